// float32 GEMM for the baseline instruction set (every CPU; 128-bit vectors: SSE2 on x86-64, NEON on aarch64): a
// register tile of 4 rows x 8 columns. Slower than torch's BLAS, so the LSTM op keeps ATen here (beats_blas false);
// it is the reference the wider kernels are tested against and runs through fastmtl._C._gemm_f32_for_tests.
#include "gemm_impl.h"

FASTMTL_DEFINE_GEMM_KERNELS(scalar, 16, 4, 2, 128, 256, 1024, false, )
