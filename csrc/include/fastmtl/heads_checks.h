// Argument checks of the multitask_loss op shared by the CPU kernel and the CUDA glue (same messages on every
// backend). Shapes of hidden/weights/levels/poolings are checked by each backend's parser before this.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "fastmtl/checks.h"

namespace fastmtl {

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
    if (levels[k] == 0) {
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
