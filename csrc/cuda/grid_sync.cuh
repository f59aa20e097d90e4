// Grid-wide barrier of the persistent / fused kernels (lstm_persistent.cu, heads.cu). CUDA only.
//
// Correct only when every block of the grid is co-resident: the kernels that use it are launched cooperatively
// (cudaLaunchCooperativeKernel), so the driver guarantees that or refuses the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>

namespace fastmtl {
namespace cuda {
namespace {

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t = 0;
#if defined(__CUDA_ARCH__)
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
#endif
  return t;
}

// Grid-wide barrier on a monotonic counter: the k-th barrier waits for k * gridDim.x arrivals (the pattern of
// cooperative_groups' grid sync). Every CTA must be co-resident: the launch is cooperative (the driver refuses a
// grid that cannot be), and a wait longer than `timeout_ns` (0: never) -- a grid that is not co-resident after all,
// or a CTA that died -- traps with a message naming the kernel instead of spinning forever.
__device__ __forceinline__ void grid_barrier(unsigned int* counter, unsigned int target,
                                             unsigned long long timeout_ns, const char* kernel) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
    unsigned int v = 0;
    unsigned long long start = 0;
    for (unsigned int spin = 0;; ++spin) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(counter) : "memory");
#else
      v = *reinterpret_cast<volatile unsigned int*>(counter);
#endif
      if (v >= target) break;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
      __nanosleep(32);
#endif
      if (timeout_ns != 0 && (spin & 1023u) == 0) {
        const unsigned long long now = global_ns();
        if (spin == 0) {
          start = now;
        } else if (now - start > timeout_ns) {
          printf("fastmtl: %s: grid barrier timed out after %.1f s in block %d of %d (counter %u, waiting for %u): "
                 "the grid is not co-resident or a block stopped; aborting the kernel\n",
                 kernel, (double)(now - start) * 1e-9, (int)blockIdx.x, (int)gridDim.x, v, target);
          __trap();
        }
      }
    }
    __threadfence();
  }
  __syncthreads();
}

}  // namespace
}  // namespace cuda
}  // namespace fastmtl
