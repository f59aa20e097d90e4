// Body of the float32 GEMM (gemm.h), included by each csrc/cpu/kernels/gemm_<isa>.cpp, whose entry point (function
// attribute for its ISA) inlines everything here; see simd_math.h for why it is all always_inline.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd_math.h"  // first: its diagnostic settings cover the instantiations below
#include "gemm.h"

namespace fastmtl {
namespace cpu_kernels {

// The float lanes of one ISA: vectors of VB bytes (VB > 0 and vector extensions), else one float.
template <int VB, bool kVec>
struct GemmLanes {
  typedef float type;
  static constexpr int W = 1;
  static FASTMTL_KERNEL_INLINE type load(const float* p) { return *p; }
  static FASTMTL_KERNEL_INLINE void store(float* p, const type& v) { *p = v; }
  static FASTMTL_KERNEL_INLINE type zero() { return 0.f; }
  template <int kOff>
  static FASTMTL_KERNEL_INLINE type bcast(const float* p) { return p[kOff]; }
};

#ifdef FASTMTL_HAVE_VECTOR_EXT
template <int VB>
struct GemmLanes<VB, true> {
  using F = VecF<VB>;
  typedef typename F::type type;
  static constexpr int W = F::kWidth;
  static FASTMTL_KERNEL_INLINE type load(const float* p) { return F::load(p); }
  static FASTMTL_KERNEL_INLINE void store(float* p, const type& v) { F::store(p, v); }
  static FASTMTL_KERNEL_INLINE type zero() { return F::splat(0.f); }
  // p[kOff] in every lane as one broadcast load with a constant displacement (GCC on x86 otherwise builds the
  // splat of a loaded float from lane inserts; see Lanes::bcast in lstm_cell_impl.h). Unlike the LSTM step
  // kernels' operands, the packed A panel is rewritten within one call (per block of k and of rows, at the same
  // address), so the asm names the float it reads as a memory input: it is ordered after the packing and never
  // merged with a load of the previous contents.
  template <int kOff>
  static FASTMTL_KERNEL_INLINE type bcast(const float* p) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    if constexpr (VB == 64 || VB == 32) {
      type v;
      asm("vbroadcastss %c2(%1), %0" : "=v"(v) : "r"(p), "i"(kOff * 4), "m"(p[kOff]));
      return v;
    }
#endif
    return F::splat(p[kOff]);
  }
};
template <int VB>
using GemmLanesOf = GemmLanes<VB, (VB > 0)>;
#else
template <int VB>
using GemmLanesOf = GemmLanes<VB, false>;
#endif

// The register tile: C (MR x NR at c, ldc) = [C +] sum_p ap[p*MR + r] * bp[p*NR + j] over p < kc, with ap an MR-row
// panel and bp an NR-column panel (NR = NV * W).
template <typename L, int MR, int NV, int R>
FASTMTL_KERNEL_INLINE void tile_rows_fma(typename L::type (&acc)[MR][NV], const typename L::type (&b)[NV],
                                         const float* ap) {
  if constexpr (R < MR) {
    const typename L::type x = L::template bcast<R>(ap);
    for (int v = 0; v < NV; ++v) acc[R][v] += x * b[v];
    tile_rows_fma<L, MR, NV, R + 1>(acc, b, ap);
  }
}

template <typename L, int MR, int NV>
FASTMTL_KERNEL_INLINE void gemm_tile(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc,
                                     bool acc_c) {
  using V = typename L::type;
  constexpr int W = L::W, NR = NV * W;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = L::zero();
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = L::load(bp + v * W);
    tile_rows_fma<L, MR, NV, 0>(acc, b, ap);
    ap += MR;
    bp += NR;
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      float* q = c + m * ldc + v * W;
      V r = acc[m][v];
      if (acc_c) r += L::load(q);
      L::store(q, r);
    }
}

// Packs a block of one operand into panels of W lanes (A: W = MR rows; B: W = NR columns), the lanes of a depth
// step contiguous: dst[(lp*kc + p)*W + l] = X[lane0 + lp*W + l, p0 + p], zero past `lanes`. X(lane, depth) is
// src[lane*ld + depth] when lane_major (A stored m x k, B stored n x k: a transpose in blocks of 16 depth steps)
// and src[depth*ld + lane] otherwise (A stored k x m, B stored k x n: rows copied as they are).
template <int W>
FASTMTL_KERNEL_INLINE void gemm_pack_panels(const float* src, int64_t ld, bool lane_major, int64_t lane0,
                                            int64_t lanes, int64_t p0, int64_t kc, float* dst) {
  for (int64_t lp = 0; lp * W < lanes; ++lp) {
    const int64_t l0 = lane0 + lp * W;
    const int cnt = lanes - lp * W < W ? int(lanes - lp * W) : W;
    float* d = dst + lp * kc * W;
    if (!lane_major) {
      const float* s = src + p0 * ld + l0;
      if (cnt == W) {
        for (int64_t p = 0; p < kc; ++p) std::memcpy(d + p * W, s + p * ld, sizeof(float) * W);
      } else {
        for (int64_t p = 0; p < kc; ++p) {
          for (int l = 0; l < cnt; ++l) d[p * W + l] = s[p * ld + l];
          for (int l = cnt; l < W; ++l) d[p * W + l] = 0.f;
        }
      }
      continue;
    }
    const float* s0 = src + l0 * ld + p0;
    constexpr int64_t PB = 16;
    for (int64_t pb = 0; cnt == W && pb + PB <= kc; pb += PB) {
      // a whole block: W lanes of PB values read into a local block, written transposed
      float blk[W][PB];
      for (int l = 0; l < W; ++l) std::memcpy(blk[l], s0 + l * ld + pb, sizeof(float) * PB);
      for (int64_t p = 0; p < PB; ++p)
        for (int l = 0; l < W; ++l) d[(pb + p) * W + l] = blk[l][p];
    }
    for (int64_t pb = cnt == W ? kc / PB * PB : 0; pb < kc; pb += PB) {
      const int64_t pe = pb + PB < kc ? pb + PB : kc;
      for (int l = 0; l < W; ++l) {
        if (l < cnt) {
          const float* s = s0 + l * ld;
          for (int64_t p = pb; p < pe; ++p) d[p * W + l] = s[p];
        } else {
          for (int64_t p = pb; p < pe; ++p) d[p * W + l] = 0.f;
        }
      }
    }
  }
}

template <int VB, int MR, int NV>
FASTMTL_KERNEL_INLINE void gemm_f32_impl(const GemmF32& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                         float* ws) {
  using L = GemmLanesOf<VB>;
  const int64_t MC = g.mc, KC = g.kc, NC = g.nc;
  constexpr int NR = NV * L::W;
  float* apack = ws;
  float* bpack = ws + (MC + MR - 1) / MR * MR * KC;  // the layout of gemm_workspace_floats
  alignas(64) float edge[MR * NR];
  for (int64_t jc = n0; jc < n1; jc += NC) {
    const int64_t nc = n1 - jc < NC ? n1 - jc : NC;
    for (int64_t pc = 0; pc < g.k; pc += KC) {
      const int64_t kc = g.k - pc < KC ? g.k - pc : KC;
      const bool acc_c = pc > 0 || g.beta != 0.f;
      gemm_pack_panels<NR>(g.b, g.ldb, g.trans_b, jc, nc, pc, kc, bpack);
      for (int64_t ic = m0; ic < m1; ic += MC) {
        const int64_t mc = m1 - ic < MC ? m1 - ic : MC;
        gemm_pack_panels<MR>(g.a, g.lda, !g.trans_a, ic, mc, pc, kc, apack);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int64_t nr = nc - jr < NR ? nc - jr : NR;
          const float* bp = bpack + jr * kc;
          for (int64_t ir = 0; ir < mc; ir += MR) {
            const int64_t mr = mc - ir < MR ? mc - ir : MR;
            const float* ap = apack + ir * kc;
            float* c = g.c + (ic + ir) * g.ldc + jc + jr;
            if (mr == MR && nr == NR) {
              gemm_tile<L, MR, NV>(kc, ap, bp, c, g.ldc, acc_c);
            } else {
              gemm_tile<L, MR, NV>(kc, ap, bp, edge, NR, false);
              for (int64_t r = 0; r < mr; ++r)
                for (int64_t j = 0; j < nr; ++j) c[r * g.ldc + j] = (acc_c ? c[r * g.ldc + j] : 0.f) + edge[r * NR + j];
            }
          }
        }
      }
    }
  }
}

}  // namespace cpu_kernels
}  // namespace fastmtl

// Defines the entry point and the table of one ISA: FASTMTL_DEFINE_GEMM_KERNELS(name, vector bytes (0: no explicit
// vectors), MR rows, NV vectors of columns per register tile, MC, KC, NC (in elements; MC a multiple of MR, NC of
// NR = NV * lanes), beats torch's BLAS (measured), function attribute).
#define FASTMTL_DEFINE_GEMM_KERNELS(isa, VB, MR, NV, MC, KC, NC, BEATS, ATTR)                               \
  namespace fastmtl {                                                                                       \
  namespace cpu_kernels {                                                                                   \
  namespace {                                                                                               \
  static_assert((MC) % (MR) == 0 && (NC) % ((NV) * GemmLanesOf<VB>::W) == 0, "blocking: whole panels");    \
  ATTR void gemm_f32_##isa(const GemmF32& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* ws) {   \
    gemm_f32_impl<VB, MR, NV>(g, m0, m1, n0, n1, ws);                                                \
  }                                                                                                         \
  const GemmKernels kGemm_##isa{MR, (NV) * GemmLanesOf<VB>::W, MC, KC, NC, BEATS, &gemm_f32_##isa};          \
  }                                                                                                         \
  const GemmKernels* gemm_kernels_##isa() { return &kGemm_##isa; }                                          \
  }                                                                                                         \
  }
