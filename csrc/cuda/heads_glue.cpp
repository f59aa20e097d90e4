// Torch glue of the CUDA multi-task heads (kernels in csrc/cuda/heads.cu): argument checks, device guard, current
// stream, output allocation, TORCH_LIBRARY_IMPL(fastmtl, CUDA, m). Compiled only in CUDA builds.
//
// float32 / float16 / bfloat16 run the fused kernels. float64 (gradcheck) runs a composite of ATen ops on the
// device with the same semantics (logits of all rows at once: meant for tests, not for speed; it synchronises).
//
// One kernel launch per call (heads_fused_kernel, cooperative; one memset of its barrier counter before it), no host
// synchronisation and no host-to-device copy (up to kMaxParamTasks = 16 tasks, whose table travels as a
// kernel parameter), so a call can be captured in a CUDA graph. Shapes, dtypes and devices are checked on the host
// as on the CPU; the *values* of lengths and targets live on the device and are validated lazily there: a bad value
// is treated safely (lengths clamped to [1, T], a bad target counts as ignored: nothing is read out of bounds) and
// the first one is recorded in a per-device error record. It is raised, with the CPU op's message, by
//   - fastmtl.functional.check_input_errors() (torch.ops.fastmtl.check_input_errors), which synchronises, raises
//     and clears the record: call it where a synchronisation is acceptable (e.g. after an epoch, in tests);
//   - every call itself when FASTMTL_SYNC_CHECKS=1 (debugging: one synchronisation per call, not in a capture).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <tuple>
#include <vector>

#include "fastmtl/checks.h"
#include "fastmtl/cuda_heads.h"
#include "fastmtl/heads_checks.h"
#include "glue_common.h"
#include "heads_composite.h"

namespace fastmtl {
namespace {

using at::Tensor;
using OptList = c10::List<std::optional<Tensor>>;
using cuda_glue::check_launch;

using HeadsShape = HeadsDims;  // check_heads_args: fastmtl/heads_checks.h, shared with the CPU op

void check_loss_args(const HeadsShape& s, const Tensor& hidden, at::TensorList weights, at::TensorList targets,
                     const OptList& class_weights, const Tensor& task_weights, at::IntArrayRef levels,
                     at::IntArrayRef ignore_indices, at::ArrayRef<double> label_smoothings) {
  check_multitask_loss_args(hidden, s.B, s.T, s.K, weights, targets, class_weights, task_weights, levels,
                            ignore_indices, label_smoothings);
}

// The dtype the heads kernels run in (float32, float16, bfloat16); nullopt for float64 (the composite) and others.
std::optional<cuda::DType> heads_dtype(at::ScalarType t) {
  const std::optional<cuda::DType> dt = cuda_glue::kernel_dtype(t);
  if (dt == cuda::DType::kFloat64) return std::nullopt;
  return dt;
}

int num_sms(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 100;
  }
  return n;
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t e = cudaStreamIsCapturing(stream, &status);
  FASTMTL_CHECK(e == cudaSuccess, "cudaStreamIsCapturing failed: ", cudaGetErrorString(e));
  return status != cudaStreamCaptureStatusNone;
}

// The per-device error record (cuda::HeadsErr), allocated and zeroed once, outside any capture, and never freed (a
// captured graph keeps writing to it at every replay).
// With create = false: nullptr when no call has run on that device yet.
int64_t* error_record(const at::Device& device, cudaStream_t stream, bool create = true) {
  static std::mutex mu;
  static at::Tensor* records[64] = {};
  const int i = device.index();
  FASTMTL_CHECK(i >= 0 && i < 64, "unsupported CUDA device index ", i);
  std::lock_guard<std::mutex> lock(mu);
  if (records[i] == nullptr) {
    if (!create) return nullptr;
    FASTMTL_CHECK(!is_capturing(stream), "the first multitask_loss / multitask_predict call on ", device,
                  " is being captured in a CUDA graph; run the op once before capturing (a warm-up, as "
                  "torch.cuda.graph asks for)");
    auto* t = new at::Tensor(at::zeros({cuda::kHeadsErrWords}, at::TensorOptions().dtype(at::kLong).device(device)));
    const cudaError_t e = cudaStreamSynchronize(stream);  // once: the zeros are in place before any stream uses them
    FASTMTL_CHECK(e == cudaSuccess, "cudaStreamSynchronize failed: ", cudaGetErrorString(e));
    records[i] = t;  // leaked on purpose: no destructor runs after the CUDA runtime is torn down at exit
  }
  return records[i]->data_ptr<int64_t>();
}

bool sync_checks() {
  const char* e = std::getenv("FASTMTL_SYNC_CHECKS");
  return e != nullptr && std::strcmp(e, "") != 0 && std::strcmp(e, "0") != 0;
}

// Reads the device's error record (one host synchronisation); when a bad value was met, clears the record and
// raises the CPU op's error for it.
void raise_input_errors(const at::Device& device, bool lazy) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  int64_t* rec = error_record(device, stream, /*create=*/false);
  if (rec == nullptr) return;  // no call has run on this device
  int64_t v[cuda::kHeadsErrWords];
  cudaError_t e = cudaMemcpyAsync(v, rec, sizeof(v), cudaMemcpyDeviceToHost, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  FASTMTL_CHECK(e == cudaSuccess, "reading the heads error record failed: ", cudaGetErrorString(e));
  if (v[cuda::kHeadsErrCode] == 0) return;
  e = cudaMemsetAsync(rec, 0, sizeof(v), stream);
  FASTMTL_CHECK(e == cudaSuccess, "clearing the heads error record failed: ", cudaGetErrorString(e));
  const char* when = lazy ? " (met on the device by a multitask_loss / multitask_predict call since the last check; "
                            "that call treated it as clamped / ignored)"
                          : "";
  const int64_t T = v[cuda::kHeadsErrT], idx = v[cuda::kHeadsErrIndex], val = v[cuda::kHeadsErrValue];
  FASTMTL_CHECK_VALUE(v[cuda::kHeadsErrCode] != 1, "lengths[", idx, "] = ", val,
                      " is out of range: every length must be in [1, T] with T = hidden.size(1) = ", T, when);
  if (v[cuda::kHeadsErrCode] == 2) {
    const int64_t k = v[cuda::kHeadsErrTask], C = v[cuda::kHeadsErrClasses], ii = v[cuda::kHeadsErrIgnore];
    if (v[cuda::kHeadsErrLevel] == 0) {
      FASTMTL_CHECK_VALUE(false, "targets[", k, "] (task ", k, ") has value ", val, " at b=", idx, ", outside [0, ",
                          C, ") and not ignore_index (", ii, ")", when);
    } else {
      FASTMTL_CHECK_VALUE(false, "targets[", k, "] (task ", k, ") has value ", val, " at (b=", idx / T, ", t=",
                          idx % T, "), outside [0, ", C, ") and not ignore_index (", ii, ")", when);
    }
  }
  FASTMTL_CHECK(false, "internal error: unknown validation code ", v[cuda::kHeadsErrCode]);
}

// torch.ops.fastmtl.check_input_errors(device): see the header comment.
void check_input_errors_op(int64_t device) {
  const int n = c10::cuda::device_count();
  FASTMTL_CHECK_VALUE(device >= 0 && device < n, "check_input_errors: device ", device, " is not a CUDA device ",
                      "(this machine has ", n, ")");
  raise_input_errors(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)), /*lazy=*/true);
}

// Beyond kMaxParamTasks tasks the table is uploaded: a pinned staging buffer and an asynchronous copy (the caching
// host allocator keeps the buffer until the copy has run). Not capturable: a replay would re-read a host buffer
// that has been reused meanwhile.
at::Tensor upload_task_table(const std::vector<cuda::HeadsTask>& tasks, const at::Device& device,
                             cudaStream_t stream, const char* op) {
  FASTMTL_CHECK(!is_capturing(stream), op, " with more than ", cuda::kMaxParamTasks, " tasks cannot be captured in ",
                "a CUDA graph (its task table is copied from host memory); split the heads into groups of at most ",
                cuda::kMaxParamTasks);
  const int64_t bytes = static_cast<int64_t>(sizeof(cuda::HeadsTask) * tasks.size());
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), tasks.data(), static_cast<size_t>(bytes));
  return host.to(device, /*non_blocking=*/true);
}

// FASTMTL_HEADS_FUSED=0: one launch per phase (prep, rows, weights, finalize) instead of the single cooperative
// launch (debugging, comparisons). The single launch needs a device with cooperative launches; elsewhere, or when
// the driver refuses the grid, the call takes the per-phase launches by itself.
bool fused_launch() {
  const char* e = std::getenv("FASTMTL_HEADS_FUSED");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

// Plans a call whose inputs and outputs are set in p and tasks, and launches prep + run on the current stream;
// raises launch errors, and with FASTMTL_SYNC_CHECKS=1 the input errors of this call.
void launch_heads(cuda::HeadsParams& p, std::vector<cuda::HeadsTask>& tasks, const at::Tensor& hidden,
                  const char* op) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.get_device()).stream();
  p.err = error_record(hidden.device(), stream);
  cuda::heads_plan(p, tasks.data(), num_sms(hidden.get_device()));
  const auto o = hidden.options();
  const at::Tensor workspace = at::empty({(int64_t)std::max<size_t>(p.workspace_bytes, 1)}, o.dtype(at::kByte));
  at::Tensor table;
  if (p.K > cuda::kMaxParamTasks) {
    table = upload_task_table(tasks, hidden.device(), stream, op);
    p.tasks = reinterpret_cast<const cuda::HeadsTask*>(table.data_ptr());
  }
  p.fused = fused_launch();
  p.barrier_timeout_ns = fastmtl::cuda_glue::barrier_timeout_ns();
  const std::string what = std::string("fastmtl ") + op;
  check_launch(cuda::heads_prepare(p, tasks.data(), workspace.data_ptr(), stream), (what + " (prep)").c_str());
  check_launch(cuda::heads_run(p, tasks.data(), stream), what.c_str());
  if (sync_checks() && !is_capturing(stream)) raise_input_errors(hidden.device(), /*lazy=*/false);
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

// Device pointers of the row lengths (nullptr = all T), kept alive by `holder`.
const int64_t* lengths_ptr(const std::optional<Tensor>& lengths, Tensor& holder) {
  if (!lengths.has_value() || !lengths->defined()) return nullptr;
  holder = lengths->contiguous();
  return holder.data_ptr<int64_t>();
}

// The parameters both ops set alike: dtype, hidden (contiguous), the row lengths (kept alive by `len_holder`), sizes.
cuda::HeadsParams heads_params(cuda::DType dtype, const Tensor& hidden, const std::optional<Tensor>& lengths,
                               const HeadsShape& s, Tensor& len_holder) {
  cuda::HeadsParams p;
  p.dtype = dtype;
  p.hidden = hidden.data_ptr();
  p.lengths = lengths_ptr(lengths, len_holder);
  p.B = s.B;
  p.T = s.T;
  p.D = s.D;
  p.K = (int)s.K;
  return p;
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
  const std::optional<cuda::DType> dtype = heads_dtype(hidden_in.scalar_type());
  if (!dtype.has_value()) {
    FASTMTL_CHECK_TYPE(hidden_in.scalar_type() == at::kDouble,
                       "hidden must be float32, float16, bfloat16 or float64 on CUDA, got ", hidden_in.scalar_type());
    check_lengths_values(lengths, s.T);
    return composite::loss_composite(hidden_in.contiguous(), lengths, weights, biases, targets, class_weights,
                                     task_weights, levels, poolings, ignore_indices, label_smoothings, compute_grad);
  }
  const Tensor hidden = hidden_in.contiguous();
  const int64_t K = s.K;
  Tensor total = at::empty({}, o), losses = at::empty({K}, o);  // the finalize kernel writes both
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
    total.zero_();
    losses.zero_();
    if (compute_grad) {
      grad_hidden.zero_();
      for (auto& g : grad_weights) g.zero_();
      for (auto& g : grad_biases) g.zero_();
    }
    return {total, losses, grad_hidden, grad_weights, grad_biases};
  }
  const Tensor lam = task_weights.to(at::kFloat).contiguous();
  Tensor len_holder;
  cuda::HeadsParams p = heads_params(*dtype, hidden, lengths, s, len_holder);
  p.task_weights = lam.data_ptr<float>();
  p.compute_grad = compute_grad;
  p.predict = false;
  p.total = total.data_ptr();
  p.losses = losses.data_ptr();
  p.grad_hidden = compute_grad ? grad_hidden.data_ptr() : nullptr;
  launch_heads(p, tasks, hidden, "multitask_loss");
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
    // every element is written (the row kernel writes -1 at padding positions)
    preds.push_back(levels[k] == 0 ? at::empty({s.B}, o.dtype(at::kLong)) : at::empty({s.B, s.T}, o.dtype(at::kLong)));
  if (s.B == 0) return preds;
  const std::optional<cuda::DType> dtype = heads_dtype(hidden.scalar_type());
  if (!dtype.has_value()) {
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
  cuda::HeadsParams p = heads_params(*dtype, hidden, lengths, s, len_holder);
  p.predict = true;
  launch_heads(p, tasks, hidden, "multitask_predict");
  return preds;
}

}  // namespace
}  // namespace fastmtl

// A CUDA-only utility op (no tensor arguments: one kernel for every backend); not part of csrc/fastmtl.cpp because
// CPU-only builds have nothing to check (their op validates synchronously).
TORCH_LIBRARY_FRAGMENT(fastmtl, m) {
  m.def("check_input_errors(int device) -> ()", &fastmtl::check_input_errors_op);
}

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("multitask_loss", &fastmtl::multitask_loss_cuda);
  m.impl("multitask_predict", &fastmtl::multitask_predict_cuda);
}
