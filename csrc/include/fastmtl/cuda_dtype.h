// The element type of the tensors that the CUDA launchers (fastmtl/cuda_*.h) read and write: one code for every op.
// The glue maps a tensor's scalar type to it (csrc/cuda/glue_common.h, kernel_dtype); each launcher says which codes
// it takes (LSTM: all four, persistent LSTM: not float64; heads: float32, float16, bfloat16; CRF: float32, float64).
// No torch and no CUDA headers: the .cu files, the glue and the host emulation of the kernels all include it.
#pragma once

namespace fastmtl {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

}  // namespace cuda
}  // namespace fastmtl
