// Host emulation of the CUDA heads kernels (csrc/cuda/heads.cu) for machines without a GPU.
//
// heads.cu is compiled here by the host compiler: each block runs as 256 std::threads with a real barrier for
// __syncthreads and per-warp barriers for the shuffles; __shared__ variables become function statics (blocks run
// one after another); the dynamic shared memory is a per-block buffer. The float32 / bf16 / fp16 paths run the FMA
// tile code (the host has no wmma), so this checks the kernels' indexing, tiling, online log-sum-exp, gradient
// tiles, row splits, pooling and finalize logic -- not the tensor-core fragments or GPU timing.
// Registered as fastmtl_emu::multitask_loss / multitask_predict (CPU tensors, same schemas as fastmtl).
#define __shared__ static
#define __launch_bounds__(...)
#define __grid_constant__
#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 tid, bid;
inline std::barrier<>* block_bar = nullptr;
inline std::barrier<>* warp_bar[8] = {};
inline unsigned long long shfl_slots[8][32];
inline unsigned char* dyn_smem = nullptr;
inline std::mutex atomic_mu;
}  // namespace emu

#define threadIdx emu::tid
#define blockIdx emu::bid
#define FASTMTL_DYN_SMEM(name) unsigned char* name = emu::dyn_smem
inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  const int w = emu::tid.x / 32, l = emu::tid.x % 32;
  unsigned long long slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  emu::shfl_slots[w][l] = slot;
  emu::warp_bar[w]->arrive_and_wait();
  T r;
  slot = emu::shfl_slots[w][l ^ o];
  std::memcpy(&r, &slot, sizeof(T));
  emu::warp_bar[w]->arrive_and_wait();
  return r;
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long cmp, unsigned long long val) {
  std::lock_guard<std::mutex> g(emu::atomic_mu);
  const unsigned long long old = *a;
  if (old == cmp) *a = val;
  return old;
}

#include "../../csrc/cuda/heads.cu"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastmtl/heads_checks.h"
#include "fastmtl/heads_schema.h"

namespace {
using at::Tensor;
using OptList = c10::List<std::optional<Tensor>>;
namespace fc = fastmtl::cuda;

template <typename F>
void launch(int64_t blocks, size_t dyn_bytes, F kernel) {
  std::vector<unsigned char> smem(dyn_bytes + 256);
  for (int64_t b = 0; b < blocks; ++b) {
    std::barrier<> bar(256);
    std::unique_ptr<std::barrier<>> wb[8];
    for (int w = 0; w < 8; ++w) {
      wb[w] = std::make_unique<std::barrier<>>(32);
      emu::warp_bar[w] = wb[w].get();
    }
    emu::block_bar = &bar;
    std::memset(smem.data(), 0xCD, smem.size());  // garbage, as on a GPU
    emu::dyn_smem = smem.data();
    std::vector<std::thread> th;
    for (int t = 0; t < 256; ++t)
      th.emplace_back([&, t] {
        emu::tid.x = t;
        emu::bid.x = (unsigned)b;
        kernel();
      });
    for (auto& x : th) x.join();
  }
}

void dispatch(fc::HeadsParams& p, std::vector<fc::HeadsTask>& tasks) {
  const size_t bytes = fc::heads_plan(p, tasks.data(), 2);
  std::vector<unsigned char> ws(bytes + 256);
  // 256-byte aligned base, like the CUDA allocator
  unsigned char* base = ws.data() + (256 - reinterpret_cast<uintptr_t>(ws.data()) % 256) % 256;
  fc::heads_bind(p, base);
  // The task table as the launchers pass it: a kernel parameter up to kMaxParamTasks tasks, else a "device" copy.
  fc::HeadsTaskTable table{};
  if (p.K <= fc::kMaxParamTasks) {
    for (int k = 0; k < p.K; ++k) table.t[k] = tasks[k];
    p.tasks = nullptr;
  } else {
    p.tasks = tasks.data();
  }
  const fc::HeadsParams pc = p;
  auto go = [&](auto tag) {
    using T = decltype(tag);
    launch(p.num_seq_tasks * p.B + p.K, 0, [&] { fastmtl::cuda::heads_prep_kernel<T>(pc, table); });
    TORCH_CHECK(p.err[0] == 0, "emulated prep kernel reported error code ", p.err[0], " task ", p.err[1], " index ",
                p.err[2], " value ", p.err[3]);
    const size_t smem = fastmtl::cuda::SmemLayout<T>::bytes;
    launch(p.row_tiles, smem, [&] { fastmtl::cuda::heads_row_kernel<T>(pc, table); });
    if (p.predict) return;
    if (p.compute_grad) launch(p.weight_blocks, smem, [&] { fastmtl::cuda::heads_weight_kernel<T>(pc, table); });
    int64_t hb = 0, wb = 0;
    if (p.compute_grad) {
      hb = std::min<int64_t>((p.B * p.T * p.D + 255) / 256, 3);
      wb = std::min<int64_t>((p.weight_elems + 255) / 256, 2);
    }
    launch(hb + wb + 1, 0, [&] { fastmtl::cuda::heads_finalize_kernel<T>(pc, table, hb, wb); });
  };
  switch (p.dtype) {
    case fc::DType::kFloat32: go(float()); break;
    case fc::DType::kFloat16: go(__half()); break;
    default: go(__nv_bfloat16()); break;
  }
}

fc::DType dtype_code(at::ScalarType t) {
  if (t == at::kFloat) return fc::DType::kFloat32;
  if (t == at::kHalf) return fc::DType::kFloat16;
  TORCH_CHECK(t == at::kBFloat16, "emulation: float32, float16 or bfloat16");
  return fc::DType::kBFloat16;
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> loss_emu(
    const Tensor& hidden_in, const std::optional<Tensor>& lengths, at::TensorList weights, const OptList& biases,
    at::TensorList targets, const OptList& class_weights, const Tensor& task_weights, at::IntArrayRef levels,
    at::IntArrayRef poolings, at::IntArrayRef ignore_indices, at::ArrayRef<double> label_smoothings,
    bool compute_grad) {
  // the ops' own argument checks (fastmtl/heads_checks.h)
  const fastmtl::HeadsDims s = fastmtl::check_heads_args(hidden_in, lengths, weights, biases, levels, poolings);
  fastmtl::check_multitask_loss_args(hidden_in, s.B, s.T, s.K, weights, targets, class_weights, task_weights, levels,
                                     ignore_indices, label_smoothings);
  const Tensor hidden = hidden_in.contiguous();
  const auto o = hidden.options();
  const int64_t K = weights.size();
  Tensor total = at::zeros({}, o), losses = at::zeros({K}, o);
  Tensor gh = compute_grad ? at::full_like(hidden, 777.0) : at::empty({0}, o);  // garbage: every element written
  std::vector<Tensor> gw, gb, keep;
  std::vector<fc::HeadsTask> tasks(K);
  for (int64_t k = 0; k < K; ++k) {
    auto& t = tasks[k];
    keep.push_back(weights[k].contiguous());
    t.weight = keep.back().data_ptr();
    const auto b = biases.get(k);
    const bool hb = b.has_value() && b->defined();
    if (hb) {
      keep.push_back(b->contiguous());
      t.bias = keep.back().data_ptr();
    }
    keep.push_back(targets[k].contiguous());
    t.target = keep.back().data_ptr<int64_t>();
    const auto cw = class_weights.get(k);
    if (cw.has_value() && cw->defined()) {
      keep.push_back(cw->to(at::kFloat).contiguous());
      t.class_weight = keep.back().data_ptr<float>();
    }
    t.num_classes = weights[k].size(0);
    t.ignore_index = ignore_indices[k];
    t.label_smoothing = (float)label_smoothings[k];
    t.level = (int)levels[k];
    t.pooling = (int)poolings[k];
    if (compute_grad) {
      gw.push_back(at::full_like(weights[k], 777.0));
      t.grad_weight = gw.back().data_ptr();
      gb.push_back(hb ? at::full({weights[k].size(0)}, 777.0, o) : at::empty({0}, o));
      if (hb) t.grad_bias = gb.back().data_ptr();
    } else {
      gw.push_back(at::empty({0}, o));
      gb.push_back(at::empty({0}, o));
    }
  }
  const Tensor lam = task_weights.to(at::kFloat).contiguous();
  Tensor len;
  if (lengths.has_value() && lengths->defined()) len = lengths->contiguous();
  Tensor err = at::zeros({fc::kHeadsErrWords}, o.dtype(at::kLong));
  fc::HeadsParams p;
  p.dtype = dtype_code(hidden.scalar_type());
  p.hidden = hidden.data_ptr();
  p.lengths = len.defined() ? len.data_ptr<int64_t>() : nullptr;
  p.B = hidden.size(0);
  p.T = hidden.size(1);
  p.D = hidden.size(2);
  p.K = (int)K;
  p.task_weights = lam.data_ptr<float>();
  p.compute_grad = compute_grad;
  p.total = total.data_ptr();
  p.losses = losses.data_ptr();
  p.grad_hidden = compute_grad ? gh.data_ptr() : nullptr;
  p.err = err.data_ptr<int64_t>();
  dispatch(p, tasks);
  return {total, losses, gh, gw, gb};
}

std::vector<Tensor> predict_emu(const Tensor& hidden_in, const std::optional<Tensor>& lengths,
                                at::TensorList weights, const OptList& biases, at::IntArrayRef levels,
                                at::IntArrayRef poolings) {
  fastmtl::check_heads_args(hidden_in, lengths, weights, biases, levels, poolings);
  const Tensor hidden = hidden_in.contiguous();
  const auto o = hidden.options();
  const int64_t K = weights.size();
  std::vector<Tensor> preds, keep;
  std::vector<fc::HeadsTask> tasks(K);
  for (int64_t k = 0; k < K; ++k) {
    preds.push_back(levels[k] == 0 ? at::full({hidden.size(0)}, 555, o.dtype(at::kLong))
                                   : at::full({hidden.size(0), hidden.size(1)}, 555, o.dtype(at::kLong)));
    auto& t = tasks[k];
    keep.push_back(weights[k].contiguous());
    t.weight = keep.back().data_ptr();
    t.num_classes = weights[k].size(0);
    const auto b = biases.get(k);
    if (b.has_value() && b->defined()) {
      keep.push_back(b->contiguous());
      t.bias = keep.back().data_ptr();
    }
    t.level = (int)levels[k];
    t.pooling = (int)poolings[k];
    t.prediction = preds.back().data_ptr<int64_t>();
  }
  Tensor len;
  if (lengths.has_value() && lengths->defined()) len = lengths->contiguous();
  Tensor err = at::zeros({fc::kHeadsErrWords}, o.dtype(at::kLong));
  fc::HeadsParams p;
  p.dtype = dtype_code(hidden.scalar_type());
  p.hidden = hidden.data_ptr();
  p.lengths = len.defined() ? len.data_ptr<int64_t>() : nullptr;
  p.B = hidden.size(0);
  p.T = hidden.size(1);
  p.D = hidden.size(2);
  p.K = (int)K;
  p.predict = true;
  p.err = err.data_ptr<int64_t>();
  dispatch(p, tasks);
  return preds;
}
}  // namespace

// The real ops' schemas (one definition: fastmtl/heads_schema.h), under the emulator's own namespace.
TORCH_LIBRARY(fastmtl_emu, m) {
  m.def(fastmtl::kMultitaskLossSchema);
  m.def(fastmtl::kMultitaskPredictSchema);
}
TORCH_LIBRARY_IMPL(fastmtl_emu, CPU, m) {
  m.impl("multitask_loss", &loss_emu);
  m.impl("multitask_predict", &predict_emu);
}
