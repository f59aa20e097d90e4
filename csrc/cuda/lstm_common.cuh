// Device helpers shared by the CUDA LSTM kernels (lstm.cu, lstm_persistent.cu). CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastmtl/cuda_lstm.h"
#include "fastmtl/lstm_math.h"

namespace fastmtl {
namespace cuda {
namespace detail {

// Storage type -> accumulation type and conversions.
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

template <typename T>
__device__ __forceinline__ typename Num<T>::acc ld(const T* p) {
  return Num<T>::load(*p);
}
template <typename T, typename A>
__device__ __forceinline__ void st(T* p, A v) {
  *p = Num<T>::store(v);
}

// Activations: accurate library functions (the reference is float64; fast intrinsics would cost accuracy).
__device__ __forceinline__ float sigmoid_(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ double sigmoid_(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

// The activation policy of the shared cell formulas (fastmtl/lstm_math.h) on the device.
struct CudaAct {
  template <typename A>
  __device__ __forceinline__ static A sigmoid(A x) { return sigmoid_(x); }
  template <typename A>
  __device__ __forceinline__ static A tanh(A x) { return tanh_(x); }
};

// Launch-error check: nullptr on success, else the CUDA error string.
inline const char* last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastmtl
