// LSTM cell formulas shared by the CPU and CUDA kernels (host/device inline).
//
// Gate order i, f, g, o (torch.nn.LSTM). Pre-activations already hold x W_ih^T + h W_hh^T + b_ih + b_hh.
// The functions are templates over the value type V (a scalar, or a SIMD vector type on the CPU) and an
// activation policy Act providing sigmoid(V) and tanh(V), so both backends use the very same algebra.
// The CPU kernels (csrc/cpu/kernels) instantiate them with the compilers' vector types inside per-ISA entry points.
#pragma once

#include <cmath>

#include "fastmtl/host_device.h"

namespace fastmtl {
namespace lstm_math {

// Scalar activations (host: std::, device: CUDA math overloads).
struct ScalarAct {
  template <typename T>
  FASTMTL_HD static T sigmoid(T x) {
#if defined(__CUDA_ARCH__)
    return T(1) / (T(1) + exp(-x));
#else
    return T(1) / (T(1) + std::exp(-x));
#endif
  }
  template <typename T>
  FASTMTL_HD static T tanh(T x) {
#if defined(__CUDA_ARCH__)
    return ::tanh(x);
#else
    return std::tanh(x);
#endif
  }
};

// Forward cell: activated gates and the new (c, h).
//   i = s(pi), f = s(pf), g = tanh(pg), o = s(po), c = f c_prev + i g, h = o tanh(c)
template <typename Act, typename V>
FASTMTL_HD void cell_forward(const V& pi, const V& pf, const V& pg, const V& po, const V& c_prev, V& i, V& f,
                             V& g, V& o, V& c, V& h) {
  i = Act::sigmoid(pi);
  f = Act::sigmoid(pf);
  g = Act::tanh(pg);
  o = Act::sigmoid(po);
  c = f * c_prev + i * g;
  h = o * Act::tanh(c);
}

// Backward cell: given the saved activated gates (i, f, g, o), the cell state c and the previous cell state,
// the incoming gradient dh of h_t (from the output and the next step) and dc_next (from the next step),
// returns the pre-activation gradients and dc_prev.
template <typename Act, typename V>
FASTMTL_HD void cell_backward(const V& i, const V& f, const V& g, const V& o, const V& c, const V& c_prev,
                              const V& dh, const V& dc_next, const V& one, V& di, V& df, V& dg, V& do_,
                              V& dc_prev) {
  V tc = Act::tanh(c);
  V dc = dc_next + dh * o * (one - tc * tc);
  do_ = dh * tc * o * (one - o);
  di = dc * g * i * (one - i);
  dg = dc * i * (one - g * g);
  df = dc * c_prev * f * (one - f);
  dc_prev = dc * f;
}

}  // namespace lstm_math
}  // namespace fastmtl
