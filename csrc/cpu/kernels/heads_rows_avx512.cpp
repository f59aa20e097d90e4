// Cross-entropy row pass for AVX-512 (F, BW, DQ, VL) with 512-bit vectors (function attributes only: see simd_math.h).
#include "heads_rows.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64)) && !defined(_MSC_VER)
#include "heads_rows_impl.h"
#if defined(__clang__)
#define FASTMTL_AVX512_ATTR \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"), min_vector_width(512)))
#else
#define FASTMTL_AVX512_ATTR \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")))
#endif
FASTMTL_DEFINE_HEADS_ROW_KERNELS(avx512, 64, FASTMTL_AVX512_ATTR)
#else
namespace fastmtl {
namespace cpu_kernels {
const HeadsRowKernels* heads_row_kernels_avx512() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
