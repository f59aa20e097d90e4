// FASTMTL_HD: how the formulas shared by the CPU and CUDA kernels (fastmtl/*_math.h) are declared.
//
// Under nvcc, host and device inline. With GCC / Clang, always_inline: the CPU instantiates them with SIMD types
// inside functions compiled for a wider ISA than the rest of the file; forcing the inlining keeps the vector
// operations inline in those callers (and leaves no out-of-line copy built for a wider ISA).
#pragma once

#if defined(__CUDACC__)
#define FASTMTL_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTMTL_HD inline __attribute__((always_inline))
#else
#define FASTMTL_HD inline
#endif
