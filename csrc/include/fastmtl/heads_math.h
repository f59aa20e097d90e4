// Cross-entropy formulas shared by the CPU and CUDA multi-task head kernels.
//
// One item (a row of logits z over C classes, target y, optional class weights w, label smoothing eps) follows
// torch.nn.functional.cross_entropy exactly. With lp = log_softmax(z), lse = logsumexp(z), Sw = sum_c w_c
// (Sw = C without class weights):
//   item loss   l = (1 - eps) * w_y * (lse - z_y) + (eps / C) * (Sw * lse - sum_c w_c z_c)
//   task loss   L = sum_items l / N_w,   N_w = sum over non-ignored items of w_y (the item count without class
//               weights). PyTorch divides the smoothing term by the same N_w when class weights are given
//               (aten/src/ATen/native/LossNLL.cpp, cross_entropy_loss_label_smoothing), so one normaliser serves
//               both terms. A task with N_w == 0 (every item ignored) has L = 0 (PyTorch would give NaN).
//   gradient    dl/dz_j = a * p_j - (1 - eps) * w_y * [j == y] - (eps / C) * w_j,
//               a = (1 - eps) * w_y + (eps / C) * Sw,  p = softmax(z)
//   and the kernels write scale * dl/dz with scale = lambda_k / N_w, so the gradient of the total is formed in
//   the forward pass and backward only multiplies by the incoming gradient.
#pragma once

#include "fastmtl/host_device.h"

namespace fastmtl {
namespace heads {

enum Level : int { kSequence = 0, kToken = 1 };
enum Pooling : int { kLast = 0, kFirst = 1, kMean = 2, kMax = 3, kLastFirst = 4 };

// Item loss from the row's logsumexp, its target logit and sum_c w_c z_c (sum_c z_c without class weights).
template <typename acc_t>
FASTMTL_HD acc_t xent_item_loss(acc_t lse, acc_t z_y, acc_t sum_wz, acc_t w_y, acc_t sum_w, acc_t eps, acc_t C) {
  acc_t loss = (acc_t(1) - eps) * w_y * (lse - z_y);
  if (eps != acc_t(0)) loss += (eps / C) * (sum_w * lse - sum_wz);
  return loss;
}

// Coefficient a of softmax(z) in the item gradient.
template <typename acc_t>
FASTMTL_HD acc_t xent_softmax_coeff(acc_t w_y, acc_t sum_w, acc_t eps, acc_t C) {
  // without label smoothing the other classes' weights take no part (as in the loss above): a nan weight of a
  // class that no target uses must not reach the gradient (0 * nan), as with torch's cross_entropy
  if (eps == acc_t(0)) return w_y;
  return (acc_t(1) - eps) * w_y + (eps / C) * sum_w;
}

}  // namespace heads
}  // namespace fastmtl
