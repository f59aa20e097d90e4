// Storage types of the CUDA kernels and their arithmetic type: float32, float64, and bfloat16 / float16 computed in
// float. Shared by the LSTM kernels (lstm.cu, lstm_persistent.cu) and the heads kernels (heads.cu, which the host
// emulation in tests/cuda_emulation also compiles). CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastmtl {
namespace cuda {
namespace detail {

// Storage type -> accumulation type (acc) and conversions: load widens, store rounds to nearest even.
template <typename T>
struct Num;
template <>
struct Num<float> {
  using acc = float;
  __device__ __forceinline__ static float load(float v) { return v; }
  __device__ __forceinline__ static float store(float v) { return v; }
};
template <>
struct Num<double> {
  using acc = double;
  __device__ __forceinline__ static double load(double v) { return v; }
  __device__ __forceinline__ static double store(double v) { return v; }
};
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  __device__ __forceinline__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Num<__half> {
  using acc = float;
  __device__ __forceinline__ static float load(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half store(float v) { return __float2half_rn(v); }
};

}  // namespace detail
}  // namespace cuda
}  // namespace fastmtl
