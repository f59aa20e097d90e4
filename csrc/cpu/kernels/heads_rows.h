// The cross-entropy row pass of the CPU heads op (csrc/cpu/heads.cpp), one per instruction set
// (heads_rows_<isa>.cpp), chosen at run time (fastmtl/cpu_isa.h).
//
// For rows [rb, re) of a chunk of logits (row r at L + r * ld) and the tasks sharing the chunk, one pass per row
// and task: max, logsumexp, the item loss (into row_losses[r * nt + j]) and, with write_grad, the scaled
// gradient of the logits written in place over them (formulas: fastmtl/heads_math.h). Row r of the chunk is
// source row row0 + r; its target index is rowpos[row0 + r] (token positions b*T + t) or row0 + r.
#pragma once

#include <cstdint>

#include "fastmtl/cpu_isa.h"

namespace fastmtl {
namespace cpu_kernels {

template <typename T>
struct SegTask {
  int64_t offset;    // first column of this task in the segment's logits
  int64_t C;         // classes
  const int64_t* tgt;
  int64_t ignore;
  const T* cw;       // class weights or nullptr
  T sum_w;           // sum of class weights (C without)
  T eps;             // label smoothing
  T scale;           // lambda_k / N_k
  bool active;       // N_k > 0
};

template <typename T>
using XentRowsFn = void (*)(T* L, int64_t ld, int64_t rb, int64_t re, int64_t row0, const int64_t* rowpos,
                            const SegTask<T>* st, int64_t nt, bool write_grad, double* row_losses);

struct HeadsRowKernels {
  XentRowsFn<float> xent_f32;
  XentRowsFn<double> xent_f64;
};

// One table per ISA file; nullptr when the ISA is not compiled into this build.
const HeadsRowKernels* heads_row_kernels_scalar();
const HeadsRowKernels* heads_row_kernels_avx2();
const HeadsRowKernels* heads_row_kernels_avx512();

// The table of cpu::active_isa().
const HeadsRowKernels& heads_row_kernels();

}  // namespace cpu_kernels
}  // namespace fastmtl
