// Torch glue of the CUDA multi-task heads (kernels in csrc/cuda/heads.cu): argument checks, device guard, current
// stream, output allocation, TORCH_LIBRARY_IMPL(fastmtl, CUDA, m). Compiled only in CUDA builds.
//
// float32 / float16 / bfloat16 run the fused kernels. float64 (gradcheck) runs a composite of ATen ops on the
// device with the same semantics (logits of all rows at once: meant for tests, not for speed).
//
// One host synchronisation per call: the prep kernel validates lengths and targets on the device and the glue
// reads the verdict back after queueing every kernel, so bad input raises a clear error instead of a silently
// wrong result (the kernels clamp / skip bad values, so nothing reads out of bounds meanwhile).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <tuple>
#include <vector>

#include "fastmtl/checks.h"
#include "fastmtl/cuda_heads.h"
#include "fastmtl/heads_checks.h"
#include "heads_composite.h"

namespace fastmtl {
namespace {

using at::Tensor;
using OptList = c10::List<std::optional<Tensor>>;

struct HeadsShape {
  int64_t B, T, D, K;
};

// The same checks, in the same order and with the same messages, as the CPU op (csrc/cpu/heads.cpp).
HeadsShape check_heads_args(const Tensor& hidden, const std::optional<Tensor>& lengths, at::TensorList weights,
                            const OptList& biases, at::IntArrayRef levels, at::IntArrayRef poolings) {
  FASTMTL_CHECK_VALUE(hidden.dim() == 3, "hidden must have shape (B, T, D) (batch first), got shape ",
                      shape_str(hidden));
  const auto dt = hidden.scalar_type();
  FASTMTL_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                     "hidden must be float32, float64, bfloat16 or float16, got ", dt);
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2);
  const int64_t K = (int64_t)weights.size();
  FASTMTL_CHECK_VALUE(K >= 1, "at least one task is required (weights is empty)");
  FASTMTL_CHECK_VALUE((int64_t)biases.size() == K, "biases has ", biases.size(), " entries but weights has ", K,
                      "; give one (or None) per task");
  FASTMTL_CHECK_VALUE((int64_t)levels.size() == K, "levels has ", levels.size(), " entries, expected ", K);
  FASTMTL_CHECK_VALUE((int64_t)poolings.size() == K, "poolings has ", poolings.size(), " entries, expected ", K);
  FASTMTL_CHECK_VALUE(D >= 1, "hidden must have at least one feature (D >= 1), got shape ", shape_str(hidden));
  FASTMTL_CHECK_VALUE(B == 0 || T >= 1, "hidden has T = 0 time steps; every sequence needs at least one");
  if (lengths.has_value() && lengths->defined()) {
    const Tensor& l = *lengths;
    FASTMTL_CHECK_TYPE(l.scalar_type() == at::kLong, "lengths must be int64 (torch.long), got ", l.scalar_type());
    FASTMTL_CHECK_VALUE(l.dim() == 1 && l.size(0) == B, "lengths must have shape (B,) = (", B, ",), got ",
                        shape_str(l));
    check_same_device(l, hidden, "lengths", "hidden");
    // values are validated on the device by the prep kernel (see raise_if_invalid)
  }
  for (int64_t k = 0; k < K; ++k) {
    const Tensor& W = weights[k];
    FASTMTL_CHECK_VALUE(W.dim() == 2 && W.size(0) >= 1 && W.size(1) == D, "weights[", k, "] (task ", k,
                        ") must have shape (num_classes, D) with D = hidden.size(2) = ", D, ", got ", shape_str(W));
    FASTMTL_CHECK_TYPE(W.scalar_type() == dt, "weights[", k, "] (task ", k, ") has dtype ", W.scalar_type(),
                       " but hidden has dtype ", dt, "; they must match");
    check_same_device(W, hidden, "weights", "hidden");
    const std::optional<Tensor> bo = biases.get(k);
    if (bo.has_value() && bo->defined()) {
      const Tensor& bb = *bo;
      FASTMTL_CHECK_VALUE(bb.dim() == 1 && bb.size(0) == W.size(0), "biases[", k, "] (task ", k,
                          ") must have shape (", W.size(0), ",), got ", shape_str(bb));
      FASTMTL_CHECK_TYPE(bb.scalar_type() == dt, "biases[", k, "] (task ", k, ") has dtype ", bb.scalar_type(),
                         " but hidden has dtype ", dt, "; they must match");
      check_same_device(bb, hidden, "biases", "hidden");
    }
    FASTMTL_CHECK_VALUE(levels[k] == 0 || levels[k] == 1, "levels[", k, "] must be 0 (sequence) or 1 (token), got ",
                        levels[k]);
    if (levels[k] == 0) {
      FASTMTL_CHECK_VALUE(poolings[k] >= 0 && poolings[k] <= 4, "poolings[", k,
                          "] must be 0 (last), 1 (first), 2 (mean), 3 (max) or 4 (last_first), got ", poolings[k]);
      FASTMTL_CHECK_VALUE(poolings[k] != 4 || D % 2 == 0, "task ", k,
                          " uses pooling last_first, which needs an even hidden size, got D = ", D);
    }
  }
  return {B, T, D, K};
}

void check_loss_args(const HeadsShape& s, const Tensor& hidden, at::TensorList weights, at::TensorList targets,
                     const OptList& class_weights, const Tensor& task_weights, at::IntArrayRef levels,
                     at::IntArrayRef ignore_indices, at::ArrayRef<double> label_smoothings) {
  check_multitask_loss_args(hidden, s.B, s.T, s.K, weights, targets, class_weights, task_weights, levels,
                            ignore_indices, label_smoothings);
}

int heads_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::kHeadsFloat32;
    case at::kHalf: return cuda::kHeadsFloat16;
    case at::kBFloat16: return cuda::kHeadsBFloat16;
    default: return -1;
  }
}

void check_launch(const char* err, const char* what) { FASTMTL_CHECK(err == nullptr, what, " failed: ", err); }

int num_sms(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 100;
  }
  return n;
}

// Reads the prep kernel's verdict (one host synchronisation) and raises the CPU op's errors.
void raise_if_invalid(const Tensor& err, int64_t T, at::IntArrayRef levels, at::IntArrayRef ignore_indices,
                      at::TensorList weights) {
  const Tensor e = err.to(at::kCPU);
  const int64_t* v = e.data_ptr<int64_t>();
  if (v[0] == 0) return;
  FASTMTL_CHECK_VALUE(v[0] != 1, "lengths[", v[2], "] = ", v[3],
                      " is out of range: every length must be in [1, T] with T = hidden.size(1) = ", T);
  if (v[0] == 2) {
    const int64_t k = v[1], idx = v[2], val = v[3], C = weights[k].size(0);
    if (levels[k] == 0) {
      FASTMTL_CHECK_VALUE(false, "targets[", k, "] (task ", k, ") has value ", val, " at b=", idx, ", outside [0, ",
                          C, ") and not ignore_index (", ignore_indices[k], ")");
    } else {
      FASTMTL_CHECK_VALUE(false, "targets[", k, "] (task ", k, ") has value ", val, " at (b=", idx / T, ", t=",
                          idx % T, "), outside [0, ", C, ") and not ignore_index (", ignore_indices[k], ")");
    }
  }
  FASTMTL_CHECK(false, "internal error: unknown validation code ", v[0]);
}

// float64 (composite) paths: validate the lengths with ATen ops (same message as the CPU op).
void check_lengths_values(const std::optional<Tensor>& lengths, int64_t T) {
  if (!lengths.has_value() || !lengths->defined() || lengths->numel() == 0) return;
  const Tensor bad = ((*lengths < 1) | (*lengths > T)).nonzero();
  if (bad.size(0) == 0) return;
  const int64_t b = bad[0][0].item<int64_t>();
  FASTMTL_CHECK_VALUE(false, "lengths[", b, "] = ", (*lengths)[b].item<int64_t>(),
                      " is out of range: every length must be in [1, T] with T = hidden.size(1) = ", T);
}

// The op validates its inputs with one host synchronisation and uploads its task table from host memory: neither is
// allowed inside a CUDA-graph capture, so a capture gets a clear error instead of a failed capture later.
void check_not_capturing(cudaStream_t stream, const char* op) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t e = cudaStreamIsCapturing(stream, &status);
  FASTMTL_CHECK(e == cudaSuccess, op, ": cudaStreamIsCapturing failed: ", cudaGetErrorString(e));
  FASTMTL_CHECK(status == cudaStreamCaptureStatusNone, op,
                " on CUDA cannot be captured in a CUDA graph (it validates lengths and targets with a host "
                "synchronisation); run it outside the captured region");
}

// Device pointers of the row lengths (nullptr = all T), kept alive by `holder`.
const int64_t* lengths_ptr(const std::optional<Tensor>& lengths, Tensor& holder) {
  if (!lengths.has_value() || !lengths->defined()) return nullptr;
  holder = lengths->contiguous();
  return holder.data_ptr<int64_t>();
}

// ---------------------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> multitask_loss_cuda(
    const Tensor& hidden_in, const std::optional<Tensor>& lengths, at::TensorList weights, const OptList& biases,
    at::TensorList targets, const OptList& class_weights, const Tensor& task_weights, at::IntArrayRef levels,
    at::IntArrayRef poolings, at::IntArrayRef ignore_indices, at::ArrayRef<double> label_smoothings,
    bool compute_grad) {
  const HeadsShape s = check_heads_args(hidden_in, lengths, weights, biases, levels, poolings);
  check_loss_args(s, hidden_in, weights, targets, class_weights, task_weights, levels, ignore_indices,
                  label_smoothings);
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const auto o = hidden_in.options();
  const int dtype = heads_dtype(hidden_in.scalar_type());
  if (dtype < 0) {
    FASTMTL_CHECK_TYPE(hidden_in.scalar_type() == at::kDouble,
                       "hidden must be float32, float16, bfloat16 or float64 on CUDA, got ", hidden_in.scalar_type());
    check_lengths_values(lengths, s.T);
    return composite::loss_composite(hidden_in.contiguous(), lengths, weights, biases, targets, class_weights,
                                     task_weights, levels, poolings, ignore_indices, label_smoothings, compute_grad);
  }
  const Tensor hidden = hidden_in.contiguous();
  const int64_t K = s.K;
  Tensor total = at::zeros({}, o), losses = at::zeros({K}, o);
  Tensor grad_hidden = compute_grad ? at::empty_like(hidden) : at::empty({0}, o);
  std::vector<Tensor> grad_weights, grad_biases;
  std::vector<Tensor> keep;  // contiguous / converted inputs, alive until the launches are queued
  std::vector<cuda::HeadsTask> tasks(K);
  for (int64_t k = 0; k < K; ++k) {
    cuda::HeadsTask& t = tasks[k];
    const Tensor w = weights[k].contiguous();
    keep.push_back(w);
    t.weight = w.data_ptr();
    const std::optional<Tensor> b = biases.get(k);
    const bool has_bias = b.has_value() && b->defined();
    if (has_bias) {
      keep.push_back(b->contiguous());
      t.bias = keep.back().data_ptr();
    }
    keep.push_back(targets[k].contiguous());
    t.target = keep.back().data_ptr<int64_t>();
    const std::optional<Tensor> cw = class_weights.get(k);
    if (cw.has_value() && cw->defined()) {
      keep.push_back(cw->to(at::kFloat).contiguous());
      t.class_weight = keep.back().data_ptr<float>();
    }
    t.num_classes = w.size(0);
    t.ignore_index = ignore_indices[k];
    t.label_smoothing = (float)label_smoothings[k];
    t.level = (int)levels[k];
    t.pooling = (int)poolings[k];
    if (compute_grad) {
      grad_weights.push_back(at::empty_like(w));
      t.grad_weight = grad_weights.back().data_ptr();
      grad_biases.push_back(has_bias ? at::empty({w.size(0)}, o) : at::empty({0}, o));
      if (has_bias) t.grad_bias = grad_biases.back().data_ptr();
    } else {
      grad_weights.push_back(at::empty({0}, o));
      grad_biases.push_back(at::empty({0}, o));
    }
  }
  if (s.B == 0) {
    if (compute_grad) {
      grad_hidden.zero_();
      for (auto& g : grad_weights) g.zero_();
      for (auto& g : grad_biases) g.zero_();
    }
    return {total, losses, grad_hidden, grad_weights, grad_biases};
  }
  const Tensor lam = task_weights.to(at::kFloat).contiguous();
  Tensor len_holder;
  cuda::HeadsParams p;
  p.dtype = dtype;
  p.hidden = hidden.data_ptr();
  p.lengths = lengths_ptr(lengths, len_holder);
  p.B = s.B;
  p.T = s.T;
  p.D = s.D;
  p.K = (int)K;
  p.task_weights = lam.data_ptr<float>();
  p.compute_grad = compute_grad;
  p.predict = false;
  p.total = total.data_ptr();
  p.losses = losses.data_ptr();
  p.grad_hidden = compute_grad ? grad_hidden.data_ptr() : nullptr;
  const Tensor err = at::zeros({4}, o.dtype(at::kLong));
  p.err = err.data_ptr<int64_t>();
  const size_t bytes = cuda::heads_plan(p, tasks.data(), num_sms(hidden.get_device()));
  const Tensor workspace = at::empty({(int64_t)std::max<size_t>(bytes, 1)}, o.dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.get_device()).stream();
  check_not_capturing(stream, "fastmtl multitask_loss");
  check_launch(cuda::heads_prepare(p, tasks.data(), workspace.data_ptr(), stream), "fastmtl multitask_loss (prep)");
  check_launch(cuda::heads_run(p, stream), "fastmtl multitask_loss");
  // The kernels treat bad lengths / targets safely (clamped / skipped); the verdict is read once all are queued.
  raise_if_invalid(err, s.T, levels, ignore_indices, weights);
  return {total, losses, grad_hidden, grad_weights, grad_biases};
}

std::vector<Tensor> multitask_predict_cuda(const Tensor& hidden_in, const std::optional<Tensor>& lengths,
                                           at::TensorList weights, const OptList& biases, at::IntArrayRef levels,
                                           at::IntArrayRef poolings) {
  const HeadsShape s = check_heads_args(hidden_in, lengths, weights, biases, levels, poolings);
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const auto o = hidden_in.options();
  const Tensor hidden = hidden_in.contiguous();
  const int64_t K = s.K;
  std::vector<Tensor> preds;
  for (int64_t k = 0; k < K; ++k)
    preds.push_back(levels[k] == 0 ? at::zeros({s.B}, o.dtype(at::kLong)) : at::zeros({s.B, s.T}, o.dtype(at::kLong)));
  if (s.B == 0) return preds;
  const int dtype = heads_dtype(hidden.scalar_type());
  if (dtype < 0) {
    FASTMTL_CHECK_TYPE(hidden.scalar_type() == at::kDouble,
                       "hidden must be float32, float16, bfloat16 or float64 on CUDA, got ", hidden.scalar_type());
    check_lengths_values(lengths, s.T);
    const Tensor len =
        (lengths.has_value() && lengths->defined()) ? *lengths : at::full({s.B}, s.T, o.dtype(at::kLong));
    const Tensor pos = composite::valid_positions(lengths, s.B, s.T, o);
    for (int64_t k = 0; k < K; ++k) {
      const Tensor X = levels[k] == 0 ? std::get<0>(composite::pool(hidden, len, poolings[k])) : hidden;
      const std::optional<Tensor> b = biases.get(k);
      Tensor z = at::matmul(X, weights[k].t());
      if (b.has_value() && b->defined()) z = z + *b;
      Tensor pr = z.argmax(-1);
      if (levels[k] == 1) pr = pr.masked_fill(pos.logical_not(), -1);  // padding positions: -1 (as the CPU op)
      preds[k].copy_(pr);
    }
    return preds;
  }
  std::vector<Tensor> keep;
  std::vector<cuda::HeadsTask> tasks(K);
  for (int64_t k = 0; k < K; ++k) {
    cuda::HeadsTask& t = tasks[k];
    keep.push_back(weights[k].contiguous());
    t.weight = keep.back().data_ptr();
    t.num_classes = weights[k].size(0);
    const std::optional<Tensor> b = biases.get(k);
    if (b.has_value() && b->defined()) {
      keep.push_back(b->contiguous());
      t.bias = keep.back().data_ptr();
    }
    t.level = (int)levels[k];
    t.pooling = (int)poolings[k];
    t.prediction = preds[k].data_ptr<int64_t>();
  }
  Tensor len_holder;
  cuda::HeadsParams p;
  p.dtype = dtype;
  p.hidden = hidden.data_ptr();
  p.lengths = lengths_ptr(lengths, len_holder);
  p.B = s.B;
  p.T = s.T;
  p.D = s.D;
  p.K = (int)K;
  p.predict = true;
  const Tensor err = at::zeros({4}, o.dtype(at::kLong));
  p.err = err.data_ptr<int64_t>();
  const size_t bytes = cuda::heads_plan(p, tasks.data(), num_sms(hidden.get_device()));
  const Tensor workspace = at::empty({(int64_t)std::max<size_t>(bytes, 1)}, o.dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.get_device()).stream();
  check_not_capturing(stream, "fastmtl multitask_predict");
  check_launch(cuda::heads_prepare(p, tasks.data(), workspace.data_ptr(), stream), "fastmtl multitask_predict (prep)");
  check_launch(cuda::heads_run(p, stream), "fastmtl multitask_predict");
  // The kernels treat bad lengths / targets safely (clamped / skipped); the verdict is read once all are queued.
  raise_if_invalid(err, s.T, levels, {}, weights);
  return preds;
}

}  // namespace
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("multitask_loss", &fastmtl::multitask_loss_cuda);
  m.impl("multitask_predict", &fastmtl::multitask_predict_cuda);
}
