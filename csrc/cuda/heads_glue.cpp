// Torch glue of the CUDA multi-task heads (kernels in csrc/cuda/heads.cu): argument checks, device guard, current
// stream, output allocation, TORCH_LIBRARY_IMPL(fastmtl, CUDA, m). Compiled only in CUDA builds.
//
// float32 / float16 / bfloat16 run the fused kernels. float64 (gradcheck) runs a composite of ATen ops on the
// device with the same semantics (logits of all rows at once: meant for tests, not for speed).
//
// One host synchronisation per call: the prep kernel validates lengths and targets on the device and the glue
// reads the verdict back, so bad input raises a clear error instead of a silently wrong result.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <tuple>
#include <vector>

#include "fastmtl/checks.h"
#include "fastmtl/cuda_heads.h"
#include "heads_composite.h"

namespace fastmtl {
namespace {

using at::Tensor;
using OptList = c10::List<std::optional<Tensor>>;

struct HeadsShape {
  int64_t B, T, D, K;
};

HeadsShape check_heads_args(const Tensor& hidden, const std::optional<Tensor>& lengths, at::TensorList weights,
                            const OptList& biases, at::IntArrayRef levels, at::IntArrayRef poolings) {
  check_dim(hidden, 3, "hidden");
  check_floating(hidden, "hidden");
  FASTMTL_CHECK_VALUE(hidden.is_cuda(), "hidden must be a CUDA tensor here, got device ", hidden.device());
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2);
  const int64_t K = (int64_t)weights.size();
  FASTMTL_CHECK_VALUE((int64_t)biases.size() == K, "biases must have one entry per task (", K, "), got ",
                      biases.size());
  FASTMTL_CHECK_VALUE((int64_t)levels.size() == K, "levels must have one entry per task (", K, "), got ",
                      levels.size());
  FASTMTL_CHECK_VALUE((int64_t)poolings.size() == K, "poolings must have one entry per task (", K, "), got ",
                      poolings.size());
  if (lengths.has_value()) {
    const Tensor& l = *lengths;
    FASTMTL_CHECK_TYPE(l.scalar_type() == at::kLong, "lengths must be an int64 tensor, got ", l.scalar_type());
    check_shape(l, {B}, "lengths");
    check_same_device(l, hidden, "lengths", "hidden");
  }
  for (int64_t k = 0; k < K; ++k) {
    const Tensor& w = weights[k];
    FASTMTL_CHECK_VALUE(w.dim() == 2, "weights[", k, "] must have shape (num_classes, ", D, "), got ",
                        shape_str(w));
    FASTMTL_CHECK_VALUE(w.size(1) == D, "weights[", k, "] has hidden size ", w.size(1), " but hidden has ", D,
                        " features (shape ", shape_str(hidden), ")");
    FASTMTL_CHECK_VALUE(w.size(0) >= 1, "weights[", k, "] must have at least one class, got shape ", shape_str(w));
    check_same_dtype(w, hidden, ("weights[" + std::to_string(k) + "]").c_str(), "hidden");
    check_same_device(w, hidden, ("weights[" + std::to_string(k) + "]").c_str(), "hidden");
    const std::optional<Tensor> b = biases.get(k);
    if (b.has_value() && b->defined()) {
      const std::string name = "biases[" + std::to_string(k) + "]";
      check_shape(*b, {w.size(0)}, name.c_str());
      check_same_dtype(*b, hidden, name.c_str(), "hidden");
      check_same_device(*b, hidden, name.c_str(), "hidden");
    }
    FASTMTL_CHECK_VALUE(levels[k] == 0 || levels[k] == 1, "levels[", k,
                        "] must be 0 (sequence) or 1 (token), got ", levels[k]);
    FASTMTL_CHECK_VALUE(poolings[k] >= 0 && poolings[k] <= 4, "poolings[", k,
                        "] must be 0 (last), 1 (first), 2 (mean), 3 (max) or 4 (last_first), got ", poolings[k]);
    FASTMTL_CHECK_VALUE(!(levels[k] == 0 && T == 0 && B > 0), "task ", k,
                        " is sequence-level but hidden has no time steps (shape ", shape_str(hidden), ")");
  }
  return {B, T, D, K};
}

void check_loss_args(const HeadsShape& s, const Tensor& hidden, at::TensorList weights, at::TensorList targets,
                     const OptList& class_weights, const Tensor& task_weights, at::IntArrayRef levels,
                     at::IntArrayRef ignore_indices, at::ArrayRef<double> label_smoothings) {
  const int64_t K = s.K;
  FASTMTL_CHECK_VALUE((int64_t)targets.size() == K, "targets must have one entry per task (", K, "), got ",
                      targets.size());
  FASTMTL_CHECK_VALUE((int64_t)class_weights.size() == K, "class_weights must have one entry per task (", K,
                      "), got ", class_weights.size());
  FASTMTL_CHECK_VALUE((int64_t)ignore_indices.size() == K, "ignore_indices must have one entry per task (", K,
                      "), got ", ignore_indices.size());
  FASTMTL_CHECK_VALUE((int64_t)label_smoothings.size() == K, "label_smoothings must have one entry per task (", K,
                      "), got ", label_smoothings.size());
  check_floating(task_weights, "task_weights");
  check_shape(task_weights, {K}, "task_weights");
  check_same_device(task_weights, hidden, "task_weights", "hidden");
  for (int64_t k = 0; k < K; ++k) {
    const Tensor& y = targets[k];
    const std::string name = "targets[" + std::to_string(k) + "]";
    FASTMTL_CHECK_TYPE(y.scalar_type() == at::kLong, name, " must be an int64 tensor, got ", y.scalar_type());
    if (levels[k] == 0) {
      FASTMTL_CHECK_VALUE(y.dim() == 1 && y.size(0) == s.B, name, " (sequence-level task) must have shape (", s.B,
                          ",), got ", shape_str(y));
    } else {
      FASTMTL_CHECK_VALUE(y.dim() == 2 && y.size(0) == s.B && y.size(1) == s.T, name,
                          " (token-level task) must have shape (", s.B, ", ", s.T, "), got ", shape_str(y));
    }
    check_same_device(y, hidden, name.c_str(), "hidden");
    const std::optional<Tensor> cw = class_weights.get(k);
    if (cw.has_value() && cw->defined()) {
      const std::string cname = "class_weights[" + std::to_string(k) + "]";
      check_floating(*cw, cname.c_str());
      check_shape(*cw, {weights[k].size(0)}, cname.c_str());
      check_same_device(*cw, hidden, cname.c_str(), "hidden");
    }
    FASTMTL_CHECK_VALUE(label_smoothings[k] >= 0.0 && label_smoothings[k] <= 1.0, "label_smoothings[", k,
                        "] must be in [0, 1], got ", label_smoothings[k]);
  }
}

int heads_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::kHeadsFloat32;
    case at::kHalf: return cuda::kHeadsFloat16;
    case at::kBFloat16: return cuda::kHeadsBFloat16;
    default: return -1;
  }
}

void check_cuda(cudaError_t e, const char* what) {
  FASTMTL_CHECK(e == cudaSuccess, what, " failed: ", cudaGetErrorString(e));
}

int num_sms(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 100;
  }
  return n;
}

// Reads the prep kernel's verdict (one host synchronisation) and raises a clear error.
void raise_if_invalid(const Tensor& err, int64_t T) {
  const Tensor e = err.to(at::kCPU);
  const int64_t* v = e.data_ptr<int64_t>();
  FASTMTL_CHECK_VALUE(v[0] != 1, "lengths must be in [1, ", T, "] (the number of time steps of hidden), got ",
                      "lengths[", v[2], "] = ", v[3]);
  FASTMTL_CHECK_VALUE(v[0] != 2, "targets[", v[1], "] (task ", v[1], ") has class ", v[3], " at flat index ", v[2],
                      ", outside [0, num_classes) and not ignore_index");
  FASTMTL_CHECK(v[0] == 0, "internal error: unknown validation code ", v[0]);
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
    return composite::loss_composite(hidden_in.contiguous(), lengths, weights, biases, targets, class_weights, task_weights,
                          levels, poolings, ignore_indices, label_smoothings, compute_grad);
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
  if (K == 0 || s.B == 0) {
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
  check_cuda(cuda::heads_prepare(p, tasks.data(), workspace.data_ptr(), stream), "fastmtl multitask_loss (prep)");
  raise_if_invalid(err, s.T);
  check_cuda(cuda::heads_run(p, stream), "fastmtl multitask_loss");
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
  if (K == 0 || s.B == 0) return preds;
  const int dtype = heads_dtype(hidden.scalar_type());
  if (dtype < 0) {
    FASTMTL_CHECK_TYPE(hidden.scalar_type() == at::kDouble,
                       "hidden must be float32, float16, bfloat16 or float64 on CUDA, got ", hidden.scalar_type());
    const Tensor len =
        (lengths.has_value() && lengths->defined()) ? *lengths : at::full({s.B}, s.T, o.dtype(at::kLong));
    for (int64_t k = 0; k < K; ++k) {
      const Tensor X = levels[k] == 0 ? std::get<0>(composite::pool(hidden, len, poolings[k])) : hidden;
      const std::optional<Tensor> b = biases.get(k);
      Tensor z = at::matmul(X, weights[k].t());
      if (b.has_value() && b->defined()) z = z + *b;
      preds[k].copy_(z.argmax(-1));
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
  check_cuda(cuda::heads_prepare(p, tasks.data(), workspace.data_ptr(), stream), "fastmtl multitask_predict (prep)");
  raise_if_invalid(err, s.T);
  check_cuda(cuda::heads_run(p, stream), "fastmtl multitask_predict");
  return preds;
}

}  // namespace
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("multitask_loss", &fastmtl::multitask_loss_cuda);
  m.impl("multitask_predict", &fastmtl::multitask_predict_cuda);
}
