// fastmtl's own float32 GEMM for the large GEMMs of the CPU LSTM op (csrc/cpu/lstm.cpp: the input projection over
// all steps, the weight gradients and the input gradient), one set per instruction set (gemm_<isa>.cpp), chosen at
// run time (fastmtl/cpu_isa.h).
//
// Row-major C (m x n, ldc) = op(A) @ op(B) (+ C when beta = 1): op(A) = A^T with A stored (k x m, lda) when
// trans_a, else A (m x k, lda); op(B) = B^T with B stored (n x k, ldb) when trans_b, else B (k x n, ldb). Every
// operand has its last dimension contiguous; the leading dimensions are arbitrary (strided views of the caller's
// buffers, e.g. one direction's columns of the packed gate gradients).
//
// BLIS-style: the k dimension in blocks of KC, op(B) of a KC x NC block packed into NR-column panels (kept in
// L3/L2, a micro-panel of KC x NR in L1), op(A) of an MC x KC block packed into MR-row panels (kept in L2), and a
// register-blocked micro-kernel of MR x NR accumulators (one broadcast of an A value and NR/W FMAs per row and k
// step against a packed B row of NR values). Partial tiles at the edges are computed into a register tile of
// zero-padded panels and added to C for the valid part only.
//
// A call computes one rectangle [m0, m1) x [n0, n1) of C with its own packing workspace, so the caller
// (fastmtl::cpu::gemm_f32, csrc/cpu/gemm.cpp) splits C over threads without synchronisation.
#pragma once

#include <cstdint>

#include "fastmtl/cpu_isa.h"

namespace fastmtl {
namespace cpu_kernels {

struct GemmF32 {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  int64_t lda = 0;
  const float* b = nullptr;
  int64_t ldb = 0;
  float beta = 0.f;  // 0 (C is overwritten, never read) or 1 (C += op(A) op(B))
  float* c = nullptr;
  int64_t ldc = 0;
  int64_t mc = 0, kc = 0, nc = 0;  // cache blocking: the table's (GemmKernels) unless tuning
};

struct GemmKernels {
  int mr, nr;              // register tile: MR rows x NR columns of C
  int64_t mc, kc, nc;      // cache blocking (MC a multiple of MR, NC a multiple of NR)
  // Whether this ISA's kernel was measured faster than torch's BLAS for the LSTM op's large float32 GEMMs (the
  // op uses it only then; the test entry fastmtl._C._gemm_f32_for_tests always runs it).
  bool beats_blas;
  // C[m0:m1, n0:n1] of the product (k >= 1), blocked by g.mc/kc/nc (> 0). ws: gemm_workspace_floats(g) floats,
  // 64-byte aligned.
  void (*gemm_f32)(const GemmF32&, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* ws);
};

// Packing workspace of one call: the A block (MC x KC) and the B block (KC x NC), each rounded up to whole panels.
inline int64_t gemm_workspace_floats(const GemmF32& g, int mr, int nr) {
  return ((g.mc + mr - 1) / mr * mr) * g.kc + ((g.nc + nr - 1) / nr * nr) * g.kc + 64;
}

// One table per ISA file; nullptr when the ISA is not compiled into this build.
const GemmKernels* gemm_kernels_scalar();
const GemmKernels* gemm_kernels_avx2();
const GemmKernels* gemm_kernels_avx512();

// The table of cpu::active_isa().
const GemmKernels& gemm_kernels();

}  // namespace cpu_kernels

namespace cpu {
// Whether the CPU ops (LSTM, heads) should run a float32 GEMM of this size through gemm_f32 rather than ATen: the
// active ISA's kernel beats torch's BLAS (GemmKernels::beats_blas) and the product is large enough.
bool use_own_gemm_f32(int64_t m, int64_t n, int64_t k);
// Row-major C (m x n, ldc) = op(A) @ op(B) + beta * C (beta 0 or 1; see the top of this file) with the active ISA's
// kernel, split over at::get_num_threads() threads when it is large (one thread inside a parallel region).
void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
              const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
}  // namespace cpu
}  // namespace fastmtl
