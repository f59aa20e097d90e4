// fastmtl._C: build information (pybind11) and every op schema (TORCH_LIBRARY), in one place.
//
// Backends register implementations in csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(fastmtl, CPU, m)) and
// csrc/cuda/<op>_glue.cpp (TORCH_LIBRARY_IMPL(fastmtl, CUDA, m)). Fake (meta) kernels and autograd live in
// fastmtl/ops/.
//
// ---------------------------------------------------------------------------------------------------------
// LSTM, one layer (both directions when bidirectional):
//   input   (T, B, I) time-major, contiguous
//   lengths int64 (B,) on the CPU, non-increasing, each in [1, T]; None means every sequence has length T.
//           The caller sorts the batch once (fastmtl.nn.LSTM does) so the sequences still running at step t
//           are always a prefix of the batch.
//   hx, cx  (D, B, H), D = 2 if bidirectional else 1
//   weights per direction, in torch.nn.LSTM order: w_ih (4H, I), w_hh (4H, H)[, b_ih (4H), b_hh (4H)];
//           len(weights) is 2*D (no bias) or 4*D (bias). Gate order i, f, g, o as torch.nn.LSTM.
//   output  (T, B, D*H); positions t >= lengths[b] are zero.
//   hy, cy  (D, B, H): the state at each sequence's last real token (forward direction) or at t = 0 (reverse).
//   reserve (D, T, B, 5H) when need_reserve (activated gates i, f, g, o and the cell state c_t per step),
//           else an empty tensor of shape (0,). Only lstm_layer_backward(_multi) reads it.
//   lstm_layer_backward_multi: K output gradients against one saved forward, as K stacked cotangents
//           grad_output (K, T, B, D*H), grad_hy, grad_cy (K, D, B, H); every result has the leading K
//           (grad_input (K, T, B, I), grad_hx, grad_cx (K, D, B, H), grad_weights[i] (K, *weights[i].shape)), row k
//           what lstm_layer_backward gives for cotangent k. One time loop over K*B rows.
// ---------------------------------------------------------------------------------------------------------
// Multi-task heads + losses:
//   hidden   (B, T, D) batch-first; lengths int64 (B,) on hidden's device (any order), None = all T.
//   per task k: weight (C_k, D), bias (C_k) or None, target int64 (B,) [sequence] or (B, T) [token],
//           class weight (C_k) or None; levels[k]: 0 sequence, 1 token; poolings[k] (sequence tasks):
//           0 last, 1 first, 2 mean, 3 max, 4 last_first (first D/2 features from the last real token, the other
//           D/2 from the first: the forward/backward halves of a bidirectional encoder).
//   task_weights (K,) floating, hidden's device: lambda_k.
//   total = sum_k lambda_k * L_k, L_k = F.cross_entropy semantics (mean over non-ignored items, class weights,
//           label smoothing); a task with every item ignored has L_k = 0.
//   When compute_grad, grad_hidden / grad_weights / grad_biases are d total / d (hidden, W_k, b_k) (lambdas
//   included); otherwise they are empty. grad_biases[k] is empty for a task without bias.
// ---------------------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------------------
// Linear-chain CRF (pytorch-crf semantics: score = start[y_0] + sum_t e[t, y_t] + sum_{t>=1} A[y_{t-1}, y_t] + end[y_L-1]):
//   emissions (B, T, C) batch first, float32/float64/bfloat16/float16; tags int64 (B, T); lengths int64 (B,) on
//           emissions' device, each in [0, T]: positions t >= lengths[b] are ignored (their tags need not be valid);
//           a sequence of length 0 has NLL 0, no gradient, an all -1 path and zero marginals.
//   transitions (C, C) indexed [from, to], start (C,), end (C,): emissions' dtype.
//   allowed (C, C) [from, to], allowed_start (C,), allowed_end (C,): optional bool masks (None: all allowed). A
//           forbidden entry scores -inf: no decoded path and no marginal uses it, its parameter gets no gradient, and
//           the NLL of a gold path that uses one is +inf (that sequence then contributes no gradient).
//   Math in float32 for float32/bfloat16/float16 inputs, float64 for float64 ("compute dtype").
//   crf_nll_fwd -> nll (B,) compute dtype, log_z (B,) compute dtype (log partition), alpha (B, T, C) compute dtype
//           (forward log-scores; saved for crf_nll_bwd).
//   crf_nll_bwd(grad_nll (B,), ..., log_z, alpha) -> d(sum_b grad_nll[b] nll[b]) / d(emissions, transitions, start,
//           end), each in its input's dtype.
//   crf_decode -> (B, T) int64 Viterbi paths, -1 at padding (ties: the first maximal index, as pytorch-crf).
//   crf_marginals -> (B, T, C) per-token marginal probabilities in the compute dtype, 0 at padding.
// ---------------------------------------------------------------------------------------------------------
#include <torch/library.h>
#ifndef FASTMTL_NO_PYTHON
#include <torch/extension.h>

#include "cpu/kernels/gemm.h"
#endif

#include "fastmtl/cpu_isa.h"
#include "fastmtl/heads_schema.h"

#ifndef FASTMTL_TORCH_VERSION
#define FASTMTL_TORCH_VERSION "unknown"
#endif
#ifndef FASTMTL_BUILD_FLAGS
#define FASTMTL_BUILD_FLAGS ""
#endif

TORCH_LIBRARY(fastmtl, m) {
  m.def(
      "lstm_layer_forward(Tensor input, Tensor? lengths, Tensor hx, Tensor cx, Tensor[] weights, "
      "bool bidirectional, bool need_reserve) -> (Tensor output, Tensor hy, Tensor cy, Tensor reserve)");
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor? lengths, "
      "Tensor hx, Tensor cx, Tensor[] weights, bool bidirectional, Tensor output, Tensor reserve) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor[] grad_weights)");
  m.def(
      "lstm_layer_backward_multi(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor? lengths, "
      "Tensor hx, Tensor cx, Tensor[] weights, bool bidirectional, Tensor output, Tensor reserve) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor[] grad_weights)");
  m.def(fastmtl::kMultitaskLossSchema);     // fastmtl/heads_schema.h (shared with the CUDA emulation tests)
  m.def(fastmtl::kMultitaskPredictSchema);
  m.def(
      "crf_nll_fwd(Tensor emissions, Tensor tags, Tensor lengths, Tensor transitions, Tensor start, Tensor end, "
      "Tensor? allowed, Tensor? allowed_start, Tensor? allowed_end) -> (Tensor nll, Tensor log_z, Tensor alpha)");
  m.def(
      "crf_nll_bwd(Tensor grad_nll, Tensor emissions, Tensor tags, Tensor lengths, Tensor transitions, Tensor start, "
      "Tensor end, Tensor? allowed, Tensor? allowed_start, Tensor? allowed_end, Tensor log_z, Tensor alpha) "
      "-> (Tensor grad_emissions, Tensor grad_transitions, Tensor grad_start, Tensor grad_end)");
  m.def(
      "crf_decode(Tensor emissions, Tensor lengths, Tensor transitions, Tensor start, Tensor end, Tensor? allowed, "
      "Tensor? allowed_start, Tensor? allowed_end) -> Tensor");
  m.def(
      "tagger_forward(Tensor ids, Tensor lengths, Tensor? chars, Tensor word_weight, Tensor? char_weight, "
      "Tensor? conv_weight, Tensor? conv_bias, Tensor[] lstm_weights, int num_layers, bool bidirectional, "
      "Tensor[] head_weights, Tensor[] head_biases, int[] head_layers, int[] levels, int[] poolings, int[] outputs) "
      "-> Tensor[]");
  m.def(
      "crf_marginals(Tensor emissions, Tensor lengths, Tensor transitions, Tensor start, Tensor end, "
      "Tensor? allowed, Tensor? allowed_start, Tensor? allowed_end) -> Tensor");
}

#ifndef FASTMTL_NO_PYTHON
namespace {
pybind11::dict build_info() {
  pybind11::dict d;
  d["torch_version"] = FASTMTL_TORCH_VERSION;
#ifdef FASTMTL_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["flags"] = FASTMTL_BUILD_FLAGS;
#if defined(_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["compiler"] =
#if defined(__clang__)
      std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
      std::string("gcc ") + __VERSION__;
#else
      std::string("unknown");
#endif
  std::vector<std::string> compiled;
  for (int i = 0; i < fastmtl::cpu::kNumIsa; ++i)
    if (fastmtl::cpu::isa_compiled(static_cast<fastmtl::cpu::Isa>(i)))
      compiled.emplace_back(fastmtl::cpu::isa_name(static_cast<fastmtl::cpu::Isa>(i)));
  d["cpu_kernels_compiled"] = compiled;
  return d;
}

// c = op(a) @ op(b) + beta * c in place through fastmtl's own float32 GEMM (csrc/cpu/kernels/gemm.h) with the
// active ISA's kernel, whether or not the LSTM op would use it for this size: a (k, m) if trans_a else (m, k),
// b (n, k) if trans_b else (k, n), c (m, n); float32 CPU matrices with the last dimension contiguous.
void gemm_f32_for_tests(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b, double beta,
                        at::Tensor c) {
  for (const at::Tensor* t : {&a, &b, static_cast<const at::Tensor*>(&c)}) {
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "_gemm_f32_for_tests: expected 2-D float32 CPU tensors, got ", t->sizes(), " ", t->scalar_type());
    TORCH_CHECK(t->size(1) <= 1 || t->stride(1) == 1, "_gemm_f32_for_tests: the last dimension must be contiguous");
  }
  TORCH_CHECK(beta == 0.0 || beta == 1.0, "_gemm_f32_for_tests: beta must be 0 or 1");
  const int64_t m = c.size(0), n = c.size(1), k = trans_a ? a.size(0) : a.size(1);
  TORCH_CHECK((trans_a ? a.size(1) : a.size(0)) == m && (trans_b ? b.size(0) : b.size(1)) == n &&
                  (trans_b ? b.size(1) : b.size(0)) == k,
              "_gemm_f32_for_tests: shapes do not match: a ", a.sizes(), " b ", b.sizes(), " c ", c.sizes());
  fastmtl::cpu::gemm_f32(trans_a, trans_b, m, n, k, a.const_data_ptr<float>(), a.stride(0),
                         b.const_data_ptr<float>(), b.stride(0), float(beta), c.data_ptr<float>(), c.stride(0));
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmtl native extension: fused LSTM and multi-task head kernels";
  m.def("build_info", &build_info, "How this extension was built (torch version, CUDA, flags).");
  m.def(
      "cpu_kernel", [] { return std::string(fastmtl::cpu::isa_name(fastmtl::cpu::active_isa())); },
      "The instruction set the CPU kernels use now (scalar, avx2 or avx512).");
  m.def("set_cpu_kernel", &fastmtl::cpu::set_active_isa, pybind11::arg("name"),
        "Selects the CPU kernels' instruction set: auto, scalar, avx2 or avx512 (must be supported here).");
  m.def("cpu_kernel_override", &fastmtl::cpu::isa_override,
        "'auto', or the instruction set forced by set_cpu_kernel / FASTMTL_CPU_KERNEL.");
  m.def("cpu_kernels", &fastmtl::cpu::supported_isa_names,
        "The instruction sets this CPU and build support, baseline first.");
  m.def("_gemm_f32_for_tests", &gemm_f32_for_tests, pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("trans_a"),
        pybind11::arg("trans_b"), pybind11::arg("beta"), pybind11::arg("c"),
        "Tests only: c = op(a) @ op(b) + beta * c in place with fastmtl's own float32 GEMM (active ISA).");
  m.def("_gemm_f32_used_by_lstm", &fastmtl::cpu::use_own_gemm_f32, pybind11::arg("m"), pybind11::arg("n"),
        pybind11::arg("k"),
        "Tests only: whether the LSTM op runs a float32 GEMM of this size through fastmtl's own kernel (active ISA).");
}
#endif  // FASTMTL_NO_PYTHON
