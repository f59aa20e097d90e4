// The CPU LSTM layer (csrc/cpu/lstm.cpp) for other CPU ops of the extension (tagger.cpp), without the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastmtl {
namespace cpu {
// lstm_layer_forward's CPU kernel (schema: csrc/fastmtl.cpp): input (T, B, I), lengths (B,) non-increasing in
// [1, T] or none, hx / cx (D, B, H), weights per direction W_ih, W_hh[, b_ih, b_hh]. Returns output (T, B, D*H),
// hy, cy, reserve.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& lengths, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList weights, bool bidirectional, bool need_reserve);
}  // namespace cpu
}  // namespace fastmtl
