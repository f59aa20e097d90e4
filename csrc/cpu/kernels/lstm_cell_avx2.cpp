// LSTM cell passes for AVX2 + FMA (function attributes only: see simd_math.h).
#include "lstm_cell.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64)) && !defined(_MSC_VER)
#include "lstm_cell_impl.h"
FASTMTL_DEFINE_LSTM_CELL_KERNELS(avx2, 32, __attribute__((target("avx2,fma"))))
#else
namespace fastmtl {
namespace cpu_kernels {
const LstmCellKernels* lstm_cell_kernels_avx2() { return nullptr; }
}  // namespace cpu_kernels
}  // namespace fastmtl
#endif
