// LSTM recurrent-step kernels for the baseline instruction set (every CPU; the compiler may still vectorise them with the
// baseline's vector unit, SSE2 on x86-64 or NEON on aarch64).
#include "lstm_cell_impl.h"

FASTMTL_DEFINE_LSTM_CELL_KERNELS(scalar, 16, 3, )
