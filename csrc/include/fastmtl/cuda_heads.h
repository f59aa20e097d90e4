// Launchers of the CUDA multi-task heads kernels (csrc/cuda/heads.cu). Raw pointers, sizes and a cudaStream_t:
// no torch types, so the kernels build with plain nvcc and the glue (csrc/cuda/heads_glue.cpp) does the rest.
//
// Contract: the `multitask_loss` / `multitask_predict` schemas in csrc/fastmtl.cpp.
//
// How a call runs (all on the caller's stream, no host synchronisation, no host-to-device copy in the common case,
// so a call can be captured in a CUDA graph):
//   heads_plan        host only: lays out the workspace (offsets per task, tile counts, split counts).
//   heads_prepare     binds the workspace and launches the prep kernel: pooled rows of the sequence-level tasks (and
//                     the argmax of max pooling), per-task normalisers (sum of the class weights of the non-ignored
//                     items), sum of class weights, and validation of lengths / targets (see HeadsParams::err).
//   heads_run         the row kernel (ONE launch for all K tasks: per (task, 64-row tile) the logits tiles on tensor
//                     cores, online log-sum-exp, per-row losses; with gradients the logit-gradient tile is formed on
//                     chip and multiplied by W into a per-task fp32 grad-hidden accumulator owned by that block, and
//                     for vocabularies up to 512 classes by X into a per-row-tile grad_W partial), the weight kernel
//                     (only with gradients and only for larger vocabularies; per (task, 64-class tile, row split) it
//                     recomputes the logits tile from the saved per-row log-sum-exp and accumulates dlogits^T X and
//                     the bias gradient on chip), and the finalize kernel (fixed-order sums: grad_hidden over tasks
//                     incl. the pooling backward, grad_W / grad_b over row tiles / splits, the losses and the total).
// With p.fused (and a device with cooperative launches) heads_prepare launches nothing and heads_run makes ONE
// cooperative launch that runs prep, rows, weights and finalize with grid barriers in between; otherwise (or when
// the driver refuses the grid) one launch per phase, as described above.
// The task table travels as a kernel parameter (HeadsTaskTable, by value) when K <= kMaxParamTasks; beyond that the
// caller uploads it to device memory (p.tasks) itself.
// Every reduction has a fixed order, so results are bitwise reproducible run to run (no float atomics).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "fastmtl/cuda_dtype.h"

namespace fastmtl {
namespace cuda {

// The error record the kernels write when they meet a bad length or target (first one wins, atomically): int64
// words {code, task, index, value, num_classes, ignore_index, T, level}; code 0 = none, 1 = length (index b),
// 2 = target (index: row b for a sequence task, b * T + t for a token task). The kernels never read out of bounds
// meanwhile (bad lengths are clamped, bad targets count as ignored). The buffer outlives the calls and is cleared
// by whoever reads it (the glue: csrc/cuda/heads_glue.cpp).
enum HeadsErr : int { kHeadsErrCode = 0, kHeadsErrTask, kHeadsErrIndex, kHeadsErrValue, kHeadsErrClasses,
                      kHeadsErrIgnore, kHeadsErrT, kHeadsErrLevel, kHeadsErrWords };

// One task. The caller fills the "inputs" part; heads_plan fills the "layout" part.
struct HeadsTask {
  // inputs (device pointers; weight/bias/grad_* have the hidden dtype; all contiguous)
  const void* weight = nullptr;        // (C, D)
  const void* bias = nullptr;          // (C) or nullptr
  const int64_t* target = nullptr;     // (B) sequence / (B, T) token; nullptr for predict
  const float* class_weight = nullptr; // (C) float32 or nullptr
  void* grad_weight = nullptr;         // (C, D) output, when computing gradients
  void* grad_bias = nullptr;           // (C) output or nullptr
  int64_t* prediction = nullptr;       // (B) / (B, T) output of multitask_predict
  int64_t num_classes = 0;
  int64_t ignore_index = -100;
  float label_smoothing = 0.f;
  int level = 0;    // heads::Level (fastmtl/heads_math.h): 0 sequence, 1 token
  int pooling = 0;  // heads::Pooling: 0 last, 1 first, 2 mean, 3 max, 4 last_first (sequence tasks)
  // layout (heads_plan)
  int index = 0;              // k
  int64_t rows = 0;           // B (sequence) or B*T (token)
  int64_t row_offset = 0;     // offset into the per-row buffers (losses, stats)
  int64_t tile_begin = 0;     // first 64-row tile of this task in the row kernel's grid
  int64_t tile_end = 0;
  int64_t pooled_index = -1;  // sequence tasks: index into the pooled buffer
  int64_t gx_offset = 0;      // floats: this task's grad accumulator (rows_pad x D_pad)
  int64_t class_tiles = 0;    // ceil(C / 64)
  int fuse_gw = 0;            // grad_W / grad_b partials per row tile from the row kernel (no weight kernel)
  int64_t splits = 1;         // row splits of the weight kernel (fused: one per row tile)
  int64_t tiles_per_split = 0;
  int64_t wblock_begin = 0;   // first block of this task in the weight kernel's grid
  int64_t wblock_end = 0;
  int64_t gw_offset = 0;      // floats: grad-W partials (splits x C_pad x D_pad)
  int64_t gb_offset = 0;      // floats: grad-b partials (splits x C_pad)
  int64_t welem_begin = 0;    // finalize: first element (C*D weight + C bias) of this task
  int64_t welem_end = 0;
};

struct HeadsParams {
  DType dtype = DType::kFloat32;    // of hidden, the weights and the outputs: float32, float16 or bfloat16
  const void* hidden = nullptr;     // (B, T, D)
  const int64_t* lengths = nullptr; // (B) or nullptr (all T)
  int64_t B = 0, T = 0, D = 0;
  int K = 0;
  const float* task_weights = nullptr;  // (K) float32 (loss mode)
  bool compute_grad = false;
  bool predict = false;
  // outputs (hidden dtype)
  void* total = nullptr;        // 0-d
  void* losses = nullptr;       // (K)
  void* grad_hidden = nullptr;  // (B, T, D)
  int64_t* err = nullptr;       // int64[kHeadsErrWords] error record (see HeadsErr), zero when no error is pending
  // layout (heads_plan) and workspace pointers (heads_prepare)
  int64_t D_pad = 0;
  bool vec_loads = false;     // 16-byte loads of X / W rows (D * elem % 16 == 0, aligned bases)
  int64_t num_seq_tasks = 0;
  int64_t total_rows = 0;
  int64_t row_tiles = 0;      // blocks of the row kernel
  int64_t weight_blocks = 0;  // blocks of the weight kernel
  int64_t weight_elems = 0;   // grad_W + grad_b elements over all tasks
  size_t off_pooled = 0, off_argmax = 0, off_norm = 0, off_wsum = 0, off_row_loss = 0,
         off_row_stats = 0, off_row_y = 0, off_gx = 0, off_gw = 0, off_gb = 0, off_sync = 0, workspace_bytes = 0;
  // Device copy of the task table, set by the caller when K > kMaxParamTasks; nullptr otherwise (the launchers then
  // pass the table as a kernel parameter and the kernels point this at it).
  const HeadsTask* tasks = nullptr;
  void* pooled = nullptr;
  int32_t* argmax = nullptr;
  float* norm = nullptr;
  float* wsum = nullptr;
  float* row_loss = nullptr;
  float* row_stats = nullptr;  // 4 floats per row: lse, a, b, s
  int32_t* row_y = nullptr;
  float* gx = nullptr;
  float* gw = nullptr;
  float* gb = nullptr;
  unsigned int* grid_sync = nullptr;  // the fused kernel's grid-barrier counter (zeroed by heads_run)
  unsigned long long barrier_timeout_ns = 10000000000ull;  // its barrier traps after this wait (0: never)
  bool fused = true;  // one cooperative launch when the device allows it (else one launch per phase)
};

// The task table as a kernel parameter (by value, __grid_constant__): no upload, nothing for a CUDA graph to go
// stale. 16 tasks keep the parameters (HeadsParams + table) under the classic 4 KB kernel-parameter limit.
constexpr int kMaxParamTasks = 16;
struct HeadsTaskTable {
  HeadsTask t[kMaxParamTasks];
};

// Host only. Fills the layout fields of `p` and `tasks` and returns the workspace size in bytes.
// `num_sms` sizes the row splits of the weight kernel (pass the device's multiprocessor count).
size_t heads_plan(HeadsParams& p, HeadsTask* tasks, int num_sms);

// Host only: points the workspace fields of `p` into `workspace` (done by heads_prepare; public for the emulation
// that tests the kernels on the host).
void heads_bind(HeadsParams& p, void* workspace);

// Binds the workspace (device memory of p.workspace_bytes, 256-byte aligned) and launches the prep kernel. `tasks`
// is the host table (heads_plan's output): passed by value when K <= kMaxParamTasks, else p.tasks must already
// point at a device copy of it. Launchers return nullptr on success or a static error string.
const char* heads_prepare(HeadsParams& p, const HeadsTask* tasks, void* workspace, cudaStream_t stream);

// Launches the row kernel, the weight kernel (with gradients) and the finalize kernel (same `tasks` rule).
const char* heads_run(const HeadsParams& p, const HeadsTask* tasks, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmtl
