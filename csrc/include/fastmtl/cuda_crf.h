// Launchers of the CUDA linear-chain CRF kernels (csrc/cuda/crf.cu). Raw pointers, sizes and a cudaStream_t: no torch
// types, so the kernels build with plain nvcc and the glue (csrc/cuda/crf_glue.cpp) does the rest.
//
// Contract: the crf_* schemas in csrc/fastmtl.cpp. The glue hands over contiguous tensors in the compute dtype
// (DType::kFloat32 or kFloat64), the effective parameters (forbidden entries -inf) and validated lengths / tags.
// One block per sequence, its threads over the tags; the forward and backward recursions run in log space with a
// max-shifted log-sum-exp per entry (exact for -inf scores). Per-sequence partial gradients (start, end,
// transitions) are written to (B, ...) buffers that the glue sums, so results are reproducible (no float atomics).
// Every launcher returns nullptr or the CUDA error string of its launch.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastmtl/cuda_dtype.h"

namespace fastmtl {
namespace cuda {

// alpha (B, T, C) forward log-scores (positions t >= lengths[b] untouched), log_z (B), nll (B): log Z - gold score
// (+inf for a gold path through a forbidden entry; 0 for length 0).
const char* crf_forward(DType dtype, int64_t B, int64_t T, int64_t C, const void* em, const int64_t* lengths,
                        const int64_t* tags, const void* trans, const void* start, const void* end, void* alpha,
                        void* log_z, void* nll, cudaStream_t stream);

// tags == nullptr: grad_em receives the marginals (g ignored, gstart / gend / gtrans unused). Otherwise grad_em =
// g_b (marginal - onehot(tag)), gstart / gend (B, C) and gtrans (B, C, C) the per-sequence parameter gradients;
// a sequence with g_b == 0, length 0 or an infeasible gold path is left as the caller zeroed it.
const char* crf_backward(DType dtype, int64_t B, int64_t T, int64_t C, const void* em, const int64_t* lengths,
                         const int64_t* tags, const void* trans, const void* start, const void* end,
                         const void* alpha, const void* log_z, const void* g, void* grad_em, void* gstart,
                         void* gend, void* gtrans, cudaStream_t stream);

// Viterbi paths (B, T) int64, -1 at padding; hist (B, T, C) int32 workspace.
const char* crf_viterbi(DType dtype, int64_t B, int64_t T, int64_t C, const void* em, const int64_t* lengths,
                        const void* trans, const void* start, const void* end, int32_t* hist, int64_t* path,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmtl
