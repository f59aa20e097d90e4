// CUDA LSTM, standard path: the fused per-step gate/cell kernels (forward and backward).
//
// The GEMMs (input projection for all steps, the per-step recurrent product on the active rows, the weight
// gradients after the loop) are issued by the torch glue (lstm_glue.cpp) through ATen/cuBLAS on the same stream;
// these kernels do everything elementwise between them in one pass. CUDA headers and csrc/include only.
//
// The cell formulas are the ones the CPU kernels use (fastmtl/lstm_math.h: cell_forward / cell_backward).
//
// Thread mapping: blockIdx.y = batch row b, threads over the hidden unit j (coalesced along j); each thread
// handles the four gates of one (b, j). Inactive (padding) rows write zeros where the contract wants zeros, so
// no separate memset is needed and every output element is written.
#include "lstm_common.cuh"

namespace fastmtl {
namespace cuda {
namespace {

using detail::ld;
using detail::Num;
using detail::st;

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ void fwd_one(const FwdStepArgs& a, int b, int j) {
  using A = typename Num<T>::acc;
  const int H = a.H;
  T* out = static_cast<T*>(a.out) + (int64_t)b * a.out_ld + j;
  T* res = a.reserve ? static_cast<T*>(a.reserve) + (int64_t)b * 5 * H + j : nullptr;
  if (b >= a.bt) {
    st(out, A(0));
    if (res) {
#pragma unroll
      for (int k = 0; k < 5; ++k) st(res + k * H, A(0));
    }
    return;
  }
  const T* xp = static_cast<const T*>(a.xproj) + (int64_t)b * a.xproj_ld + j;
  const A zi = ld(xp), zf = ld(xp + H), zg = ld(xp + 2 * H), zo = ld(xp + 3 * H);
  A* cs = static_cast<A*>(a.c_state) + (int64_t)b * H + j;
  A ig, fg, gg, og, c, h;
  lstm_math::cell_forward<detail::CudaAct>(zi, zf, zg, zo, *cs, ig, fg, gg, og, c, h);
  *cs = c;
  const T hs = Num<T>::store(h);
  static_cast<T*>(a.h_state)[(int64_t)b * H + j] = hs;
  *out = hs;
  if (res) {
    st(res, ig);
    st(res + H, fg);
    st(res + 2 * H, gg);
    st(res + 3 * H, og);
    st(res + 4 * H, c);
  }
}

// Gradient row b; the saved forward values (reserve, c_{t-1}, h_{t-1}, hx, cx, hprev) are those of forward row
// b / rep (BwdStepArgs).
template <typename T>
__device__ __forceinline__ void bwd_one(const BwdStepArgs& a, int b, int j) {
  using A = typename Num<T>::acc;
  const int H = a.H;
  const int64_t bh = (int64_t)b * H + j;
  const int fb = a.rep == 1 ? b : b / a.rep;         // the forward row of gradient row b
  const bool own_hp = a.rep == 1 || b % a.rep == 0;  // one gradient row per forward row writes hprev
  const int64_t fbh = (int64_t)fb * H + j;
  T* dg = static_cast<T*>(a.dgates) + (int64_t)b * a.dgates_ld + j;
  T* hp = static_cast<T*>(a.hprev) + fbh;
  A* dcs = static_cast<A*>(a.dc_state) + bh;
  const A* dhrec = static_cast<const A*>(a.dhrec);
  if (b >= a.bt) {
    if (b < a.n_prev) {  // this row's first forward step was the previously processed one
      st(static_cast<T*>(a.grad_hx) + bh, dhrec[bh]);
      st(static_cast<T*>(a.grad_cx) + bh, *dcs);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) st(dg + k * H, A(0));
    if (own_hp) st(hp, A(0));
    return;
  }
  const T* r = static_cast<const T*>(a.res) + (int64_t)fb * 5 * H + j;
  const A ig = ld(r), fg = ld(r + H), gg = ld(r + 2 * H), og = ld(r + 3 * H), c = ld(r + 4 * H);
  A c_prev;
  T h_prev;
  if (b < a.n_cprev) {
    c_prev = ld(static_cast<const T*>(a.res_prev) + (int64_t)fb * 5 * H + 4 * H + j);
    h_prev = static_cast<const T*>(a.hsrc)[(int64_t)fb * a.hsrc_ld + j];
  } else {
    c_prev = ld(static_cast<const T*>(a.cx) + fbh);
    h_prev = static_cast<const T*>(a.hx)[fbh];
  }
  A dh = ld(static_cast<const T*>(a.grad_out) + (int64_t)b * a.grad_out_ld + j);
  A dc;
  if (b < a.n_prev) {
    dh += dhrec[bh];
    dc = *dcs;
  } else {
    dh += ld(static_cast<const T*>(a.grad_hy) + bh);
    dc = ld(static_cast<const T*>(a.grad_cy) + bh);
  }
  A d_i, d_f, d_g, d_o, dc_prev;
  lstm_math::cell_backward<detail::CudaAct>(ig, fg, gg, og, c, c_prev, dh, dc, A(1), d_i, d_f, d_g, d_o, dc_prev);
  *dcs = dc_prev;
  st(dg, d_i);
  st(dg + H, d_f);
  st(dg + 2 * H, d_g);
  st(dg + 3 * H, d_o);
  if (own_hp) *hp = h_prev;
}

// Rows are grid-strided over blockIdx.y (gridDim.y is capped at 65535).
template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_step_kernel(FwdStepArgs a) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= a.H) return;
  for (int b = blockIdx.y; b < a.B; b += gridDim.y) fwd_one<T>(a, b, j);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_step_kernel(BwdStepArgs a) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= a.H) return;
  for (int b = blockIdx.y; b < a.B; b += gridDim.y) bwd_one<T>(a, b, j);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_finish_kernel(const typename Num<T>::acc* dhrec,
                                                              const typename Num<T>::acc* dcs,
                                                              T* ghx, T* gcx, int n_prev, int H) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= H) return;
  for (int b = blockIdx.y; b < n_prev; b += gridDim.y) {
    const int64_t bh = (int64_t)b * H + j;
    st(ghx + bh, dhrec[bh]);
    st(gcx + bh, dcs[bh]);
  }
}

inline dim3 grid_for(int H, int rows) {
  return dim3((unsigned)((H + kThreads - 1) / kThreads), (unsigned)(rows < 65535 ? rows : 65535));
}

template <typename T>
const char* fwd_step_impl(const FwdStepArgs& a, cudaStream_t s) {
  if (a.B <= 0 || a.H <= 0) return nullptr;
  fwd_step_kernel<T><<<grid_for(a.H, a.B), kThreads, 0, s>>>(a);
  return detail::last_error();
}
template <typename T>
const char* bwd_step_impl(const BwdStepArgs& a, cudaStream_t s) {
  if (a.B <= 0 || a.H <= 0) return nullptr;
  bwd_step_kernel<T><<<grid_for(a.H, a.B), kThreads, 0, s>>>(a);
  return detail::last_error();
}
template <typename T>
const char* bwd_finish_impl(const void* dhrec, const void* dcs, void* ghx, void* gcx, int n_prev, int H,
                            cudaStream_t s) {
  if (n_prev <= 0 || H <= 0) return nullptr;
  bwd_finish_kernel<T><<<grid_for(H, n_prev), kThreads, 0, s>>>(
      static_cast<const typename Num<T>::acc*>(dhrec), static_cast<const typename Num<T>::acc*>(dcs),
      static_cast<T*>(ghx),
      static_cast<T*>(gcx), n_prev, H);
  return detail::last_error();
}

const char* kBadDtype = "fastmtl: unsupported dtype in the CUDA LSTM kernels";

}  // namespace

const char* lstm_fwd_step(DType dt, const FwdStepArgs& a, cudaStream_t s) {
  switch (dt) {
    case DType::kFloat32: return fwd_step_impl<float>(a, s);
    case DType::kFloat64: return fwd_step_impl<double>(a, s);
    case DType::kBFloat16: return fwd_step_impl<__nv_bfloat16>(a, s);
    case DType::kFloat16: return fwd_step_impl<__half>(a, s);
  }
  return kBadDtype;
}

const char* lstm_bwd_step(DType dt, const BwdStepArgs& a, cudaStream_t s) {
  switch (dt) {
    case DType::kFloat32: return bwd_step_impl<float>(a, s);
    case DType::kFloat64: return bwd_step_impl<double>(a, s);
    case DType::kBFloat16: return bwd_step_impl<__nv_bfloat16>(a, s);
    case DType::kFloat16: return bwd_step_impl<__half>(a, s);
  }
  return kBadDtype;
}

const char* lstm_bwd_finish(DType dt, const void* dhrec, const void* dcs, void* ghx, void* gcx, int n_prev, int H,
                            cudaStream_t s) {
  switch (dt) {
    case DType::kFloat32: return bwd_finish_impl<float>(dhrec, dcs, ghx, gcx, n_prev, H, s);
    case DType::kFloat64: return bwd_finish_impl<double>(dhrec, dcs, ghx, gcx, n_prev, H, s);
    case DType::kBFloat16: return bwd_finish_impl<__nv_bfloat16>(dhrec, dcs, ghx, gcx, n_prev, H, s);
    case DType::kFloat16: return bwd_finish_impl<__half>(dhrec, dcs, ghx, gcx, n_prev, H, s);
  }
  return kBadDtype;
}

}  // namespace cuda
}  // namespace fastmtl
