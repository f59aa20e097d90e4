// float32 GEMM for AVX2 + FMA (function attributes only: see simd_math.h): a register tile of 6 rows x 16 columns
// (12 accumulators).
#include "gemm.h"

#ifdef FASTMTL_X86_KERNELS
#include "gemm_impl.h"
FASTMTL_DEFINE_GEMM_KERNELS(avx2, 32, 6, 2, 144, 256, 2048, true, FASTMTL_TARGET_AVX2)
#else
namespace fastmtl {
namespace cpu_kernels {
const GemmKernels* gemm_kernels_avx2() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
