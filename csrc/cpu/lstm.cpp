// Fused CPU LSTM layer (both directions), forward and backward. Schema and layout: csrc/fastmtl.cpp.
//
// Forward, per layer:
//   * the input projection of every (active) time step of both directions is ONE GEMM:
//       gx (N, D*4H) = X_packed (N, I) @ [W_ih_fwd; W_ih_rev]^T + (b_ih + b_hh)
//     X_packed holds, for t = 0..T-1, the rows x[t, :n_t] (n_t = number of sequences with length > t, a prefix of
//     the batch because the caller sorts by length). With equal lengths X_packed is the input itself (no copy).
//   * per step and direction one recurrent GEMM on the n_t active rows, accumulated in place into gx
//     (beta = 1, so no separate gate buffer), then one fused vectorised pass over the rows (at::parallel_for;
//     the pass is csrc/cpu/kernels/lstm_cell_<isa>.cpp, chosen at run time from the CPU's features) computing
//     the activations and the new (c, h).
//     The running (h, c) live in hy/cy themselves: a row that stops keeps its state at its last real token, and
//     the reverse direction starts a row at its last real token simply because the row only becomes active then.
//   * GEMMs go through ATen's public CPU API (at::cpu::mm_out, addmm_) on strided views; nothing private of torch.
// Backward: the same walk in the other order; per step one fused pass producing the pre-activation gradients
//   (packed (N, D*4H)) and dc_prev, and one GEMM dh_prev = dG_t @ W_hh on the active rows; then the weight
//   gradients as large GEMMs over all steps: dW_ih = dG^T X_packed, dW_hh = dG^T H_prev_packed, db = sum dG,
//   grad_input = dG W_ih (one GEMM, scattered back to the padded layout).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastmtl/checks.h"
#include "fastmtl/cpu_isa.h"
#include "fastmtl/lstm_checks.h"
#include "kernels/lstm_cell.h"

namespace fastmtl {
namespace {

using cpu_kernels::BwdCols;
using cpu_kernels::FwdCols;

template <typename T>
using FwdFn = void (*)(const FwdCols<T>&, int64_t, int64_t);
template <typename T>
using BwdFn = void (*)(const BwdCols<T>&, int64_t, int64_t);

// The cell passes of the ISA chosen for this call (fastmtl/cpu_isa.h).
template <typename T>
FwdFn<T> fwd_kernel(const cpu_kernels::LstmCellKernels& k) {
  if constexpr (std::is_same_v<T, float>) return k.fwd_f32;
  else return k.fwd_f64;
}
template <typename T>
BwdFn<T> bwd_kernel(const cpu_kernels::LstmCellKernels& k) {
  if constexpr (std::is_same_v<T, float>) return k.bwd_f32;
  else return k.bwd_f64;
}

// The two directions of a layer are independent. With two or three threads they run concurrently, one thread
// each, with no synchronisation at all inside the time loop (the per-step GEMMs and passes then run
// single-threaded: the BLAS and at::parallel_for run serially inside a parallel region). With more threads each
// direction in turn gets all of them per step.
template <typename F>
void run_directions(int64_t D, const F& run_direction) {
  const int nt = at::get_num_threads();
  const bool concurrent = D == 2 && !at::in_parallel_region() && nt >= 2 && nt <= 3;
  if (concurrent) {
    at::parallel_for(0, 2, 1, [&](int64_t d0, int64_t d1) {
      for (int64_t dir = d0; dir < d1; ++dir) run_direction(dir);
    });
  } else {
    for (int64_t dir = 0; dir < D; ++dir) run_direction(dir);
  }
}

// GEMMs through ATen's public CPU kernels (at::cpu::mm_out / addmm_, the structured kernels behind at::mm_out,
// called directly): torch's BLAS, without a dispatcher round trip per call. The per-step GEMMs are many and small,
// and in the concurrent-directions path they run on worker threads where every dispatcher call would go through
// the autograd layers again.
//
// c = beta * c + a @ b for 2-D (possibly strided, last-dim-contiguous) tensors; beta is 0 or 1.
void matmul_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, float beta) {
  if (c.numel() == 0) return;
  if (a.size(1) == 0) {
    if (beta == 0.f) c.zero_();
    return;
  }
  at::Tensor out = c;
  if (beta == 0.f) at::cpu::mm_out(out, a, b);
  else at::cpu::addmm_(out, a, b);
}

// Row-major C (m x n, ldc) = op(A) @ op(B) + beta * C; op(A) = A^T with A stored (k x m, lda) when trans_a, else
// A (m x k, lda); op(B) = B^T with B stored (n x k, ldb) when trans_b, else B (k x n, ldb). beta is 0 or 1.
// The per-step GEMMs, on strided views of the caller's buffers (no copies), as matmul_into.
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda,
                    const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto Cv = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  if (k == 0) {
    if (beta == T(0)) Cv.zero_();
    return;
  }
  auto Av = trans_a ? at::from_blob(const_cast<T*>(A), {k, m}, {lda, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opts);
  auto Bv = trans_b ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opts);
  if (beta == T(0)) at::cpu::mm_out(Cv, Av, Bv);
  else at::cpu::addmm_(Cv, Av, Bv);
}

// Scratch buffers reused across calls, per thread and per purpose ("slot"). A fresh multi-MiB allocation costs a
// page fault and a page clear per 4 KiB on first touch (the allocator hands large blocks back to the OS), which
// measured as 20-35 % of a layer's time here. A slot keeps its largest buffer up to 64 MiB; larger requests
// are allocated per call. Scratch never escapes an op call.
enum ScratchSlot { kGates = 0, kPackedX, kGradOutT, kDGates, kHPrev0, kHPrev1, kNumSlots };

at::Tensor scratch(ScratchSlot slot, at::IntArrayRef shape, const at::TensorOptions& opts) {
  constexpr int64_t cap_bytes = int64_t(64) << 20;
  thread_local at::Tensor cache[kNumSlots];
  const int64_t numel = c10::multiply_integers(shape);
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  if (bytes > cap_bytes) return at::empty(shape, opts);
  at::Tensor& buf = cache[slot];
  if (!buf.defined() || buf.dtype() != opts.dtype() || buf.numel() < numel) {
    buf = at::Tensor();
    buf = at::empty({numel}, opts);
  }
  return buf.narrow(0, 0, numel).view(shape);
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
  auto out = scratch(kPackedX, {s.N, F}, x.options());
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
// Forward
// ---------------------------------------------------------------------------------------------------------
// A fresh (D, H, B) copy of a (D, B, H) state (never a view: .contiguous() would alias when B or H is 1, and
// these buffers are updated in place).
at::Tensor transposed_copy(const at::Tensor& t) {
  return at::empty({t.size(0), t.size(2), t.size(1)}, t.options()).copy_(t.transpose(1, 2));
}

// Hidden units per parallel chunk of the fused pass: a step's pass is small next to its GEMM, and splitting it is
// only worth a fork/join when each chunk has real work (~32K cell updates).
inline int64_t unit_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cpu(
    const at::Tensor& input_, const std::optional<at::Tensor>& lengths, const at::Tensor& hx,
    const at::Tensor& cx, at::TensorList weights, bool bidirectional, bool need_reserve) {
  const LstmDims d = check_lstm_layer_args(input_, lengths, hx, cx, weights, bidirectional, "lstm_layer_forward",
                                           /*cuda=*/false);
  const int64_t T = d.T, B = d.B, H = d.H, D = d.D, G4 = 4 * H, per = d.bias ? 4 : 2;
  auto input = input_.contiguous();
  auto output = at::empty({T, B, D * H}, input.options());
  auto reserve = need_reserve ? at::empty({D, T, B, 5 * H}, input.options()) : at::empty({0}, input.options());
  if (T == 0 || B == 0 || H == 0) {
    if (need_reserve) reserve.zero_();
    output.zero_();
    return {output, hx.contiguous().clone(), cx.contiguous().clone(), reserve};
  }
  std::optional<at::Tensor> len_c;
  if (lengths.has_value()) len_c = lengths->contiguous();
  const Steps s = make_steps(len_c, T, B);
  const int64_t N = s.N;

  auto Xp = pack_rows(input, s);
  // gx^T (D, 4H, N): the input projection of every active row, one GEMM per direction (the biases are added in
  // the fused pass). Step t's block is the columns [off_t, off_t + n_t).
  at::Tensor gxT = scratch(kGates, {D, G4, N}, input.options());
  at::Tensor bias = d.bias ? at::empty({D, G4}, input.options()) : at::Tensor();
  std::vector<at::Tensor> w_hh(D);
  for (int64_t dir = 0; dir < D; ++dir) {
    matmul_into(weights[dir * per], Xp.t(), gxT[dir], 0.f);
    if (d.bias) {
      at::Tensor bd = bias[dir];
      at::add_out(bd, weights[dir * per + 2], weights[dir * per + 3]);
    }
    w_hh[dir] = weights[dir * per + 1].contiguous();
  }
  // Running states, transposed (D, H, B); a sequence that stops keeps its state at its last real token, and the
  // reverse direction starts a sequence at its last real token because it only becomes active there.
  auto hT = transposed_copy(hx);
  auto cT = transposed_copy(cx);

  const cpu_kernels::LstmCellKernels& kernels = cpu_kernels::lstm_cell_kernels();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_forward_cpu", [&] {
    using T_ = scalar_t;
    const FwdFn<T_> kernel = fwd_kernel<T_>(kernels);
    T_* gxp = gxT.data_ptr<T_>();
    T_* outp = output.data_ptr<T_>();
    T_* hp = hT.data_ptr<T_>();
    T_* cp = cT.data_ptr<T_>();
    T_* resp = need_reserve ? reserve.data_ptr<T_>() : nullptr;
    const T_* biasp = d.bias ? bias.const_data_ptr<T_>() : nullptr;
    auto run_direction = [&](int64_t dir) {
      const T_* W = w_hh[dir].const_data_ptr<T_>();
      T_* h = hp + dir * H * B;
      T_* c = cp + dir * H * B;
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = dir == 0 ? step : T - 1 - step;
        const int64_t n = s.n[t];
        T_* out_t = outp + t * B * D * H + dir * H;
        T_* res_t = resp ? resp + (dir * T + t) * B * 5 * H : nullptr;
        if (n > 0) {
          T_* G = gxp + dir * G4 * N + s.off[t];
          // gates^T (4H x n) += W_hh (4H x H) @ h_prev^T (H x n)
          gemm_rm<T_>(false, false, G4, n, H, W, H, h, B, T_(1), G, N);
          FwdCols<T_> a{G, N, biasp ? biasp + dir * G4 : nullptr, h, c, B, res_t, out_t, D * H, H, n, B};
          at::parallel_for(0, H, unit_grain(n), [&](int64_t j0, int64_t j1) { kernel(a, j0, j1); });
        } else if (res_t) {
          std::memset(res_t, 0, 5 * H * B * sizeof(T_));
        }
        for (int64_t b = n; b < B; ++b) std::memset(out_t + b * D * H, 0, H * sizeof(T_));  // padding: zero
      }
    };
    run_directions(D, run_direction);
  });
  return {output, transposed_copy(hT), transposed_copy(cT), reserve};
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_layer_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& grad_hy_, const at::Tensor& grad_cy_,
    const at::Tensor& input_, const std::optional<at::Tensor>& lengths, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList weights, bool bidirectional, const at::Tensor& output_, const at::Tensor& reserve_) {
  const LstmDims d = check_lstm_layer_args(input_, lengths, hx, cx, weights, bidirectional, "lstm_layer_backward",
                                           /*cuda=*/false);
  const int64_t T = d.T, B = d.B, H = d.H, D = d.D, G4 = 4 * H, I = d.I, per = d.bias ? 4 : 2;
  check_lstm_backward_args(grad_output_, grad_hy_, grad_cy_, output_, reserve_, input_, d, "lstm_layer_backward");
  auto input = input_.contiguous();
  auto output = output_.contiguous();
  auto reserve = reserve_.contiguous();
  auto hx_c = hx.contiguous();
  std::vector<at::Tensor> grad_w;
  if (T == 0 || B == 0 || H == 0) {
    for (const auto& w : weights) grad_w.push_back(at::zeros_like(w));
    return {at::zeros_like(input), grad_hy_.contiguous().clone(), grad_cy_.contiguous().clone(), grad_w};
  }
  std::optional<at::Tensor> len_c;
  if (lengths.has_value()) len_c = lengths->contiguous();
  const Steps s = make_steps(len_c, T, B);
  const int64_t N = s.N;
  // Everything per step is transposed (unit-major), as in the forward pass.
  auto goT = scratch(kGradOutT, {D, T, H, B}, input.options());  // grad_output, unit-major per step
  goT.copy_(grad_output_.reshape({T, B, D, H}).permute({2, 0, 3, 1}));
  auto cxT = transposed_copy(cx);                                       // (D, H, B)
  auto dhT = transposed_copy(grad_hy_);  // running dL/dh_t^T, becomes grad_hx^T
  auto dcT = transposed_copy(grad_cy_);  // running dL/dc_t^T, becomes grad_cx^T
  std::vector<at::Tensor> w_hh(D);
  for (int64_t dir = 0; dir < D; ++dir) w_hh[dir] = weights[dir * per + 1].contiguous();
  auto dGT = scratch(kDGates, {D, G4, N}, input.options());  // packed pre-activation gradients, transposed
  std::vector<at::Tensor> hprev(D);                    // packed h_{t-1} (fwd) / h_{t+1} (rev) per direction
  for (int64_t dir = 0; dir < D; ++dir) hprev[dir] = scratch(dir == 0 ? kHPrev0 : kHPrev1, {N, H}, input.options());

  const cpu_kernels::LstmCellKernels& kernels = cpu_kernels::lstm_cell_kernels();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_backward_cpu", [&] {
    using T_ = scalar_t;
    const BwdFn<T_> kernel = bwd_kernel<T_>(kernels);
    const T_* resp = reserve.const_data_ptr<T_>();
    const T_* gop = goT.const_data_ptr<T_>();
    const T_* outp = output.const_data_ptr<T_>();
    const T_* hxp = hx_c.const_data_ptr<T_>();
    const T_* cxp = cxT.const_data_ptr<T_>();
    T_* dGp = dGT.data_ptr<T_>();
    T_* dhp = dhT.data_ptr<T_>();
    T_* dcp = dcT.data_ptr<T_>();
    auto run_direction = [&](int64_t dir) {
      const T_* W = w_hh[dir].const_data_ptr<T_>();
      const T_* cx_d = cxp + dir * H * B;
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = dir == 0 ? T - 1 - step : step;
        const int64_t n = s.n[t];
        if (n == 0) continue;
        BwdCols<T_> a{};
        a.reserve = resp + (dir * T + t) * B * 5 * H;
        a.cp_b = cx_d;
        const int64_t tn = dir == 0 ? t - 1 : t + 1;  // the step that produced c_prev
        if (tn >= 0 && tn < T) {
          a.cp_a = resp + (dir * T + tn) * B * 5 * H + 4 * H * B;
          a.split = dir == 0 ? n : s.n[tn];
        } else {
          a.cp_a = cx_d;
          a.split = 0;
        }
        a.gout = gop + (dir * T + t) * H * B;
        a.dh = dhp + dir * H * B;
        a.dc = dcp + dir * H * B;
        a.dgates = dGp + dir * G4 * N + s.off[t];
        a.g_ld = N;
        a.H = H;
        a.n = n;
        a.B = B;
        at::parallel_for(0, H, unit_grain(n), [&](int64_t j0, int64_t j1) { kernel(a, j0, j1); });
        // dh_prev^T (H x n) = W_hh^T (H x 4H) @ dgates^T (4H x n)
        gemm_rm<T_>(true, false, H, n, G4, W, H, a.dgates, N, T_(0), a.dh, B);
      }
      // Packed previous hidden states for dW_hh: fwd h_{t-1} (hx at t = 0); rev h_{t+1} (hx at the last token).
      T_* hpv = hprev[dir].data_ptr<T_>();
      const T_* hx_d = hxp + dir * B * H;
      at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = s.n[t];
          T_* dst = hpv + s.off[t] * H;
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
    };
    run_directions(D, run_direction);
  });

  // Weight gradients and the input gradient: large GEMMs over all steps.
  auto Xp = pack_rows(input, s);
  auto gin = at::empty({N, I}, input.options());
  for (int64_t dir = 0; dir < D; ++dir) {
    const auto& dG_d = dGT[dir];  // (4H, N)
    auto dW_ih = at::empty({G4, I}, input.options());
    matmul_into(dG_d, Xp, dW_ih, 0.f);
    matmul_into(dG_d.t(), weights[dir * per].contiguous(), gin, dir == 0 ? 0.f : 1.f);
    auto dW_hh = at::empty({G4, H}, input.options());
    matmul_into(dG_d, hprev[dir], dW_hh, 0.f);
    grad_w.push_back(dW_ih);
    grad_w.push_back(dW_hh);
    if (d.bias) {
      auto db = dG_d.sum(1);
      grad_w.push_back(db);
      grad_w.push_back(db.clone());
    }
  }
  auto grad_input = unpack_rows(gin, s, T, B);
  return {grad_input, transposed_copy(dhT), transposed_copy(dcT), grad_w};
}

}  // namespace
}  // namespace fastmtl

namespace fastmtl {
namespace cpu_kernels {
const LstmCellKernels& lstm_cell_kernels() {
  return cpu::select_kernels(lstm_cell_kernels_scalar(), lstm_cell_kernels_avx2(), lstm_cell_kernels_avx512());
}
}  // namespace cpu_kernels
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("lstm_layer_forward", &fastmtl::lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &fastmtl::lstm_layer_backward_cpu);
}
