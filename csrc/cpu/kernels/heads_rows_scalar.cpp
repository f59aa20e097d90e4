// Cross-entropy row pass for the baseline instruction set (every CPU; the compiler may still vectorise them with the
// baseline's vector unit, SSE2 on x86-64 or NEON on aarch64).
#include "heads_rows_impl.h"

FASTMTL_DEFINE_HEADS_ROW_KERNELS(scalar, 16, )
