// Linear-chain CRF step loops for avx512 (function attributes only: see simd_math.h).
#include "crf.h"

#ifdef FASTMTL_X86_KERNELS
#include "crf_impl.h"
FASTMTL_DEFINE_CRF_KERNELS(avx512, 64, FASTMTL_TARGET_AVX512)
#else
namespace fastmtl {
namespace cpu_kernels {
const CrfKernels* crf_kernels_avx512() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
