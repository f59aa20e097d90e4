// CUDA kernels of the linear-chain CRF ops (see csrc/include/fastmtl/cuda_crf.h for the contract and
// csrc/fastmtl.cpp for the op semantics). CUDA headers and csrc/include only; raw pointers, sizes, a stream.
#include <cuda_runtime.h>

#include <cstdint>

#include "fastmtl/cuda_crf.h"

namespace fastmtl {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ T ninf() {
  return -static_cast<T>(INFINITY);
}

__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return __logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

// The end of a step of a recursion kept in two shared-memory rows: once every thread has written the next row, it
// becomes the current one.
template <typename T>
__device__ __forceinline__ void next_step(T*& cur, T*& next) {
  __syncthreads();
  T* x = cur;
  cur = next;
  next = x;
}

__device__ __forceinline__ int64_t seq_len(const int64_t* lengths, int64_t b, int64_t T) {
  const int64_t L = lengths[b];
  return L < 0 ? 0 : (L > T ? T : L);
}

__device__ __forceinline__ int64_t safe_tag(const int64_t* tags, int64_t i, int64_t C) {
  const int64_t y = tags[i];
  return y < 0 ? 0 : (y >= C ? C - 1 : y);
}

// Gold-path score of sequence b (thread 0 only), accumulated in double.
template <typename T>
__device__ double gold_score(const T* em, const int64_t* tags, const T* trans, const T* start, const T* end,
                             int64_t b, int64_t L, int64_t T_, int64_t C) {
  if (L == 0) return 0.0;
  const T* e = em + b * T_ * C;
  const int64_t* y = tags + b * T_;
  int64_t prev = safe_tag(y, 0, C);
  double s = double(start[prev]) + double(e[prev]);
  for (int64_t t = 1; t < L; ++t) {
    const int64_t cur = safe_tag(y, t, C);
    s += double(trans[prev * C + cur]) + double(e[t * C + cur]);
    prev = cur;
  }
  return s + double(end[prev]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
crf_forward_kernel(int64_t T_, int64_t C, const T* __restrict__ em, const int64_t* __restrict__ lengths,
                   const int64_t* __restrict__ tags, const T* __restrict__ trans, const T* __restrict__ start,
                   const T* __restrict__ end, T* __restrict__ alpha, T* __restrict__ log_z, T* __restrict__ nll) {
  extern __shared__ unsigned char smem_raw[];
  T* a = reinterpret_cast<T*>(smem_raw);
  T* na = a + C;
  const int64_t b = blockIdx.x;
  const int64_t L = seq_len(lengths, b, T_);
  if (L == 0) {
    if (threadIdx.x == 0) {
      log_z[b] = T(0);
      if (nll) nll[b] = T(0);
    }
    return;
  }
  const T* e = em + b * T_ * C;
  T* al = alpha + b * T_ * C;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) al[j] = a[j] = start[j] + e[j];
  __syncthreads();
  for (int64_t t = 1; t < L; ++t) {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      T m = ninf<T>();
      for (int64_t i = 0; i < C; ++i) m = fmax(m, a[i] + trans[i * C + j]);
      T v = ninf<T>();
      if (m > ninf<T>()) {
        T s = T(0);
        for (int64_t i = 0; i < C; ++i) s += dexp(a[i] + trans[i * C + j] - m);
        v = m + dlog(s) + e[t * C + j];
      }
      na[j] = v;
      al[t * C + j] = v;
    }
    next_step(a, na);
  }
  if (threadIdx.x == 0) {
    T m = ninf<T>();
    for (int64_t j = 0; j < C; ++j) m = fmax(m, a[j] + end[j]);
    T lz = m;
    if (m > ninf<T>()) {
      double s = 0.0;
      for (int64_t j = 0; j < C; ++j) s += exp(double(a[j] + end[j] - m));
      lz = T(double(m) + log(s));
    }
    log_z[b] = lz;
    if (nll) {
      const double g = gold_score<T>(em, tags, trans, start, end, b, L, T_, C);
      nll[b] = g == -double(INFINITY) ? T(INFINITY) : T(double(lz) - g);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
crf_backward_kernel(int64_t T_, int64_t C, const T* __restrict__ em, const int64_t* __restrict__ lengths,
                    const int64_t* __restrict__ tags, const T* __restrict__ trans, const T* __restrict__ start,
                    const T* __restrict__ end, const T* __restrict__ alpha, const T* __restrict__ log_z,
                    const T* __restrict__ gscale, T* __restrict__ grad_em, T* __restrict__ gstart,
                    T* __restrict__ gend, T* __restrict__ gtrans) {
  extern __shared__ unsigned char smem_raw[];
  T* beta = reinterpret_cast<T*>(smem_raw);
  T* nb = beta + C;
  __shared__ T s_g;
  const int64_t b = blockIdx.x;
  const int64_t L = seq_len(lengths, b, T_);
  const T lz = log_z[b];
  if (L == 0 || !(lz > ninf<T>())) return;
  if (threadIdx.x == 0) {
    T g = tags ? gscale[b] : T(1);
    if (tags && gold_score<T>(em, tags, trans, start, end, b, L, T_, C) == -double(INFINITY)) g = T(0);
    s_g = g;
  }
  __syncthreads();
  const T g = s_g;
  if (tags && g == T(0)) return;
  const T* e = em + b * T_ * C;
  const T* al = alpha + b * T_ * C;
  T* ge = grad_em + b * T_ * C;
  const int64_t* y = tags ? tags + b * T_ : nullptr;
  T* gtr = gtrans ? gtrans + b * C * C : nullptr;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) beta[j] = end[j];
  __syncthreads();
  for (int64_t t = L - 1; t >= 0; --t) {
    const int64_t yt = y ? safe_tag(y, t, C) : -1;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const T marg = dexp(al[t * C + j] + beta[j] - lz);
      if (!y) {
        ge[t * C + j] = marg;
        continue;
      }
      const T v = g * marg - (j == yt ? g : T(0));
      ge[t * C + j] = v;
      if (t == 0 && gstart) gstart[b * C + j] = v;
      if (t == L - 1 && gend) gend[b * C + j] = v;
    }
    if (t == 0) break;
    if (gtr) {
      for (int64_t k = threadIdx.x; k < C * C; k += blockDim.x) {
        const int64_t i = k / C, j = k - i * C;
        const T x = al[(t - 1) * C + i] + trans[k] + e[t * C + j] + beta[j] - lz;
        gtr[k] += g * dexp(x);
      }
    }
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
      T m = ninf<T>();
      for (int64_t j = 0; j < C; ++j) m = fmax(m, trans[i * C + j] + e[t * C + j] + beta[j]);
      T v = ninf<T>();
      if (m > ninf<T>()) {
        T s = T(0);
        for (int64_t j = 0; j < C; ++j) s += dexp(trans[i * C + j] + e[t * C + j] + beta[j] - m);
        v = m + dlog(s);
      }
      nb[i] = v;
    }
    next_step(beta, nb);
  }
  if (gtr) {
    __syncthreads();
    if (threadIdx.x == 0)
      for (int64_t t = 1; t < L; ++t) gtr[safe_tag(y, t - 1, C) * C + safe_tag(y, t, C)] -= g;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
crf_viterbi_kernel(int64_t T_, int64_t C, const T* __restrict__ em, const int64_t* __restrict__ lengths,
                   const T* __restrict__ trans, const T* __restrict__ start, const T* __restrict__ end,
                   int32_t* __restrict__ hist, int64_t* __restrict__ path) {
  extern __shared__ unsigned char smem_raw[];
  T* sc = reinterpret_cast<T*>(smem_raw);
  T* ns = sc + C;
  const int64_t b = blockIdx.x;
  const int64_t L = seq_len(lengths, b, T_);
  int64_t* out = path + b * T_;
  for (int64_t t = L + threadIdx.x; t < T_; t += blockDim.x) out[t] = -1;
  if (L == 0) return;
  const T* e = em + b * T_ * C;
  int32_t* h = hist + b * T_ * C;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) sc[j] = start[j] + e[j];
  __syncthreads();
  for (int64_t t = 1; t < L; ++t) {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const T ej = e[t * C + j];
      // (score[from] + A[from, to]) + e[to], the first maximal `from` (pytorch-crf's order and tie rule)
      T best = (sc[0] + trans[j]) + ej;
      int32_t idx = 0;
      for (int64_t i = 1; i < C; ++i) {
        const T v = (sc[i] + trans[i * C + j]) + ej;
        if (v > best) {
          best = v;
          idx = int32_t(i);
        }
      }
      ns[j] = best;
      h[t * C + j] = idx;
    }
    next_step(sc, ns);
  }
  if (threadIdx.x == 0) {
    int64_t best = 0;
    T bv = sc[0] + end[0];
    for (int64_t j = 1; j < C; ++j) {
      const T v = sc[j] + end[j];
      if (v > bv) {
        bv = v;
        best = j;
      }
    }
    out[L - 1] = best;
    for (int64_t t = L - 1; t >= 1; --t) {
      best = h[t * C + best];
      out[t - 1] = best;
    }
  }
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* crf_forward(DType dtype, int64_t B, int64_t T, int64_t C, const void* em, const int64_t* lengths,
                        const int64_t* tags, const void* trans, const void* start, const void* end, void* alpha,
                        void* log_z, void* nll, cudaStream_t stream) {
  if (B == 0) return nullptr;
  if (dtype == DType::kFloat64) {
    crf_forward_kernel<double><<<unsigned(B), kThreads, 2 * C * sizeof(double), stream>>>(
        T, C, static_cast<const double*>(em), lengths, tags, static_cast<const double*>(trans),
        static_cast<const double*>(start), static_cast<const double*>(end), static_cast<double*>(alpha),
        static_cast<double*>(log_z), static_cast<double*>(nll));
  } else {
    crf_forward_kernel<float><<<unsigned(B), kThreads, 2 * C * sizeof(float), stream>>>(
        T, C, static_cast<const float*>(em), lengths, tags, static_cast<const float*>(trans),
        static_cast<const float*>(start), static_cast<const float*>(end), static_cast<float*>(alpha),
        static_cast<float*>(log_z), static_cast<float*>(nll));
  }
  return last_error();
}

const char* crf_backward(DType dtype, int64_t B, int64_t T, int64_t C, const void* em, const int64_t* lengths,
                         const int64_t* tags, const void* trans, const void* start, const void* end,
                         const void* alpha, const void* log_z, const void* g, void* grad_em, void* gstart,
                         void* gend, void* gtrans, cudaStream_t stream) {
  if (B == 0) return nullptr;
  if (dtype == DType::kFloat64) {
    crf_backward_kernel<double><<<unsigned(B), kThreads, 2 * C * sizeof(double), stream>>>(
        T, C, static_cast<const double*>(em), lengths, tags, static_cast<const double*>(trans),
        static_cast<const double*>(start), static_cast<const double*>(end), static_cast<const double*>(alpha),
        static_cast<const double*>(log_z), static_cast<const double*>(g), static_cast<double*>(grad_em),
        static_cast<double*>(gstart), static_cast<double*>(gend), static_cast<double*>(gtrans));
  } else {
    crf_backward_kernel<float><<<unsigned(B), kThreads, 2 * C * sizeof(float), stream>>>(
        T, C, static_cast<const float*>(em), lengths, tags, static_cast<const float*>(trans),
        static_cast<const float*>(start), static_cast<const float*>(end), static_cast<const float*>(alpha),
        static_cast<const float*>(log_z), static_cast<const float*>(g), static_cast<float*>(grad_em),
        static_cast<float*>(gstart), static_cast<float*>(gend), static_cast<float*>(gtrans));
  }
  return last_error();
}

const char* crf_viterbi(DType dtype, int64_t B, int64_t T, int64_t C, const void* em, const int64_t* lengths,
                        const void* trans, const void* start, const void* end, int32_t* hist, int64_t* path,
                        cudaStream_t stream) {
  if (B == 0) return nullptr;
  if (dtype == DType::kFloat64) {
    crf_viterbi_kernel<double><<<unsigned(B), kThreads, 2 * C * sizeof(double), stream>>>(
        T, C, static_cast<const double*>(em), lengths, static_cast<const double*>(trans),
        static_cast<const double*>(start), static_cast<const double*>(end), hist, path);
  } else {
    crf_viterbi_kernel<float><<<unsigned(B), kThreads, 2 * C * sizeof(float), stream>>>(
        T, C, static_cast<const float*>(em), lengths, static_cast<const float*>(trans),
        static_cast<const float*>(start), static_cast<const float*>(end), hist, path);
  }
  return last_error();
}

}  // namespace cuda
}  // namespace fastmtl
