// The LSTM cell passes of the CPU op (csrc/cpu/lstm.cpp), one set per instruction set (lstm_cell_<isa>.cpp),
// chosen at run time (fastmtl/cpu_isa.h).
//
// Per step everything is kept "transposed" (hidden unit j major, batch b minor), because the recurrent GEMM runs
// fastest as gates^T (4H x n) = W_hh (4H x H) @ h^T (H x n): the weights are the large left operand and the few
// active rows the small right one. A kernel call handles hidden units [j0, j1) for the n active sequences
// (vectorised along b).
#pragma once

#include <cstdint>

#include "fastmtl/cpu_isa.h"

namespace fastmtl {
namespace cpu_kernels {

template <typename T>
struct FwdCols {
  const T* gates;    // pre-activation of gate k (i, f, g, o), unit j, sequence b: gates[(k*H + j) * g_ld + b]
  int64_t g_ld;
  const T* bias;     // 4H combined bias b_ih + b_hh, or nullptr
  T* h;              // running h^T, c^T: [j * s_ld + b], updated in place
  T* c;
  int64_t s_ld;
  T* reserve;        // this step's (5H x B) block: [(k*H + j) * B + b], k = i, f, g, o, c; or nullptr
  T* out;            // output row of sequence b: out + b * out_ld (H values of this direction)
  int64_t out_ld;
  int64_t H, n, B;
};

template <typename T>
struct BwdCols {
  const T* reserve;  // this step's (5H x B) block
  const T* cp_a;     // c_prev^T of sequences b < split: cp_a[j * B + b]
  const T* cp_b;     // c_prev^T of sequences b >= split (the initial cell state): cp_b[j * B + b]
  int64_t split;
  const T* gout;     // gradient of this step's output, transposed: gout[j * B + b]
  T* dh;             // running dL/dh^T, dL/dc^T: [j * B + b]; dc becomes dL/dc_prev
  T* dc;
  T* dgates;         // [(k*H + j) * g_ld + b]
  int64_t g_ld;
  int64_t H, n, B;
};

struct LstmCellKernels {
  void (*fwd_f32)(const FwdCols<float>&, int64_t j0, int64_t j1);
  void (*fwd_f64)(const FwdCols<double>&, int64_t j0, int64_t j1);
  void (*bwd_f32)(const BwdCols<float>&, int64_t j0, int64_t j1);
  void (*bwd_f64)(const BwdCols<double>&, int64_t j0, int64_t j1);
};

// One table per ISA file; nullptr when the ISA is not compiled into this build.
const LstmCellKernels* lstm_cell_kernels_scalar();
const LstmCellKernels* lstm_cell_kernels_avx2();
const LstmCellKernels* lstm_cell_kernels_avx512();

// The table of cpu::active_isa().
const LstmCellKernels& lstm_cell_kernels();

}  // namespace cpu_kernels
}  // namespace fastmtl
