// Torch glue for the CUDA LSTM kernels (compiled only in CUDA builds): argument checks, device guard, current
// stream, GEMMs through ATen (cuBLAS), the per-step loop, and TORCH_LIBRARY_IMPL(fastmtl, CUDA, m).
//
// Contract: csrc/fastmtl.cpp (lstm_layer_forward / lstm_layer_backward / lstm_layer_backward_multi). Kernels:
// csrc/cuda/lstm.cu (standard path) and csrc/cuda/lstm_persistent.cu (persistent forward and backward); launchers
// in fastmtl/cuda_lstm.h.
//
// Path selection (forward and backward decide separately with the same rule; both read/write the same reserve,
// dgates and hprev layouts, so any combination is consistent):
//   persistent  when the dtype is bfloat16 or float16, or float32 with TF32 allowed (see Precision below),
//               and B <= 64, H % 8 == 0, and the W_hh
//               slices fit in shared memory on a grid the occupancy calculator guarantees co-resident
//               (lstm_persistent_plan; for example H <= 1024 bidirectional bf16 and H <= 1024 float32 per
//               direction on an H100). float64 never takes it.
//   standard    otherwise: one GEMM for the input projection of all steps and both directions, then per step one
//               GEMM on the active rows accumulated in place onto that step's projection (addmm_, beta = 1) and
//               one fused gate/cell kernel.
//   FASTMTL_LSTM_CUDA_PATH=standard|persistent forces a path ("persistent" raises when it cannot apply), for tests
//   and benchmarks; unset or "auto" uses the rule above.
//   lstm_layer_backward_multi (K cotangents, one time loop on B*K interleaved gradient rows) always takes the
//   standard path: the persistent backward kernel has no rows-per-forward-row divisor (BwdStepArgs::rep).
// Precision does not depend on the shape: float32 uses TF32 only where torch allows it for both kinds of work
// the layer does, matrix products (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision, which the
// standard path's ATen GEMMs follow) and RNNs (torch.backends.cudnn.allow_tf32); the persistent kernel's tf32
// mma.sync runs only then, so a float32 layer never switches between TF32 and FP32 with the batch size.
// Persistent kernels are launched cooperatively; if the driver refuses (the grid cannot be co-resident now, e.g.
// under MPS limits) the call takes the standard path (warned once). Their grid barrier traps after
// FASTMTL_GRID_BARRIER_TIMEOUT_S seconds (default 10, 0 = never) instead of hanging.
//
// No host synchronisation: lengths live on the CPU (the contract), so the per-step batch sizes are computed on the
// host; with lengths=None nothing is copied at all and the ops can be captured in CUDA graphs. With lengths inside a
// capture, the standard path is used and the batch sizes are frozen into the graph (warned once).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "fastmtl/checks.h"
#include "fastmtl/cuda_lstm.h"
#include "fastmtl/lstm_checks.h"
#include "glue_common.h"

namespace {

namespace fc = fastmtl::cuda;
using fastmtl::cuda_glue::check_launch;

fc::DType to_kernel_dtype(at::ScalarType st) {
  const std::optional<fc::DType> dt = fastmtl::cuda_glue::kernel_dtype(st);
  FASTMTL_CHECK_TYPE(dt.has_value(), "input must be float32, float64, bfloat16 or float16 on CUDA, got ", st);
  return *dt;
}

inline void* ptr_at(const at::Tensor& t, int64_t elem_offset) {
  return static_cast<char*>(t.data_ptr()) + elem_offset * static_cast<int64_t>(t.element_size());
}

// The checked sizes (T, B, I, H, D, bias) plus what the kernels need.
struct Layer : fastmtl::LstmDims {
  std::vector<int64_t> bs;  // active rows per time step (prefix of the batch)
  bool full = true;         // every sequence has length T
  std::vector<at::Tensor> w_ih, w_hh, b_ih, b_hh;  // contiguous, per direction
};

// The checks shared with the CPU op (fastmtl/lstm_checks.h), then the per-step active batch sizes.
Layer check_layer(const at::Tensor& input, const std::optional<at::Tensor>& lengths, const at::Tensor& hx,
                  const at::Tensor& cx, at::TensorList weights, bool bidirectional, const char* op) {
  Layer L;
  static_cast<fastmtl::LstmDims&>(L) =
      fastmtl::check_lstm_layer_args(input, lengths, hx, cx, weights, bidirectional, op, /*cuda=*/true);
  const int64_t per = L.bias ? 4 : 2;
  for (int64_t k = 0; k < L.D; ++k) {
    L.w_ih.push_back(weights[k * per].contiguous());
    L.w_hh.push_back(weights[k * per + 1].contiguous());
    if (L.bias) {
      L.b_ih.push_back(weights[k * per + 2].contiguous());
      L.b_hh.push_back(weights[k * per + 3].contiguous());
    }
  }
  L.bs.assign(static_cast<size_t>(L.T), L.B);
  if (lengths.has_value() && lengths->defined()) {
    const at::Tensor lc = lengths->contiguous();  // checked above
    const int64_t* lp = lc.const_data_ptr<int64_t>();
    // bs[t] = #{b : lengths[b] > t}; lengths are non-increasing so the active rows are a prefix.
    int64_t b = L.B;
    for (int64_t t = 0; t < L.T; ++t) {
      while (b > 0 && lp[b - 1] <= t) --b;
      L.bs[static_cast<size_t>(t)] = b;
    }
    L.full = L.B == 0 || lp[L.B - 1] == L.T;
  }
  return L;
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// "auto" (default), "standard" or "persistent".
std::string forced_path() {
  const char* e = std::getenv("FASTMTL_LSTM_CUDA_PATH");
  std::string s = e ? e : "";
  if (s.empty() || s == "auto") return "auto";
  FASTMTL_CHECK_VALUE(s == "standard" || s == "persistent", "FASTMTL_LSTM_CUDA_PATH must be auto, standard or ",
                      "persistent, got '", s, "'");
  return s;
}

// out (fp32 for bf16/fp16 operands, else the operands' dtype) = a @ b. Uses aten::mm.dtype_out (cuBLAS with an
// fp32 output, no rounding to 16 bits) where this torch supports it for these dtypes; otherwise the product in the
// operands' dtype, widened. The answer is remembered per dtype.
void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
    return;
  }
  static std::atomic<int> supported[2] = {{-1}, {-1}};  // bf16, fp16: -1 unknown, 0 no, 1 yes
  std::atomic<int>& flag = supported[a.scalar_type() == at::kHalf ? 1 : 0];
  if (flag.load() != 0) {
    try {
      at::mm_out(out, a, b, out.scalar_type());
      flag.store(1);
      return;
    } catch (const c10::Error&) {
      if (flag.load() == 1) throw;  // it worked before: a real error
      flag.store(0);
    }
  }
  out.copy_(at::mm(a, b));
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &st) == cudaSuccess && st != cudaStreamCaptureStatusNone;
}

// Variable lengths inside a CUDA-graph capture: the per-step batch sizes are host values, so the graph bakes them
// in (replays are valid for these lengths only), and the persistent path (which would copy them from a pinned host
// buffer) is not used.
void note_capture_with_lengths(const Layer& L, cudaStream_t stream) {
  if (!L.full && is_capturing(stream)) {
    TORCH_WARN_ONCE("fastmtl: an LSTM with lengths is being captured in a CUDA graph; the per-step batch sizes ",
                    "are frozen into the graph, so its replays are valid only for the same lengths");
  }
}

// Decides the path for one op call; throws when FASTMTL_LSTM_CUDA_PATH=persistent cannot be honoured.
bool choose_persistent(const Layer& L, const at::Tensor& input, fc::DType kdt, bool backward,
                       fc::PersistentPlan* plan, cudaStream_t stream) {
  const std::string force = forced_path();
  if (force == "standard") return false;
  if (!L.full && is_capturing(stream)) {
    FASTMTL_CHECK(force != "persistent", "FASTMTL_LSTM_CUDA_PATH=persistent, but the persistent kernels do not ",
                  "take lengths inside a CUDA-graph capture");
    return false;
  }
  const bool tf32 = at::globalContext().allowTF32CuDNN(at::Float32Op::RNN) && at::globalContext().allowTF32CuBLAS();
  check_launch(fc::lstm_persistent_plan(kdt, static_cast<int>(L.B), static_cast<int>(L.H), static_cast<int>(L.D),
                                        tf32, input.device().index(), backward, plan),
               "fastmtl LSTM persistent plan");
  FASTMTL_CHECK(plan->ok || force != "persistent", "FASTMTL_LSTM_CUDA_PATH=persistent, but the persistent ",
                (backward ? "backward" : "forward"), " kernel cannot run this layer (B=", L.B, ", H=", L.H,
                ", dtype ", input.scalar_type(), "): ", plan->reason);
  return plan->ok;
}

// The persistent launch result: true when it ran; false when the driver refused the cooperative launch (nothing
// was launched; the caller takes the standard path, unless the persistent path is forced); throws on other errors.
bool persistent_launched(const char* err, const char* what) {
  if (err == fc::kPersistentGridTooLarge) {
    FASTMTL_CHECK(forced_path() != "persistent", "FASTMTL_LSTM_CUDA_PATH=persistent, but ", what, ": ", err);
    TORCH_WARN_ONCE("fastmtl: ", err, "; this and similar calls take the standard path");
    return false;
  }
  check_launch(err, what);
  return true;
}

// Per-step batch sizes on the device for the persistent kernels (undefined when every sequence has length T).
// Pinned host buffer + non_blocking copy: no host synchronisation; the caching host allocator keeps the buffer
// alive until the copy has run.
at::Tensor batch_sizes_on_device(const Layer& L, const at::Tensor& input) {
  if (L.full) return at::Tensor();
  at::Tensor host = at::empty({L.T}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int* p = host.data_ptr<int>();
  for (int64_t t = 0; t < L.T; ++t) p[t] = static_cast<int>(L.bs[static_cast<size_t>(t)]);
  return host.to(input.device(), /*non_blocking=*/true);
}

// The tensors behind the pointers of a persistent launch's arguments, kept until the launch is queued.
struct PersistentBuffers {
  at::Tensor barrier;      // one zeroed counter per launch
  at::Tensor batch_sizes;  // batch_sizes_on_device
};

// Fills what PersistentFwdArgs and PersistentBwdArgs have in common (W_hh, the sizes, the per-step batch sizes, the
// grid barrier and its timeout).
template <typename Args>
PersistentBuffers fill_persistent_args(Args& a, const Layer& L, const at::Tensor& input) {
  PersistentBuffers buf;
  buf.barrier = at::zeros({L.D}, input.options().dtype(at::kInt));
  buf.batch_sizes = batch_sizes_on_device(L, input);
  a.whh[0] = L.w_hh[0].data_ptr();
  a.whh[1] = L.D == 2 ? L.w_hh[1].data_ptr() : nullptr;
  a.batch_sizes = buf.batch_sizes.defined() ? buf.batch_sizes.data_ptr<int>() : nullptr;
  a.barrier = reinterpret_cast<unsigned int*>(buf.barrier.data_ptr<int>());
  a.T = static_cast<int>(L.T);
  a.B = static_cast<int>(L.B);
  a.H = static_cast<int>(L.H);
  a.D = static_cast<int>(L.D);
  a.barrier_timeout_ns = fastmtl::cuda_glue::barrier_timeout_ns();
  return buf;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& lengths, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList weights, bool bidirectional, bool need_reserve) {
  Layer L = check_layer(input, lengths, hx, cx, weights, bidirectional, "lstm_layer_forward");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t T = L.T, B = L.B, I = L.I, H = L.H, D = L.D, G = 4 * H;
  const auto opts = input.options();
  at::Tensor output = at::empty({T, B, D * H}, opts);
  at::Tensor reserve = need_reserve ? at::empty({D, T, B, 5 * H}, opts) : at::empty({0}, opts);
  at::Tensor hy = at::empty({D, B, H}, opts);
  at::Tensor cy = at::empty({D, B, H}, opts);
  if (T == 0 || B == 0 || H == 0) {
    hy.copy_(hx);
    cy.copy_(cx);
    output.zero_();
    return {output, hy, cy, reserve};
  }
  const fc::DType kdt = to_kernel_dtype(input.scalar_type());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  const at::Tensor x2d = input.contiguous().view({T * B, I});
  const at::Tensor hx_c = hx.contiguous();
  const at::Tensor cx_c = cx.contiguous();

  // Input projection for every step and both directions in one GEMM: (T*B, D*4H), biases folded in.
  const at::Tensor wih_cat = D == 1 ? L.w_ih[0] : at::cat({L.w_ih[0], L.w_ih[1]}, 0);
  at::Tensor xproj;
  if (L.bias) {
    at::Tensor bias = D == 1 ? L.b_ih[0] + L.b_hh[0] : at::cat({L.b_ih[0] + L.b_hh[0], L.b_ih[1] + L.b_hh[1]}, 0);
    xproj = at::addmm(bias, x2d, wih_cat.t());
  } else {
    xproj = at::mm(x2d, wih_cat.t());
  }
  const int64_t ldx = D * G;

  // Path selection (see the header comment and csrc/cuda/README.md).
  fc::PersistentPlan plan;
  note_capture_with_lengths(L, stream);
  if (choose_persistent(L, input, kdt, /*backward=*/false, &plan, stream)) {
    at::Tensor hbuf = at::empty({D, 2, B, H}, opts);
    hbuf.select(1, 0).copy_(hx_c);
    fc::PersistentFwdArgs a;
    const PersistentBuffers buf = fill_persistent_args(a, L, input);
    a.xproj = xproj.data_ptr();
    a.cx = cx_c.data_ptr();
    a.out = output.data_ptr();
    a.hy = hy.data_ptr();
    a.cy = cy.data_ptr();
    a.reserve = need_reserve ? reserve.data_ptr() : nullptr;
    a.hbuf = hbuf.data_ptr();
    if (persistent_launched(fc::lstm_persistent_fwd(kdt, a, plan, stream), "fastmtl LSTM persistent forward kernel"))
      return {output, hy, cy, reserve};
  }

  // Standard path.
  const int64_t ldo = D * H;
  for (int64_t d = 0; d < D; ++d) {
    const at::Tensor whh_t = L.w_hh[d].t();  // (H, 4H) view
    at::Tensor h_state = hx_c.select(0, d).clone(at::MemoryFormat::Contiguous);
    at::Tensor c_state = cx_c.select(0, d).to(acc_type(input.scalar_type())).contiguous().clone();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = d == 0 ? s : T - 1 - s;
      const int64_t bt = L.bs[static_cast<size_t>(t)];
      if (bt > 0) {
        // Recurrent GEMM accumulated in place onto this step's input projection (beta = 1): one rounding of the
        // gate pre-activations in bf16/fp16 instead of two.
        xproj.narrow(0, t * B, bt).narrow(1, d * G, G).addmm_(h_state.narrow(0, 0, bt), whh_t);
      }
      fc::FwdStepArgs a;
      a.xproj = ptr_at(xproj, t * B * ldx + d * G);
      a.xproj_ld = ldx;
      a.c_state = c_state.data_ptr();
      a.h_state = h_state.data_ptr();
      a.out = ptr_at(output, t * B * ldo + d * H);
      a.out_ld = ldo;
      a.reserve = need_reserve ? ptr_at(reserve, (d * T + t) * B * 5 * H) : nullptr;
      a.B = static_cast<int>(B);
      a.bt = static_cast<int>(bt);
      a.H = static_cast<int>(H);
      check_launch(fc::lstm_fwd_step(kdt, a, stream), "fastmtl LSTM forward step kernel");
    }
    hy.select(0, d).copy_(h_state);
    cy.select(0, d).copy_(c_state);
  }
  return {output, hy, cy, reserve};
}

// Zero weight gradients (empty layer), each with the leading sizes `lead` ({} or {K}).
std::vector<at::Tensor> zero_weight_grads(at::TensorList weights, at::IntArrayRef lead) {
  std::vector<at::Tensor> grad_w;
  for (const auto& w : weights) {
    std::vector<int64_t> sizes = lead.vec();
    sizes.insert(sizes.end(), w.sizes().begin(), w.sizes().end());
    grad_w.push_back(at::zeros(sizes, w.options()));
  }
  return grad_w;
}

// The standard path's backward time loop, both directions, on gradient rows: rep gradient rows per forward row
// (rep = 1: lstm_layer_backward; rep = K: lstm_layer_backward_multi, gradient row b*K + k = cotangent k of forward
// row b). go (T, B*rep, D*H), ghy, gcy (D, B*rep, H) and the results dG (T, B*rep, D*4H), grad_hx, grad_cx
// (D, B*rep, H) are in gradient rows; hx_c, cx_c, out_c, res and hprev (D, T, B, H) in forward rows. Per step one
// fused kernel (BwdStepArgs::rep) and one GEMM dG_t[:bt] @ W_hh on the bt = rep * bs[t] active gradient rows.
void standard_backward_loop(const Layer& L, fc::DType kdt, cudaStream_t stream, int64_t rep, const at::Tensor& go,
                            const at::Tensor& ghy, const at::Tensor& gcy, const at::Tensor& hx_c,
                            const at::Tensor& cx_c, const at::Tensor& out_c, const at::Tensor& res, at::Tensor& dG,
                            at::Tensor& hprev, at::Tensor& grad_hx, at::Tensor& grad_cx) {
  const int64_t T = L.T, B = L.B, H = L.H, D = L.D, G = 4 * H, R = B * rep;
  const int64_t ldo = D * H, ldg = D * G;
  const auto acc_opts = go.options().dtype(acc_type(go.scalar_type()));
  for (int64_t d = 0; d < D; ++d) {
    const at::Tensor& whh = L.w_hh[d];  // (4H, H)
    at::Tensor dc_state = at::empty({R, H}, acc_opts);
    at::Tensor dhrec = at::empty({R, H}, acc_opts);
    int64_t n_prev = 0;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = d == 0 ? T - 1 - s : s;
      const int64_t tp = d == 0 ? t - 1 : t + 1;  // previous step in this direction's forward order
      const int64_t n_cprev = (tp >= 0 && tp < T) ? rep * L.bs[static_cast<size_t>(tp)] : 0;
      const int64_t bt = rep * L.bs[static_cast<size_t>(t)];
      fc::BwdStepArgs a;
      a.grad_out = ptr_at(go, t * R * ldo + d * H);
      a.grad_out_ld = ldo;
      a.dhrec = dhrec.data_ptr();
      a.grad_hy = ptr_at(ghy, d * R * H);
      a.grad_cy = ptr_at(gcy, d * R * H);
      a.dc_state = dc_state.data_ptr();
      a.res = ptr_at(res, (d * T + t) * B * 5 * H);
      a.res_prev = n_cprev > 0 ? ptr_at(res, (d * T + tp) * B * 5 * H) : nullptr;
      a.cx = ptr_at(cx_c, d * B * H);
      a.hsrc = n_cprev > 0 ? ptr_at(out_c, tp * B * ldo + d * H) : nullptr;
      a.hsrc_ld = ldo;
      a.hx = ptr_at(hx_c, d * B * H);
      a.hprev = ptr_at(hprev, (d * T + t) * B * H);
      a.dgates = ptr_at(dG, t * R * ldg + d * G);
      a.dgates_ld = ldg;
      a.grad_hx = ptr_at(grad_hx, d * R * H);
      a.grad_cx = ptr_at(grad_cx, d * R * H);
      a.B = static_cast<int>(R);
      a.bt = static_cast<int>(bt);
      a.n_prev = static_cast<int>(n_prev);
      a.n_cprev = static_cast<int>(n_cprev);
      a.H = static_cast<int>(H);
      a.rep = static_cast<int>(rep);
      check_launch(fc::lstm_bwd_step(kdt, a, stream), "fastmtl LSTM backward step kernel");
      if (bt > 0) {
        at::Tensor dh_v = dhrec.narrow(0, 0, bt);
        mm_acc_out(dh_v, dG.select(0, t).narrow(0, 0, bt).narrow(1, d * G, G), whh);
      }
      n_prev = bt;
    }
    check_launch(fc::lstm_bwd_finish(kdt, dhrec.data_ptr(), dc_state.data_ptr(), ptr_at(grad_hx, d * R * H),
                                     ptr_at(grad_cx, d * R * H), static_cast<int>(n_prev), static_cast<int>(H),
                                     stream),
                 "fastmtl LSTM backward finish kernel");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_layer_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input,
    const std::optional<at::Tensor>& lengths, const at::Tensor& hx, const at::Tensor& cx, at::TensorList weights,
    bool bidirectional, const at::Tensor& output, const at::Tensor& reserve) {
  Layer L = check_layer(input, lengths, hx, cx, weights, bidirectional, "lstm_layer_backward");
  const int64_t T = L.T, B = L.B, I = L.I, H = L.H, D = L.D, G = 4 * H;
  const char* op = "lstm_layer_backward";
  fastmtl::check_lstm_backward_args(grad_output, grad_hy, grad_cy, output, reserve, input, L, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();

  at::Tensor grad_input = (T == 0 || B == 0 || H == 0) ? at::zeros({T, B, I}, opts) : at::empty({T, B, I}, opts);
  at::Tensor grad_hx = at::empty({D, B, H}, opts);
  at::Tensor grad_cx = at::empty({D, B, H}, opts);
  if (T == 0 || B == 0 || H == 0) {
    grad_hx.copy_(grad_hy);
    grad_cx.copy_(grad_cy);
    return {grad_input, grad_hx, grad_cx, zero_weight_grads(weights, {})};
  }
  std::vector<at::Tensor> grad_w;
  const fc::DType kdt = to_kernel_dtype(input.scalar_type());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor ghy = grad_hy.contiguous();
  const at::Tensor gcy = grad_cy.contiguous();
  const at::Tensor hx_c = hx.contiguous();
  const at::Tensor cx_c = cx.contiguous();
  const at::Tensor out_c = output.contiguous();
  const at::Tensor res = reserve.contiguous();
  const int64_t ldg = D * G;

  at::Tensor dG = at::empty({T, B, ldg}, opts);        // gate pre-activation gradients, both directions
  at::Tensor hprev = at::empty({D, T, B, H}, opts);    // h_{t-1} per step (hx at each sequence's first step)
  fc::PersistentPlan plan;
  note_capture_with_lengths(L, stream);
  bool persistent = choose_persistent(L, input, kdt, /*backward=*/true, &plan, stream);
  if (persistent) {
    fc::PersistentBwdArgs a;
    const PersistentBuffers buf = fill_persistent_args(a, L, input);
    a.grad_out = go.data_ptr();
    a.grad_hy = ghy.data_ptr();
    a.grad_cy = gcy.data_ptr();
    a.reserve = res.data_ptr();
    a.out = out_c.data_ptr();
    a.hx = hx_c.data_ptr();
    a.cx = cx_c.data_ptr();
    a.dgates = dG.data_ptr();
    a.hprev = hprev.data_ptr();
    a.grad_hx = grad_hx.data_ptr();
    a.grad_cx = grad_cx.data_ptr();
    persistent =
        persistent_launched(fc::lstm_persistent_bwd(kdt, a, plan, stream), "fastmtl LSTM persistent backward kernel");
  }
  if (!persistent) {
    standard_backward_loop(L, kdt, stream, /*rep=*/1, go, ghy, gcy, hx_c, cx_c, out_c, res, dG, hprev, grad_hx,
                           grad_cx);
  }

  // Weight and input gradients as large GEMMs over all steps (padding rows of dG are zero).
  const at::Tensor dG2 = dG.view({T * B, ldg});
  const at::Tensor x2d = input.contiguous().view({T * B, I});
  const at::Tensor wih_cat = D == 1 ? L.w_ih[0] : at::cat({L.w_ih[0], L.w_ih[1]}, 0);  // (D*4H, I)
  at::Tensor gi2 = grad_input.view({T * B, I});
  at::mm_out(gi2, dG2, wih_cat);
  const at::Tensor gwih = at::mm(dG2.t(), x2d);  // (D*4H, I)
  at::Tensor gbias;
  if (L.bias) gbias = dG2.sum(0, /*keepdim=*/false, acc_type(input.scalar_type())).to(input.scalar_type());
  for (int64_t d = 0; d < D; ++d) {
    grad_w.push_back(D == 1 ? gwih : gwih.narrow(0, d * G, G).clone());
    grad_w.push_back(at::mm(dG2.narrow(1, d * G, G).t(), hprev.select(0, d).view({T * B, H})));
    if (L.bias) {
      at::Tensor gb = gbias.narrow(0, d * G, G);
      grad_w.push_back(gb.clone());
      grad_w.push_back(gb.clone());
    }
  }
  return {grad_input, grad_hx, grad_cx, grad_w};
}

// (K, X, B, F) stacked cotangents -> (X, B*K, F), row b*K + k = cotangent k of forward row b.
at::Tensor interleave_cotangents(const at::Tensor& t) {
  return t.permute({1, 2, 0, 3}).contiguous().view({t.size(1), t.size(2) * t.size(0), t.size(3)});
}
// (X, B*K, F) gradient rows -> (K, X, B, F).
at::Tensor deinterleave_rows(const at::Tensor& t, int64_t K) {
  return t.view({t.size(0), t.size(1) / K, K, t.size(2)}).permute({2, 0, 1, 3}).contiguous();
}

// K cotangents against one saved forward (csrc/fastmtl.cpp): exactly K lstm_layer_backward calls, computed as one.
// The cotangents are interleaved into B*K gradient rows (row b*K + k = cotangent k of forward row b, so the rows
// active at step t are the prefix K * bs[t]) and the standard path's time loop runs on them (its step kernel reads
// the saved forward values of row b*K + k from forward row b: BwdStepArgs::rep = K). Always the standard path: the
// persistent backward kernel (lstm_persistent.cu) has no rows-per-forward-row divisor, so FASTMTL_LSTM_CUDA_PATH
// and the persistent rule do not apply here. After the loop: grad_input one GEMM over all K*T*B gradient rows, the
// weight gradients one GEMM per (cotangent, direction) on strided views of dG (rows b*K + k), biases one column sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_layer_backward_multi_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input,
    const std::optional<at::Tensor>& lengths, const at::Tensor& hx, const at::Tensor& cx, at::TensorList weights,
    bool bidirectional, const at::Tensor& output, const at::Tensor& reserve) {
  const char* op = "lstm_layer_backward_multi";
  Layer L = check_layer(input, lengths, hx, cx, weights, bidirectional, op);
  const int64_t K =
      fastmtl::check_lstm_backward_multi_args(grad_output, grad_hy, grad_cy, output, reserve, input, L, op);
  const int64_t T = L.T, B = L.B, I = L.I, H = L.H, D = L.D, G = 4 * H, ldg = D * G;
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();
  if (K == 0 || T == 0 || B == 0 || H == 0) {
    return {at::zeros({K, T, B, I}, opts), grad_hy.clone(at::MemoryFormat::Contiguous),
            grad_cy.clone(at::MemoryFormat::Contiguous), zero_weight_grads(weights, {K})};
  }
  const fc::DType kdt = to_kernel_dtype(input.scalar_type());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  note_capture_with_lengths(L, stream);
  const int64_t R = B * K;  // gradient rows
  FASTMTL_CHECK_VALUE(R <= std::numeric_limits<int>::max(), op, ": B * K = ", B, " * ", K,
                      " gradient rows exceed the kernels' 32-bit row index; pass fewer cotangents per call");
  const at::Tensor go = interleave_cotangents(grad_output);  // (T, B*K, D*H)
  const at::Tensor ghy = interleave_cotangents(grad_hy);     // (D, B*K, H)
  const at::Tensor gcy = interleave_cotangents(grad_cy);
  at::Tensor dG = at::empty({T, R, ldg}, opts);      // gradient rows
  at::Tensor hprev = at::empty({D, T, B, H}, opts);  // forward rows (the same for every cotangent)
  at::Tensor grad_hx = at::empty({D, R, H}, opts);
  at::Tensor grad_cx = at::empty({D, R, H}, opts);
  standard_backward_loop(L, kdt, stream, K, go, ghy, gcy, hx.contiguous(), cx.contiguous(), output.contiguous(),
                         reserve.contiguous(), dG, hprev, grad_hx, grad_cx);

  // grad_input: one GEMM over every gradient row (padding rows of dG are zero), then back to (K, T, B, I).
  const at::Tensor wih_cat = D == 1 ? L.w_ih[0] : at::cat({L.w_ih[0], L.w_ih[1]}, 0);  // (D*4H, I)
  at::Tensor gin = at::empty({T, R, I}, opts);
  at::Tensor gin2 = gin.view({T * R, I});
  at::mm_out(gin2, dG.view({T * R, ldg}), wih_cat);
  // Weight gradients: cotangent k's rows of dG are the strided (T*B, D*4H) view dG3[:, k] (row stride K*D*4H).
  const at::Tensor dG3 = dG.view({T * B, K, ldg});
  const at::Tensor x2d = input.contiguous().view({T * B, I});
  at::Tensor gbias;  // (K, D*4H)
  if (L.bias) gbias = dG3.sum(0, /*keepdim=*/false, acc_type(input.scalar_type())).to(input.scalar_type());
  std::vector<at::Tensor> grad_w;
  for (int64_t d = 0; d < D; ++d) {
    const at::Tensor hprev_d = hprev.select(0, d).view({T * B, H});
    at::Tensor gwih = at::empty({K, G, I}, opts);
    at::Tensor gwhh = at::empty({K, G, H}, opts);
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor dG_kd_t = dG3.select(1, k).narrow(1, d * G, G).t();  // (4H, T*B)
      at::Tensor gwih_k = gwih.select(0, k);
      at::Tensor gwhh_k = gwhh.select(0, k);
      at::mm_out(gwih_k, dG_kd_t, x2d);
      at::mm_out(gwhh_k, dG_kd_t, hprev_d);
    }
    grad_w.push_back(gwih);
    grad_w.push_back(gwhh);
    if (L.bias) {
      at::Tensor gb = gbias.narrow(1, d * G, G);
      grad_w.push_back(gb.clone(at::MemoryFormat::Contiguous));
      grad_w.push_back(gb.clone(at::MemoryFormat::Contiguous));
    }
  }
  return {deinterleave_rows(gin, K), deinterleave_rows(grad_hx, K), deinterleave_rows(grad_cx, K), grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
  m.impl("lstm_layer_backward_multi", &lstm_layer_backward_multi_cuda);
}
