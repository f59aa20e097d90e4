// Fused CPU LSTM layer (both directions), forward and backward. Schema and layout: csrc/fastmtl.cpp.
//
// Forward, per layer:
//   * the input projection of every (active) time step of both directions is ONE GEMM:
//       gx (N, D*4H) = X_packed (N, I) @ [W_ih_fwd; W_ih_rev]^T + (b_ih + b_hh)
//     X_packed holds, for t = 0..T-1, the rows x[t, :n_t] (n_t = number of sequences with length > t, a prefix of
//     the batch because the caller sorts by length). With equal lengths X_packed is the input itself (no copy).
//   * per step and direction one recurrent GEMM on the n_t active rows, accumulated in place into gx
//     (beta = 1, so no separate gate buffer), then one fused vectorised pass over the rows (at::parallel_for,
//     at::vec::Vectorized when the CPU has AVX2+FMA) computing the activations and the new (c, h).
//     The running (h, c) live in hy/cy themselves: a row that stops keeps its state at its last real token, and
//     the reverse direction starts a row at its last real token simply because the row only becomes active then.
// Backward: the same walk in the other order; per step one fused pass producing the pre-activation gradients
//   (packed (N, D*4H)) and dc_prev, and one GEMM dh_prev = dG_t @ W_hh on the active rows; then the weight
//   gradients as large GEMMs over all steps: dW_ih = dG^T X_packed, dW_hh = dG^T H_prev_packed, db = sum dG,
//   grad_input = dG W_ih (one GEMM, scattered back to the padded layout).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastmtl/checks.h"
#include "fastmtl/lstm_math.h"

namespace fastmtl {
namespace {

namespace lm = fastmtl::lstm_math;

// ---------------------------------------------------------------------------------------------------------
// Row kernels
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct FwdRows {
  const T* gates;    // row b: gates + b * gates_ld, 4H pre-activations (i, f, g, o)
  int64_t gates_ld;
  T* h;              // (rows, H) running hidden state, updated in place
  T* c;              // (rows, H) running cell state, updated in place
  T* out;            // row b: out + b * out_ld
  int64_t out_ld;
  T* reserve;        // row b: reserve + b * 5H (i, f, g, o, c), or nullptr
  const T* bias;     // 4H combined bias b_ih + b_hh, or nullptr
  int64_t H;
};

template <typename T>
struct BwdRows {
  const T* reserve;  // row b: reserve + b * 5H (i, f, g, o, c) of this step
  const T* cp_a;     // c_prev of rows b < split: cp_a + b * cp_a_ld
  int64_t cp_a_ld;
  const T* cp_b;     // c_prev of rows b >= split: cp_b + b * H (the initial cell state)
  int64_t split;
  const T* gout;     // row b: gout + b * gout_ld, gradient of the output at this step
  int64_t gout_ld;
  const T* dh;       // (rows, H) gradient of h_t from later steps (or grad_hy)
  T* dc;             // (rows, H) gradient of c_t from later steps; replaced by the gradient of c_prev
  T* dgates;         // row b: dgates + b * dgates_ld, 4H
  int64_t dgates_ld;
  int64_t H;
};

template <typename T>
void fwd_rows_scalar(const FwdRows<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H;
  for (int64_t b = b0; b < b1; ++b) {
    const T* G = a.gates + b * a.gates_ld;
    T* hs = a.h + b * H;
    T* cs = a.c + b * H;
    T* out = a.out + b * a.out_ld;
    T* r = a.reserve ? a.reserve + b * 5 * H : nullptr;
    for (int64_t j = 0; j < H; ++j) {
      T i, f, g, o, c, h;
      T pi = G[j], pf = G[H + j], pg = G[2 * H + j], po = G[3 * H + j];
      if (a.bias) {
        pi += a.bias[j];
        pf += a.bias[H + j];
        pg += a.bias[2 * H + j];
        po += a.bias[3 * H + j];
      }
      lm::cell_forward<lm::ScalarAct>(pi, pf, pg, po, cs[j], i, f, g, o, c, h);
      cs[j] = c;
      hs[j] = h;
      out[j] = h;
      if (r) {
        r[j] = i;
        r[H + j] = f;
        r[2 * H + j] = g;
        r[3 * H + j] = o;
        r[4 * H + j] = c;
      }
    }
  }
}

template <typename T>
void bwd_rows_scalar(const BwdRows<T>& a, int64_t b0, int64_t b1) {
  const int64_t H = a.H;
  const T one(1);
  for (int64_t b = b0; b < b1; ++b) {
    const T* r = a.reserve + b * 5 * H;
    const T* cp = b < a.split ? a.cp_a + b * a.cp_a_ld : a.cp_b + b * H;
    const T* go = a.gout + b * a.gout_ld;
    const T* dh = a.dh + b * H;
    T* dc = a.dc + b * H;
    T* dG = a.dgates + b * a.dgates_ld;
    for (int64_t j = 0; j < H; ++j) {
      T di, df, dg, do_, dcp;
      lm::cell_backward<lm::ScalarAct>(r[j], r[H + j], r[2 * H + j], r[3 * H + j], r[4 * H + j], cp[j],
                                       dh[j] + go[j], dc[j], one, di, df, dg, do_, dcp);
      dG[j] = di;
      dG[H + j] = df;
      dG[2 * H + j] = dg;
      dG[3 * H + j] = do_;
      dc[j] = dcp;
    }
  }
}

}  // namespace
}  // namespace fastmtl

// ---------------------------------------------------------------------------------------------------------
// AVX2 + FMA versions of the row kernels with at::vec::Vectorized. The extension is compiled for the baseline
// ISA, so this block is compiled for AVX2 (its own CPU_CAPABILITY namespace, like ATen's own kernels) and
// selected at run time when the CPU supports it.
// ---------------------------------------------------------------------------------------------------------
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(FASTMTL_NO_AVX2)
#define FASTMTL_HAVE_AVX2_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// g++ does not define the ISA macros for `#pragma GCC target`; sleef.h (included by the AVX2 vector headers)
// declares its AVX2 entry points only under them.
#ifndef __AVX__
#define __AVX__ 1
#define FASTMTL_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define FASTMTL_UNDEF_AVX2
#endif
#ifndef __FMA__
#define __FMA__ 1
#define FASTMTL_UNDEF_FMA
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace fastmtl {
namespace {

struct VecAct {
  template <typename V>
  static V sigmoid(const V& x) {
    return V(1) / (V(1) + (V(0) - x).exp());
  }
  template <typename V>
  static V tanh(const V& x) {
    return x.tanh();
  }
};

template <typename T>
void fwd_rows_avx2(const FwdRows<T>& a, int64_t b0, int64_t b1) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = a.H;
  constexpr int64_t W = V::size();
  for (int64_t b = b0; b < b1; ++b) {
    const T* G = a.gates + b * a.gates_ld;
    T* hs = a.h + b * H;
    T* cs = a.c + b * H;
    T* out = a.out + b * a.out_ld;
    T* r = a.reserve ? a.reserve + b * 5 * H : nullptr;
    for (int64_t j = 0; j < H; j += W) {
      const int64_t cnt = std::min<int64_t>(W, H - j);
      const bool full = cnt == W;
      auto ld = [&](const T* p) { return full ? V::loadu(p) : V::loadu(p, cnt); };
      auto st = [&](const V& v, T* p) {
        if (full) v.store(p); else v.store(p, cnt);
      };
      V i, f, g, o, c, h;
      V pi = ld(G + j), pf = ld(G + H + j), pg = ld(G + 2 * H + j), po = ld(G + 3 * H + j);
      if (a.bias) {
        pi = pi + ld(a.bias + j);
        pf = pf + ld(a.bias + H + j);
        pg = pg + ld(a.bias + 2 * H + j);
        po = po + ld(a.bias + 3 * H + j);
      }
      lm::cell_forward<VecAct>(pi, pf, pg, po, ld(cs + j), i, f, g, o, c, h);
      st(c, cs + j);
      st(h, hs + j);
      st(h, out + j);
      if (r) {
        st(i, r + j);
        st(f, r + H + j);
        st(g, r + 2 * H + j);
        st(o, r + 3 * H + j);
        st(c, r + 4 * H + j);
      }
    }
  }
}

template <typename T>
void bwd_rows_avx2(const BwdRows<T>& a, int64_t b0, int64_t b1) {
  using V = at::vec::Vectorized<T>;
  const int64_t H = a.H;
  constexpr int64_t W = V::size();
  const V one(T(1));
  for (int64_t b = b0; b < b1; ++b) {
    const T* r = a.reserve + b * 5 * H;
    const T* cp = b < a.split ? a.cp_a + b * a.cp_a_ld : a.cp_b + b * H;
    const T* go = a.gout + b * a.gout_ld;
    const T* dh = a.dh + b * H;
    T* dc = a.dc + b * H;
    T* dG = a.dgates + b * a.dgates_ld;
    for (int64_t j = 0; j < H; j += W) {
      const int64_t cnt = std::min<int64_t>(W, H - j);
      const bool full = cnt == W;
      auto ld = [&](const T* p) { return full ? V::loadu(p) : V::loadu(p, cnt); };
      auto st = [&](const V& v, T* p) {
        if (full) v.store(p); else v.store(p, cnt);
      };
      V di, df, dg, do_, dcp;
      lm::cell_backward<VecAct>(ld(r + j), ld(r + H + j), ld(r + 2 * H + j), ld(r + 3 * H + j),
                                ld(r + 4 * H + j), ld(cp + j), ld(dh + j) + ld(go + j), ld(dc + j), one, di, df,
                                dg, do_, dcp);
      st(di, dG + j);
      st(df, dG + H + j);
      st(dg, dG + 2 * H + j);
      st(do_, dG + 3 * H + j);
      st(dcp, dc + j);
    }
  }
}

void fwd_rows_avx2_f(const FwdRows<float>& a, int64_t b0, int64_t b1) { fwd_rows_avx2<float>(a, b0, b1); }
void fwd_rows_avx2_d(const FwdRows<double>& a, int64_t b0, int64_t b1) { fwd_rows_avx2<double>(a, b0, b1); }
void bwd_rows_avx2_f(const BwdRows<float>& a, int64_t b0, int64_t b1) { bwd_rows_avx2<float>(a, b0, b1); }
void bwd_rows_avx2_d(const BwdRows<double>& a, int64_t b0, int64_t b1) { bwd_rows_avx2<double>(a, b0, b1); }

}  // namespace
}  // namespace fastmtl

#undef CPU_CAPABILITY_AVX2
#undef CPU_CAPABILITY
#ifdef FASTMTL_UNDEF_AVX
#undef __AVX__
#endif
#ifdef FASTMTL_UNDEF_AVX2
#undef __AVX2__
#endif
#ifdef FASTMTL_UNDEF_FMA
#undef __FMA__
#endif
#pragma GCC pop_options
#endif

namespace fastmtl {
namespace {

template <typename T>
using FwdFn = void (*)(const FwdRows<T>&, int64_t, int64_t);
template <typename T>
using BwdFn = void (*)(const BwdRows<T>&, int64_t, int64_t);

bool use_avx2() {
#ifdef FASTMTL_HAVE_AVX2_KERNELS
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

template <typename T>
FwdFn<T> fwd_kernel();
template <typename T>
BwdFn<T> bwd_kernel();
template <>
FwdFn<float> fwd_kernel<float>() {
#ifdef FASTMTL_HAVE_AVX2_KERNELS
  if (use_avx2()) return &fwd_rows_avx2_f;
#endif
  return &fwd_rows_scalar<float>;
}
template <>
FwdFn<double> fwd_kernel<double>() {
#ifdef FASTMTL_HAVE_AVX2_KERNELS
  if (use_avx2()) return &fwd_rows_avx2_d;
#endif
  return &fwd_rows_scalar<double>;
}
template <>
BwdFn<float> bwd_kernel<float>() {
#ifdef FASTMTL_HAVE_AVX2_KERNELS
  if (use_avx2()) return &bwd_rows_avx2_f;
#endif
  return &bwd_rows_scalar<float>;
}
template <>
BwdFn<double> bwd_kernel<double>() {
#ifdef FASTMTL_HAVE_AVX2_KERNELS
  if (use_avx2()) return &bwd_rows_avx2_d;
#endif
  return &bwd_rows_scalar<double>;
}

// Rows per parallel chunk: enough elementwise work per task to amortise the scheduling.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

// BLAS: torch's own (MKL or OpenBLAS) Fortran entry points when the installed torch exports them (it does on the
// x86-64 builds), called without the dispatcher for the many small per-step GEMMs; otherwise ATen's mm.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

template <typename T>
inline bool fortran_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                         const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const int64_t lim = std::numeric_limits<int>::max();
  if (m > lim || n > lim || k > lim || lda > lim || ldb > lim || ldc > lim) return false;
  const int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (!sgemm_) return false;
    sgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LDA, b, &LDB, &beta, c, &LDC);
    return true;
  } else {
    if (!dgemm_) return false;
    dgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LDA, b, &LDB, &beta, c, &LDC);
    return true;
  }
}

// Row-major C (m x n, ldc) = A (m x k, lda) @ op(B) + beta * C, op(B) = B^T with B (n x k, ldb) when trans_b,
// else B (k x n, ldb).
// oneDNN matmul through ATen (exported by torch's CPU library when built with oneDNN, as the x86-64 wheels are).
// On this project's machines it runs float32 GEMMs about twice as fast as the BLAS (AVX-512 kernels on CPUs where
// MKL takes its AVX2 path), and it is what torch.nn.LSTM's oneDNN path uses. Weak, so a torch without it still
// loads the extension and the BLAS is used instead. FASTMTL_LSTM_GEMM=blas forces the BLAS.
}  // namespace
}  // namespace fastmtl
namespace at {
namespace native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha) __attribute__((weak));
}  // namespace native
}  // namespace at
namespace fastmtl {
namespace {

bool use_dnnl() {
  static const bool ok = [] {
    if (&at::native::mkldnn_matmul == nullptr || !at::hasMKLDNN()) return false;
    const char* env = std::getenv("FASTMTL_LSTM_GEMM");
    return !(env && std::string(env) == "blas");
  }();
  return ok;
}

// c = beta * c + a @ b for 2-D (possibly strided, last-dim-contiguous) tensors.
void matmul_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, float beta) {
  if (c.numel() == 0) return;
  if (a.size(1) == 0) {
    if (beta == 0.f) c.zero_();
    return;
  }
  if (c.scalar_type() == at::kFloat && use_dnnl()) {
    at::native::mkldnn_matmul(a, b, c, beta, 1.f);
    return;
  }
  if (beta == 0.f) {
    at::Tensor out = c;
    if (c.is_contiguous()) {
      at::mm_out(out, a, b);
    } else {
      c.copy_(at::mm(a, b));
    }
  } else {
    c.addmm_(a, b);
  }
}

// Row-major C (m x n, ldc) = A (m x k, lda) @ op(B) + beta * C, op(B) = B^T with B (n x k, ldb) when trans_b,
// else B (k x n, ldb). The per-step GEMMs: oneDNN for float32, else the BLAS directly.
template <typename T>
inline void gemm_rm(bool trans_b, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (std::is_same_v<T, float> && k > 0 && use_dnnl()) {
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    auto Cv = at::from_blob(C, {m, n}, {ldc, 1}, opts);
    auto Av = at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opts);
    auto Bv = trans_b ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opts).t()
                      : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opts);
    at::native::mkldnn_matmul(Av, Bv, Cv, float(beta), 1.f);
    return;
  }
  // Column-major view: C^T (n x m) = op(B)^T (n x k) @ A^T (k x m).
  if (k > 0 && fortran_gemm<T>(trans_b ? 'T' : 'N', 'N', n, m, k, T(1), B, ldb, A, lda, beta, C, ldc)) return;
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto Cv = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  auto Av = at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opts);
  auto Bv = trans_b ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opts);
  if (beta == T(0)) Cv.copy_(at::mm(Av, Bv));
  else Cv.addmm_(Av, Bv);
}

// Active rows per step: n[t] = #{b : length_b > t} (a prefix), off[t] = sum_{t' < t} n[t'], N = sum n[t].
struct Steps {
  std::vector<int64_t> n, off;
  int64_t N = 0;
  bool full = true;  // every sequence runs all T steps (the packed layout is the padded one)
};

Steps make_steps(const std::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  Steps s;
  s.n.assign(T, B);
  s.off.assign(T, 0);
  if (lengths.has_value()) {
    const int64_t* len = lengths->data_ptr<int64_t>();
    std::vector<int64_t> cnt(T + 1, 0);
    for (int64_t b = 0; b < B; ++b) cnt[len[b]]++;  // number of sequences of each length
    int64_t running = B;
    for (int64_t t = 0; t < T; ++t) {
      running -= cnt[t];  // sequences with length <= t have stopped
      s.n[t] = running;
      if (running != B) s.full = false;
    }
  }
  int64_t acc = 0;
  for (int64_t t = 0; t < T; ++t) {
    s.off[t] = acc;
    acc += s.n[t];
  }
  s.N = acc;
  return s;
}

// Rows x[t, :n_t] for all t, stacked: (N, F). The input itself when every sequence is full length.
at::Tensor pack_rows(const at::Tensor& x, const Steps& s) {
  const int64_t T = x.size(0), B = x.size(1), F = x.size(2);
  if (s.full) return x.view({T * B, F});
  auto out = at::empty({s.N, F}, x.options());
  const int64_t row_bytes = F * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      if (s.n[t] > 0) std::memcpy(dst + s.off[t] * row_bytes, src + t * B * row_bytes, s.n[t] * row_bytes);
  });
  return out;
}

// Inverse of pack_rows: (N, F) -> (T, B, F) with zero rows at padded positions.
at::Tensor unpack_rows(const at::Tensor& p, const Steps& s, int64_t T, int64_t B) {
  const int64_t F = p.size(1);
  if (s.full) return p.view({T, B, F});
  auto out = at::empty({T, B, F}, p.options());
  const int64_t row_bytes = F * p.element_size();
  const char* src = static_cast<const char*>(p.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (s.n[t] > 0) std::memcpy(dst + t * B * row_bytes, src + s.off[t] * row_bytes, s.n[t] * row_bytes);
      if (s.n[t] < B) std::memset(dst + (t * B + s.n[t]) * row_bytes, 0, (B - s.n[t]) * row_bytes);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------------------
struct Dims {
  int64_t T, B, I, H, D;
  bool bias;
};

Dims check_layer_args(const at::Tensor& input, const std::optional<at::Tensor>& lengths, const at::Tensor& hx,
                      const at::Tensor& cx, at::TensorList weights, bool bidirectional, const char* op) {
  Dims d{};
  d.D = bidirectional ? 2 : 1;
  FASTMTL_CHECK_VALUE(input.dim() == 3, op, ": input must be 3-D (T, B, input_size), got shape ",
                      shape_str(input));
  FASTMTL_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                     ": input must be float32 or float64 on the CPU, got ", input.scalar_type());
  d.T = input.size(0);
  d.B = input.size(1);
  d.I = input.size(2);
  const int64_t nw = static_cast<int64_t>(weights.size());
  FASTMTL_CHECK_VALUE(nw == 2 * d.D || nw == 4 * d.D, op, ": weights must hold ", 2 * d.D, " (no bias) or ",
                      4 * d.D, " (with bias) tensors for ", d.D, " direction(s), got ", nw);
  d.bias = nw == 4 * d.D;
  const int64_t per = d.bias ? 4 : 2;
  FASTMTL_CHECK_VALUE(weights[1].dim() == 2, op, ": weights[1] (w_hh) must be 2-D (4*hidden_size, hidden_size), ",
                      "got shape ", shape_str(weights[1]));
  d.H = weights[1].size(1);
  static const char* names[] = {"w_ih", "w_hh", "b_ih", "b_hh"};
  for (int64_t dir = 0; dir < d.D; ++dir) {
    for (int64_t k = 0; k < per; ++k) {
      const auto& w = weights[dir * per + k];
      std::vector<int64_t> expected;
      if (k == 0) expected = {4 * d.H, d.I};
      else if (k == 1) expected = {4 * d.H, d.H};
      else expected = {4 * d.H};
      FASTMTL_CHECK_VALUE(w.sizes() == at::IntArrayRef(expected), op, ": weights[", dir * per + k, "] (",
                          names[k], dir ? "_reverse" : "", ") must have shape ", at::IntArrayRef(expected),
                          ", got ", shape_str(w));
      FASTMTL_CHECK_TYPE(w.scalar_type() == input.scalar_type(), op, ": weights[", dir * per + k, "] (", names[k],
                         ") has dtype ", w.scalar_type(), " but input has dtype ", input.scalar_type());
      FASTMTL_CHECK_VALUE(w.device() == input.device(), op, ": weights[", dir * per + k, "] is on ", w.device(),
                          " but input is on ", input.device());
    }
  }
  const std::vector<int64_t> state{d.D, d.B, d.H};
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&hx, "hx"}, {&cx, "cx"}}) {
    FASTMTL_CHECK_VALUE(t->sizes() == at::IntArrayRef(state), op, ": ", name, " must have shape (D, B, H) = ",
                        at::IntArrayRef(state), ", got ", shape_str(*t));
    FASTMTL_CHECK_TYPE(t->scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                       " but input has dtype ", input.scalar_type());
    FASTMTL_CHECK_VALUE(t->device() == input.device(), op, ": ", name, " is on ", t->device(),
                        " but input is on ", input.device());
  }
  if (lengths.has_value()) {
    const auto& L = *lengths;
    FASTMTL_CHECK_TYPE(L.scalar_type() == at::kLong, op, ": lengths must be int64, got ", L.scalar_type());
    FASTMTL_CHECK_VALUE(L.device().is_cpu(), op, ": lengths must be on the CPU, got ", L.device());
    FASTMTL_CHECK_VALUE(L.dim() == 1 && L.size(0) == d.B, op, ": lengths must have shape (B,) = (", d.B,
                        ",), got ", shape_str(L));
    auto Lc = L.contiguous();
    const int64_t* p = Lc.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < d.B; ++b) {
      FASTMTL_CHECK_VALUE(p[b] >= 1 && p[b] <= d.T, op, ": lengths[", b, "] = ", p[b],
                          " is outside [1, T] with T = ", d.T);
      FASTMTL_CHECK_VALUE(b == 0 || p[b] <= p[b - 1], op, ": lengths must be sorted in non-increasing order ",
                          "(lengths[", b - 1, "] = ", p[b - 1], " < lengths[", b, "] = ", p[b], ")");
    }
  }
  return d;
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cpu(
    const at::Tensor& input_, const std::optional<at::Tensor>& lengths, const at::Tensor& hx,
    const at::Tensor& cx, at::TensorList weights, bool bidirectional, bool need_reserve) {
  const Dims d = check_layer_args(input_, lengths, hx, cx, weights, bidirectional, "lstm_layer_forward");
  const int64_t T = d.T, B = d.B, H = d.H, D = d.D, G4 = 4 * H, per = d.bias ? 4 : 2;
  auto input = input_.contiguous();
  auto output = at::empty({T, B, D * H}, input.options());
  auto hy = hx.contiguous().clone();
  auto cy = cx.contiguous().clone();
  auto reserve = need_reserve ? at::empty({D, T, B, 5 * H}, input.options()) : at::empty({0}, input.options());
  if (T == 0 || B == 0 || H == 0) {
    if (need_reserve) reserve.zero_();
    output.zero_();
    return {output, hy, cy, reserve};
  }
  std::optional<at::Tensor> len_c;
  if (lengths.has_value()) len_c = lengths->contiguous();
  const Steps s = make_steps(len_c, T, B);

  auto Xp = pack_rows(input, s);
  // gx (D, N, 4H): the input projection of every active row, one GEMM per direction (the biases are added in the
  // fused pass). Each direction's block is contiguous, so the per-step GEMMs work on dense row blocks.
  at::Tensor gx = at::empty({D, s.N, G4}, input.options());
  at::Tensor bias = d.bias ? at::empty({D, G4}, input.options()) : at::Tensor();
  for (int64_t dir = 0; dir < D; ++dir) {
    matmul_into(Xp, weights[dir * per].t(), gx[dir], 0.f);
    if (d.bias) {
      at::Tensor bd = bias[dir];
      at::add_out(bd, weights[dir * per + 2], weights[dir * per + 3]);
    }
  }
  std::vector<at::Tensor> w_hh(D);
  for (int64_t dir = 0; dir < D; ++dir) w_hh[dir] = weights[dir * per + 1].contiguous();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_forward_cpu", [&] {
    using T_ = scalar_t;
    const FwdFn<T_> kernel = fwd_kernel<T_>();
    T_* gxp = gx.data_ptr<T_>();
    T_* outp = output.data_ptr<T_>();
    T_* hyp = hy.data_ptr<T_>();
    T_* cyp = cy.data_ptr<T_>();
    T_* resp = need_reserve ? reserve.data_ptr<T_>() : nullptr;
    const T_* biasp = d.bias ? bias.const_data_ptr<T_>() : nullptr;
    const int64_t grain = row_grain(H);
    for (int64_t step = 0; step < T; ++step) {
      for (int64_t dir = 0; dir < D; ++dir) {
        const int64_t t = dir == 0 ? step : T - 1 - step;
        const int64_t n = s.n[t];
        T_* out_t = outp + t * B * D * H + dir * H;
        T_* res_t = resp ? resp + (dir * T + t) * B * 5 * H : nullptr;
        if (n > 0) {
          T_* G = gxp + (dir * s.N + s.off[t]) * G4;
          T_* h = hyp + dir * B * H;
          T_* c = cyp + dir * B * H;
          // G += h_prev @ W_hh^T on the active rows (h_prev is the running state).
          gemm_rm<T_>(true, n, G4, H, h, H, w_hh[dir].const_data_ptr<T_>(), H, T_(1), G, G4);
          FwdRows<T_> a{G, G4, h, c, out_t, D * H, res_t, biasp ? biasp + dir * G4 : nullptr, H};
          at::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) { kernel(a, b0, b1); });
        }
        for (int64_t b = n; b < B; ++b) {  // padded positions: zero output (and a defined reserve)
          std::memset(out_t + b * D * H, 0, H * sizeof(T_));
          if (res_t) std::memset(res_t + b * 5 * H, 0, 5 * H * sizeof(T_));
        }
      }
    }
  });
  return {output, hy, cy, reserve};
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_layer_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& grad_hy_, const at::Tensor& grad_cy_,
    const at::Tensor& input_, const std::optional<at::Tensor>& lengths, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList weights, bool bidirectional, const at::Tensor& output_, const at::Tensor& reserve_) {
  const Dims d = check_layer_args(input_, lengths, hx, cx, weights, bidirectional, "lstm_layer_backward");
  const int64_t T = d.T, B = d.B, H = d.H, D = d.D, G4 = 4 * H, I = d.I;
  const std::vector<int64_t> out_shape{T, B, D * H}, state{D, B, H}, res_shape{D, T, B, 5 * H};
  FASTMTL_CHECK_VALUE(grad_output_.sizes() == at::IntArrayRef(out_shape),
                      "lstm_layer_backward: grad_output must have shape ", at::IntArrayRef(out_shape), ", got ",
                      shape_str(grad_output_));
  FASTMTL_CHECK_VALUE(output_.sizes() == at::IntArrayRef(out_shape), "lstm_layer_backward: output must have shape ",
                      at::IntArrayRef(out_shape), ", got ", shape_str(output_));
  FASTMTL_CHECK_VALUE(grad_hy_.sizes() == at::IntArrayRef(state), "lstm_layer_backward: grad_hy must have shape ",
                      at::IntArrayRef(state), ", got ", shape_str(grad_hy_));
  FASTMTL_CHECK_VALUE(grad_cy_.sizes() == at::IntArrayRef(state), "lstm_layer_backward: grad_cy must have shape ",
                      at::IntArrayRef(state), ", got ", shape_str(grad_cy_));
  FASTMTL_CHECK_VALUE(reserve_.sizes() == at::IntArrayRef(res_shape),
                      "lstm_layer_backward: reserve must have shape (D, T, B, 5H) = ", at::IntArrayRef(res_shape),
                      ", got ", shape_str(reserve_),
                      " (run lstm_layer_forward with need_reserve=True when gradients are needed)");
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&grad_output_, "grad_output"},
                         {&grad_hy_, "grad_hy"}, {&grad_cy_, "grad_cy"}, {&output_, "output"},
                         {&reserve_, "reserve"}}) {
    FASTMTL_CHECK_TYPE(t->scalar_type() == input_.scalar_type(), "lstm_layer_backward: ", name, " has dtype ",
                       t->scalar_type(), " but input has dtype ", input_.scalar_type());
  }
  const int64_t per = d.bias ? 4 : 2;
  auto input = input_.contiguous();
  auto grad_output = grad_output_.contiguous();
  auto output = output_.contiguous();
  auto reserve = reserve_.contiguous();
  auto hx_c = hx.contiguous();
  auto cx_c = cx.contiguous();
  auto dh = grad_hy_.contiguous().clone();  // running dL/dh_t per direction, becomes grad_hx
  auto dc = grad_cy_.contiguous().clone();  // running dL/dc_t per direction, becomes grad_cx

  std::vector<at::Tensor> grad_w;
  if (T == 0 || B == 0 || H == 0) {
    for (const auto& w : weights) grad_w.push_back(at::zeros_like(w));
    return {at::zeros_like(input), dh, dc, grad_w};
  }
  std::optional<at::Tensor> len_c;
  if (lengths.has_value()) len_c = lengths->contiguous();
  const Steps s = make_steps(len_c, T, B);
  std::vector<at::Tensor> w_hh(D);
  for (int64_t dir = 0; dir < D; ++dir) w_hh[dir] = weights[dir * per + 1].contiguous();
  auto dG = at::empty({D, s.N, G4}, input.options());  // packed pre-activation gradients per direction
  std::vector<at::Tensor> hprev(D);                     // packed h_{t-1} (fwd) / h_{t+1} (rev) per direction
  for (int64_t dir = 0; dir < D; ++dir) hprev[dir] = at::empty({s.N, H}, input.options());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_backward_cpu", [&] {
    using T_ = scalar_t;
    const BwdFn<T_> kernel = bwd_kernel<T_>();
    const T_* resp = reserve.const_data_ptr<T_>();
    const T_* gop = grad_output.const_data_ptr<T_>();
    const T_* outp = output.const_data_ptr<T_>();
    const T_* hxp = hx_c.const_data_ptr<T_>();
    const T_* cxp = cx_c.const_data_ptr<T_>();
    T_* dGp = dG.data_ptr<T_>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dcp = dc.data_ptr<T_>();
    const int64_t grain = row_grain(H);
    for (int64_t step = 0; step < T; ++step) {
      for (int64_t dir = 0; dir < D; ++dir) {
        const int64_t t = dir == 0 ? T - 1 - step : step;
        const int64_t n = s.n[t];
        if (n == 0) continue;
        const T_* res_t = resp + (dir * T + t) * B * 5 * H;
        const T_* cx_d = cxp + dir * B * H;
        BwdRows<T_> a{};
        a.reserve = res_t;
        a.cp_b = cx_d;
        if (dir == 0) {
          a.cp_a = t > 0 ? resp + (dir * T + t - 1) * B * 5 * H + 4 * H : cx_d;
          a.cp_a_ld = t > 0 ? 5 * H : H;
          a.split = n;
        } else {
          a.cp_a = t + 1 < T ? resp + (dir * T + t + 1) * B * 5 * H + 4 * H : cx_d;
          a.cp_a_ld = t + 1 < T ? 5 * H : H;
          a.split = t + 1 < T ? s.n[t + 1] : 0;
        }
        a.gout = gop + t * B * D * H + dir * H;
        a.gout_ld = D * H;
        a.dh = dhp + dir * B * H;
        a.dc = dcp + dir * B * H;
        a.dgates = dGp + (dir * s.N + s.off[t]) * G4;
        a.dgates_ld = G4;
        a.H = H;
        at::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) { kernel(a, b0, b1); });
        // dh_prev (active rows) = dG_t @ W_hh
        gemm_rm<T_>(false, n, H, G4, a.dgates, G4, w_hh[dir].const_data_ptr<T_>(), H, T_(0), dhp + dir * B * H,
                    H);
      }
    }
    // Packed previous hidden states for dW_hh: fwd h_{t-1} (hx at t = 0); rev h_{t+1} (hx at the last token).
    for (int64_t dir = 0; dir < D; ++dir) {
      T_* hp = hprev[dir].data_ptr<T_>();
      const T_* hx_d = hxp + dir * B * H;
      at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = s.n[t];
          T_* dst = hp + s.off[t] * H;
          int64_t from_out = 0;  // rows taking h from the neighbouring step's output
          const T_* src = nullptr;
          if (dir == 0 && t > 0) {
            from_out = n;
            src = outp + (t - 1) * B * D * H;
          } else if (dir == 1 && t + 1 < T) {
            from_out = s.n[t + 1];
            src = outp + (t + 1) * B * D * H + H;
          }
          for (int64_t b = 0; b < from_out; ++b) std::memcpy(dst + b * H, src + b * D * H, H * sizeof(T_));
          if (n > from_out) std::memcpy(dst + from_out * H, hx_d + from_out * H, (n - from_out) * H * sizeof(T_));
        }
      });
    }
  });

  // Weight gradients: large GEMMs over all steps.
  auto Xp = pack_rows(input, s);
  auto gin = at::empty({s.N, I}, input.options());
  for (int64_t dir = 0; dir < D; ++dir) {
    const auto& dG_d = dG[dir];
    auto dW_ih = at::empty({G4, I}, input.options());
    matmul_into(dG_d.t(), Xp, dW_ih, 0.f);
    matmul_into(dG_d, weights[dir * per].contiguous(), gin, dir == 0 ? 0.f : 1.f);
    auto dW_hh = at::empty({G4, H}, input.options());
    matmul_into(dG_d.t(), hprev[dir], dW_hh, 0.f);
    grad_w.push_back(dW_ih);
    grad_w.push_back(dW_hh);
    if (d.bias) {
      auto db = dG_d.sum(0);
      grad_w.push_back(db);
      grad_w.push_back(db.clone());
    }
  }
  auto grad_input = unpack_rows(gin, s, T, B);
  return {grad_input, dh, dc, grad_w};
}

}  // namespace
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("lstm_layer_forward", &fastmtl::lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &fastmtl::lstm_layer_backward_cpu);
}
