// Argument checks of the lstm_layer_forward/backward ops shared by the CPU kernel and the CUDA glue (same messages
// on every backend; only the accepted input dtypes differ).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fastmtl/checks.h"

namespace fastmtl {

// Sizes of one LSTM layer call: T steps, B sequences, I inputs, H hidden units, D directions.
struct LstmDims {
  int64_t T = 0, B = 0, I = 0, H = 0, D = 1;
  bool bias = false;
};

// `t` is defined and has input's dtype and device.
inline void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* op, const std::string& name) {
  FASTMTL_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor");
  FASTMTL_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                     " but input has dtype ", input.scalar_type());
  FASTMTL_CHECK_VALUE(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
                      input.device());
}

// input (T, B, I); weights [w_ih, w_hh, (b_ih, b_hh)] per direction; hx, cx (D, B, H); lengths (B,) int64 on the
// CPU, in [1, T], non-increasing. `cuda`: the CUDA backend (input on a CUDA device, float32/float64/bfloat16/
// float16) or the CPU one (float32/float64).
inline LstmDims check_lstm_layer_args(const at::Tensor& input, const std::optional<at::Tensor>& lengths,
                                      const at::Tensor& hx, const at::Tensor& cx, at::TensorList weights,
                                      bool bidirectional, const char* op, bool cuda) {
  LstmDims d;
  d.D = bidirectional ? 2 : 1;
  FASTMTL_CHECK_VALUE(input.dim() == 3, op, ": input must be 3-D (T, B, input_size), got shape ",
                      shape_str(input));
  const at::ScalarType st = input.scalar_type();
  if (cuda) {
    FASTMTL_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                       ": input must be float32, float64, bfloat16 or float16 on CUDA, got ", st);
    FASTMTL_CHECK_VALUE(input.is_cuda(), op, ": input must be a CUDA tensor here, got device ", input.device());
  } else {
    FASTMTL_CHECK_TYPE(st == at::kFloat || st == at::kDouble, op, ": input must be float32 or float64 on the CPU, got ",
                       st);
  }
  d.T = input.size(0);
  d.B = input.size(1);
  d.I = input.size(2);
  const int64_t n = static_cast<int64_t>(weights.size());
  FASTMTL_CHECK_VALUE(n == 2 * d.D || n == 4 * d.D, op, ": weights must hold ", 2 * d.D, " (no bias) or ", 4 * d.D,
                      " (with bias) tensors for ", d.D, " direction(s), got ", n);
  d.bias = n == 4 * d.D;
  const int64_t per = d.bias ? 4 : 2;
  FASTMTL_CHECK_VALUE(weights[1].defined() && weights[1].dim() == 2, op,
                      ": weights[1] (w_hh) must be 2-D (4*hidden_size, hidden_size), got shape ",
                      weights[1].defined() ? shape_str(weights[1]) : std::string("None"));
  d.H = weights[1].size(1);
  const int64_t G = 4 * d.H;
  static const char* names[] = {"w_ih", "w_hh", "b_ih", "b_hh"};
  for (int64_t dir = 0; dir < d.D; ++dir) {
    for (int64_t k = 0; k < per; ++k) {
      const at::Tensor& w = weights[dir * per + k];
      std::vector<int64_t> expected;
      if (k == 0) expected = {G, d.I};
      else if (k == 1) expected = {G, d.H};
      else expected = {G};
      const std::string nm = "weights[" + std::to_string(dir * per + k) + "] (" + names[k] +
                             (dir ? "_reverse" : "") + ")";
      FASTMTL_CHECK_VALUE(w.defined() && w.sizes() == at::IntArrayRef(expected), op, ": ", nm, " must have shape ",
                          at::IntArrayRef(expected), ", got ", w.defined() ? shape_str(w) : std::string("None"));
      check_like_input(w, input, op, nm);
    }
  }
  const std::vector<int64_t> state{d.D, d.B, d.H};
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&hx, "hx"}, {&cx, "cx"}}) {
    FASTMTL_CHECK_VALUE(t->defined() && t->sizes() == at::IntArrayRef(state), op, ": ", name,
                        " must have shape (D, B, H) = ", at::IntArrayRef(state), ", got ",
                        t->defined() ? shape_str(*t) : std::string("None"));
    check_like_input(*t, input, op, name);
  }
  if (lengths.has_value() && lengths->defined()) {
    const at::Tensor& len = *lengths;
    FASTMTL_CHECK_TYPE(len.scalar_type() == at::kLong, op, ": lengths must be int64, got ", len.scalar_type());
    FASTMTL_CHECK_VALUE(len.device().is_cpu(), op, ": lengths must be on the CPU (the per-step batch sizes are ",
                        "computed on the host), got ", len.device());
    FASTMTL_CHECK_VALUE(len.dim() == 1 && len.size(0) == d.B, op, ": lengths must have shape (B,) = (", d.B,
                        ",), got ", shape_str(len));
    const at::Tensor lc = len.contiguous();
    const int64_t* p = lc.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < d.B; ++b) {
      FASTMTL_CHECK_VALUE(p[b] >= 1 && p[b] <= d.T, op, ": lengths[", b, "] = ", p[b], " is outside [1, T] with T = ",
                          d.T);
      FASTMTL_CHECK_VALUE(b == 0 || p[b] <= p[b - 1], op, ": lengths must be sorted in non-increasing order ",
                          "(lengths[", b - 1, "] = ", p[b - 1], " < lengths[", b, "] = ", p[b], ")");
    }
  }
  return d;
}

// The backward op's extra tensors: grad_output and output (T, B, D*H), grad_hy and grad_cy (D, B, H), reserve
// (D, T, B, 5H), all with input's dtype and device. K >= 0 (lstm_layer_backward_multi): the incoming gradients
// carry a leading K (K stacked cotangents), output and reserve do not.
inline void check_lstm_backward_args(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                     const at::Tensor& grad_cy, const at::Tensor& output, const at::Tensor& reserve,
                                     const at::Tensor& input, const LstmDims& d, const char* op, int64_t K = -1) {
  const std::vector<int64_t> out_shape{d.T, d.B, d.D * d.H}, state{d.D, d.B, d.H}, res_shape{d.D, d.T, d.B, 5 * d.H};
  std::vector<int64_t> g_out = out_shape, g_state = state;
  if (K >= 0) {
    g_out.insert(g_out.begin(), K);
    g_state.insert(g_state.begin(), K);
  }
  using Expect = std::tuple<const at::Tensor*, const char*, const std::vector<int64_t>*>;
  for (auto [t, name, shape] : {Expect{&grad_output, "grad_output", &g_out}, Expect{&output, "output", &out_shape},
                                Expect{&grad_hy, "grad_hy", &g_state}, Expect{&grad_cy, "grad_cy", &g_state}}) {
    FASTMTL_CHECK_VALUE(t->defined() && t->sizes() == at::IntArrayRef(*shape), op, ": ", name, " must have shape ",
                        at::IntArrayRef(*shape), ", got ", t->defined() ? shape_str(*t) : std::string("None"));
  }
  FASTMTL_CHECK_VALUE(reserve.defined() && reserve.sizes() == at::IntArrayRef(res_shape), op,
                      ": reserve must have shape (D, T, B, 5H) = ", at::IntArrayRef(res_shape), ", got ",
                      reserve.defined() ? shape_str(reserve) : std::string("None"),
                      " (run lstm_layer_forward with need_reserve=True when gradients are needed)");
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&grad_output, "grad_output"},
                         {&grad_hy, "grad_hy"}, {&grad_cy, "grad_cy"}, {&output, "output"}, {&reserve, "reserve"}}) {
    check_like_input(*t, input, op, name);
  }
}

// lstm_layer_backward_multi: grad_output (K, T, B, D*H), grad_hy and grad_cy (K, D, B, H); output and reserve as
// for one backward. Returns K.
inline int64_t check_lstm_backward_multi_args(const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                              const at::Tensor& grad_cy, const at::Tensor& output,
                                              const at::Tensor& reserve, const at::Tensor& input, const LstmDims& d,
                                              const char* op) {
  FASTMTL_CHECK_VALUE(grad_output.defined() && grad_output.dim() == 4, op,
                      ": grad_output must have shape (K, T, B, D*H) (K stacked output gradients), got ",
                      grad_output.defined() ? shape_str(grad_output) : std::string("None"));
  const int64_t K = grad_output.size(0);
  check_lstm_backward_args(grad_output, grad_hy, grad_cy, output, reserve, input, d, op, K);
  return K;
}

}  // namespace fastmtl
