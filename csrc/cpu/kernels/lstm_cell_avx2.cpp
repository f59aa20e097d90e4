// LSTM recurrent-step kernels for AVX2 + FMA (function attributes only: see simd_math.h).
#include "lstm_cell.h"

#ifdef FASTMTL_X86_KERNELS
#include "lstm_cell_impl.h"
FASTMTL_DEFINE_LSTM_CELL_KERNELS(avx2, 32, 3, FASTMTL_TARGET_AVX2)
#else
namespace fastmtl {
namespace cpu_kernels {
const LstmCellKernels* lstm_cell_kernels_avx2() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
