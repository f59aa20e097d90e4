// Device helpers shared by the CUDA LSTM kernels (lstm.cu, lstm_persistent.cu). CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastmtl/cuda_lstm.h"
#include "fastmtl/lstm_math.h"
#include "num.cuh"

namespace fastmtl {
namespace cuda {
namespace detail {

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
