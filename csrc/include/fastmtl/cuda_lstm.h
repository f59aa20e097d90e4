// Launchers of the CUDA LSTM kernels (csrc/cuda/lstm.cu, csrc/cuda/lstm_persistent.cu).
//
// Framework-free: raw pointers, sizes and a cudaStream_t; no torch headers. The torch glue
// (csrc/cuda/lstm_glue.cpp) owns allocation, GEMMs (ATen/cuBLAS), argument checks and registration.
// Every launcher returns nullptr on success or a static error string (cudaGetErrorString or a fixed message);
// the glue raises it as a Python RuntimeError.
//
// Layout conventions (one layer, direction d, time step t, see csrc/fastmtl.cpp):
//   gates are ordered i, f, g, o (torch.nn.LSTM); "4H rows" below means a row of 4*H values, gate k at k*H.
//   Rows are batch entries; a pointer with an `_ld` is the first row, row b is at ptr + b * ld (elements).
//   acc_t is double for float64 storage and float otherwise (cell state and its gradient are kept in acc_t).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "fastmtl/cuda_dtype.h"

namespace fastmtl {
namespace cuda {

// One forward step, all B rows: rows b < bt are active (they run step t), rows b >= bt are padding
// (output and reserve rows are written as zero, the state is left untouched).
struct FwdStepArgs {
  const void* xproj;  // rows of 4H: x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T (the glue adds the last in place)
  int64_t xproj_ld;
  void* c_state;      // (B, H) acc_t, updated in place for active rows
  void* h_state;      // (B, H) storage dtype, updated in place for active rows
  void* out;          // output rows (H values each) for this step and direction
  int64_t out_ld;
  void* reserve;      // (B, 5H) rows for this step (i, f, g, o, c), or nullptr
  int B, bt, H;
};
const char* lstm_fwd_step(DType dt, const FwdStepArgs& a, cudaStream_t stream);

// One backward step (processing order is the reverse of the forward order of this direction).
// Rows are gradient rows; gradient row b belongs to forward row b / rep (rep = 1: one backward, the same rows;
// rep = K: lstm_layer_backward_multi, whose K cotangents of forward row b are the gradient rows b*K .. b*K+K-1, so
// the active gradient rows are still a prefix). B, bt, n_prev, n_cprev count gradient rows (K times the forward
// rows); the pointers marked [fwd] are indexed by the forward row, the others by the gradient row.
//   n_prev: rows active in the previously processed step (0 for the first): their dh comes from dhrec and their
//           dc from dc_state; active rows b >= n_prev start here (their last forward step) and take grad_hy/grad_cy.
//           Rows bt <= b < n_prev finished at the previous processed step: grad_hx/grad_cx are written for them.
//   n_cprev: rows for which the previous forward step exists (c_{t-1}, h_{t-1} from res_prev / hsrc); the other
//           active rows take cx / hx.
struct BwdStepArgs {
  const void* grad_out;  // rows of H (dy_t)
  int64_t grad_out_ld;
  const void* dhrec;     // (n_prev, H) contiguous acc_t: dG_{prev processed} W_hh (fp32 for bf16/fp16: dh is
                         // carried across steps without rounding to 16 bits)
  const void* grad_hy;   // (B, H)
  const void* grad_cy;   // (B, H)
  void* dc_state;        // (B, H) acc_t
  const void* res;       // [fwd] (B/rep, 5H) reserve rows at t
  const void* res_prev;  // [fwd] (B/rep, 5H) reserve rows at the previous forward step, or nullptr
  const void* cx;        // [fwd] (B/rep, H)
  const void* hsrc;      // [fwd] output rows at the previous forward step (H values each), or nullptr
  int64_t hsrc_ld;
  const void* hx;        // [fwd] (B/rep, H)
  void* hprev;           // [fwd] (B/rep, H) rows at t of the h_{t-1} buffer (for the W_hh gradient); zero for
                         // inactive rows; written by gradient row b*rep only
  void* dgates;          // rows of 4H at t: gradient of the gate pre-activations; zero for inactive rows
  int64_t dgates_ld;
  void* grad_hx;         // (B, H)
  void* grad_cx;         // (B, H)
  int B, bt, n_prev, n_cprev, H;
  int rep = 1;           // gradient rows per forward row
};
const char* lstm_bwd_step(DType dt, const BwdStepArgs& a, cudaStream_t stream);

// After the last processed step: grad_hx[b] = dhrec[b], grad_cx[b] = dc_state[b] for b < n_prev (both acc_t).
const char* lstm_bwd_finish(DType dt, const void* dhrec, const void* dc_state, void* grad_hx, void* grad_cx,
                            int n_prev, int H, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// Persistent forward path (csrc/cuda/lstm_persistent.cu): one launch runs every time step of one layer
// (both directions in one launch when they fit, else one launch per direction). Each CTA keeps the rows
// {i,f,g,o} x [j0, j0+hc) of W_hh of one direction in shared memory for the whole sequence, computes its slice
// of h_{t-1} W_hh^T with mma.sync tensor-core instructions (bf16/fp16 operands, or tf32 for float32, fp32
// accumulation), applies the gate/cell update for its hidden units (the cell state never leaves the CTA), writes
// h_t to a global double buffer, and meets the other CTAs at a grid-wide barrier before the next step.
// The grid is never larger than what the occupancy calculator says is co-resident (1 CTA per SM when the
// weights need it), and the kernels are launched cooperatively, so the driver guarantees co-residency or refuses
// the launch (kPersistentGridTooLarge: the glue then takes the standard path). The grid barrier traps with a
// message naming the kernel after `barrier_timeout_ns` (0: never) rather than spin forever.
struct PersistentPlan {
  bool ok = false;
  int hc = 0;                // hidden units per CTA (4, 8, 16 or 32)
  int ctas_per_dir = 0;      // ceil(H / hc)
  int dirs_per_launch = 0;   // D (one launch) or 1 (one launch per direction)
  size_t smem_bytes = 0;     // dynamic shared memory per CTA
  const char* reason = "";   // why not, when !ok
};
// Decides whether the persistent path applies (see the rule in csrc/cuda/README.md) and sizes it.
// Never launches anything; queries device attributes and the occupancy calculator (cached per device).
// `backward` sizes the backward kernel (its shared memory differs) instead of the forward one.
// Returned (as this very pointer) by the persistent launchers when the driver refuses the cooperative launch
// because the grid cannot be co-resident right now (MPS / green-context SM limits): nothing was launched.
extern const char* const kPersistentGridTooLarge;

const char* lstm_persistent_plan(DType dt, int B, int H, int D, bool allow_tf32, int device, bool backward,
                                 PersistentPlan* plan);

struct PersistentFwdArgs {
  const void* xproj;        // (T, B, D*4H) with biases; direction d at column d*4H
  const void* whh[2];       // (4H, H) per direction
  const void* cx;           // (D, B, H)
  void* out;                // (T, B, D*H)
  void* hy;                 // (D, B, H)
  void* cy;                 // (D, B, H)
  void* reserve;            // (D, T, B, 5H) or nullptr
  void* hbuf;               // (D, 2, B, H) storage dtype; hbuf[d][0] must hold hx[d] at launch
  const int* batch_sizes;   // (T,) device int32: active rows per step, or nullptr (all B)
  unsigned int* barrier;    // one zeroed counter per launch (D counters when launched per direction)
  unsigned long long barrier_timeout_ns = 10000000000ull;  // grid-barrier wait after which the kernel traps; 0 never
  int T, B, H, D;
};
const char* lstm_persistent_fwd(DType dt, const PersistentFwdArgs& a, const PersistentPlan& plan,
                                cudaStream_t stream);

// Persistent backward (same split: CTA = direction x hidden-unit slice, W_hh[:, slice] resident in shared memory):
// per step the gate gradients of the slice, a grid barrier, then dh_{t-1} for the slice = dG_t . W_hh[:, slice] on
// the tensor cores (kept in shared memory in fp32). Writes dgates and hprev exactly as the standard backward, so
// the glue computes the weight and input gradients with the same large GEMMs afterwards.
struct PersistentBwdArgs {
  const void* grad_out;     // (T, B, D*H)
  const void* grad_hy;      // (D, B, H)
  const void* grad_cy;      // (D, B, H)
  const void* whh[2];       // (4H, H) per direction
  const void* reserve;      // (D, T, B, 5H)
  const void* out;          // (T, B, D*H) forward output
  const void* hx;           // (D, B, H)
  const void* cx;           // (D, B, H)
  void* dgates;             // (T, B, D*4H)
  void* hprev;              // (D, T, B, H)
  void* grad_hx;            // (D, B, H)
  void* grad_cx;            // (D, B, H)
  const int* batch_sizes;   // (T,) device int32, or nullptr (all B)
  unsigned int* barrier;    // zeroed counters, one per launch
  unsigned long long barrier_timeout_ns = 10000000000ull;  // as in PersistentFwdArgs
  int T, B, H, D;
};
const char* lstm_persistent_bwd(DType dt, const PersistentBwdArgs& a, const PersistentPlan& plan,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmtl
