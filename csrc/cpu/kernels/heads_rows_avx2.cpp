// Cross-entropy row pass for AVX2 + FMA (function attributes only: see simd_math.h).
#include "heads_rows.h"

#ifdef FASTMTL_X86_KERNELS
#include "heads_rows_impl.h"
FASTMTL_DEFINE_HEADS_ROW_KERNELS(avx2, 32, FASTMTL_TARGET_AVX2)
#else
namespace fastmtl {
namespace cpu_kernels {
const HeadsRowKernels* heads_row_kernels_avx2() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
