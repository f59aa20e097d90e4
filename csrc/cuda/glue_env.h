// Host-side settings of the CUDA glue read from the environment, shared by heads_glue.cpp and lstm_glue.cpp.
#pragma once

#include <cstdlib>

#include "fastmtl/checks.h"

namespace fastmtl {
namespace cuda_glue {

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
