// Tensor-level GEMM of the CPU ops (LSTM, heads): fastmtl's own float32 GEMM (kernels/gemm.h) where it beats
// torch's BLAS on this CPU (cpu::use_own_gemm_f32), ATen's otherwise. Implemented in gemm.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastmtl {
namespace cpu {
// c = beta * c + a @ b for 2-D CPU tensors of one dtype (possibly strided views with one unit stride each; c with
// a unit column stride for the own GEMM); beta is 0 or 1.
void matmul_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, float beta);
}  // namespace cpu
}  // namespace fastmtl
