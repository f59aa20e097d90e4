// float32 GEMM for AVX-512 (F, BW, DQ, VL) with 512-bit vectors (function attributes only: see simd_math.h):
// a register tile of 14 rows x 32 columns (28 accumulators).
#include "gemm.h"

#ifdef FASTMTL_X86_KERNELS
#include "gemm_impl.h"
FASTMTL_DEFINE_GEMM_KERNELS(avx512, 64, 14, 2, 336, 256, 2048, true, FASTMTL_TARGET_AVX512)
#else
namespace fastmtl {
namespace cpu_kernels {
const GemmKernels* gemm_kernels_avx512() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
