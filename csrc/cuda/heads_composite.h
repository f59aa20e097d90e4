// Composite (ATen ops) version of multitask_loss / the pooling of multitask_predict, used by the CUDA glue for
// float64 (gradcheck on the device). Same semantics as the fused kernels; materialises every logit tensor.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "fastmtl/checks.h"

namespace fastmtl {
namespace composite {

using at::Tensor;
using OptList = c10::List<std::optional<Tensor>>;

inline Tensor valid_positions(const std::optional<Tensor>& lengths, int64_t B, int64_t T, const at::TensorOptions& o) {
  const Tensor t = at::arange(T, o.dtype(at::kLong)).unsqueeze(0).expand({B, T});
  if (!lengths.has_value() || !lengths->defined()) return at::ones({B, T}, o.dtype(at::kBool));
  return t < lengths->unsqueeze(1);
}

inline std::tuple<Tensor, Tensor> pool(const Tensor& hidden, const Tensor& len, int64_t pooling) {
  // returns pooled (B, D) and the one-hot-ish (B, T, D) d pooled / d hidden weights
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2);
  const auto o = hidden.options();
  const Tensor tt = at::arange(T, o.dtype(at::kLong)).view({1, T, 1});
  const Tensor last = (tt == (len - 1).view({B, 1, 1})).to(hidden.scalar_type()).expand({B, T, D});
  const Tensor first = (tt == 0).to(hidden.scalar_type()).expand({B, T, D});
  Tensor wgt;
  switch (pooling) {
    case 0: wgt = last; break;
    case 1: wgt = first; break;
    case 2: wgt = ((tt < len.view({B, 1, 1})).to(hidden.scalar_type()) / len.view({B, 1, 1}).to(hidden.scalar_type()))
                      .expand({B, T, D});
      break;
    case 3: {
      const Tensor masked = hidden.masked_fill(tt.expand({B, T, D}) >= len.view({B, 1, 1}), -INFINITY);
      const Tensor arg = std::get<1>(masked.max(1, true));
      wgt = (tt.expand({B, T, D}) == arg).to(hidden.scalar_type());
      break;
    }
    default: {
      const Tensor left = (at::arange(D, o.dtype(at::kLong)) < D / 2).view({1, 1, D});
      wgt = at::where(left, last, first);
    }
  }
  wgt = wgt.contiguous();
  return {(hidden * wgt).sum(1), wgt};
}

inline std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> loss_composite(
    const Tensor& hidden, const std::optional<Tensor>& lengths, at::TensorList weights, const OptList& biases,
    at::TensorList targets, const OptList& class_weights, const Tensor& task_weights, at::IntArrayRef levels,
    at::IntArrayRef poolings, at::IntArrayRef ignore_indices, at::ArrayRef<double> label_smoothings,
    bool compute_grad) {
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2), K = weights.size();
  const auto o = hidden.options();
  const Tensor len = (lengths.has_value() && lengths->defined()) ? *lengths : at::full({B}, T, o.dtype(at::kLong));
  const Tensor pos = valid_positions(lengths, B, T, o);
  Tensor total = at::zeros({}, o), losses = at::zeros({K}, o);
  Tensor grad_hidden = compute_grad ? at::zeros_like(hidden) : at::empty({0}, o);
  std::vector<Tensor> gw, gb;
  const Tensor lam = task_weights.to(hidden.scalar_type());
  for (int64_t k = 0; k < K; ++k) {
    const Tensor& W = weights[k];
    const int64_t C = W.size(0);
    const std::optional<Tensor> bias = biases.get(k);
    const bool has_bias = bias.has_value() && bias->defined();
    Tensor X, wgt, mask;
    if (levels[k] == 0) {
      std::tie(X, wgt) = pool(hidden, len, poolings[k]);
      mask = at::ones({B}, o.dtype(at::kBool));
    } else {
      X = hidden.reshape({B * T, D});
      mask = pos.reshape({B * T});
    }
    const Tensor y = targets[k].reshape({-1});
    mask = mask & (y != ignore_indices[k]);
    const Tensor bad = (mask & ((y < 0) | (y >= C))).nonzero();
    if (bad.size(0) > 0) {  // the CPU op's message
      const int64_t i = bad[0][0].item<int64_t>(), v = y[i].item<int64_t>();
      if (levels[k] == 0) {
        FASTMTL_CHECK_VALUE(false, "targets[", k, "] (task ", k, ") has value ", v, " at b=", i, ", outside [0, ", C,
                            ") and not ignore_index (", ignore_indices[k], ")");
      } else {
        FASTMTL_CHECK_VALUE(false, "targets[", k, "] (task ", k, ") has value ", v, " at (b=", i / T, ", t=", i % T,
                            "), outside [0, ", C, ") and not ignore_index (", ignore_indices[k], ")");
      }
    }
    const Tensor yc = at::where(mask, y, at::zeros_like(y));
    const Tensor z = has_bias ? at::addmm(*bias, X, W.t()) : at::mm(X, W.t());
    const Tensor logp = at::log_softmax(z, 1);
    const std::optional<Tensor> cwo = class_weights.get(k);
    const Tensor cw = (cwo.has_value() && cwo->defined()) ? cwo->to(hidden.scalar_type()) : at::ones({C}, o);
    const double eps = label_smoothings[k];
    const Tensor m = mask.to(hidden.scalar_type());
    const Tensor wy = cw.index_select(0, yc) * m;
    const Tensor norm = wy.sum();
    const Tensor li = -(1 - eps) * wy * logp.gather(1, yc.unsqueeze(1)).squeeze(1) -
                      eps / C * (logp * cw).sum(1) * m;
    const Tensor safe = at::where(norm > 0, norm, at::ones_like(norm));
    const Tensor L = at::where(norm > 0, li.sum() / safe, at::zeros_like(norm));
    losses.select(0, k).copy_(L);
    total = total + lam[k] * L;
    if (!compute_grad) continue;
    const Tensor scale = at::where(norm > 0, lam[k] / safe, at::zeros_like(norm));
    const Tensor onehot = at::one_hot(yc, C).to(hidden.scalar_type());
    const Tensor p = logp.exp();
    const Tensor dz = scale * m.unsqueeze(1) *
                      (p * ((1 - eps) * wy.unsqueeze(1) + eps / C * cw.sum()) - (1 - eps) * wy.unsqueeze(1) * onehot -
                       eps / C * cw.unsqueeze(0));
    gw.push_back(at::mm(dz.t(), X).to(W.scalar_type()));
    gb.push_back(has_bias ? dz.sum(0).to(W.scalar_type()) : at::empty({0}, o));
    const Tensor dX = at::mm(dz, W);
    if (levels[k] == 0)
      grad_hidden.add_(wgt * dX.unsqueeze(1));
    else
      grad_hidden.add_(dX.view({B, T, D}));
  }
  if (!compute_grad) {
    gw.assign(K, at::empty({0}, o));
    gb.assign(K, at::empty({0}, o));
  }
  return {total, losses, grad_hidden, gw, gb};
}

}  // namespace composite
}  // namespace fastmtl
