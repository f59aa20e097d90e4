// Body of the cross-entropy row pass, included by each csrc/cpu/kernels/heads_rows_<isa>.cpp, whose entry points
// (function attributes for their ISA) inline it; see simd_math.h for why everything here is always_inline.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "simd_math.h"  // first: its diagnostic settings cover the instantiations below
#include "fastmtl/heads_math.h"
#include "heads_rows.h"

namespace fastmtl {
namespace cpu_kernels {

// max_c z[c] (NaNs ignored, as the comparison is false for them).
template <typename T, int VB>
FASTMTL_KERNEL_INLINE T row_max(const T* z, int64_t C) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if constexpr (kUseVecF<T, VB>) {
    using F = VecF<VB>;
    using V = typename F::type;
    constexpr int W = F::kWidth;
    if (C >= W) {
      V acc = F::splat(m);
      for (; i + W <= C; i += W) {
        const V v = F::load(z + i);
        acc = v > acc ? v : acc;
      }
      float lanes[W];
      F::store(lanes, acc);
      for (int v = 0; v < W; ++v) m = lanes[v] > m ? lanes[v] : m;
    }
  }
  for (; i < C; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

// sum_c exp(z[c] - m), accumulated in float lanes and summed in double.
template <typename T, int VB>
FASTMTL_KERNEL_INLINE double row_sum_exp(const T* z, int64_t C, T m) {
  double s = 0.0;
  int64_t i = 0;
  if constexpr (kUseVecF<T, VB>) {
    using F = VecF<VB>;
    using V = typename F::type;
    constexpr int W = F::kWidth;
    if (C >= W) {
      const V vm = F::splat(m);
      V acc = F::splat(0.0f);
      for (; i + W <= C; i += W) acc += F::exp(F::load(z + i) - vm);
      float lanes[W];
      F::store(lanes, acc);
      for (int v = 0; v < W; ++v) s += double(lanes[v]);
    }
  }
  for (; i < C; ++i) s += double(exp_approx(z[i] - m));
  return s;
}

// z[c] = a * exp(z[c] - lse) - neg * (cw ? cw[c] : 1), in place.
template <typename T, int VB>
FASTMTL_KERNEL_INLINE void row_grad(T* z, int64_t C, T a, T lse, T neg, const T* cw) {
  int64_t i = 0;
  if constexpr (kUseVecF<T, VB>) {
    using F = VecF<VB>;
    using V = typename F::type;
    constexpr int W = F::kWidth;
    const V va = F::splat(a), vl = F::splat(lse), vn = F::splat(neg);
    if (cw) {
      for (; i + W <= C; i += W) F::store(z + i, va * F::exp(F::load(z + i) - vl) - vn * F::load(cw + i));
    } else {
      for (; i + W <= C; i += W) F::store(z + i, va * F::exp(F::load(z + i) - vl) - vn);
    }
  }
  if (cw) {
    for (; i < C; ++i) z[i] = a * exp_approx(z[i] - lse) - neg * cw[i];
  } else {
    for (; i < C; ++i) z[i] = a * exp_approx(z[i] - lse) - neg;
  }
}

template <typename T, int VB>
FASTMTL_KERNEL_INLINE void xent_rows_impl(T* L, int64_t ld, int64_t rb, int64_t re, int64_t row0,
                                          const int64_t* rowpos, const SegTask<T>* st, int64_t nt, bool write_grad,
                                          double* row_losses) {
  for (int64_t r = rb; r < re; ++r) {
    T* zr = L + r * ld;
    const int64_t gi = rowpos ? rowpos[row0 + r] : row0 + r;
    for (int64_t j = 0; j < nt; ++j) {
      const SegTask<T>& t = st[j];
      T* z = zr + t.offset;
      const int64_t C = t.C;
      const int64_t y = t.active ? t.tgt[gi] : t.ignore;
      if (!t.active || y == t.ignore) {
        row_losses[r * nt + j] = 0.0;
        if (write_grad)
          for (int64_t c = 0; c < C; ++c) z[c] = T(0);
        continue;
      }
      const T m = row_max<T, VB>(z, C);
      const double s = row_sum_exp<T, VB>(z, C, m);
      // sum_c w_c z_c (only with label smoothing)
      double swz = 0.0;
      if (t.eps != T(0)) {
        if (t.cw) {
          for (int64_t c = 0; c < C; ++c) swz += double(t.cw[c]) * double(z[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) swz += double(z[c]);
        }
      }
      const double lse = double(m) + std::log(s);
      const double w_y = t.cw ? double(t.cw[y]) : 1.0;
      const double eps = double(t.eps);
      row_losses[r * nt + j] =
          heads::xent_item_loss<double>(lse, double(z[y]), swz, w_y, double(t.sum_w), eps, double(C));
      if (write_grad) {
        const T a = T(double(t.scale) * heads::xent_softmax_coeff<double>(w_y, double(t.sum_w), eps, double(C)));
        const T neg = T(double(t.scale) * eps / double(C));
        row_grad<T, VB>(z, C, a, T(lse), neg, (t.cw && eps != 0.0) ? t.cw : nullptr);
        z[y] -= T(double(t.scale) * (1.0 - eps) * w_y);
      }
    }
  }
}

}  // namespace cpu_kernels
}  // namespace fastmtl

// Defines the entry points and the table of one ISA: FASTMTL_DEFINE_HEADS_ROW_KERNELS(name, vector bytes (0: no
// explicit vectors), function attribute).
#define FASTMTL_DEFINE_HEADS_ROW_KERNELS(isa, VB, ATTR)                                                       \
  namespace fastmtl {                                                                                         \
  namespace cpu_kernels {                                                                                     \
  namespace {                                                                                                 \
  ATTR void xent_rows_f32_##isa(float* L, int64_t ld, int64_t rb, int64_t re, int64_t row0,                   \
                                const int64_t* rowpos, const SegTask<float>* st, int64_t nt, bool write_grad, \
                                double* row_losses) {                                                         \
    xent_rows_impl<float, VB>(L, ld, rb, re, row0, rowpos, st, nt, write_grad, row_losses);                   \
  }                                                                                                           \
  ATTR void xent_rows_f64_##isa(double* L, int64_t ld, int64_t rb, int64_t re, int64_t row0,                  \
                                const int64_t* rowpos, const SegTask<double>* st, int64_t nt,                 \
                                bool write_grad, double* row_losses) {                                        \
    xent_rows_impl<double, VB>(L, ld, rb, re, row0, rowpos, st, nt, write_grad, row_losses);                  \
  }                                                                                                           \
  const HeadsRowKernels kTable_##isa{&xent_rows_f32_##isa, &xent_rows_f64_##isa};                             \
  }                                                                                                           \
  const HeadsRowKernels* heads_row_kernels_##isa() { return &kTable_##isa; }                                  \
  }                                                                                                           \
  }
