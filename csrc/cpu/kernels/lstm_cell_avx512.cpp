// LSTM recurrent-step kernels for AVX-512 (F, BW, DQ, VL) with 512-bit vectors (function attributes only: see simd_math.h).
#include "lstm_cell.h"

#ifdef FASTMTL_X86_KERNELS
#include "lstm_cell_impl.h"
FASTMTL_DEFINE_LSTM_CELL_KERNELS(avx512, 64, 6, FASTMTL_TARGET_AVX512)
#else
namespace fastmtl {
namespace cpu_kernels {
const LstmCellKernels* lstm_cell_kernels_avx512() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
