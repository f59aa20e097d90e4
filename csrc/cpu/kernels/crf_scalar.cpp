// Linear-chain CRF step loops for the baseline instruction set (every CPU; 16-byte vectors: SSE2 on x86-64, NEON on
// aarch64), and the run-time choice among the ISA tables.
#include "crf_impl.h"

FASTMTL_DEFINE_CRF_KERNELS(scalar, 16, )

namespace fastmtl {
namespace cpu_kernels {
const CrfKernels& crf_kernels() {
  return cpu::select_kernels(crf_kernels_scalar(), crf_kernels_avx2(), crf_kernels_avx512());
}
}  // namespace cpu_kernels
}  // namespace fastmtl
