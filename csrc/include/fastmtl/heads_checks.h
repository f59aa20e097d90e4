// Argument checks of the multitask_loss / multitask_predict ops, shared by the CPU op (csrc/cpu/heads.cpp), the CUDA
// glue (csrc/cuda/heads_glue.cpp) and the host emulation of the CUDA kernels (tests/cuda_emulation): the same checks,
// in the same order, with the same messages on every backend. Shapes, dtypes and devices only: the values of
// lengths and targets are checked by each backend where they live (the CPU op at once; CUDA on the device, see
// csrc/cuda/heads_glue.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "fastmtl/checks.h"
#include "fastmtl/heads_math.h"

namespace fastmtl {

struct HeadsDims {
  int64_t B, T, D, K;
};

// hidden (B, T, D) batch first; per task a weight (C_k, D), a bias (C_k) or None, a level (heads::Level) and a
// pooling (heads::Pooling, sequence tasks); lengths (B,) int64 on hidden's device or None.
inline HeadsDims check_heads_args(const at::Tensor& hidden, const std::optional<at::Tensor>& lengths,
                                  at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                                  at::IntArrayRef levels, at::IntArrayRef poolings) {
  FASTMTL_CHECK_VALUE(hidden.dim() == 3, "hidden must have shape (B, T, D) (batch first), got shape ",
                      shape_str(hidden));
  const auto dt = hidden.scalar_type();
  FASTMTL_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                     "hidden must be float32, float64, bfloat16 or float16, got ", dt);
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2);
  const int64_t K = int64_t(weights.size());
  FASTMTL_CHECK_VALUE(K >= 1, "at least one task is required (weights is empty)");
  FASTMTL_CHECK_VALUE(int64_t(biases.size()) == K, "biases has ", biases.size(), " entries but weights has ", K,
                      "; give one (or None) per task");
  FASTMTL_CHECK_VALUE(int64_t(levels.size()) == K, "levels has ", levels.size(), " entries, expected ", K);
  FASTMTL_CHECK_VALUE(int64_t(poolings.size()) == K, "poolings has ", poolings.size(), " entries, expected ", K);
  FASTMTL_CHECK_VALUE(D >= 1, "hidden must have at least one feature (D >= 1), got shape ", shape_str(hidden));
  FASTMTL_CHECK_VALUE(B == 0 || T >= 1, "hidden has T = 0 time steps; every sequence needs at least one");
  if (lengths.has_value() && lengths->defined()) {
    const at::Tensor& l = *lengths;
    FASTMTL_CHECK_TYPE(l.scalar_type() == at::kLong, "lengths must be int64 (torch.long), got ", l.scalar_type());
    FASTMTL_CHECK_VALUE(l.dim() == 1 && l.size(0) == B, "lengths must have shape (B,) = (", B, ",), got ",
                        shape_str(l));
    check_same_device(l, hidden, "lengths", "hidden");
  }
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& W = weights[k];
    FASTMTL_CHECK_VALUE(W.dim() == 2 && W.size(0) >= 1 && W.size(1) == D, "weights[", k, "] (task ", k,
                        ") must have shape (num_classes, D) with D = hidden.size(2) = ", D, ", got ", shape_str(W));
    FASTMTL_CHECK_TYPE(W.scalar_type() == dt, "weights[", k, "] (task ", k, ") has dtype ", W.scalar_type(),
                       " but hidden has dtype ", dt, "; they must match");
    check_same_device(W, hidden, "weights", "hidden");
    const std::optional<at::Tensor> bo = biases.get(k);
    if (bo.has_value() && bo->defined()) {
      const at::Tensor& bb = *bo;
      FASTMTL_CHECK_VALUE(bb.dim() == 1 && bb.size(0) == W.size(0), "biases[", k, "] (task ", k,
                          ") must have shape (", W.size(0), ",), got ", shape_str(bb));
      FASTMTL_CHECK_TYPE(bb.scalar_type() == dt, "biases[", k, "] (task ", k, ") has dtype ", bb.scalar_type(),
                         " but hidden has dtype ", dt, "; they must match");
      check_same_device(bb, hidden, "biases", "hidden");
    }
    FASTMTL_CHECK_VALUE(levels[k] == heads::kSequence || levels[k] == heads::kToken, "levels[", k,
                        "] must be 0 (sequence) or 1 (token), got ", levels[k]);
    if (levels[k] == heads::kSequence) {
      FASTMTL_CHECK_VALUE(poolings[k] >= heads::kLast && poolings[k] <= heads::kLastFirst, "poolings[", k,
                          "] must be 0 (last), 1 (first), 2 (mean), 3 (max) or 4 (last_first), got ", poolings[k]);
      FASTMTL_CHECK_VALUE(poolings[k] != heads::kLastFirst || D % 2 == 0, "task ", k,
                          " uses pooling last_first, which needs an even hidden size, got D = ", D);
    }
  }
  return {B, T, D, K};
}

// hidden (B, T, D); K tasks; levels[k] 0 = sequence, 1 = token.
inline void check_multitask_loss_args(const at::Tensor& hidden, int64_t B, int64_t Tn, int64_t K,
                                      at::TensorList weights, at::TensorList targets,
                                      const c10::List<std::optional<at::Tensor>>& class_weights,
                                      const at::Tensor& task_weights, at::IntArrayRef levels,
                                      at::IntArrayRef ignore_indices, at::ArrayRef<double> label_smoothings) {
  FASTMTL_CHECK_VALUE(int64_t(targets.size()) == K, "targets has ", targets.size(), " entries, expected ", K,
                      " (one per task)");
  FASTMTL_CHECK_VALUE(int64_t(class_weights.size()) == K, "class_weights has ", class_weights.size(),
                      " entries, expected ", K, " (one tensor or None per task)");
  FASTMTL_CHECK_VALUE(int64_t(ignore_indices.size()) == K, "ignore_indices has ", ignore_indices.size(),
                      " entries, expected ", K);
  FASTMTL_CHECK_VALUE(int64_t(label_smoothings.size()) == K, "label_smoothings has ", label_smoothings.size(),
                      " entries, expected ", K);
  FASTMTL_CHECK_TYPE(at::isFloatingType(task_weights.scalar_type()), "task_weights must be a floating tensor, got ",
                     task_weights.scalar_type());
  FASTMTL_CHECK_VALUE(task_weights.dim() == 1 && task_weights.size(0) == K, "task_weights must have shape (", K,
                      ",), got ", shape_str(task_weights));
  check_same_device(task_weights, hidden, "task_weights", "hidden");
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& y = targets[k];
    FASTMTL_CHECK_TYPE(y.scalar_type() == at::kLong, "targets[", k, "] (task ", k,
                       ") must be int64 (torch.long), got ", y.scalar_type());
    check_same_device(y, hidden, "targets", "hidden");
    if (levels[k] == heads::kSequence) {
      FASTMTL_CHECK_VALUE(y.dim() == 1 && y.size(0) == B, "targets[", k, "] (task ", k,
                          ", sequence level) must have shape (B,) = (", B, ",), got ", shape_str(y));
    } else {
      FASTMTL_CHECK_VALUE(y.dim() == 2 && y.size(0) == B && y.size(1) == Tn, "targets[", k, "] (task ", k,
                          ", token level) must have shape (B, T) = (", B, ", ", Tn, "), got ", shape_str(y));
    }
    FASTMTL_CHECK_VALUE(label_smoothings[k] >= 0.0 && label_smoothings[k] <= 1.0, "label_smoothings[", k,
                        "] (task ", k, ") must be in [0, 1], got ", label_smoothings[k]);
    const std::optional<at::Tensor> cwo = class_weights.get(k);
    if (cwo.has_value() && cwo->defined()) {
      const at::Tensor& cw = *cwo;
      FASTMTL_CHECK_TYPE(at::isFloatingType(cw.scalar_type()), "class_weights[", k, "] (task ", k,
                         ") must be a floating tensor, got ", cw.scalar_type());
      FASTMTL_CHECK_VALUE(cw.dim() == 1 && cw.size(0) == weights[k].size(0), "class_weights[", k, "] (task ", k,
                          ") must have shape (", weights[k].size(0), ",), got ", shape_str(cw));
      check_same_device(cw, hidden, "class_weights", "hidden");
    }
  }
}

}  // namespace fastmtl
