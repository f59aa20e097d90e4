// Host-side helpers shared by the CUDA glue files (crf_glue.cpp, heads_glue.cpp, lstm_glue.cpp): the kernels' dtype
// code of a tensor, the check of a launcher's result and the settings read from the environment.
#pragma once

#include <cstdlib>
#include <optional>

#include "fastmtl/checks.h"
#include "fastmtl/cuda_dtype.h"

namespace fastmtl {
namespace cuda_glue {

// The launchers' dtype code (fastmtl/cuda_dtype.h) of a scalar type; nullopt for one that no CUDA kernel takes.
inline std::optional<cuda::DType> kernel_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: return std::nullopt;
  }
}

// Raises a launcher's error string (nullptr: success) as a RuntimeError: "<what> failed: <error>".
inline void check_launch(const char* err, const char* what) { FASTMTL_CHECK(err == nullptr, what, " failed: ", err); }

// FASTMTL_GRID_BARRIER_TIMEOUT_S (seconds, default 10; 0 = wait forever) in nanoseconds: a persistent or fused
// kernel's grid barrier traps with the kernel's name after it.
inline unsigned long long barrier_timeout_ns() {
  const char* e = std::getenv("FASTMTL_GRID_BARRIER_TIMEOUT_S");
  if (e == nullptr || *e == '\0') return 10000000000ull;
  char* end = nullptr;
  const double v = std::strtod(e, &end);
  FASTMTL_CHECK_VALUE(end != e && *end == '\0' && v >= 0.0 && v < 1e9, "FASTMTL_GRID_BARRIER_TIMEOUT_S must be a ",
                      "number of seconds >= 0 (0: no timeout), got '", e, "'");
  return static_cast<unsigned long long>(v * 1e9);
}

}  // namespace cuda_glue
}  // namespace fastmtl
