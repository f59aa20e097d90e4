// CUDA kernels of the fused multi-task heads + losses (see csrc/include/fastmtl/cuda_heads.h for the plan of a call
// and csrc/fastmtl.cpp for the op contract). CUDA headers and csrc/include only; raw pointers, sizes, a stream.
//
// Tiles: 64 rows x 64 classes, the feature dimension D in chunks of 64, 256 threads (8 warps) per block.
//   bf16 / fp16: tensor cores through wmma (m16n16k16, fp32 accumulation); each warp owns a 16 x 32 slice of the
//                64 x 64 output tile (two 16 x 16 accumulator fragments).
//   float32:     fp32 FMA (each thread a 4 x 4 sub-tile), so float32 results match PyTorch's float32 matmuls.
// Math per row i of task k (C classes, class weights w (1 without), smoothing e, lambda_k, normaliser N_k; the
// formulas of fastmtl/heads_math.h, xent_item_loss and xent_softmax_coeff, which the CPU op uses too):
//   lse_i = log sum_c exp(z_ic)             (online over class tiles)
//   loss_i = (1-e) w_y (lse - z_y) + e/C (sum_c w_c lse - sum_c w_c z_c)          (F.cross_entropy)
//   dz_ic = lambda_k/N_k * [ p_ic ((1-e) w_y + e/C sum w) - (1-e) w_y [c==y] - e/C w_c ]
//
// Phases (all K tasks in each). On a device with cooperative launches they run as ONE launch (heads_fused_kernel:
// a co-resident grid loops over each phase's work items, with a grid barrier between phases that traps after
// FASTMTL_GRID_BARRIER_TIMEOUT_S); otherwise, or with FASTMTL_HEADS_FUSED=0, one launch each:
//   prep      pooled rows of the sequence tasks (+ argmax of max pooling), normalisers N_k, sum of class weights,
//             validation of lengths / targets into an error word.
//   row       one block per (task, 64-row tile). Pass 1 over the class tiles: logits tile = X W^T (+ b) on chip,
//             online log-sum-exp, target logit, sum_c w_c z_c -> per-row loss. With gradients, pass 2 over the class
//             tiles: the logits tile again (or pass 1's tile when C <= 64), the gradient tile dz on chip (fp32 and
//             operand type in shared memory), grad_X(rows) += dz . W accumulated in fp32 rows owned by the block,
//             and for small vocabularies (<= 512 classes, bounded partials) the row tile's grad_W partial dz^T . X
//             and grad_b partial. No logits tensor ever reaches global memory.
//   weight    only for large vocabularies: one block per (task, 64-class tile, row split); it recomputes the logits
//             tiles of its rows (same code and order as the row kernel: bitwise the same logits), forms dz from the
//             saved per-row (lse, coefficients) and accumulates grad_W += dz^T . X, grad_b += sum_rows dz on chip.
//   finalize  fixed-order sums: grad_hidden = sum over tasks in task order (pooling backward for sequence tasks),
//             grad_W / grad_b = sum over row tiles / splits in order, per-task losses and the total.
// Deterministic: every reduction has a fixed order and no float atomics are used, so two runs are bitwise equal.
// tests/cuda_emulation/heads_emu.cpp compiles this file for the host (FMA tile path) to test it without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

// Dynamic shared memory of the row and weight kernels (the host emulation used by the tests redefines it).
#ifndef FASTMTL_DYN_SMEM
#define FASTMTL_DYN_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <cfloat>
#include <cstdint>
#include <type_traits>
#include <algorithm>
#include <mutex>

#include "fastmtl/cuda_heads.h"
#include "fastmtl/heads_math.h"
#include "cp_async.cuh"
#include "num.cuh"
#if defined(__CUDACC__)
#include "grid_sync.cuh"
#endif

namespace fastmtl {
namespace cuda {
namespace {

using detail::Num;

constexpr int kTile = 64;      // rows per tile, classes per tile, features per chunk
constexpr int kThreads = 256;  // 8 warps
constexpr int kLdl = 68;       // leading dimension (floats) of the fp32 logits tile in shared memory
constexpr int kFuseMaxClassTiles = 8;  // tasks with at most 512 classes may get grad_W in the row kernel

template <typename T>
struct Ld {
  // leading dimension of the T tiles in shared memory: odd for float (conflict-free FMA reads), a multiple of 8
  // for 16-bit types (wmma needs 16-byte multiples and 32-byte aligned fragment pointers)
  static constexpr int value = sizeof(T) == 4 ? 65 : 72;
};

__host__ __device__ constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// ---------------------------------------------------------------------------------------------------------------
// 64 x 64 output tile, C += A B, A (64 x K), B (K x 64), K a multiple of 16, operands in shared memory.
// A_ROW: A(m, k) = a[m * lda + k] (else a[m + k * lda]); B_ROW: B(k, n) = b[k * ldb + n] (else b[k + n * ldb]).
// Accumulators load from / store to fp32 row-major memory (shared or global).

template <typename T>
struct SimtMma {
  struct Acc {
    float v[4][4];  // rows ty + 16 i, cols tx + 16 j
  };
  static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc.v[i][j] = 0.f;
  }
  template <bool A_ROW, bool B_ROW>
  static __device__ __forceinline__ void mma(Acc& acc, const T* a, int lda, const T* b, int ldb, int K) {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = ty + 16 * i;
        av[i] = Num<T>::load(A_ROW ? a[m * lda + k] : a[m + k * lda]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = tx + 16 * j;
        bv[j] = Num<T>::load(B_ROW ? b[k * ldb + n] : b[k + n * ldb]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc.v[i][j] = fmaf(av[i], bv[j], acc.v[i][j]);
    }
  }
  static __device__ __forceinline__ void store(const Acc& acc, float* c, int64_t ldc) {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[(ty + 16 * i) * ldc + tx + 16 * j] = acc.v[i][j];
  }
  static __device__ __forceinline__ void load(Acc& acc, const float* c, int64_t ldc) {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc.v[i][j] = c[(ty + 16 * i) * ldc + tx + 16 * j];
  }
};

#if defined(__CUDACC__)  // (the host-compiled emulation in tests/emulate has no wmma)
namespace wmma = nvcuda::wmma;

template <bool ROW>
using WmmaLayout = typename std::conditional<ROW, wmma::row_major, wmma::col_major>::type;

template <typename T>
struct TcMma {
  using Frag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  struct Acc {
    Frag f[2];  // warp w: rows 16 (w / 2), cols 32 (w % 2) + 16 j
  };
  static __device__ __forceinline__ void zero(Acc& acc) {
    wmma::fill_fragment(acc.f[0], 0.f);
    wmma::fill_fragment(acc.f[1], 0.f);
  }
  template <bool A_ROW, bool B_ROW>
  static __device__ __forceinline__ void mma(Acc& acc, const T* a, int lda, const T* b, int ldb, int K) {
    const int warp = threadIdx.x >> 5, m0 = 16 * (warp >> 1), n0 = 32 * (warp & 1);
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, WmmaLayout<A_ROW>> fa;
      wmma::load_matrix_sync(fa, A_ROW ? a + m0 * lda + k : a + m0 + k * lda, lda);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = n0 + 16 * j;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, WmmaLayout<B_ROW>> fb;
        wmma::load_matrix_sync(fb, B_ROW ? b + k * ldb + n : b + k + n * ldb, ldb);
        wmma::mma_sync(acc.f[j], fa, fb, acc.f[j]);
      }
    }
  }
  static __device__ __forceinline__ void store(const Acc& acc, float* c, int64_t ldc) {
    const int warp = threadIdx.x >> 5, m0 = 16 * (warp >> 1), n0 = 32 * (warp & 1);
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(c + m0 * ldc + n0 + 16 * j, acc.f[j], (unsigned)ldc, wmma::mem_row_major);
  }
  static __device__ __forceinline__ void load(Acc& acc, const float* c, int64_t ldc) {
    const int warp = threadIdx.x >> 5, m0 = 16 * (warp >> 1), n0 = 32 * (warp & 1);
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::load_matrix_sync(acc.f[j], c + m0 * ldc + n0 + 16 * j, (unsigned)ldc, wmma::mem_row_major);
  }
};

#endif  // __CUDACC__

// Tensor cores where the architecture has them for the type (fp16: sm_70+, bf16: sm_80+); the host pass and older
// architectures see the FMA version (the host pass never runs it).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
#define FASTMTL_TC_F16 true
#else
#define FASTMTL_TC_F16 false
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FASTMTL_TC_BF16 true
#else
#define FASTMTL_TC_BF16 false
#endif
template <typename T>
struct UseTc : std::false_type {};
template <>
struct UseTc<__half> : std::integral_constant<bool, FASTMTL_TC_F16> {};
template <>
struct UseTc<__nv_bfloat16> : std::integral_constant<bool, FASTMTL_TC_BF16> {};
#if defined(__CUDACC__)
template <typename T>
using Mma = typename std::conditional<UseTc<T>::value, TcMma<T>, SimtMma<T>>::type;
#else
template <typename T>
using Mma = SimtMma<T>;
#endif

// ---------------------------------------------------------------------------------------------------------------
// Shared memory of the row and weight kernels.

struct RowState {
  const void* ptr;  // the row of X (hidden row or pooled row), nullptr when the row takes no part
  int64_t y;        // target class, -1 when the row is ignored / padding / outside the task
  int valid;        // counts in the loss
  int arg;          // predict: running argmax
  float argv;
  float m, s, zy, wz;  // running max, sum of exp, target logit, sum_c w_c z_c
  float lse, a, b, sm; // gradient coefficients (see the header comment)
};

template <typename T>
struct SmemLayout {
  static constexpr int ldt = Ld<T>::value;
  static constexpr size_t tile = align_up(sizeof(T) * kTile * ldt, 128);
  static constexpr size_t xs = 0, ws = tile, ds = 2 * tile, ls = 3 * tile;
  static constexpr size_t rows = ls + align_up(sizeof(float) * kTile * kLdl, 128);
  // 16-bit types: second X / W buffers for the cp.async double-buffered logits loop
  static constexpr bool pipelined = sizeof(T) == 2;
  static constexpr size_t xs1 = rows + align_up(sizeof(RowState) * kTile, 128);
  static constexpr size_t ws1 = xs1 + (pipelined ? tile : 0);
  static constexpr size_t bytes = ws1 + (pipelined ? tile : 0);
};

template <typename T>
struct Smem {
  T* xs;  // X chunk   [64 rows][64 features]
  T* ws;  // W chunk   [64 classes][64 features]
  T* ds;  // dlogits   [64 rows][64 classes] (operand type)
  T* xs1;  // second buffers of the pipelined logits loop (16-bit types)
  T* ws1;
  float* ls;  // logits / dlogits [64 rows][64 classes] fp32, ld kLdl
  RowState* rs;
  HeadsTask* task;
  __device__ static Smem bind(unsigned char* base, HeadsTask* task) {
    using L = SmemLayout<T>;
    Smem s;
    s.xs = reinterpret_cast<T*>(base + L::xs);
    s.ws = reinterpret_cast<T*>(base + L::ws);
    s.ds = reinterpret_cast<T*>(base + L::ds);
    s.xs1 = reinterpret_cast<T*>(base + L::xs1);
    s.ws1 = reinterpret_cast<T*>(base + L::ws1);
    s.ls = reinterpret_cast<float*>(base + L::ls);
    s.rs = reinterpret_cast<RowState*>(base + L::rows);
    s.task = task;
    return s;
  }
};

// Copies 16 bytes (kVec elements) from global src to shared dst (dst 16-byte aligned for 16-bit types).
template <typename T>
__device__ __forceinline__ void copy16(T* dst, const T* src) {
  const uint4 v = *reinterpret_cast<const uint4*>(src);
  if constexpr (sizeof(T) == 2) {
    *reinterpret_cast<uint4*>(dst) = v;
  } else {
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int u = 0; u < (int)(16 / sizeof(T)); ++u) dst[u] = e[u];
  }
}
template <typename T>
__device__ __forceinline__ void zero_n(T* dst) {
#pragma unroll
  for (int u = 0; u < (int)(16 / sizeof(T)); ++u) dst[u] = Num<T>::store(0.f);
}

// dst[i][kk] = src[(row0 + i) * D + d0 + kk] for row0 + i < nrows and d0 + kk < D, else 0.
// vec: D is a multiple of 16 bytes and src is 16-byte aligned, so 16-byte loads never straddle the end of a row.
template <typename T>
__device__ __forceinline__ void load_matrix_chunk(T* dst, const T* src, int64_t row0, int64_t nrows, int64_t D,
                                                  int64_t d0, bool vec) {
  constexpr int ldt = Ld<T>::value;
  if (vec) {
    constexpr int V = 16 / sizeof(T), per_row = kTile / V;
    for (int e = threadIdx.x; e < kTile * per_row; e += kThreads) {
      const int i = e / per_row, kk = (e - i * per_row) * V;
      const int64_t r = row0 + i, d = d0 + kk;
      if (r < nrows && d < D)
        copy16<T>(dst + i * ldt + kk, src + r * D + d);
      else
        zero_n<T>(dst + i * ldt + kk);
    }
    return;
  }
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int i = e >> 6, kk = e & 63;
    const int64_t r = row0 + i, d = d0 + kk;
    dst[i * ldt + kk] = (r < nrows && d < D) ? src[r * D + d] : Num<T>::store(0.f);
  }
}

// dst[i][kk] = X row i (through the row state) at feature d0 + kk, 0 for rows without X.
template <typename T>
__device__ __forceinline__ void load_x_chunk(T* dst, const RowState* rs, int64_t D, int64_t d0, bool vec) {
  constexpr int ldt = Ld<T>::value;
  if (vec) {
    constexpr int V = 16 / sizeof(T), per_row = kTile / V;
    for (int e = threadIdx.x; e < kTile * per_row; e += kThreads) {
      const int i = e / per_row, kk = (e - i * per_row) * V;
      const int64_t d = d0 + kk;
      const T* p = static_cast<const T*>(rs[i].ptr);
      if (p != nullptr && d < D)
        copy16<T>(dst + i * ldt + kk, p + d);
      else
        zero_n<T>(dst + i * ldt + kk);
    }
    return;
  }
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int i = e >> 6, kk = e & 63;
    const int64_t d = d0 + kk;
    const T* p = static_cast<const T*>(rs[i].ptr);
    dst[i * ldt + kk] = (p != nullptr && d < D) ? p[d] : Num<T>::store(0.f);
  }
}

// 16 bytes global -> shared: cp.async on sm_80+ (cp_async.cuh); elsewhere (older architectures, the host emulation)
// a plain copy, so the pipelined loop below has the same logic everywhere.
template <typename T>
__device__ __forceinline__ void async_copy16(T* dst, const T* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  cp_async16(dst, src);
#else
  copy16<T>(dst, src);
#endif
}

// Issues the copies of X chunk d0 (rows through the row states) and W chunk (classes c0.., features d0..) into
// xs / ws (16-bit types, 16-byte aligned rows); out-of-range parts are zero-filled with plain stores.
template <typename T>
__device__ __forceinline__ void stage_chunks_async(T* xs, T* ws, const RowState* rs, const T* W, int64_t C,
                                                   int64_t D, int64_t c0, int64_t d0) {
  constexpr int ldt = Ld<T>::value, V = 16 / sizeof(T), per_row = kTile / V;
  for (int e = threadIdx.x; e < 2 * kTile * per_row; e += kThreads) {
    const bool is_w = e >= kTile * per_row;
    const int f = is_w ? e - kTile * per_row : e;
    const int i = f / per_row, kk = (f - i * per_row) * V;
    const int64_t d = d0 + kk;
    T* dst = (is_w ? ws : xs) + i * ldt + kk;
    const T* src = nullptr;
    if (d < D) {
      if (is_w)
        src = c0 + i < C ? W + (c0 + i) * D + d : nullptr;
      else
        src = rs[i].ptr != nullptr ? static_cast<const T*>(rs[i].ptr) + d : nullptr;
    }
    if (src != nullptr)
      async_copy16<T>(dst, src);
    else
      zero_n<T>(dst);
  }
  cp_async_commit();
}

// Logits tile (without bias) of the block's 64 rows and classes [c0, c0 + 64) into sm.ls. Same code and order in
// the row and weight kernels, so both see bitwise the same logits. 16-bit types with aligned rows: double-buffered
// (the copies of chunk i+1 run while chunk i is on the tensor cores).
template <typename T>
__device__ void logits_tile(const Smem<T>& sm, const T* W, int64_t C, int64_t D, int64_t c0, bool vec) {
  using M = Mma<T>;
  constexpr int ldt = Ld<T>::value;
  typename M::Acc acc;
  M::zero(acc);
  if (SmemLayout<T>::pipelined && vec) {
    const int64_t n = (D + kTile - 1) / kTile;
    if (n > 0) stage_chunks_async<T>(sm.xs, sm.ws, sm.rs, W, C, D, c0, 0);
    for (int64_t i = 0; i < n; ++i) {
      const bool odd = (i & 1) != 0;
      if (i + 1 < n) {
        stage_chunks_async<T>(odd ? sm.xs : sm.xs1, odd ? sm.ws : sm.ws1, sm.rs, W, C, D, c0, (i + 1) * kTile);
        cp_async_wait<1>();  // chunk i has landed (chunk i + 1 may still be in flight)
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      M::template mma<true, false>(acc, odd ? sm.xs1 : sm.xs, ldt, odd ? sm.ws1 : sm.ws, ldt, kTile);
      __syncthreads();  // everyone is done with this buffer before it is refilled (chunk i + 2)
    }
  } else {
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      load_x_chunk<T>(sm.xs, sm.rs, D, d0, vec);
      load_matrix_chunk<T>(sm.ws, W, c0, C, D, d0, vec);
      __syncthreads();
      M::template mma<true, false>(acc, sm.xs, ldt, sm.ws, ldt, kTile);
      __syncthreads();
    }
  }
  M::store(acc, sm.ls, kLdl);
  __syncthreads();
}

__device__ __forceinline__ float class_w(const float* cw, int64_t c) { return cw != nullptr ? cw[c] : 1.f; }

// Forms the gradient tile from the logits tile in sm.ls: fp32 into sm.ls, operand type into sm.ds.
template <typename T>
__device__ void form_dlogits(const Smem<T>& sm, const T* bias, const float* cw, int64_t C, int64_t c0) {
  constexpr int ldt = Ld<T>::value;
  const int i = threadIdx.x >> 2, q = threadIdx.x & 3;
  const RowState& r = sm.rs[i];
#pragma unroll 4
  for (int jj = 0; jj < 16; ++jj) {
    const int j = q + 4 * jj;
    const int64_t c = c0 + j;
    float g = 0.f;
    if (r.valid && c < C) {
      const float z = sm.ls[i * kLdl + j] + (bias != nullptr ? Num<T>::load(bias[c]) : 0.f);
      g = r.a * expf(z - r.lse) - (c == r.y ? r.b : 0.f) - r.sm * class_w(cw, c);
    }
    sm.ls[i * kLdl + j] = g;
    sm.ds[i * ldt + j] = Num<T>::store(g);
  }
  __syncthreads();
}

__device__ __forceinline__ const HeadsTask* find_task(const HeadsTask* tasks, int K, int64_t blk, bool by_rows) {
  for (int k = 0; k < K; ++k) {
    const int64_t end = by_rows ? tasks[k].tile_end : tasks[k].wblock_end;
    if (blk < end) return tasks + k;
  }
  return tasks + (K - 1);
}

// The block's task, copied by thread 0 into task_raw for every thread of the block: a __shared__ array of the
// calling kernel (raw storage, as a __shared__ variable must not have a non-trivial constructor).
__device__ __forceinline__ HeadsTask& block_task(unsigned char* task_raw, const HeadsParams& p, int64_t blk,
                                                 bool by_rows) {
  HeadsTask& task = *reinterpret_cast<HeadsTask*>(task_raw);
  if (threadIdx.x == 0) task = *find_task(p.tasks, p.K, blk, by_rows);
  __syncthreads();
  return task;
}

__device__ __forceinline__ int64_t seq_length(const HeadsParams& p, int64_t b) {
  if (p.lengths == nullptr) return p.T;
  int64_t len = p.lengths[b];
  return len < 1 ? 1 : (len > p.T ? p.T : len);  // invalid lengths are reported by the prep kernel
}

// Row states of the 64 rows starting at r0 (threads 0..63). Loss mode: only real positions have X; rows with a
// target in range that is not ignore_index are valid. Same in predict mode (padding positions predict -1).
template <typename T>
__device__ void setup_rows(const HeadsParams& p, const HeadsTask& tk, RowState* rs, int64_t r0, bool from_stats) {
  const int i = threadIdx.x;
  if (i >= kTile) return;
  const int64_t r = r0 + i;
  RowState st;
  st.ptr = nullptr;
  st.y = -1;
  st.valid = 0;
  st.arg = 0;
  st.argv = -INFINITY;
  st.m = -INFINITY;
  st.s = 0.f;
  st.zy = 0.f;
  st.wz = 0.f;
  st.lse = 0.f;
  st.a = st.b = st.sm = 0.f;
  if (r < tk.rows) {
    const T* src;
    bool pos_ok = true;
    if (tk.level == heads::kToken) {
      const int64_t b = r / p.T, t = r - b * p.T;
      pos_ok = t < seq_length(p, b);
      src = static_cast<const T*>(p.hidden) + r * p.D;
    } else {
      src = static_cast<const T*>(p.pooled) + (tk.pooled_index * p.B + r) * p.D;
    }
    if (pos_ok) st.ptr = src;  // padding positions take no part (predict gives them -1)
    if (!p.predict && pos_ok) {
      if (from_stats) {
        const int64_t g = tk.row_offset + r;
        st.y = p.row_y[g];
        st.valid = st.y >= 0;
        st.lse = p.row_stats[4 * g + 0];
        st.a = p.row_stats[4 * g + 1];
        st.b = p.row_stats[4 * g + 2];
        st.sm = p.row_stats[4 * g + 3];
      } else {
        const int64_t y = tk.target[r];
        if (y != tk.ignore_index && y >= 0 && y < tk.num_classes) {
          st.y = y;
          st.valid = 1;
        }
      }
    }
  }
  rs[i] = st;
}

// ---------------------------------------------------------------------------------------------------------------
// Prep kernel: blocks [0, S*B) pool the sequence-level tasks' rows; blocks [S*B, S*B + K) compute the per-task
// normaliser and class-weight sum and validate targets (block of task 0 also validates lengths).

__device__ void report_error(const HeadsParams& p, int64_t code, const HeadsTask* tk, int64_t index, int64_t value) {
  int64_t* err = p.err;
  unsigned long long* e = reinterpret_cast<unsigned long long*>(err);
  if (atomicCAS(e, 0ull, (unsigned long long)code) == 0ull) {
    err[kHeadsErrTask] = tk != nullptr ? tk->index : -1;
    err[kHeadsErrIndex] = index;
    err[kHeadsErrValue] = value;
    err[kHeadsErrClasses] = tk != nullptr ? tk->num_classes : 0;
    err[kHeadsErrIgnore] = tk != nullptr ? tk->ignore_index : 0;
    err[kHeadsErrT] = p.T;
    err[kHeadsErrLevel] = tk != nullptr ? tk->level : 0;
  }
}

__device__ float block_sum(float v, float* red) {
  // fixed-order tree reduction: deterministic
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float out = red[0];
  __syncthreads();
  return out;
}

template <typename T>
__device__ void heads_prep_block(const HeadsParams& p, int64_t blk) {
  __shared__ float red[kThreads];
  const int64_t S = p.num_seq_tasks;
  if (blk < S * p.B) {
    const int64_t s = blk / p.B, b = blk - s * p.B;
    const HeadsTask* tk = nullptr;
    for (int k = 0; k < p.K; ++k)
      if (p.tasks[k].level == heads::kSequence && p.tasks[k].pooled_index == s) tk = p.tasks + k;
    if (tk == nullptr) return;
    const int64_t len = seq_length(p, b), T_ = p.T, D = p.D;
    const T* h = static_cast<const T*>(p.hidden) + b * T_ * D;
    T* out = static_cast<T*>(p.pooled) + (s * p.B + b) * D;
    int32_t* am = p.argmax + (s * p.B + b) * D;
    const int pooling = tk->pooling;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      float v;
      switch (pooling) {
        case heads::kLast: v = Num<T>::load(h[(len - 1) * D + d]); break;
        case heads::kFirst: v = Num<T>::load(h[d]); break;
        case heads::kMean: {
          float acc = 0.f;
          for (int64_t t = 0; t < len; ++t) acc += Num<T>::load(h[t * D + d]);
          v = acc / (float)len;
          break;
        }
        case heads::kMax: {
          float best = Num<T>::load(h[d]);
          int32_t arg = 0;
          for (int64_t t = 1; t < len; ++t) {
            const float x = Num<T>::load(h[t * D + d]);
            if (x > best) {
              best = x;
              arg = (int32_t)t;
            }
          }
          am[d] = arg;
          v = best;
          break;
        }
        default:  // heads::kLastFirst
          v = d < D / 2 ? Num<T>::load(h[(len - 1) * D + d]) : Num<T>::load(h[d]);
      }
      out[d] = Num<T>::store(v);
    }
    return;
  }
  const int64_t k = blk - S * p.B;
  if (k >= p.K) return;
  const HeadsTask& tk = p.tasks[k];
  if (k == 0 && p.lengths != nullptr) {
    for (int64_t b = threadIdx.x; b < p.B; b += kThreads) {
      const int64_t len = p.lengths[b];
      if (len < 1 || len > p.T) report_error(p, 1, nullptr, b, len);
    }
  }
  if (p.predict || tk.target == nullptr) return;
  float n = 0.f, ws = 0.f;
  for (int64_t r = threadIdx.x; r < tk.rows; r += kThreads) {
    bool pos_ok = true;
    if (tk.level == heads::kToken) {
      const int64_t b = r / p.T, t = r - b * p.T;
      pos_ok = t < seq_length(p, b);
    }
    if (!pos_ok) continue;
    const int64_t y = tk.target[r];
    if (y == tk.ignore_index) continue;
    if (y < 0 || y >= tk.num_classes) {
      report_error(p, 2, &tk, r, y);
      continue;
    }
    n += class_w(tk.class_weight, y);
  }
  if (tk.class_weight != nullptr)
    for (int64_t c = threadIdx.x; c < tk.num_classes; c += kThreads) ws += tk.class_weight[c];
  n = block_sum(n, red);
  ws = block_sum(ws, red);
  if (threadIdx.x == 0) {
    p.norm[k] = n;
    p.wsum[k] = tk.class_weight != nullptr ? ws : (float)tk.num_classes;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row kernel: one block per (task, 64-row tile), all tasks in one launch.

template <typename T>
__device__ void heads_row_block(const HeadsParams& p, int64_t blk) {
  FASTMTL_DYN_SMEM(smem_raw);
  __shared__ __align__(16) unsigned char task_raw[sizeof(HeadsTask)];  // see block_task
  HeadsTask& task = block_task(task_raw, p, blk, /*by_rows=*/true);
  const HeadsTask& tk = task;
  const Smem<T> sm = Smem<T>::bind(smem_raw, &task);
  const int64_t r0 = (blk - tk.tile_begin) * kTile;
  const int64_t C = tk.num_classes, D = p.D;
  const T* W = static_cast<const T*>(tk.weight);
  const T* bias = static_cast<const T*>(tk.bias);
  const float* cw = tk.class_weight;
  setup_rows<T>(p, tk, sm.rs, r0, false);
  __syncthreads();

  const int i = threadIdx.x >> 2, q = threadIdx.x & 3;  // 4 threads per row in the epilogues
  // Pass 1: online log-sum-exp (loss) or argmax (predict).
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    logits_tile<T>(sm, W, C, D, c0, p.vec_loads);
    RowState& r = sm.rs[i];
    float tmax = -INFINITY;
    int targ = 0;
#pragma unroll 4
    for (int jj = 0; jj < 16; ++jj) {
      const int j = q + 4 * jj;
      const int64_t c = c0 + j;
      if (c < C) {
        const float z = sm.ls[i * kLdl + j] + (bias != nullptr ? Num<T>::load(bias[c]) : 0.f);
        sm.ls[i * kLdl + j] = z;
        if (z > tmax) {  // strict: the first index wins ties within a thread
          tmax = z;
          targ = (int)c;
        }
      }
    }
    // combine the 4 threads of the row (consecutive lanes)
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, tmax, o);
      const int oa = __shfl_xor_sync(0xffffffffu, targ, o);
      if (om > tmax || (om == tmax && oa < targ)) {
        tmax = om;
        targ = oa;
      }
    }
    if (p.predict) {
      if (q == 0 && tmax > r.argv) {  // earlier tiles win ties
        r.argv = tmax;
        r.arg = targ;
      }
    } else {
      float se = 0.f, zy = 0.f, wz = 0.f;
#pragma unroll 4
      for (int jj = 0; jj < 16; ++jj) {
        const int j = q + 4 * jj;
        const int64_t c = c0 + j;
        if (c < C) {
          const float z = sm.ls[i * kLdl + j];
          se += expf(z - tmax);
          wz += class_w(cw, c) * z;
          if (c == r.y) zy = z;
        }
      }
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) {
        se += __shfl_xor_sync(0xffffffffu, se, o);
        zy += __shfl_xor_sync(0xffffffffu, zy, o);
        wz += __shfl_xor_sync(0xffffffffu, wz, o);
      }
      if (q == 0 && r.valid) {
        const float nm = fmaxf(r.m, tmax);
        r.s = r.s * expf(r.m - nm) + se * expf(tmax - nm);
        r.m = nm;
        r.zy += zy;
        r.wz += wz;
      }
    }
    __syncthreads();
  }


  // Per-row loss and gradient coefficients.
  const int kidx = tk.index;
  if (threadIdx.x < kTile) {
    const int64_t r = r0 + threadIdx.x;
    RowState& st = sm.rs[threadIdx.x];
    if (r < tk.rows) {
      if (p.predict) {
        tk.prediction[r] = st.ptr != nullptr ? (int64_t)st.arg : (int64_t)-1;
      } else {
        const int64_t g = tk.row_offset + r;
        float loss = 0.f;
        if (st.valid) {
          const float eps = tk.label_smoothing, wsum = p.wsum[kidx];
          const float wy = class_w(cw, st.y);
          st.lse = st.m + logf(st.s);
          loss = heads::xent_item_loss<float>(st.lse, st.zy, st.wz, wy, wsum, eps, (float)C);
          if (p.compute_grad) {
            const float norm = p.norm[kidx];
            const float scale = norm != 0.f ? p.task_weights[kidx] / norm : 0.f;  // NaN propagates, as in torch
            st.a = scale * heads::xent_softmax_coeff<float>(wy, wsum, eps, (float)C);
            st.b = scale * (1.f - eps) * wy;
            st.sm = scale * eps / (float)C;
          }
        }
        p.row_loss[g] = loss;
        if (p.compute_grad) {
          p.row_y[g] = st.valid ? (int32_t)st.y : -1;
          p.row_stats[4 * g + 0] = st.lse;
          p.row_stats[4 * g + 1] = st.a;
          p.row_stats[4 * g + 2] = st.b;
          p.row_stats[4 * g + 3] = st.sm;
        }
      }
    }
  }
  __syncthreads();
  if (p.predict || !p.compute_grad) return;

  // Pass 2: gradient tiles, grad_X(rows) += dlogits . W(class tile), accumulated in this block's own fp32 rows.
  // A task with one class tile reuses pass 1's logits (still in sm.ls, bias included). A task with fuse_gw also
  // writes this row tile's grad_W partial dlogits^T . X and grad_b partial (reduced over row tiles by finalize), so
  // the weight kernel skips it.
  using M = Mma<T>;
  constexpr int ldt = Ld<T>::value;
  float* gxp = p.gx + tk.gx_offset + r0 * p.D_pad;
  const bool cached = C <= kTile;
  const bool fuse = tk.fuse_gw != 0;
  const int64_t rt = blk - tk.tile_begin, C_pad = tk.class_tiles * kTile;
  float* gwp = p.gw + tk.gw_offset + rt * C_pad * p.D_pad;
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    if (!cached) logits_tile<T>(sm, W, C, D, c0, p.vec_loads);
    form_dlogits<T>(sm, cached ? nullptr : bias, cw, C, c0);
    if (fuse && threadIdx.x < kTile) {
      float gb = 0.f;
      for (int r = 0; r < kTile; ++r) gb += sm.ls[r * kLdl + threadIdx.x];
      p.gb[tk.gb_offset + rt * C_pad + c0 + threadIdx.x] = gb;
    }
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      load_matrix_chunk<T>(sm.ws, W, c0, C, D, d0, p.vec_loads);  // ws[class][feature]: B(k = class, n = feature)
      if (fuse) load_x_chunk<T>(sm.xs, sm.rs, D, d0, p.vec_loads);  // xs[row][feature]: B(k = row, n = feature)
      __syncthreads();
      {
        typename M::Acc acc;
        if (c0 == 0)
          M::zero(acc);
        else
          M::load(acc, gxp + d0, p.D_pad);
        M::template mma<true, true>(acc, sm.ds, ldt, sm.ws, ldt, kTile);
        M::store(acc, gxp + d0, p.D_pad);
      }
      if (fuse) {
        typename M::Acc acc;
        M::zero(acc);
        // A = dlogits^T: A(m = class, k = row) = ds[row * ldt + class], column-major
        M::template mma<false, true>(acc, sm.ds, ldt, sm.xs, ldt, kTile);
        M::store(acc, gwp + c0 * p.D_pad + d0, p.D_pad);
      }
      __syncthreads();
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight kernel: one block per (task, 64-class tile, row split). Recomputes the logits tiles of its rows, forms
// the gradient tiles from the saved per-row coefficients and accumulates grad_W(class tile) += dlogits^T . X and
// grad_b(class tile) += sum over rows of dlogits, in fp32, in a fixed row order.

template <typename T>
__device__ void heads_weight_block(const HeadsParams& p, int64_t blk) {
  FASTMTL_DYN_SMEM(smem_raw);
  __shared__ __align__(16) unsigned char task_raw[sizeof(HeadsTask)];  // see block_task
  HeadsTask& task = block_task(task_raw, p, blk, /*by_rows=*/false);
  const HeadsTask& tk = task;
  const Smem<T> sm = Smem<T>::bind(smem_raw, &task);
  using M = Mma<T>;
  constexpr int ldt = Ld<T>::value;
  const int64_t local = blk - tk.wblock_begin;
  const int64_t ct = local % tk.class_tiles, s = local / tk.class_tiles;
  const int64_t c0 = ct * kTile, C = tk.num_classes, D = p.D, C_pad = tk.class_tiles * kTile;
  const int64_t row_tiles = tk.tile_end - tk.tile_begin;
  const int64_t rt_begin = s * tk.tiles_per_split;
  const int64_t rt_end = rt_begin + tk.tiles_per_split < row_tiles ? rt_begin + tk.tiles_per_split : row_tiles;
  const T* W = static_cast<const T*>(tk.weight);
  const T* bias = static_cast<const T*>(tk.bias);
  float* gwp = p.gw + tk.gw_offset + (s * C_pad + c0) * p.D_pad;
  float gb = 0.f;
  for (int64_t rt = rt_begin; rt < rt_end; ++rt) {
    setup_rows<T>(p, tk, sm.rs, rt * kTile, true);
    __syncthreads();
    logits_tile<T>(sm, W, C, D, c0, p.vec_loads);
    form_dlogits<T>(sm, bias, tk.class_weight, C, c0);
    if (threadIdx.x < kTile)
      for (int i = 0; i < kTile; ++i) gb += sm.ls[i * kLdl + threadIdx.x];
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      load_x_chunk<T>(sm.xs, sm.rs, D, d0, p.vec_loads);  // xs[row][feature]: B(k = row, n = feature), row-major
      __syncthreads();
      typename M::Acc acc;
      if (rt == rt_begin)
        M::zero(acc);
      else
        M::load(acc, gwp + d0, p.D_pad);
      // A = dlogits^T: A(m = class, k = row) = ds[row * ldt + class], column-major
      M::template mma<false, true>(acc, sm.ds, ldt, sm.xs, ldt, kTile);
      M::store(acc, gwp + d0, p.D_pad);
      __syncthreads();
    }
    __syncthreads();
  }
  if (threadIdx.x < kTile) p.gb[tk.gb_offset + s * C_pad + c0 + threadIdx.x] = gb;
}

// ---------------------------------------------------------------------------------------------------------------
// Finalize kernel: blocks [0, hblocks) grad_hidden (sum over tasks in task order, pooling backward for sequence
// tasks), blocks [hblocks, hblocks + wblocks) grad_W / grad_b (sum over row splits in order, cast), last block the
// per-task losses and the total (fixed-order reductions).

template <typename T>
__device__ void heads_finalize_block(const HeadsParams& p, int64_t blk, int64_t hblocks, int64_t wblocks) {
  __shared__ float red[kThreads];
  if (blk < hblocks) {
    const int64_t n = p.B * p.T * p.D, D = p.D;
    T* out = static_cast<T*>(p.grad_hidden);
    for (int64_t e = blk * kThreads + threadIdx.x; e < n; e += hblocks * kThreads) {
      const int64_t d = e % D, bt = e / D, b = bt / p.T, t = bt - b * p.T;
      const int64_t len = seq_length(p, b);
      float v = 0.f;
      for (int k = 0; k < p.K; ++k) {
        const HeadsTask& tk = p.tasks[k];
        if (tk.level == heads::kToken) {
          v += p.gx[tk.gx_offset + bt * p.D_pad + d];
          continue;
        }
        const float g = p.gx[tk.gx_offset + b * p.D_pad + d];
        switch (tk.pooling) {
          case heads::kLast: v += t == len - 1 ? g : 0.f; break;
          case heads::kFirst: v += t == 0 ? g : 0.f; break;
          case heads::kMean: v += t < len ? g / (float)len : 0.f; break;
          case heads::kMax: v += t == p.argmax[(tk.pooled_index * p.B + b) * D + d] ? g : 0.f; break;
          default: v += t == (d < D / 2 ? len - 1 : 0) ? g : 0.f;  // heads::kLastFirst
        }
      }
      out[e] = Num<T>::store(v);
    }
    return;
  }
  blk -= hblocks;
  if (blk < wblocks) {
    for (int64_t e = blk * kThreads + threadIdx.x; e < p.weight_elems; e += wblocks * kThreads) {
      const HeadsTask* tk = p.tasks;
      for (int k = 0; k < p.K; ++k)
        if (e >= p.tasks[k].welem_begin && e < p.tasks[k].welem_end) tk = p.tasks + k;
      const int64_t le = e - tk->welem_begin, C = tk->num_classes, D = p.D, C_pad = tk->class_tiles * kTile;
      float v = 0.f;
      if (le < C * D) {
        const int64_t c = le / D, d = le - c * D;
        for (int64_t s = 0; s < tk->splits; ++s) v += p.gw[tk->gw_offset + (s * C_pad + c) * p.D_pad + d];
        static_cast<T*>(tk->grad_weight)[le] = Num<T>::store(v);
      } else {
        const int64_t c = le - C * D;
        for (int64_t s = 0; s < tk->splits; ++s) v += p.gb[tk->gb_offset + s * C_pad + c];
        static_cast<T*>(tk->grad_bias)[c] = Num<T>::store(v);
      }
    }
    return;
  }
  if (p.predict) return;
  float total = 0.f;
  for (int k = 0; k < p.K; ++k) {
    const HeadsTask& tk = p.tasks[k];
    float s = 0.f;
    for (int64_t r = threadIdx.x; r < tk.rows; r += kThreads) s += p.row_loss[tk.row_offset + r];
    s = block_sum(s, red);
    const float norm = p.norm[k];
    const float L = norm != 0.f ? s / norm : 0.f;
    if (threadIdx.x == 0) static_cast<T*>(p.losses)[k] = Num<T>::store(L);
    total += p.task_weights[k] * L;
  }
  if (threadIdx.x == 0) *static_cast<T*>(p.total) = Num<T>::store(total);
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels. Each phase above as a kernel of its own (one block per work item), and all of them in ONE cooperative
// launch (heads_fused_kernel: a grid of co-resident blocks loops over each phase's work items, with a grid barrier
// between phases). The task table comes as a kernel parameter unless p.tasks points at a device copy.

template <typename T>
__global__ void __launch_bounds__(kThreads)
    heads_prep_kernel(HeadsParams p, const __grid_constant__ HeadsTaskTable tt) {
  if (p.tasks == nullptr) p.tasks = tt.t;
  heads_prep_block<T>(p, blockIdx.x);
}
template <typename T>
__global__ void __launch_bounds__(kThreads)
    heads_row_kernel(HeadsParams p, const __grid_constant__ HeadsTaskTable tt) {
  if (p.tasks == nullptr) p.tasks = tt.t;
  heads_row_block<T>(p, blockIdx.x);
}
template <typename T>
__global__ void __launch_bounds__(kThreads)
    heads_weight_kernel(HeadsParams p, const __grid_constant__ HeadsTaskTable tt) {
  if (p.tasks == nullptr) p.tasks = tt.t;
  heads_weight_block<T>(p, blockIdx.x);
}
template <typename T>
__global__ void __launch_bounds__(kThreads)
    heads_finalize_kernel(HeadsParams p, const __grid_constant__ HeadsTaskTable tt, int64_t hblocks, int64_t wblocks) {
  if (p.tasks == nullptr) p.tasks = tt.t;
  heads_finalize_block<T>(p, blockIdx.x, hblocks, wblocks);
}

#if defined(__CUDACC__)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    heads_fused_kernel(HeadsParams p, const __grid_constant__ HeadsTaskTable tt, int64_t hblocks, int64_t wblocks) {
  if (p.tasks == nullptr) p.tasks = tt.t;
  unsigned int target = 0;
  const int64_t prep_blocks = p.num_seq_tasks * p.B + p.K;
  for (int64_t b = blockIdx.x; b < prep_blocks; b += gridDim.x) {
    heads_prep_block<T>(p, b);
    __syncthreads();
  }
  grid_barrier(p.grid_sync, target += gridDim.x, p.barrier_timeout_ns, "heads_fused_kernel (after prep)");
  for (int64_t b = blockIdx.x; b < p.row_tiles; b += gridDim.x) {
    heads_row_block<T>(p, b);
    __syncthreads();
  }
  if (p.predict) return;
  if (p.compute_grad && p.weight_blocks > 0) {
    grid_barrier(p.grid_sync, target += gridDim.x, p.barrier_timeout_ns, "heads_fused_kernel (after rows)");
    for (int64_t b = blockIdx.x; b < p.weight_blocks; b += gridDim.x) {
      heads_weight_block<T>(p, b);
      __syncthreads();
    }
  }
  grid_barrier(p.grid_sync, target += gridDim.x, p.barrier_timeout_ns, "heads_fused_kernel (before finalize)");
  for (int64_t b = blockIdx.x; b < hblocks + wblocks + 1; b += gridDim.x) {
    heads_finalize_block<T>(p, b, hblocks, wblocks);
    __syncthreads();
  }
}
#endif  // __CUDACC__

// ---------------------------------------------------------------------------------------------------------------
// Launchers.

static_assert(sizeof(HeadsParams) + sizeof(HeadsTaskTable) + 2 * sizeof(int64_t) <= 4096,
              "kernel parameters over the classic 4 KB limit: lower kMaxParamTasks");

size_t elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

#if defined(__CUDACC__)
template <typename T>
cudaError_t launch_prep(const HeadsParams& p, const HeadsTaskTable& tt, cudaStream_t stream) {
  const int64_t blocks = p.num_seq_tasks * p.B + p.K;
  if (blocks == 0) return cudaSuccess;
  heads_prep_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>(p, tt);
  return cudaGetLastError();
}

// Blocks of the finalize phase: grad_hidden, grad_W / grad_b, and one for the losses.
inline void finalize_blocks(const HeadsParams& p, int64_t& hblocks, int64_t& wblocks) {
  hblocks = wblocks = 0;
  if (p.compute_grad) {
    const int64_t nh = p.B * p.T * p.D;
    hblocks = nh == 0 ? 0 : std::min<int64_t>((nh + kThreads - 1) / kThreads, 4096);
    wblocks = p.weight_elems == 0 ? 0 : std::min<int64_t>((p.weight_elems + kThreads - 1) / kThreads, 4096);
  }
}

// Blocks of the fused kernel the device holds at once (0: no cooperative launch), per device and dtype.
template <typename T>
int fused_capacity() {
  static std::mutex mu;
  static int cap[64] = {};
  static bool known[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    (void)cudaGetLastError();
    return 0;
  }
  std::lock_guard<std::mutex> lock(mu);
  if (!known[dev]) {
    int coop = 0, sms = 0, per_sm = 0;
    const size_t smem = SmemLayout<T>::bytes;
    cudaError_t e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(heads_fused_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, heads_fused_kernel<T>, kThreads, smem);
    if (e != cudaSuccess) (void)cudaGetLastError();
    cap[dev] = (e == cudaSuccess && coop) ? per_sm * sms : 0;
    known[dev] = true;
  }
  return cap[dev];
}

// The fused kernel: one cooperative launch (after zeroing its barrier counter); cudaErrorCooperativeLaunchTooLarge
// when the driver refuses the grid (the caller then launches the phases one by one).
template <typename T>
cudaError_t launch_fused(const HeadsParams& p, const HeadsTaskTable& tt, cudaStream_t stream) {
  int64_t hblocks, wblocks;
  finalize_blocks(p, hblocks, wblocks);
  const int64_t work = std::max<int64_t>(std::max<int64_t>(p.num_seq_tasks * p.B + p.K, p.row_tiles),
                                         std::max<int64_t>(p.weight_blocks, hblocks + wblocks + 1));
  const int64_t grid = std::min<int64_t>(work, fused_capacity<T>());
  if (grid < 1) return cudaErrorCooperativeLaunchTooLarge;
  cudaError_t e = cudaMemsetAsync(p.grid_sync, 0, sizeof(unsigned int), stream);
  if (e != cudaSuccess) return e;
  HeadsParams pa = p;
  HeadsTaskTable ta = tt;
  void* args[] = {&pa, &ta, &hblocks, &wblocks};
  e = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&heads_fused_kernel<T>), dim3((unsigned)grid),
                                  dim3(kThreads), args, SmemLayout<T>::bytes, stream);
  if (e == cudaErrorCooperativeLaunchTooLarge) (void)cudaGetLastError();
  return e;
}

template <typename T>
cudaError_t launch_run(const HeadsParams& p, const HeadsTaskTable& tt, cudaStream_t stream) {
  const size_t smem = SmemLayout<T>::bytes;
  cudaError_t e;
  if (p.fused) {  // the prep phase is part of the fused kernel (heads_prepare launched nothing)
    e = launch_fused<T>(p, tt, stream);
    if (e != cudaErrorCooperativeLaunchTooLarge) return e;
    e = launch_prep<T>(p, tt, stream);  // refused: the phases one launch each
    if (e != cudaSuccess) return e;
  }
  if (p.row_tiles > 0) {
    e = cudaFuncSetAttribute(heads_row_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    heads_row_kernel<T><<<(unsigned)p.row_tiles, kThreads, smem, stream>>>(p, tt);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  if (p.predict) return cudaSuccess;
  if (p.compute_grad && p.weight_blocks > 0) {
    e = cudaFuncSetAttribute(heads_weight_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    heads_weight_kernel<T><<<(unsigned)p.weight_blocks, kThreads, smem, stream>>>(p, tt);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  int64_t hblocks, wblocks;
  finalize_blocks(p, hblocks, wblocks);
  heads_finalize_kernel<T><<<(unsigned)(hblocks + wblocks + 1), kThreads, 0, stream>>>(p, tt, hblocks, wblocks);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace

size_t heads_plan(HeadsParams& p, HeadsTask* tasks, int num_sms) {
  const int64_t D_pad = (p.D + kTile - 1) / kTile * kTile;
  p.D_pad = D_pad;
  p.num_seq_tasks = 0;
  p.total_rows = 0;
  p.row_tiles = 0;
  p.weight_blocks = 0;
  p.weight_elems = 0;
  int64_t gx_floats = 0, gw_floats = 0, gb_floats = 0;
  const int64_t target_blocks = 2 * (int64_t)(num_sms > 0 ? num_sms : 100);
  const int64_t max_partial_floats = (int64_t)64 << 20;  // 256 MB of fp32 grad-W partials per task at most
  const int64_t max_fused_floats = (int64_t)16 << 20;    // 64 MB of per-row-tile partials (fused grad_W)
  for (int k = 0; k < p.K; ++k) {
    HeadsTask& t = tasks[k];
    t.index = k;
    t.rows = t.level == heads::kToken ? p.B * p.T : p.B;
    t.row_offset = p.total_rows;
    p.total_rows += t.rows;
    const int64_t nt = (t.rows + kTile - 1) / kTile;
    t.tile_begin = p.row_tiles;
    p.row_tiles += nt;
    t.tile_end = p.row_tiles;
    t.pooled_index = t.level == heads::kSequence ? p.num_seq_tasks++ : -1;
    t.class_tiles = (t.num_classes + kTile - 1) / kTile;
    t.gx_offset = gx_floats;
    t.gw_offset = gw_floats;
    t.gb_offset = gb_floats;
    t.splits = 1;
    t.tiles_per_split = nt;
    t.wblock_begin = p.weight_blocks;
    t.welem_begin = p.weight_elems;
    if (p.compute_grad && !p.predict) {
      gx_floats += nt * kTile * D_pad;
      const int64_t C_pad = t.class_tiles * kTile;
      // Small vocabularies: the row kernel writes one grad_W partial per row tile (no weight kernel, no third
      // logits GEMM) when the partials stay small.
      t.fuse_gw = (t.class_tiles <= kFuseMaxClassTiles && nt * C_pad * D_pad <= max_fused_floats) ? 1 : 0;
      if (t.fuse_gw) {
        t.splits = nt;
        t.tiles_per_split = 1;
        gw_floats += nt * C_pad * D_pad;
        gb_floats += nt * C_pad;
        p.weight_elems += t.num_classes * p.D + (t.bias != nullptr ? t.num_classes : 0);
        t.wblock_end = p.weight_blocks;
        t.welem_end = p.weight_elems;
        continue;
      }
      int64_t splits = (target_blocks + t.class_tiles - 1) / t.class_tiles;
      const int64_t mem_cap = std::max<int64_t>(1, max_partial_floats / std::max<int64_t>(1, C_pad * D_pad));
      splits = std::max<int64_t>(1, std::min<int64_t>(std::min(splits, mem_cap), nt));
      const int64_t tps = nt == 0 ? 0 : (nt + splits - 1) / splits;
      splits = tps == 0 ? 0 : (nt + tps - 1) / tps;  // no empty split
      t.splits = splits;
      t.tiles_per_split = tps;
      p.weight_blocks += t.class_tiles * splits;
      gw_floats += splits * C_pad * D_pad;
      gb_floats += splits * C_pad;
      p.weight_elems += t.num_classes * p.D + (t.bias != nullptr ? t.num_classes : 0);
    }
    t.wblock_end = p.weight_blocks;
    t.welem_end = p.weight_elems;
  }
  // 16-byte loads of X and W rows: every row start 16-byte aligned (D a multiple of 16 bytes, aligned bases;
  // the pooled rows live in the workspace, which is 256-byte aligned).
  const size_t es = elem_size(p.dtype);
  bool vec = (p.D * (int64_t)es) % 16 == 0 && reinterpret_cast<uintptr_t>(p.hidden) % 16 == 0;
  for (int k = 0; k < p.K; ++k) vec = vec && reinterpret_cast<uintptr_t>(tasks[k].weight) % 16 == 0;
  p.vec_loads = vec;
  const bool loss = !p.predict;
  const bool grad = loss && p.compute_grad;
  const int64_t S = p.num_seq_tasks;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = align_up(off + bytes, 256);
    return at;
  };
  p.off_pooled = take(elem_size(p.dtype) * S * p.B * p.D);
  p.off_argmax = take(sizeof(int32_t) * S * p.B * p.D);
  p.off_norm = take(sizeof(float) * p.K);
  p.off_wsum = take(sizeof(float) * p.K);
  p.off_row_loss = take(loss ? sizeof(float) * p.total_rows : 0);
  p.off_row_stats = take(grad ? sizeof(float) * 4 * p.total_rows : 0);
  p.off_row_y = take(grad ? sizeof(int32_t) * p.total_rows : 0);
  p.off_gx = take(sizeof(float) * gx_floats);
  p.off_gw = take(sizeof(float) * gw_floats);
  p.off_gb = take(sizeof(float) * gb_floats);
  p.off_sync = take(sizeof(unsigned int));
  p.workspace_bytes = off;
  return off;
}

void heads_bind(HeadsParams& p, void* workspace) {
  unsigned char* base = static_cast<unsigned char*>(workspace);
  p.pooled = base + p.off_pooled;
  p.argmax = reinterpret_cast<int32_t*>(base + p.off_argmax);
  p.norm = reinterpret_cast<float*>(base + p.off_norm);
  p.wsum = reinterpret_cast<float*>(base + p.off_wsum);
  p.row_loss = reinterpret_cast<float*>(base + p.off_row_loss);
  p.row_stats = reinterpret_cast<float*>(base + p.off_row_stats);
  p.row_y = reinterpret_cast<int32_t*>(base + p.off_row_y);
  p.gx = reinterpret_cast<float*>(base + p.off_gx);
  p.gw = reinterpret_cast<float*>(base + p.off_gw);
  p.gb = reinterpret_cast<float*>(base + p.off_gb);
  p.grid_sync = reinterpret_cast<unsigned int*>(base + p.off_sync);
}

#if defined(__CUDACC__)
static const char* err_str(cudaError_t e) { return e == cudaSuccess ? nullptr : cudaGetErrorString(e); }

// The kernel-parameter copy of the task table (K <= kMaxParamTasks), or an empty one when p.tasks is a device copy.
static bool param_table(const HeadsParams& p, const HeadsTask* tasks, HeadsTaskTable& tt) {
  if (p.tasks != nullptr) return true;
  if (p.K > kMaxParamTasks || tasks == nullptr) return false;
  for (int k = 0; k < p.K; ++k) tt.t[k] = tasks[k];
  return true;
}
static const char* kNoTable = "fastmtl heads: more than kMaxParamTasks tasks need a device copy of the task table";

const char* heads_prepare(HeadsParams& p, const HeadsTask* tasks, void* workspace, cudaStream_t stream) {
  heads_bind(p, workspace);
  if (p.K == 0) return nullptr;
  HeadsTaskTable tt;
  if (!param_table(p, tasks, tt)) return kNoTable;
  switch (p.dtype) {
    case DType::kFloat32:
      p.fused = p.fused && fused_capacity<float>() > 0;
      return p.fused ? nullptr : err_str(launch_prep<float>(p, tt, stream));
    case DType::kFloat16:
      p.fused = p.fused && fused_capacity<__half>() > 0;
      return p.fused ? nullptr : err_str(launch_prep<__half>(p, tt, stream));
    case DType::kBFloat16:
      p.fused = p.fused && fused_capacity<__nv_bfloat16>() > 0;
      return p.fused ? nullptr : err_str(launch_prep<__nv_bfloat16>(p, tt, stream));
    default: return "fastmtl heads: unsupported dtype code";
  }
}

const char* heads_run(const HeadsParams& p, const HeadsTask* tasks, cudaStream_t stream) {
  if (p.K == 0) return nullptr;
  HeadsTaskTable tt;
  if (!param_table(p, tasks, tt)) return kNoTable;
  switch (p.dtype) {
    case DType::kFloat32: return err_str(launch_run<float>(p, tt, stream));
    case DType::kFloat16: return err_str(launch_run<__half>(p, tt, stream));
    case DType::kBFloat16: return err_str(launch_run<__nv_bfloat16>(p, tt, stream));
    default: return "fastmtl heads: unsupported dtype code";
  }
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace fastmtl
