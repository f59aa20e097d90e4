// Cross-entropy row pass for AVX-512 (F, BW, DQ, VL) with 512-bit vectors (function attributes only: see simd_math.h).
#include "heads_rows.h"

#ifdef FASTMTL_X86_KERNELS
#include "heads_rows_impl.h"
FASTMTL_DEFINE_HEADS_ROW_KERNELS(avx512, 64, FASTMTL_TARGET_AVX512)
#else
namespace fastmtl {
namespace cpu_kernels {
const HeadsRowKernels* heads_row_kernels_avx512() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
