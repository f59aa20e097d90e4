// CUDA LSTM, persistent path: one launch runs every time step of a layer (forward; the backward kernel below
// mirrors it with W_hh[:, slice] resident instead).
//
// Work split. Direction d, hidden units [j0, j0 + hc) belong to one CTA (hc in {4, 8, 16, 32}). The CTA keeps the
// 4*hc rows {i, f, g, o} x [j0, j0 + hc) of W_hh (all H columns) in shared memory for the whole sequence,
// pre-arranged in mma.sync A-fragment order (one 16-byte load per lane per fragment, conflict-free), and keeps the
// cell state of its units in shared memory (it never leaves the CTA until cy). Per step:
//   1. stage h_{t-1} (the active rows, padded to 8) from the global double buffer into shared memory, in chunks of
//      128 words per row, two stages deep with cp.async (L2 only, so other CTAs' writes are seen);
//   2. G^T (4hc x B) = W_slice (4hc x H) . h^T (H x B) on the tensor cores: mma.m16n8k16 bf16/fp16 or
//      mma.m16n8k8 tf32 (float32 input), fp32 accumulation; warps split the m-tiles and the k-steps, partial sums
//      are reduced through shared memory;
//   3. gate/cell update for (b, j) in the slice: adds the precomputed input projection (with biases), writes h_t to
//      the other global buffer, the output row and the reserve (same layout as the standard path, so the standard
//      backward reads it); padding rows get zeros and carry their h unchanged;
//   4. grid-wide barrier (monotonic atomic counter, one per launch, zeroed by the glue).
// The grid is sized so that every CTA is co-resident (occupancy calculator x SM count), which the hand-rolled
// barrier needs; lstm_persistent_plan refuses shapes where that cannot be guaranteed.
#include <cstdio>
#include <map>
#include <mutex>
#include <tuple>

#include "cp_async.cuh"
#include "grid_sync.cuh"
#include "lstm_common.cuh"

namespace fastmtl {
namespace cuda {
namespace {

using detail::Num;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkWords = 128;                           // h words per row per staged chunk
constexpr int kKStepWords = 8;                             // one mma k-step: k16 (16-bit) or k8 (tf32)
constexpr int kStepsPerChunk = kChunkWords / kKStepWords;  // 16
constexpr int kRowWords = kChunkWords + 4;                 // row pitch = 4 (mod 32) words: conflict-free B loads
constexpr int kMaxNTiles = 8;                              // B <= 64
constexpr int kMaxBatch = kMaxNTiles * 8;

// Operand traits: elements per 32-bit word and the tensor-core instruction.
template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static constexpr int kEPW = 2;
  __device__ __forceinline__ static uint32_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
  __device__ __forceinline__ static uint32_t b_word(uint32_t w) { return w; }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
#endif
  }
};
template <>
struct Mma<__half> {
  static constexpr int kEPW = 2;
  __device__ __forceinline__ static uint32_t bits(__half x) { return __half_as_ushort(x); }
  __device__ __forceinline__ static uint32_t b_word(uint32_t w) { return w; }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
#endif
  }
};
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
#endif
  return r;
}
template <>
struct Mma<float> {
  static constexpr int kEPW = 1;
  __device__ __forceinline__ static uint32_t b_word(uint32_t w) { return to_tf32(__uint_as_float(w)); }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
#endif
  }
};

// Where A[row][col] lives in W_hh (4H x H, row-major), or false for the zero padding.
//   forward  (kBwd = false): A = W_hh rows {i,f,g,o} x [j0, j0+hc): row -> gate = row / hc, unit u = row % hc,
//                            A[row][col] = W_hh[gate*H + j0 + u][col], K = H;
//   backward (kBwd = true):  A = W_hh[:, j0:j0+hc]^T: A[u][col] = W_hh[col][j0 + u], K = 4H (rows >= hc are padding).
template <bool kBwd>
__device__ __forceinline__ bool w_index(int row, int col, int hc, int j0, int H, int64_t& idx) {
  if (!kBwd) {
    const int gate = row / hc, u = row % hc;
    if (j0 + u >= H || col >= H) return false;
    idx = ((int64_t)gate * H + j0 + u) * H + col;
    return true;
  }
  if (row >= hc || j0 + row >= H || col >= 4 * H) return false;
  idx = (int64_t)col * H + j0 + row;
  return true;
}

// Word r (0..3) of the A fragment of lane (g = lane/4, q = lane%4) for fragment row `row` and k-step kk.
//   16-bit m16n8k16: a0 = A[g][2q..2q+1], a1 = A[g+8][2q..], a2 = A[g][2q+8..], a3 = A[g+8][2q+8..]
//   tf32   m16n8k8 : a0 = A[g][q],        a1 = A[g+8][q],     a2 = A[g][q+4],     a3 = A[g+8][q+4]
template <typename T, bool kBwd>
__device__ __forceinline__ uint32_t a_word(const T* __restrict__ w, int row, int kk, int q, int r, int hc, int j0,
                                           int H) {
  int64_t idx = 0;
  if constexpr (Mma<T>::kEPW == 2) {
    const int col = kk * 16 + 2 * q + ((r & 2) ? 8 : 0);
    const uint32_t lo = w_index<kBwd>(row, col, hc, j0, H, idx) ? Mma<T>::bits(w[idx]) : 0u;
    const uint32_t hi = w_index<kBwd>(row, col + 1, hc, j0, H, idx) ? Mma<T>::bits(w[idx]) : 0u;
    return lo | (hi << 16);
  } else {
    const int col = kk * 8 + q + ((r & 2) ? 4 : 0);
    return w_index<kBwd>(row, col, hc, j0, H, idx) ? to_tf32(w[idx]) : 0u;
  }
}

// Built without sm_80+ machine code (e.g. only PTX of an older architecture, JIT-compiled for this device): the
// kernels would have empty bodies. lstm_persistent_plan refuses such a build (cudaFuncGetAttributes); should one
// run anyway, it traps rather than return garbage.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
__device__ __forceinline__ void no_sm80_trap(const char* kernel) {
  printf("fastmtl: %s was built without sm_80+ code (compute capability %d): rebuild with TORCH_CUDA_ARCH_LIST "
         "including 8.0 or newer\n", kernel, (int)(__CUDA_ARCH__ / 10));
  __trap();
}
#endif

// Shared-memory geometry, identical on host and device.
//   M rows of A (multiple of 16) x K columns, batch padded to Npad; `state_floats` fp32 values per unit and row.
struct Geo {
  int M, Mt, NKS, Kwords, nchunks, Ksteps, Npad, red_pitch;
  size_t w_bytes, h_bytes, red_bytes, c_bytes;
  __host__ __device__ Geo(int M_, int K, int B, int epw, int state_floats) {
    M = M_;
    Mt = M / 16;
    NKS = kWarps / Mt;
    Kwords = (K + epw - 1) / epw;
    nchunks = (Kwords + kChunkWords - 1) / kChunkWords;
    Ksteps = nchunks * kStepsPerChunk;
    Npad = (B + 7) & ~7;
    red_pitch = Npad + 1;
    w_bytes = (size_t)Mt * Ksteps * 32 * 16;
    h_bytes = (size_t)2 * Npad * kRowWords * 4;
    red_bytes = (size_t)NKS * M * red_pitch * 4;
    c_bytes = (size_t)state_floats * Npad * 4;
  }
  __host__ __device__ size_t total() const { return w_bytes + h_bytes + red_bytes + c_bytes; }
};
// Forward: A = 4*hc rows of W_hh, K = H, state = c. Backward: A = W_hh[:, slice]^T padded to >= 16 rows, K = 4H,
// state = dc and dh.
__host__ __device__ inline Geo fwd_geo(int hc, int H, int B, int epw) { return Geo(4 * hc, H, B, epw, hc); }
__host__ __device__ inline Geo bwd_geo(int hc, int H, int B, int epw) {
  return Geo(hc < 16 ? 16 : hc, 4 * H, B, epw, 2 * hc);
}

// Loads the CTA's A operand into shared memory in fragment order: word ((mt * Ksteps + kk) * 32 + lane) * 4 + r.
template <typename T, bool kBwd>
__device__ __forceinline__ void load_weights(const Geo& geo, uint4* wfrag, const T* w, int hc, int j0, int H) {
  uint32_t* wf = reinterpret_cast<uint32_t*>(wfrag);
  const int n = geo.Mt * geo.Ksteps * 32 * 4;
  for (int idx = threadIdx.x; idx < n; idx += kThreads) {
    const int r = idx & 3, ln = (idx >> 2) & 31, frag = idx >> 7;
    const int kk = frag % geo.Ksteps, mt = frag / geo.Ksteps;
    const int row = mt * 16 + (ln >> 2) + ((r & 1) ? 8 : 0);
    wf[idx] = a_word<T, kBwd>(w, row, kk, ln & 3, r, hc, j0, H);
  }
}

// A CTA of a persistent kernel: direction dir, hidden units [j0, j0 + hc), and the parts of its dynamic shared memory
// (layout geo): the A fragments of its W_hh slice, the two staging buffers, the k-split partial sums and the fp32
// state of its units.
struct PersistentCta {
  int dir, j0;
  uint4* wfrag;
  uint32_t* hst;
  float* red;
  float* state;
};

// The CTA of this block.
__device__ __forceinline__ PersistentCta persistent_cta(const Geo& geo, unsigned char* smem, int hc, int ctas_per_dir,
                                                        int dir0) {
  PersistentCta c;
  c.dir = dir0 + static_cast<int>(blockIdx.x) / ctas_per_dir;
  c.j0 = (static_cast<int>(blockIdx.x) % ctas_per_dir) * hc;
  c.wfrag = reinterpret_cast<uint4*>(smem);
  c.hst = reinterpret_cast<uint32_t*>(smem + geo.w_bytes);
  c.red = reinterpret_cast<float*>(smem + geo.w_bytes + geo.h_bytes);
  c.state = reinterpret_cast<float*>(smem + geo.w_bytes + geo.h_bytes + geo.red_bytes);
  return c;
}

// cta.red[(ks * M + m) * RP + n] = partial (over this warp's k-split) of sum_k A[m][k] * src[n][k] (A: cta.wfrag) for
// n < 8*ceil(bt/8). src rows are `src_ld` elements apart (16-byte aligned rows), K = geo.Kwords words. Staged through
// shared memory (cta.hst) in 128-word chunks, two deep, with cp.async.cg (L2: sees other CTAs' writes made before the
// grid barrier). Ends with every warp's partials written; the caller synchronises before reading cta.red.
template <typename T>
__device__ __forceinline__ void recurrent_mma(const Geo& geo, const PersistentCta& cta, const T* src, int64_t src_ld,
                                              int B, int bt) {
  const int nt_act = (bt + 7) >> 3;
  if (nt_act <= 0) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int mt = warp % geo.Mt, ks = warp / geo.Mt;
  const int rows = nt_act * 8;
  float acc[kMaxNTiles][4];
#pragma unroll
  for (int nt = 0; nt < kMaxNTiles; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  auto issue = [&](int c, int stage) {
    uint32_t* dst0 = cta.hst + (size_t)stage * geo.Npad * kRowWords;
    const int n = rows * (kChunkWords / 4);
    for (int idx = tid; idx < n; idx += kThreads) {
      const int row = idx / (kChunkWords / 4), gr = idx % (kChunkWords / 4);
      const int word = c * kChunkWords + gr * 4;
      const bool valid = row < B && word < geo.Kwords;
      const char* p = reinterpret_cast<const char*>(src) +
                      (valid ? ((int64_t)row * src_ld * (int64_t)sizeof(T) + (int64_t)word * 4) : 0);
      cp_async16(dst0 + row * kRowWords + gr * 4, p, valid ? 16 : 0);
    }
    cp_async_commit();
  };
  issue(0, 0);
  for (int c = 0; c < geo.nchunks; ++c) {
    if (c + 1 < geo.nchunks) {
      issue(c + 1, (c + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t* hs = cta.hst + (size_t)(c & 1) * geo.Npad * kRowWords;
    for (int kl = ks; kl < kStepsPerChunk; kl += geo.NKS) {
      const uint4 a = cta.wfrag[(mt * geo.Ksteps + c * kStepsPerChunk + kl) * 32 + lane];
#pragma unroll
      for (int nt = 0; nt < kMaxNTiles; ++nt) {
        if (nt < nt_act) {
          const uint32_t* hp = hs + (nt * 8 + g) * kRowWords + kl * kKStepWords + q;
          Mma<T>::mma(acc[nt], a, Mma<T>::b_word(hp[0]), Mma<T>::b_word(hp[4]));
        }
      }
    }
    __syncthreads();
  }
  const int M = geo.M, RP = geo.red_pitch;
  const int r0 = mt * 16 + g;
#pragma unroll
  for (int nt = 0; nt < kMaxNTiles; ++nt) {
    if (nt < nt_act) {
      const int n0 = nt * 8 + 2 * q;
      cta.red[(ks * M + r0) * RP + n0] = acc[nt][0];
      cta.red[(ks * M + r0) * RP + n0 + 1] = acc[nt][1];
      cta.red[(ks * M + r0 + 8) * RP + n0] = acc[nt][2];
      cta.red[(ks * M + r0 + 8) * RP + n0 + 1] = acc[nt][3];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_fwd_kernel(PersistentFwdArgs p, int hc, int ctas_per_dir, int dir0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  const int H = p.H, B = p.B, steps = p.T, D = p.D;
  const Geo geo = fwd_geo(hc, H, B, Mma<T>::kEPW);
  const PersistentCta cta = persistent_cta(geo, smem, hc, ctas_per_dir, dir0);
  const int dir = cta.dir, j0 = cta.j0, tid = threadIdx.x;
  const int M = geo.M, NKS = geo.NKS, Npad = geo.Npad, RP = geo.red_pitch;
  float* cst = cta.state;  // cell state of the slice (element e = b * hc + u)

  load_weights<T, false>(geo, cta.wfrag, static_cast<const T*>(dir == 0 ? p.whh[0] : p.whh[1]), hc, j0, H);
  const T* cx = static_cast<const T*>(p.cx) + (int64_t)dir * B * H;
  for (int e = tid; e < hc * Npad; e += kThreads) {
    const int b = e / hc, j = j0 + e % hc;
    cst[e] = (b < B && j < H) ? Num<T>::load(cx[(int64_t)b * H + j]) : 0.f;
  }
  __syncthreads();

  T* hbuf = static_cast<T*>(p.hbuf) + (int64_t)dir * 2 * B * H;
  const T* xproj = static_cast<const T*>(p.xproj);
  T* out = static_cast<T*>(p.out);
  T* reserve = static_cast<T*>(p.reserve);
  const int64_t G = 4 * (int64_t)H;
  unsigned int barrier_target = 0;

  for (int s = 0; s < steps; ++s) {
    const int t = dir == 0 ? s : steps - 1 - s;
    const int bt = p.batch_sizes ? __ldg(p.batch_sizes + t) : B;
    const T* hcur = hbuf + (int64_t)(s & 1) * B * H;
    T* hnxt = hbuf + (int64_t)((s & 1) ^ 1) * B * H;

    recurrent_mma<T>(geo, cta, hcur, H, B, bt);
    __syncthreads();

    // Gate/cell update for the slice.
    for (int e = tid; e < hc * B; e += kThreads) {
      const int b = e / hc, u = e % hc, j = j0 + u;
      if (j >= H) continue;
      T* o_ptr = out + ((int64_t)t * B + b) * D * H + (int64_t)dir * H + j;
      T* r_ptr = reserve ? reserve + (((int64_t)dir * steps + t) * B + b) * 5 * H + j : nullptr;
      if (b < bt) {
        const T* xp = xproj + ((int64_t)t * B + b) * D * G + (int64_t)dir * G + j;
        float z[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          float v = Num<T>::load(xp[(int64_t)k * H]);
          for (int kss = 0; kss < NKS; ++kss) v += cta.red[(kss * M + k * hc + u) * RP + b];
          z[k] = v;
        }
        float ig, fg, gg, og, c, h;
        lstm_math::cell_forward<detail::CudaAct>(z[0], z[1], z[2], z[3], cst[e], ig, fg, gg, og, c, h);
        cst[e] = c;
        const T hT = Num<T>::store(h);
        hnxt[(int64_t)b * H + j] = hT;
        *o_ptr = hT;
        if (r_ptr) {
          r_ptr[0] = Num<T>::store(ig);
          r_ptr[H] = Num<T>::store(fg);
          r_ptr[2 * H] = Num<T>::store(gg);
          r_ptr[3 * H] = Num<T>::store(og);
          r_ptr[4 * (int64_t)H] = Num<T>::store(c);
        }
      } else {
        hnxt[(int64_t)b * H + j] = __ldcg(hcur + (int64_t)b * H + j);
        *o_ptr = Num<T>::store(0.f);
        if (r_ptr) {
#pragma unroll
          for (int k = 0; k < 5; ++k) r_ptr[(int64_t)k * H] = Num<T>::store(0.f);
        }
      }
    }
    if (s + 1 < steps) {
      barrier_target += gridDim.x;
      grid_barrier(p.barrier, barrier_target, p.barrier_timeout_ns, "persistent_fwd_kernel");
    }
  }
  __syncthreads();
  // hy, cy of the slice (the final buffer rows of this slice were written by this CTA).
  const T* hfin = hbuf + (int64_t)(steps & 1) * B * H;
  T* hy = static_cast<T*>(p.hy) + (int64_t)dir * B * H;
  T* cy = static_cast<T*>(p.cy) + (int64_t)dir * B * H;
  for (int e = tid; e < hc * B; e += kThreads) {
    const int b = e / hc, j = j0 + e % hc;
    if (j >= H) continue;
    hy[(int64_t)b * H + j] = __ldcg(hfin + (int64_t)b * H + j);
    cy[(int64_t)b * H + j] = Num<T>::store(cst[e]);
  }
#elif defined(__CUDA_ARCH__)
  no_sm80_trap("persistent_fwd_kernel");
#endif
}

// Persistent backward: per processed step (reverse of the forward order of the direction)
//   1. elementwise for the slice: dh = dy + dh_rec (kept in shared memory from the previous step; grad_hy at a
//      row's last step), dc likewise; gate pre-activation gradients dG_t written to global (also the input of the
//      weight-gradient GEMMs), h_{t-1} to hprev, grad_hx/grad_cx for rows whose first step was the previous one;
//   2. grid barrier (dG_t of every slice is now visible);
//   3. dh_rec for the slice = dG_t (B x 4H) . W_hh[:, slice] on the tensor cores, kept in shared memory (fp32).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_bwd_kernel(PersistentBwdArgs p, int hc, int ctas_per_dir, int dir0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  const int H = p.H, B = p.B, steps = p.T, D = p.D;
  const Geo geo = bwd_geo(hc, H, B, Mma<T>::kEPW);
  const PersistentCta cta = persistent_cta(geo, smem, hc, ctas_per_dir, dir0);
  const int dir = cta.dir, j0 = cta.j0, tid = threadIdx.x;
  const int M = geo.M, NKS = geo.NKS, Npad = geo.Npad, RP = geo.red_pitch;
  float* dcs = cta.state;       // dc of the slice (element e = b * hc + u)
  float* dhs = dcs + hc * Npad;  // dh from the recurrent product

  load_weights<T, true>(geo, cta.wfrag, static_cast<const T*>(dir == 0 ? p.whh[0] : p.whh[1]), hc, j0, H);
  __syncthreads();

  const int64_t G = 4 * (int64_t)H, ldg = (int64_t)D * G, ldo = (int64_t)D * H;
  const int64_t dBH = (int64_t)dir * B * H;
  const T* go = static_cast<const T*>(p.grad_out);
  const T* ghy = static_cast<const T*>(p.grad_hy) + dBH;
  const T* gcy = static_cast<const T*>(p.grad_cy) + dBH;
  const T* res = static_cast<const T*>(p.reserve);
  const T* out = static_cast<const T*>(p.out);
  const T* hx = static_cast<const T*>(p.hx) + dBH;
  const T* cx = static_cast<const T*>(p.cx) + dBH;
  T* dgates = static_cast<T*>(p.dgates);
  T* hprev = static_cast<T*>(p.hprev);
  T* ghx = static_cast<T*>(p.grad_hx) + dBH;
  T* gcx = static_cast<T*>(p.grad_cx) + dBH;
  unsigned int barrier_target = 0;
  int n_prev = 0;

  for (int s = 0; s < steps; ++s) {
    const int t = dir == 0 ? steps - 1 - s : s;
    const int tp = dir == 0 ? t - 1 : t + 1;  // previous step in the forward order
    const int bt = p.batch_sizes ? __ldg(p.batch_sizes + t) : B;
    const int n_cprev = (tp >= 0 && tp < steps) ? (p.batch_sizes ? __ldg(p.batch_sizes + tp) : B) : 0;

    for (int e = tid; e < hc * B; e += kThreads) {
      const int b = e / hc, u = e % hc, j = j0 + u;
      if (j >= H) continue;
      const int64_t bh = (int64_t)b * H + j;
      T* dg = dgates + ((int64_t)t * B + b) * ldg + (int64_t)dir * G + j;
      T* hp = hprev + (((int64_t)dir * steps + t) * B + b) * H + j;
      if (b < bt) {
        const T* r = res + (((int64_t)dir * steps + t) * B + b) * 5 * H + j;
        const float ig = Num<T>::load(r[0]), fg = Num<T>::load(r[H]), gg = Num<T>::load(r[2 * H]),
                    og = Num<T>::load(r[3 * H]), c = Num<T>::load(r[4 * (int64_t)H]);
        float c_prev;
        T h_prev;
        if (b < n_cprev) {
          c_prev = Num<T>::load(res[(((int64_t)dir * steps + tp) * B + b) * 5 * H + 4 * H + j]);
          h_prev = out[((int64_t)tp * B + b) * ldo + (int64_t)dir * H + j];
        } else {
          c_prev = Num<T>::load(cx[bh]);
          h_prev = hx[bh];
        }
        float dh = Num<T>::load(go[((int64_t)t * B + b) * ldo + (int64_t)dir * H + j]);
        float dc;
        if (b < n_prev) {
          dh += dhs[e];
          dc = dcs[e];
        } else {
          dh += Num<T>::load(ghy[bh]);
          dc = Num<T>::load(gcy[bh]);
        }
        float d_i, d_f, d_g, d_o, dc_prev;
        lstm_math::cell_backward<detail::CudaAct>(ig, fg, gg, og, c, c_prev, dh, dc, 1.f, d_i, d_f, d_g, d_o,
                                                  dc_prev);
        dcs[e] = dc_prev;
        dg[0] = Num<T>::store(d_i);
        dg[H] = Num<T>::store(d_f);
        dg[2 * H] = Num<T>::store(d_g);
        dg[3 * H] = Num<T>::store(d_o);
        *hp = h_prev;
      } else {
        if (b < n_prev) {  // this row's first forward step was the previously processed one
          ghx[bh] = Num<T>::store(dhs[e]);
          gcx[bh] = Num<T>::store(dcs[e]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) dg[(int64_t)k * H] = Num<T>::store(0.f);
        *hp = Num<T>::store(0.f);
      }
    }
    barrier_target += gridDim.x;
    grid_barrier(p.barrier, barrier_target, p.barrier_timeout_ns, "persistent_bwd_kernel");

    recurrent_mma<T>(geo, cta, dgates + (int64_t)t * B * ldg + (int64_t)dir * G, ldg, B, bt);
    __syncthreads();
    for (int e = tid; e < hc * B; e += kThreads) {
      const int b = e / hc, u = e % hc;
      if (b < bt) {
        float v = 0.f;
        for (int kss = 0; kss < NKS; ++kss) v += cta.red[(kss * M + u) * RP + b];
        dhs[e] = v;
      }
    }
    __syncthreads();
    n_prev = bt;
  }
  for (int e = tid; e < hc * B; e += kThreads) {
    const int b = e / hc, j = j0 + e % hc;
    if (j >= H || b >= n_prev) continue;
    ghx[(int64_t)b * H + j] = Num<T>::store(dhs[e]);
    gcx[(int64_t)b * H + j] = Num<T>::store(dcs[e]);
  }
#elif defined(__CUDA_ARCH__)
  no_sm80_trap("persistent_bwd_kernel");
#endif
}

struct DeviceInfo {
  bool init = false;
  int sms = 0, smem_optin = 0, major = 0, cooperative = 0;
};
std::mutex g_mutex;
DeviceInfo g_info[64];
bool g_attr_set[64][6];
// Plans are cached per (device, kernel, B, H, D): after the first call no CUDA API is touched, so a call inside a
// CUDA-graph capture (global capture mode) makes no occupancy queries.
std::map<std::tuple<int, int, int, int, int>, PersistentPlan> g_plans;

int kernel_index(DType dt, bool bwd) {
  return (dt == DType::kFloat32 ? 0 : dt == DType::kBFloat16 ? 1 : 2) + (bwd ? 3 : 0);
}

template <typename T>
const void* kernel_ptr(bool bwd) {
  return !bwd ? reinterpret_cast<const void*>(&persistent_fwd_kernel<T>)
              : reinterpret_cast<const void*>(&persistent_bwd_kernel<T>);
}
const void* kernel_for(DType dt, bool bwd) {
  switch (dt) {
    case DType::kFloat32: return kernel_ptr<float>(bwd);
    case DType::kBFloat16: return kernel_ptr<__nv_bfloat16>(bwd);
    case DType::kFloat16: return kernel_ptr<__half>(bwd);
    default: return nullptr;
  }
}

// Cooperative launch: the driver guarantees that every CTA of the grid is co-resident (or refuses the launch with
// cudaErrorCooperativeLaunchTooLarge, e.g. under MPS / green-context SM limits; reported as
// kPersistentGridTooLarge so the glue can take the standard path), so two persistent launches in flight at once
// (two streams, parallel graph branches) cannot each be partly resident and wait on each other forever.
template <typename Args>
const char* launch(const void* kernel, const Args& a, const PersistentPlan& plan, cudaStream_t s) {
  const int launches = a.D / plan.dirs_per_launch;
  for (int l = 0; l < launches; ++l) {
    Args pa = a;
    pa.barrier = a.barrier + l;
    int hc = plan.hc, ctas = plan.ctas_per_dir, dir0 = l * plan.dirs_per_launch;
    void* args[] = {&pa, &hc, &ctas, &dir0};
    const dim3 grid(plan.ctas_per_dir * plan.dirs_per_launch);
    const cudaError_t e = cudaLaunchCooperativeKernel(kernel, grid, dim3(kThreads), args, plan.smem_bytes, s);
    if (e == cudaErrorCooperativeLaunchTooLarge && l == 0) {
      (void)cudaGetLastError();  // not sticky; clear it for the caller's next launch check
      return kPersistentGridTooLarge;
    }
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  return nullptr;
}

// lstm_persistent_fwd / lstm_persistent_bwd: the kernel of the dtype, launched as planned.
template <bool kBwd, typename Args>
const char* launch_persistent(DType dt, const Args& a, const PersistentPlan& plan, cudaStream_t s,
                              const char* no_plan) {
  if (!plan.ok) return no_plan;
  if (a.T <= 0 || a.B <= 0) return nullptr;
  const void* kernel = kernel_for(dt, kBwd);
  if (kernel == nullptr) return "fastmtl: the persistent LSTM kernel supports float32 (tf32), bfloat16 and float16";
  return launch(kernel, a, plan, s);
}

}  // namespace

const char* const kPersistentGridTooLarge =
    "fastmtl: the persistent LSTM grid cannot be co-resident on this device now (cudaErrorCooperativeLaunchTooLarge)";

const char* lstm_persistent_plan(DType dt, int B, int H, int D, bool allow_tf32, int device, bool backward,
                                 PersistentPlan* plan) {
  *plan = PersistentPlan{};
  if (dt == DType::kFloat64) {
    plan->reason = "float64 always takes the standard path";
    return nullptr;
  }
  if (dt == DType::kFloat32 && !allow_tf32) {
    plan->reason = "float32 without TF32 (torch.backends.cudnn.allow_tf32 is False) takes the standard path";
    return nullptr;
  }
  if (B < 1 || B > kMaxBatch) {
    plan->reason = "the persistent kernel handles 1 <= B <= 64";
    return nullptr;
  }
  if (H < 8 || H % 8 != 0) {
    plan->reason = "the persistent kernel needs H to be a positive multiple of 8";
    return nullptr;
  }
  if (device < 0 || device >= 64 || D < 1 || D > 2) {
    plan->reason = "unsupported device index or direction count";
    return nullptr;
  }
  const void* fn = kernel_for(dt, backward);
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto key = std::make_tuple(device, kernel_index(dt, backward), B, H, D);
  const auto hit = g_plans.find(key);
  if (hit != g_plans.end()) {
    *plan = hit->second;
    return nullptr;
  }
  DeviceInfo& info = g_info[device];
  if (!info.init) {
    cudaError_t e = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&info.cooperative, cudaDevAttrCooperativeLaunch, device);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    info.init = true;
  }
  if (info.major < 8) {
    plan->reason = "the persistent kernel needs compute capability 8.0 or newer (mma bf16/tf32, cp.async)";
    return nullptr;
  }
  if (!info.cooperative) {
    plan->reason = "the device does not support cooperative launches (needed for the grid-wide barrier)";
    return nullptr;
  }
  bool& attr = g_attr_set[device][kernel_index(dt, backward)];
  if (!attr) {
    // The binary's code for this device must be sm_80+ (else the kernels are compiled out, see no_sm80_trap).
    cudaFuncAttributes fa{};
    cudaError_t fe = cudaFuncGetAttributes(&fa, fn);
    if (fe != cudaSuccess) return cudaGetErrorString(fe);
    if (fa.binaryVersion < 80) {
      plan->reason = "this build has no sm_80+ code for the device (TORCH_CUDA_ARCH_LIST without 8.0 or newer)";
      return nullptr;
    }
    cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, info.smem_optin);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    attr = true;
  }
  const int epw = dt == DType::kFloat32 ? 1 : 2;
  const int dir_options[2] = {D, 1};
  for (int oi = 0; oi < (D == 2 ? 2 : 1); ++oi) {
    const int dirs = dir_options[oi];
    for (int hc = 4; hc <= 32; hc *= 2) {
      const Geo geo = backward ? bwd_geo(hc, H, B, epw) : fwd_geo(hc, H, B, epw);
      const int ctas = (H + hc - 1) / hc;
      const size_t smem = geo.total();
      if (smem > static_cast<size_t>(info.smem_optin)) continue;
      int per_sm = 0;
      cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, smem);
      if (e != cudaSuccess) return cudaGetErrorString(e);
      if (per_sm < 1 || static_cast<long>(per_sm) * info.sms < static_cast<long>(ctas) * dirs) continue;
      plan->ok = true;
      plan->hc = hc;
      plan->ctas_per_dir = ctas;
      plan->dirs_per_launch = dirs;
      plan->smem_bytes = smem;
      g_plans[key] = *plan;
      return nullptr;
    }
  }
  plan->reason = "W_hh does not fit in the shared memory of a co-resident grid for this H and dtype";
  g_plans[key] = *plan;
  return nullptr;
}

const char* lstm_persistent_fwd(DType dt, const PersistentFwdArgs& a, const PersistentPlan& plan, cudaStream_t s) {
  return launch_persistent<false>(dt, a, plan, s, "fastmtl: lstm_persistent_fwd called without a valid plan");
}

const char* lstm_persistent_bwd(DType dt, const PersistentBwdArgs& a, const PersistentPlan& plan, cudaStream_t s) {
  return launch_persistent<true>(dt, a, plan, s, "fastmtl: lstm_persistent_bwd called without a valid plan");
}

}  // namespace cuda
}  // namespace fastmtl
