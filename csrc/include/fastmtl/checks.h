// Argument checks with clear messages. Every message names the argument, what it got and what was expected,
// and surfaces in Python as ValueError (FASTMTL_CHECK_VALUE), TypeError (FASTMTL_CHECK_TYPE) or RuntimeError.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

#define FASTMTL_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, "fastmtl: ", __VA_ARGS__)
#define FASTMTL_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, "fastmtl: ", __VA_ARGS__)
#define FASTMTL_CHECK(cond, ...) TORCH_CHECK(cond, "fastmtl: ", __VA_ARGS__)

namespace fastmtl {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  FASTMTL_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", shape_str(t));
}

inline void check_floating(const at::Tensor& t, const char* name) {
  FASTMTL_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ",
                     t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  FASTMTL_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
                     " has dtype ", ref.scalar_type(), "; they must match");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  FASTMTL_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                      ref.device(), "; they must be on the same device");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  FASTMTL_CHECK_VALUE(t.sizes() == expected, name, " must have shape ", expected, ", got ", shape_str(t));
}

}  // namespace fastmtl
