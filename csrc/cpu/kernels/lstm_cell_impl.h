// Bodies of the LSTM recurrent-step kernels, included by each csrc/cpu/kernels/lstm_cell_<isa>.cpp, whose entry
// points (function attributes for their ISA) inline them; see simd_math.h for why everything here is
// always_inline. The cell formulas themselves are fastmtl/lstm_math.h, shared with the CUDA kernels.
//
// The micro-kernel: a register tile of M rows (sequences) x 4 vectors of W lanes, accumulated over K with one
// broadcast of the row's operand and four FMAs against a packed panel row of 4W values (a GEMM micro-kernel in the
// BLIS / oneDNN brgemm style, the panel streamed from cache, the row operands from L1), then an epilogue on the tile.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "simd_math.h"  // first: its diagnostic settings cover the instantiations below
#include "fastmtl/lstm_math.h"
#include "lstm_cell.h"

namespace fastmtl {
namespace cpu_kernels {

namespace lm = fastmtl::lstm_math;

// The lanes of one ISA for element type T: float vectors of VB bytes, or one scalar (double, or no vector
// extensions).
template <typename T, int VB, bool kVec>
struct Lanes {
  typedef T type;
  static constexpr int W = 1;
  typedef KernelAct Act;
  static FASTMTL_KERNEL_INLINE T load(const T* p) { return *p; }
  static FASTMTL_KERNEL_INLINE void store(T* p, const T& v) { *p = v; }
  static FASTMTL_KERNEL_INLINE T splat(T x) { return x; }
  static FASTMTL_KERNEL_INLINE T bcast(const T* p, int64_t k) { return p[k]; }
  static FASTMTL_KERNEL_INLINE T load_n(const T* p, int) { return *p; }
  static FASTMTL_KERNEL_INLINE void store_n(T* p, const T& v, int) { *p = v; }
  static FASTMTL_KERNEL_INLINE T zero_first(const T& v, int skip) { return skip > 0 ? T(0) : v; }
};

#ifdef FASTMTL_HAVE_VECTOR_EXT
template <int VB>
struct Lanes<float, VB, true> {
  using F = VecF<VB>;
  typedef typename F::type type;
  static constexpr int W = F::kWidth;
  typedef VecAct<VB> Act;
  static FASTMTL_KERNEL_INLINE type load(const float* p) { return F::load(p); }
  static FASTMTL_KERNEL_INLINE void store(float* p, const type& v) { F::store(p, v); }
  static FASTMTL_KERNEL_INLINE type splat(float x) { return F::splat(x); }
  // p[k] in every lane, as one broadcast load. Written as such for GCC on x86's AVX/AVX-512 vectors: it expands the
  // duplicate of a loaded float into 16 masked lane inserts (a vector constructor), and F::splat's 0 + x (not an
  // identity for x = -0.0) into an add and a register broadcast. (The operand is read-only during a kernel call, so
  // the asm needs no memory operand, which would keep the accumulators in memory. Clang emits the broadcast load
  // itself, and rejects the constraint outside a function targeting the ISA.)
  static FASTMTL_KERNEL_INLINE type bcast(const float* p, int64_t k) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    if constexpr (VB == 64 || VB == 32) {
      type v;
      asm("vbroadcastss (%1,%2,4), %0" : "=v"(v) : "r"(p), "r"(k));
      return v;
    }
#endif
    return F::splat(p[k]);
  }
  // The first cnt lanes (0 < cnt <= W) from / to memory; the others zero.
  static FASTMTL_KERNEL_INLINE type load_n(const float* p, int cnt) {
    if (cnt == W) return F::load(p);
    type v = F::splat(0.f);
    std::memcpy(&v, p, sizeof(float) * cnt);
    return v;
  }
  static FASTMTL_KERNEL_INLINE void store_n(float* p, const type& v, int cnt) {
    if (cnt == W) F::store(p, v);
    else std::memcpy(p, &v, sizeof(float) * cnt);
  }
  // v with its first `skip` lanes zeroed (bitwise, so no inf or NaN there leaks into a product).
  static FASTMTL_KERNEL_INLINE type zero_first(const type& v, int skip) {
    typename F::itype keep;
    for (int u = 0; u < W; ++u) keep[u] = u < skip ? 0 : -1;
    return (type)((typename F::itype)v & keep);
  }
};
#endif
template <typename T, int VB>
using LanesOf = Lanes<T, VB, kUseVecF<T, VB>>;

// acc[m][v] = sum_k a[m][k] * panel[k*4W + v*W .. +W]
template <typename L, int M, typename T>
FASTMTL_KERNEL_INLINE void tile_gemm(const T* const* a, int64_t K, const T* panel, typename L::type (&acc)[M][4]) {
  using V = typename L::type;
  constexpr int W = L::W;
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < 4; ++v) acc[m][v] = L::splat(T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T* p = panel + k * 4 * W;
    const V w0 = L::load(p), w1 = L::load(p + W), w2 = L::load(p + 2 * W), w3 = L::load(p + 3 * W);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const V x = L::bcast(a[m], k);
      acc[m][0] += x * w0;
      acc[m][1] += x * w1;
      acc[m][2] += x * w2;
      acc[m][3] += x * w3;
    }
  }
}

// The forward epilogue of row b and units [j, j + cnt): the gate pre-activations acc (the recurrent product of
// the W units) plus gx_t and the bias, then the cell, writing c_t, h_t and (for backward) the activated gates.
template <typename L, typename T>
FASTMTL_KERNEL_INLINE void fwd_epilogue(const FwdStep<T>& a, int64_t j, int cnt, int64_t b,
                                        const typename L::type (&acc)[4]) {
  using V = typename L::type;
  using Act = typename L::Act;
  const int64_t H = a.H;
  V bi = L::splat(T(0)), bf = bi, bg = bi, bo = bi;
  if (a.bias) {
    bi = L::load_n(a.bias + j, cnt);
    bf = L::load_n(a.bias + H + j, cnt);
    bg = L::load_n(a.bias + 2 * H + j, cnt);
    bo = L::load_n(a.bias + 3 * H + j, cnt);
  }
  const T* gx = a.gx + b * a.gx_ld + j;
  T* c = a.c + b * H + j;
  V i, f, g, o, cn, h;
  lm::cell_forward<Act>(acc[0] + L::load_n(gx, cnt) + bi, acc[1] + L::load_n(gx + H, cnt) + bf,
                        acc[2] + L::load_n(gx + 2 * H, cnt) + bg, acc[3] + L::load_n(gx + 3 * H, cnt) + bo,
                        L::load_n(c, cnt), i, f, g, o, cn, h);
  L::store_n(c, cn, cnt);
  L::store_n(a.out + b * a.out_ld + j, h, cnt);
  if (a.reserve) {
    T* r = a.reserve + b * 5 * H + j;
    L::store_n(r, i, cnt);
    L::store_n(r + H, f, cnt);
    L::store_n(r + 2 * H, g, cnt);
    L::store_n(r + 3 * H, o, cnt);
    L::store_n(r + 4 * H, cn, cnt);
  }
}

// h_{t-1} of row b.
template <typename T>
FASTMTL_KERNEL_INLINE const T* fwd_prev_row(const FwdStep<T>& a, int64_t b) {
  return b < a.split ? a.hp_a + b * a.hp_a_ld : a.hp_b + b * a.hp_b_ld;
}

// Forward: rows [b0, b0 + M) of unit block p.
template <typename L, int M, typename T>
FASTMTL_KERNEL_INLINE void fwd_tile(const FwdStep<T>& a, int64_t p, int64_t b0) {
  using V = typename L::type;
  constexpr int W = L::W;
  const int64_t H = a.H, j = p * W;
  const int cnt = H - j < W ? int(H - j) : W;
  const T* rows[M];
  for (int m = 0; m < M; ++m) rows[m] = fwd_prev_row(a, b0 + m);
  V acc[M][4];
  tile_gemm<L, M>(rows, H, a.wp + p * H * 4 * W, acc);
  for (int m = 0; m < M; ++m) fwd_epilogue<L>(a, j, cnt, b0 + m, acc[m]);
}

template <typename L, int MR, typename T>
FASTMTL_KERNEL_INLINE void fwd_rows_rest(const FwdStep<T>& a, int64_t p, int64_t b0, int64_t rest) {
  if constexpr (MR > 1) {
    if (rest == MR - 1) return fwd_tile<L, MR - 1>(a, p, b0);
    return fwd_rows_rest<L, MR - 1>(a, p, b0, rest);
  }
}

template <typename T, int VB, int MR>
FASTMTL_KERNEL_INLINE void fwd_step_impl(const FwdStep<T>& a, int64_t p0, int64_t p1) {
  using L = LanesOf<T, VB>;
  for (int64_t p = p0; p < p1; ++p) {
    int64_t b0 = 0;
    for (; b0 + MR <= a.n; b0 += MR) fwd_tile<L, MR>(a, p, b0);
    if (b0 < a.n) fwd_rows_rest<L, MR>(a, p, b0, a.n - b0);
  }
}

// Forward for few rows, straight from W_hh's own layout (4H x H row-major; FwdStep::wp points at it, nothing is
// packed): the weights are read once per row and step, as the tile kernel reads its panels, but without the pack per
// call, which at B = 1 costs as much as several steps. Per unit block p (units j .. j + W - 1) and gate k, the W
// weight rows of those units are dotted with h_{t-1} (rows_dot), a pairwise reduction turns the W per-row sums
// into one vector whose lane u is unit j + u's pre-activation, and the epilogue is the tile kernel's.
#ifdef FASTMTL_HAVE_VECTOR_EXT
template <typename V, std::size_t... I>
FASTMTL_KERNEL_INLINE V pair_sums(const V& x, const V& y, std::index_sequence<I...>) {
  // lanes 0 .. W/2-1: x's neighbouring lanes summed; lanes W/2 .. W-1: y's
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(x, y, int(2 * I)...) + __builtin_shufflevector(x, y, int(2 * I + 1)...);
#else  // GCC before 12 has no __builtin_shufflevector (V is a float vector: int32 lane indices)
  typedef int32_t M __attribute__((vector_size(sizeof(V))));
  return __builtin_shuffle(x, y, M{int(2 * I)...}) + __builtin_shuffle(x, y, M{int(2 * I + 1)...});
#endif
}
#endif

// One level of row_sums: acc[0 .. S/2) from the pairs of acc[0 .. S), then the next level (unrolled at compile
// time, so acc stays in registers).
template <typename L, int S>
FASTMTL_KERNEL_INLINE void row_sums_level(typename L::type (&acc)[L::W]) {
#ifdef FASTMTL_HAVE_VECTOR_EXT
  if constexpr (S > 1) {
#pragma GCC unroll 16
    for (int i = 0; i < S / 2; ++i)
      acc[i] = pair_sums(acc[2 * i], acc[2 * i + 1], std::make_index_sequence<L::W>());
    row_sums_level<L, S / 2>(acc);
  }
#endif
}

// acc[u] (W lanes each) -> one vector whose lane u is the sum of acc[u]'s lanes (acc is overwritten).
template <typename L>
FASTMTL_KERNEL_INLINE typename L::type row_sums(typename L::type (&acc)[L::W]) {
  row_sums_level<L, L::W>(acc);
  return acc[0];
}

// Lane u: the dot product of row u of w (rows of ld H; u < cnt, the other lanes 0) with h (H values). Each row is
// read start to end (one sequential stream over the block's rows, which the prefetchers follow at full speed; a
// column walk over W rows at once ran 20-40 % slower), with four partial sums for independent FMA chains.
template <typename L, typename T>
FASTMTL_KERNEL_INLINE typename L::type rows_dot(const T* w, int64_t H, const T* h, int cnt) {
  using V = typename L::type;
  constexpr int W = L::W;
  V acc[W];
  for (int u = 0; u < W; ++u) {
    V s0 = L::splat(T(0)), s1 = s0, s2 = s0, s3 = s0;
    if (u < cnt) {
      const T* r = w + u * H;
      int64_t k = 0;
      for (; k + 4 * W <= H; k += 4 * W) {
        s0 += L::load(r + k) * L::load(h + k);
        s1 += L::load(r + k + W) * L::load(h + k + W);
        s2 += L::load(r + k + 2 * W) * L::load(h + k + 2 * W);
        s3 += L::load(r + k + 3 * W) * L::load(h + k + 3 * W);
      }
      for (; k + W <= H; k += W) s0 += L::load(r + k) * L::load(h + k);
      if (k < H) s1 += L::load_n(r + k, int(H - k)) * L::load_n(h + k, int(H - k));
    }
    acc[u] = (s0 + s1) + (s2 + s3);
  }
  return row_sums<L>(acc);
}

template <typename T, int VB>
FASTMTL_KERNEL_INLINE void fwd_gemv_impl(const FwdStep<T>& a, int64_t p0, int64_t p1) {
  using L = LanesOf<T, VB>;
  using V = typename L::type;
  constexpr int W = L::W;
  const int64_t H = a.H;
  for (int64_t b = 0; b < a.n; ++b) {
    const T* h = fwd_prev_row(a, b);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j = p * W;
      const int cnt = H - j < W ? int(H - j) : W;
      V acc[4];
      for (int k = 0; k < 4; ++k) {
        const T* w = a.wp + (k * H + j) * H;
        acc[k] = rows_dot<L>(w, H, h, cnt);
      }
      fwd_epilogue<L>(a, j, cnt, b, acc);
    }
  }
}

// DotRows: W weight rows (in L1 for every input row) are dotted with two input rows at a time (four with 32 vector
// registers), four weight rows per pass, so each load of a weight chunk serves several rows and each load of an
// input chunk four weight rows; the per-row sums are then reduced pairwise into one vector of W columns
// (row_sums), as in the one-sequence step kernel (whose rows_dot keeps one row per pass with four partial sums:
// sharing each load of h over four rows measured slower there, where the stream of W_hh is the limit).
template <typename L, int NX, typename T>
FASTMTL_KERNEL_INLINE void proj_dot(const T* w, int64_t I, const T* const (&x)[NX], int cnt,
                                    typename L::type (&out)[NX]) {
  using V = typename L::type;
  constexpr int W = L::W;
  constexpr int R = W >= 4 ? 4 : W;
  V acc[NX][W];
  for (int u0 = 0; u0 < W; u0 += R) {
    V s[R][NX];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NX; ++i) s[r][i] = L::splat(T(0));
    const int rows = cnt - u0 >= R ? R : (cnt - u0 > 0 ? cnt - u0 : 0);
    if (rows > 0) {
      const T* w0 = w + u0 * I;
      int64_t k = 0;
      if (rows == R) {  // (the common case: no per-row condition in the loop)
        for (; k + W <= I; k += W) {
          V xv[NX];
#pragma GCC unroll 4
          for (int i = 0; i < NX; ++i) xv[i] = L::load(x[i] + k);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const V wv = L::load(w0 + r * I + k);
#pragma GCC unroll 4
            for (int i = 0; i < NX; ++i) s[r][i] += wv * xv[i];
          }
        }
      } else {
        for (; k + W <= I; k += W) {
          V xv[NX];
          for (int i = 0; i < NX; ++i) xv[i] = L::load(x[i] + k);
          for (int r = 0; r < rows; ++r) {
            const V wv = L::load(w0 + r * I + k);
            for (int i = 0; i < NX; ++i) s[r][i] += wv * xv[i];
          }
        }
      }
      if (k < I) {
        const int rest = int(I - k);
        V xv[NX];
        if constexpr (W > 1) {
          if (I >= W) {
            // The last W values of each row (overlapping the previous chunk; in bounds, unlike a partial load,
            // which would cost a copy per row), against x's last W values, the overlap masked to zero in both.
            const int64_t kt = I - W;
            for (int i = 0; i < NX; ++i) xv[i] = L::zero_first(L::load(x[i] + kt), W - rest);
            for (int r = 0; r < rows; ++r) {  // (the weights masked too: an inf there must not meet a 0)
              const V wv = L::zero_first(L::load(w0 + r * I + kt), W - rest);
              for (int i = 0; i < NX; ++i) s[r][i] += wv * xv[i];
            }
            k = I;
          }
        }
        if (k < I) {
          for (int i = 0; i < NX; ++i) xv[i] = L::load_n(x[i] + k, rest);
          for (int r = 0; r < rows; ++r) {
            const V wv = L::load_n(w0 + r * I + k, rest);
            for (int i = 0; i < NX; ++i) s[r][i] += wv * xv[i];
          }
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NX; ++i) acc[i][u0 + r] = s[r][i];
  }
  for (int i = 0; i < NX; ++i) out[i] = row_sums<L>(acc[i]);
}

template <typename T, int VB>
FASTMTL_KERNEL_INLINE void dot_rows_impl(const DotRows<T>& a, int64_t c0, int64_t c1) {
  using L = LanesOf<T, VB>;
  using V = typename L::type;
  constexpr int W = L::W;
  const int64_t I = a.I;
  for (int64_t j = c0; j < c1; j += W) {
    const int cnt = c1 - j < W ? int(c1 - j) : W;
    const T* w = a.w + j * I;
    const V b = a.bias ? L::load_n(a.bias + j, cnt) : L::splat(T(0));
    int64_t r = 0;
    if constexpr (VB >= 64) {  // 32 vector registers: four input rows per weight load
      for (; r + 4 <= a.n; r += 4) {
        const T* const x[4] = {a.x + r * a.x_ld, a.x + (r + 1) * a.x_ld, a.x + (r + 2) * a.x_ld,
                               a.x + (r + 3) * a.x_ld};
        V o[4];
        proj_dot<L, 4>(w, I, x, cnt, o);
        for (int i = 0; i < 4; ++i) L::store_n(a.out + (r + i) * a.out_ld + j, o[i] + b, cnt);
      }
    }
    for (; r + 2 <= a.n; r += 2) {
      const T* const x[2] = {a.x + r * a.x_ld, a.x + (r + 1) * a.x_ld};
      V o[2];
      proj_dot<L, 2>(w, I, x, cnt, o);
      L::store_n(a.out + r * a.out_ld + j, o[0] + b, cnt);
      L::store_n(a.out + (r + 1) * a.out_ld + j, o[1] + b, cnt);
    }
    if (r < a.n) {
      const T* const x[1] = {a.x + r * a.x_ld};
      V o[1];
      proj_dot<L, 1>(w, I, x, cnt, o);
      L::store_n(a.out + r * a.out_ld + j, o[0] + b, cnt);
    }
  }
}

// Backward: rows [b0, b0 + M) of unit block q (4W units); rows below np take dh from the recurrent product,
// the others (carry) from a.carry. The saved forward values of gradient row b are those of forward row b / rep.
template <typename L, int M, bool kCarry, typename T>
FASTMTL_KERNEL_INLINE void bwd_tile(const BwdStep<T>& a, int64_t q, int64_t b0) {
  using V = typename L::type;
  using Act = typename L::Act;
  constexpr int W = L::W;
  const int64_t H = a.H, j0 = q * 4 * W;
  V acc[M][4];
  if constexpr (kCarry) {
    for (int m = 0; m < M; ++m)
      for (int v = 0; v < 4; ++v) acc[m][v] = L::splat(T(0));
  } else {
    const T* rows[M];
    for (int m = 0; m < M; ++m) rows[m] = a.dgn + (b0 + m) * a.dgn_ld;
    tile_gemm<L, M>(rows, 4 * H, a.wp + q * 4 * H * 4 * W, acc);
  }
  const V one = L::splat(T(1));
  for (int m = 0; m < M; ++m) {
    const int64_t b = b0 + m;
    const int64_t fb = a.rep == 1 ? b : b / a.rep;  // the forward row of gradient row b
    const T* r = a.reserve + fb * 5 * H;
    const T* cp = fb < a.split ? a.cp_a + fb * a.cp_a_ld : a.cp_b + fb * H;
    const T* go = a.gout + b * a.gout_ld;
    T* dc = a.dc + b * H;
    T* dg = a.dg + b * a.dg_ld;
    for (int v = 0; v < 4; ++v) {
      const int64_t j = j0 + v * W;
      if (j >= H) break;
      const int cnt = H - j < W ? int(H - j) : W;
      V dh = acc[m][v] + L::load_n(go + j, cnt);
      if constexpr (kCarry) dh += L::load_n(a.carry + b * H + j, cnt);
      V di, df, dgg, dgo, dcp;
      lm::cell_backward<Act>(L::load_n(r + j, cnt), L::load_n(r + H + j, cnt), L::load_n(r + 2 * H + j, cnt),
                             L::load_n(r + 3 * H + j, cnt), L::load_n(r + 4 * H + j, cnt), L::load_n(cp + j, cnt),
                             dh, L::load_n(dc + j, cnt), one, di, df, dgg, dgo, dcp);
      L::store_n(dg + j, di, cnt);
      L::store_n(dg + H + j, df, cnt);
      L::store_n(dg + 2 * H + j, dgg, cnt);
      L::store_n(dg + 3 * H + j, dgo, cnt);
      L::store_n(dc + j, dcp, cnt);
    }
  }
}

template <typename L, int MR, bool kCarry, typename T>
FASTMTL_KERNEL_INLINE void bwd_rows_rest(const BwdStep<T>& a, int64_t q, int64_t b0, int64_t rest) {
  if constexpr (MR > 1) {
    if (rest == MR - 1) return bwd_tile<L, MR - 1, kCarry>(a, q, b0);
    return bwd_rows_rest<L, MR - 1, kCarry>(a, q, b0, rest);
  }
}

template <typename L, int MR, bool kCarry, typename T>
FASTMTL_KERNEL_INLINE void bwd_rows(const BwdStep<T>& a, int64_t q, int64_t lo, int64_t hi) {
  int64_t b0 = lo;
  for (; b0 + MR <= hi; b0 += MR) bwd_tile<L, MR, kCarry>(a, q, b0);
  if (b0 < hi) bwd_rows_rest<L, MR, kCarry>(a, q, b0, hi - b0);
}

template <typename T, int VB, int MR>
FASTMTL_KERNEL_INLINE void bwd_step_impl(const BwdStep<T>& a, int64_t q0, int64_t q1) {
  using L = LanesOf<T, VB>;
  const int64_t np = a.np < a.n ? a.np : a.n;
  for (int64_t q = q0; q < q1; ++q) {
    bwd_rows<L, MR, false>(a, q, 0, np);
    bwd_rows<L, MR, true>(a, q, np, a.n);
  }
}

}  // namespace cpu_kernels
}  // namespace fastmtl

// Defines the entry points and the table of one ISA: FASTMTL_DEFINE_LSTM_CELL_KERNELS(name, vector bytes (0: no
// explicit vectors), rows per float register tile, function attribute).
#define FASTMTL_DEFINE_LSTM_CELL_KERNELS(isa, VB, MR, ATTR)                                               \
  namespace fastmtl {                                                                                     \
  namespace cpu_kernels {                                                                                 \
  namespace {                                                                                             \
  ATTR void lstm_fwd_f32_##isa(const FwdStep<float>& a, int64_t p0, int64_t p1) {                        \
    fwd_step_impl<float, VB, MR>(a, p0, p1);                                                              \
  }                                                                                                       \
  ATTR void lstm_fwd_f64_##isa(const FwdStep<double>& a, int64_t p0, int64_t p1) {                       \
    fwd_step_impl<double, VB, 4>(a, p0, p1);                                                              \
  }                                                                                                       \
  ATTR void lstm_fwd_gemv_f32_##isa(const FwdStep<float>& a, int64_t p0, int64_t p1) {                   \
    fwd_gemv_impl<float, VB>(a, p0, p1);                                                                  \
  }                                                                                                       \
  ATTR void lstm_fwd_gemv_f64_##isa(const FwdStep<double>& a, int64_t p0, int64_t p1) {                  \
    fwd_gemv_impl<double, VB>(a, p0, p1);                                                                 \
  }                                                                                                       \
  ATTR void lstm_dot_rows_f32_##isa(const DotRows<float>& a, int64_t c0, int64_t c1) {                  \
    dot_rows_impl<float, VB>(a, c0, c1);                                                                  \
  }                                                                                                       \
  ATTR void lstm_bwd_f32_##isa(const BwdStep<float>& a, int64_t q0, int64_t q1) {                         \
    bwd_step_impl<float, VB, MR>(a, q0, q1);                                                              \
  }                                                                                                       \
  ATTR void lstm_bwd_f64_##isa(const BwdStep<double>& a, int64_t q0, int64_t q1) {                        \
    bwd_step_impl<double, VB, 4>(a, q0, q1);                                                              \
  }                                                                                                       \
  const LstmCellKernels kTable_##isa{LanesOf<float, VB>::W, LanesOf<double, VB>::W, &lstm_fwd_f32_##isa,   \
                                     &lstm_fwd_f64_##isa, &lstm_fwd_gemv_f32_##isa, &lstm_fwd_gemv_f64_##isa,    \
                                     &lstm_dot_rows_f32_##isa, &lstm_bwd_f32_##isa, &lstm_bwd_f64_##isa};                            \
  }                                                                                                       \
  const LstmCellKernels* lstm_cell_kernels_##isa() { return &kTable_##isa; }                              \
  }                                                                                                       \
  }
