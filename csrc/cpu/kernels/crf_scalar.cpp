// Linear-chain CRF step loops for the baseline instruction set (every CPU; 16-byte vectors: SSE2 on x86-64, NEON on
// aarch64); the run-time choice among the ISA tables is in csrc/cpu/crf.cpp.
#include "crf_impl.h"

FASTMTL_DEFINE_CRF_KERNELS(scalar, 16, )
