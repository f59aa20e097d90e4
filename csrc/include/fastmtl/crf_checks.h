// Argument checks of the linear-chain CRF ops (crf_nll_fwd, crf_nll_bwd, crf_decode, crf_marginals), shared by the
// CPU op (csrc/cpu/crf.cpp) and the CUDA glue (csrc/cuda/crf_glue.cpp): the same checks, in the same order, with
// the same messages. Shapes, dtypes and devices here; the values of lengths and tags by check_crf_values.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <optional>

#include "fastmtl/checks.h"

namespace fastmtl {

struct CrfDims {
  int64_t B, T, C;
};

// emissions (B, T, C) floating; tags (B, T) int64 (when given); lengths (B,) int64; transitions (C, C) [from, to],
// start (C,), end (C,) of emissions' dtype; allowed (C, C), allowed_start (C,), allowed_end (C,) bool or None.
// Everything on emissions' device.
inline CrfDims check_crf_args(const char* op, const at::Tensor& emissions, const at::Tensor* tags,
                              const at::Tensor& lengths, const at::Tensor& transitions, const at::Tensor& start,
                              const at::Tensor& end, const std::optional<at::Tensor>& allowed,
                              const std::optional<at::Tensor>& allowed_start,
                              const std::optional<at::Tensor>& allowed_end) {
  FASTMTL_CHECK_VALUE(emissions.dim() == 3, op, ": emissions must have shape (B, T, C) (batch first), got shape ",
                      shape_str(emissions));
  const auto dt = emissions.scalar_type();
  FASTMTL_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
                     ": emissions must be float32, float64, bfloat16 or float16, got ", dt);
  const int64_t B = emissions.size(0), T = emissions.size(1), C = emissions.size(2);
  FASTMTL_CHECK_VALUE(C >= 1, op, ": emissions must have at least one tag (C >= 1), got shape ", shape_str(emissions));
  const auto dev = emissions.device();
  if (tags != nullptr) {
    FASTMTL_CHECK_TYPE(tags->scalar_type() == at::kLong, op, ": tags must be int64, got ", tags->scalar_type());
    FASTMTL_CHECK_VALUE(tags->dim() == 2 && tags->size(0) == B && tags->size(1) == T, op,
                        ": tags must have shape (B, T) = (", B, ", ", T, ") like emissions, got ", shape_str(*tags));
    FASTMTL_CHECK_VALUE(tags->device() == dev, op, ": tags is on ", tags->device(), " but emissions is on ", dev);
  }
  FASTMTL_CHECK_TYPE(lengths.scalar_type() == at::kLong, op, ": lengths must be int64, got ", lengths.scalar_type());
  FASTMTL_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == B, op, ": lengths must have shape (B,) = (", B,
                      ",), got ", shape_str(lengths));
  FASTMTL_CHECK_VALUE(lengths.device() == dev, op, ": lengths is on ", lengths.device(), " but emissions is on ", dev);
  struct P {
    const at::Tensor* t;
    const char* name;
    bool square;
  };
  for (const P& p : {P{&transitions, "transitions", true}, P{&start, "start", false}, P{&end, "end", false}}) {
    if (p.square) {
      FASTMTL_CHECK_VALUE(p.t->dim() == 2 && p.t->size(0) == C && p.t->size(1) == C, op, ": ", p.name,
                          " must have shape (C, C) = (", C, ", ", C, ") [from, to] for emissions of shape ",
                          shape_str(emissions), ", got ", shape_str(*p.t));
    } else {
      FASTMTL_CHECK_VALUE(p.t->dim() == 1 && p.t->size(0) == C, op, ": ", p.name, " must have shape (C,) = (", C,
                          ",) for emissions of shape ", shape_str(emissions), ", got ", shape_str(*p.t));
    }
    FASTMTL_CHECK_TYPE(p.t->scalar_type() == dt, op, ": ", p.name, " has dtype ", p.t->scalar_type(),
                       " but emissions has dtype ", dt, "; they must match");
    FASTMTL_CHECK_VALUE(p.t->device() == dev, op, ": ", p.name, " is on ", p.t->device(), " but emissions is on ",
                        dev);
  }
  struct M {
    const std::optional<at::Tensor>* t;
    const char* name;
    bool square;
  };
  for (const M& m : {M{&allowed, "allowed", true}, M{&allowed_start, "allowed_start", false},
                     M{&allowed_end, "allowed_end", false}}) {
    if (!m.t->has_value() || !(*m.t)->defined()) continue;
    const at::Tensor& t = **m.t;
    FASTMTL_CHECK_TYPE(t.scalar_type() == at::kBool, op, ": ", m.name, " must be a bool mask, got ", t.scalar_type());
    if (m.square) {
      FASTMTL_CHECK_VALUE(t.dim() == 2 && t.size(0) == C && t.size(1) == C, op, ": ", m.name,
                          " must have shape (C, C) = (", C, ", ", C, ") [from, to], got ", shape_str(t));
    } else {
      FASTMTL_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, op, ": ", m.name, " must have shape (C,) = (", C,
                          ",), got ", shape_str(t));
    }
    FASTMTL_CHECK_VALUE(t.device() == dev, op, ": ", m.name, " is on ", t.device(), " but emissions is on ", dev);
  }
  return {B, T, C};
}

// Values on the host: every length in [0, T]; every tag at a real position (t < lengths[b]) in [0, C).
inline void check_crf_values(const char* op, const CrfDims& d, const int64_t* len, const int64_t* tags) {
  for (int64_t b = 0; b < d.B; ++b) {
    FASTMTL_CHECK_VALUE(len[b] >= 0 && len[b] <= d.T, op, ": lengths[", b, "] = ", len[b],
                        " is outside [0, T] = [0, ", d.T, "]");
  }
  if (tags == nullptr) return;
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t t = 0; t < len[b]; ++t) {
      const int64_t y = tags[b * d.T + t];
      TORCH_CHECK_INDEX(y >= 0 && y < d.C, "fastmtl: ", op, ": tags[", b, ", ", t, "] = ", y,
                        " is outside [0, C) = [0, ", d.C, ") (positions t < lengths[b] must hold a valid tag)");
    }
  }
}

// The effective parameters in the compute dtype `ct` (float32 for float32/bfloat16/float16, float64 for float64),
// contiguous: a forbidden transition / start / end (mask false) scores -inf, so no path through it has any weight.
struct CrfEffective {
  at::Tensor trans, start, end;
};

inline CrfEffective crf_effective(const at::Tensor& transitions, const at::Tensor& start, const at::Tensor& end,
                                  const std::optional<at::Tensor>& allowed,
                                  const std::optional<at::Tensor>& allowed_start,
                                  const std::optional<at::Tensor>& allowed_end, at::ScalarType ct) {
  auto apply = [&](const at::Tensor& x, const std::optional<at::Tensor>& m) {
    at::Tensor y = x.to(ct).contiguous();
    if (m.has_value() && m->defined()) y = y.masked_fill(m->logical_not(), -std::numeric_limits<double>::infinity());
    return y.contiguous();
  };
  return {apply(transitions, allowed), apply(start, allowed_start), apply(end, allowed_end)};
}

inline at::ScalarType crf_compute_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace fastmtl
