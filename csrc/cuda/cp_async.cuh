// cp.async (sm_80+): 16-byte copies from global to shared memory that complete in the background, through L2 only
// (.cg, so a block sees what other blocks wrote before a grid barrier), committed in groups and waited for by group.
// Shared by the persistent LSTM kernels (lstm_persistent.cu) and the heads kernels (heads.cu). Below sm_80, and in the
// host emulation of heads.cu, the functions do nothing: their callers either require sm_80 or copy by other means.
#pragma once

#include <cuda_runtime.h>

namespace fastmtl {
namespace cuda {
namespace {

// All 16 bytes of gsrc to smem_dst (both 16-byte aligned).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gsrc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gsrc) : "memory");
#endif
}

// The first src_bytes (0 to 16) of gsrc to smem_dst, the rest of the 16 bytes zero-filled.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gsrc, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gsrc), "r"(src_bytes) : "memory");
#endif
}

// Closes the group of the copies issued since the previous commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace
}  // namespace cuda
}  // namespace fastmtl
