// Linear-chain CRF step loops for avx2 (function attributes only: see simd_math.h).
#include "crf.h"

#ifdef FASTMTL_X86_KERNELS
#include "crf_impl.h"
FASTMTL_DEFINE_CRF_KERNELS(avx2, 32, FASTMTL_TARGET_AVX2)
#else
namespace fastmtl {
namespace cpu_kernels {
const CrfKernels* crf_kernels_avx2() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
