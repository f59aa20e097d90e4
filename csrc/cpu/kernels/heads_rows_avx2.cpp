// Cross-entropy row pass for AVX2 + FMA (function attributes only: see simd_math.h).
#include "heads_rows.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64)) && !defined(_MSC_VER)
#include "heads_rows_impl.h"
FASTMTL_DEFINE_HEADS_ROW_KERNELS(avx2, 32, __attribute__((target("avx2,fma"))))
#else
namespace fastmtl {
namespace cpu_kernels {
const HeadsRowKernels* heads_row_kernels_avx2() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
