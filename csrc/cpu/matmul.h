// Tensor-level GEMM of the CPU ops (LSTM, heads): fastmtl's own float32 GEMM (kernels/gemm.h) where it beats
// torch's BLAS on this CPU (cpu::use_own_gemm_f32), ATen's otherwise. Implemented in gemm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastmtl {
namespace cpu {
// c = beta * c + a @ b for 2-D CPU tensors of one dtype (possibly strided views with one unit stride each; c with
// a unit column stride for the own GEMM); beta is 0 or 1. Fewer than min_own_rows rows of c go to ATen.
void matmul_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, float beta,
                 int64_t min_own_rows = 0);

// The LSTM's input projection X (m x I) @ W_ih^T (I x 4H) runs on the own GEMM only from this many rows: it packs
// all of W_ih per call, which a few rows do not repay. Measured on an AMD EPYC Zen 4 (1 thread, torch 2.13's BLAS),
// I = 192, 4H = 2048: 1.54x torch's time at 32 rows, 1.10x at 128, 1.05x at 256, 0.88x at 704 (I = 512: 1.68x,
// 1.24x, 1.00x, 0.96x). The heads' GEMMs keep the own kernel from one register tile of rows (their weight
// gradients, C rows of classes, measured 3-24 % faster with it there).
constexpr int64_t kInputProjectionMinRows = 256;
}  // namespace cpu
}  // namespace fastmtl
