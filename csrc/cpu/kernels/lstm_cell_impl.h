// Bodies of the LSTM cell passes, included by each csrc/cpu/kernels/lstm_cell_<isa>.cpp, whose entry points
// (function attributes for their ISA) inline them; see simd_math.h for why everything here is always_inline.
// The cell formulas themselves are fastmtl/lstm_math.h, shared with the CUDA kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd_math.h"  // first: its diagnostic settings cover the instantiations below
#include "fastmtl/lstm_math.h"
#include "lstm_cell.h"

namespace fastmtl {
namespace cpu_kernels {

namespace lm = fastmtl::lstm_math;

// After a block of units is computed: h^T[j0:j1, :n] -> output rows (a small transpose in cache), and the
// padded part of the reserve block zeroed (so the reserve is fully defined).
template <typename T>
FASTMTL_KERNEL_INLINE void fwd_cols_finish(const FwdCols<T>& a, int64_t j0, int64_t j1) {
  for (int64_t b = 0; b < a.n; ++b) {
    T* o = a.out + b * a.out_ld;
    const T* hp = a.h + b;
    for (int64_t j = j0; j < j1; ++j) o[j] = hp[j * a.s_ld];
  }
  if (a.reserve && a.n < a.B) {
    for (int64_t k = 0; k < 5; ++k)
      for (int64_t j = j0; j < j1; ++j)
        std::memset(a.reserve + (k * a.H + j) * a.B + a.n, 0, (a.B - a.n) * sizeof(T));
  }
}

// Lanes [b0, b1) of unit j; the vector loop (float with VB > 0) then the scalar tail, the same formulas.
template <typename T, int VB>
FASTMTL_KERNEL_INLINE void fwd_unit(const FwdCols<T>& a, int64_t j) {
  const int64_t H = a.H, L = a.g_ld, RB = a.B, n = a.n;
  const T* gi = a.gates + j * L;
  const T* gf = gi + H * L;
  const T* gg = gi + 2 * H * L;
  const T* go = gi + 3 * H * L;
  const T bi = a.bias ? a.bias[j] : T(0), bf = a.bias ? a.bias[H + j] : T(0);
  const T bg = a.bias ? a.bias[2 * H + j] : T(0), bo = a.bias ? a.bias[3 * H + j] : T(0);
  T* hr = a.h + j * a.s_ld;
  T* cr = a.c + j * a.s_ld;
  T* ri = a.reserve ? a.reserve + j * RB : nullptr;
  int64_t b = 0;
#ifdef FASTMTL_HAVE_VECTOR_EXT
  if constexpr (VB > 0 && sizeof(T) == sizeof(float)) {
    using F = VecF<VB>;
    using V = typename F::type;
    constexpr int W = F::kWidth;
    const V vbi = F::splat(bi), vbf = F::splat(bf), vbg = F::splat(bg), vbo = F::splat(bo);
    for (; b + W <= n; b += W) {
      V i, f, g, o, c, h;
      lm::cell_forward<VecAct<VB>>(F::load(gi + b) + vbi, F::load(gf + b) + vbf, F::load(gg + b) + vbg,
                                   F::load(go + b) + vbo, F::load(cr + b), i, f, g, o, c, h);
      F::store(cr + b, c);
      F::store(hr + b, h);
      if (ri) {
        F::store(ri + b, i);
        F::store(ri + H * RB + b, f);
        F::store(ri + 2 * H * RB + b, g);
        F::store(ri + 3 * H * RB + b, o);
        F::store(ri + 4 * H * RB + b, c);
      }
    }
  }
#endif
  for (; b < n; ++b) {
    T i, f, g, o, c, h;
    lm::cell_forward<KernelAct>(gi[b] + bi, gf[b] + bf, gg[b] + bg, go[b] + bo, cr[b], i, f, g, o, c, h);
    cr[b] = c;
    hr[b] = h;
    if (ri) {
      ri[b] = i;
      ri[H * RB + b] = f;
      ri[2 * H * RB + b] = g;
      ri[3 * H * RB + b] = o;
      ri[4 * H * RB + b] = c;
    }
  }
}

template <typename T, int VB>
FASTMTL_KERNEL_INLINE void fwd_cols_impl(const FwdCols<T>& a, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) fwd_unit<T, VB>(a, j);
  fwd_cols_finish(a, j0, j1);
}

// Lanes [lo, hi) of unit j with c_prev^T row cp.
template <typename T, int VB>
FASTMTL_KERNEL_INLINE void bwd_cols_range(const BwdCols<T>& a, int64_t j, int64_t lo, int64_t hi, const T* cp) {
  const int64_t H = a.H, L = a.g_ld, RB = a.B;
  const T* ri = a.reserve + j * RB;
  const T* gout = a.gout + j * RB;
  const T* dh = a.dh + j * RB;
  T* dc = a.dc + j * RB;
  T* di = a.dgates + j * L;
  int64_t b = lo;
#ifdef FASTMTL_HAVE_VECTOR_EXT
  if constexpr (VB > 0 && sizeof(T) == sizeof(float)) {
    using F = VecF<VB>;
    using V = typename F::type;
    constexpr int W = F::kWidth;
    const V one = F::splat(1.0f);
    for (; b + W <= hi; b += W) {
      V vi, vf, vg, vo, vcp;
      lm::cell_backward<VecAct<VB>>(F::load(ri + b), F::load(ri + H * RB + b), F::load(ri + 2 * H * RB + b),
                                    F::load(ri + 3 * H * RB + b), F::load(ri + 4 * H * RB + b), F::load(cp + b),
                                    F::load(dh + b) + F::load(gout + b), F::load(dc + b), one, vi, vf, vg, vo, vcp);
      F::store(di + b, vi);
      F::store(di + H * L + b, vf);
      F::store(di + 2 * H * L + b, vg);
      F::store(di + 3 * H * L + b, vo);
      F::store(dc + b, vcp);
    }
  }
#endif
  const T one(1);
  for (; b < hi; ++b) {
    T vi, vf, vg, vo, vcp;
    lm::cell_backward<KernelAct>(ri[b], ri[H * RB + b], ri[2 * H * RB + b], ri[3 * H * RB + b], ri[4 * H * RB + b],
                                 cp[b], dh[b] + gout[b], dc[b], one, vi, vf, vg, vo, vcp);
    di[b] = vi;
    di[H * L + b] = vf;
    di[2 * H * L + b] = vg;
    di[3 * H * L + b] = vo;
    dc[b] = vcp;
  }
}

template <typename T, int VB>
FASTMTL_KERNEL_INLINE void bwd_cols_impl(const BwdCols<T>& a, int64_t j0, int64_t j1) {
  const int64_t RB = a.B;
  // two ranges: c_prev from the neighbouring step (b < split) or the initial state
  const int64_t split = a.split < a.n ? a.split : a.n;
  for (int64_t j = j0; j < j1; ++j) {
    bwd_cols_range<T, VB>(a, j, 0, split, a.cp_a + j * RB);
    bwd_cols_range<T, VB>(a, j, split, a.n, a.cp_b + j * RB);
  }
}

}  // namespace cpu_kernels
}  // namespace fastmtl

// Defines the entry points and the table of one ISA: FASTMTL_DEFINE_LSTM_CELL_KERNELS(name, vector bytes (0: no
// explicit vectors), function attribute).
#define FASTMTL_DEFINE_LSTM_CELL_KERNELS(isa, VB, ATTR)                                                   \
  namespace fastmtl {                                                                                     \
  namespace cpu_kernels {                                                                                 \
  namespace {                                                                                             \
  ATTR void lstm_fwd_f32_##isa(const FwdCols<float>& a, int64_t j0, int64_t j1) {                         \
    fwd_cols_impl<float, VB>(a, j0, j1);                                                                  \
  }                                                                                                       \
  ATTR void lstm_fwd_f64_##isa(const FwdCols<double>& a, int64_t j0, int64_t j1) {                        \
    fwd_cols_impl<double, VB>(a, j0, j1);                                                                 \
  }                                                                                                       \
  ATTR void lstm_bwd_f32_##isa(const BwdCols<float>& a, int64_t j0, int64_t j1) {                         \
    bwd_cols_impl<float, VB>(a, j0, j1);                                                                  \
  }                                                                                                       \
  ATTR void lstm_bwd_f64_##isa(const BwdCols<double>& a, int64_t j0, int64_t j1) {                        \
    bwd_cols_impl<double, VB>(a, j0, j1);                                                                 \
  }                                                                                                       \
  const LstmCellKernels kTable_##isa{&lstm_fwd_f32_##isa, &lstm_fwd_f64_##isa, &lstm_bwd_f32_##isa,        \
                                     &lstm_bwd_f64_##isa};                                                 \
  }                                                                                                       \
  const LstmCellKernels* lstm_cell_kernels_##isa() { return &kTable_##isa; }                              \
  }                                                                                                       \
  }
