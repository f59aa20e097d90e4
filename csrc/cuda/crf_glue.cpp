// Torch glue of the CUDA linear-chain CRF kernels (csrc/cuda/crf.cu): argument checks (shared with the CPU op:
// fastmtl/crf_checks.h), device guard, current stream, compute-dtype conversion, effective parameters,
// TORCH_LIBRARY_IMPL(fastmtl, CUDA, m). Compiled only in CUDA builds.
//
// The values of lengths and tags are checked with the CPU op's messages on a host copy: one synchronisation per
// call (the kernels also clamp them, so nothing is read out of bounds whatever the values).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "fastmtl/checks.h"
#include "fastmtl/crf_checks.h"
#include "fastmtl/cuda_crf.h"
#include "glue_common.h"

namespace fastmtl {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
using cuda_glue::check_launch;

struct Prep {
  CrfDims d;
  at::ScalarType ct;
  cuda::DType dt;  // of ct
  Tensor em, len, tags;
  CrfEffective eff;
};

Prep prepare(const char* op, const Tensor& emissions, const Tensor* tags, const Tensor& lengths,
             const Tensor& transitions, const Tensor& start, const Tensor& end, const OptT& allowed,
             const OptT& allowed_start, const OptT& allowed_end) {
  Prep p;
  p.d = check_crf_args(op, emissions, tags, lengths, transitions, start, end, allowed, allowed_start, allowed_end);
  FASTMTL_CHECK_VALUE(emissions.is_cuda(), op, ": expected CUDA tensors, got ", emissions.device());
  p.len = lengths.contiguous();
  if (tags) p.tags = tags->contiguous();
  const Tensor len_h = p.len.cpu();
  const Tensor tags_h = tags ? p.tags.cpu() : Tensor();
  check_crf_values(op, p.d, len_h.const_data_ptr<int64_t>(), tags ? tags_h.const_data_ptr<int64_t>() : nullptr);
  p.ct = crf_compute_dtype(emissions.scalar_type());
  p.dt = *cuda_glue::kernel_dtype(p.ct);  // float32 or float64
  p.em = emissions.to(p.ct).contiguous();
  p.eff = crf_effective(transitions, start, end, allowed, allowed_start, allowed_end, p.ct);
  return p;
}

std::tuple<Tensor, Tensor, Tensor> crf_nll_fwd_cuda(const Tensor& emissions, const Tensor& tags,
                                                    const Tensor& lengths, const Tensor& transitions,
                                                    const Tensor& start, const Tensor& end, const OptT& allowed,
                                                    const OptT& allowed_start, const OptT& allowed_end) {
  const c10::cuda::CUDAGuard guard(emissions.device());
  Prep p = prepare("crf_nll_fwd", emissions, &tags, lengths, transitions, start, end, allowed, allowed_start,
                   allowed_end);
  const auto opts = p.em.options();
  Tensor nll = at::empty({p.d.B}, opts), log_z = at::empty({p.d.B}, opts);
  Tensor alpha = at::zeros({p.d.B, p.d.T, p.d.C}, opts);
  check_launch(cuda::crf_forward(p.dt, p.d.B, p.d.T, p.d.C, p.em.const_data_ptr(), p.len.const_data_ptr<int64_t>(),
                                 p.tags.const_data_ptr<int64_t>(), p.eff.trans.const_data_ptr(),
                                 p.eff.start.const_data_ptr(), p.eff.end.const_data_ptr(), alpha.data_ptr(),
                                 log_z.data_ptr(), nll.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "crf_forward");
  return {nll, log_z, alpha};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> crf_nll_bwd_cuda(const Tensor& grad_nll, const Tensor& emissions,
                                                            const Tensor& tags, const Tensor& lengths,
                                                            const Tensor& transitions, const Tensor& start,
                                                            const Tensor& end, const OptT& allowed,
                                                            const OptT& allowed_start, const OptT& allowed_end,
                                                            const Tensor& log_z, const Tensor& alpha) {
  const c10::cuda::CUDAGuard guard(emissions.device());
  Prep p = prepare("crf_nll_bwd", emissions, &tags, lengths, transitions, start, end, allowed, allowed_start,
                   allowed_end);
  const int64_t B = p.d.B, T = p.d.T, C = p.d.C;
  FASTMTL_CHECK_VALUE(grad_nll.dim() == 1 && grad_nll.size(0) == B && grad_nll.is_floating_point() &&
                          grad_nll.device() == emissions.device(),
                      "crf_nll_bwd: grad_nll must be a floating (B,) tensor on emissions' device, got ",
                      shape_str(grad_nll));
  FASTMTL_CHECK_VALUE(log_z.dim() == 1 && log_z.size(0) == B && log_z.scalar_type() == p.ct &&
                          log_z.device() == emissions.device(),
                      "crf_nll_bwd: log_z must be the (B,) tensor crf_nll_fwd returned, got ", shape_str(log_z));
  FASTMTL_CHECK_VALUE(alpha.dim() == 3 && alpha.size(0) == B && alpha.size(1) == T && alpha.size(2) == C &&
                          alpha.scalar_type() == p.ct && alpha.device() == emissions.device(),
                      "crf_nll_bwd: alpha must be the (B, T, C) tensor crf_nll_fwd returned, got ", shape_str(alpha));
  const auto opts = p.em.options();
  const Tensor g = grad_nll.to(p.ct).contiguous(), lz = log_z.contiguous(), al = alpha.contiguous();
  Tensor ge = at::zeros({B, T, C}, opts), gs = at::zeros({B, C}, opts), gn = at::zeros({B, C}, opts);
  Tensor gt = at::zeros({B, C, C}, opts);
  check_launch(cuda::crf_backward(p.dt, B, T, C, p.em.const_data_ptr(), p.len.const_data_ptr<int64_t>(),
                                  p.tags.const_data_ptr<int64_t>(), p.eff.trans.const_data_ptr(),
                                  p.eff.start.const_data_ptr(), p.eff.end.const_data_ptr(), al.const_data_ptr(),
                                  lz.const_data_ptr(), g.const_data_ptr(), ge.data_ptr(), gs.data_ptr(),
                                  gn.data_ptr(), gt.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "crf_backward");
  return {ge.to(emissions.scalar_type()), gt.sum(0).to(transitions.scalar_type()), gs.sum(0).to(start.scalar_type()),
          gn.sum(0).to(end.scalar_type())};
}

Tensor crf_marginals_cuda(const Tensor& emissions, const Tensor& lengths, const Tensor& transitions,
                          const Tensor& start, const Tensor& end, const OptT& allowed, const OptT& allowed_start,
                          const OptT& allowed_end) {
  const c10::cuda::CUDAGuard guard(emissions.device());
  Prep p = prepare("crf_marginals", emissions, nullptr, lengths, transitions, start, end, allowed, allowed_start,
                   allowed_end);
  const int64_t B = p.d.B, T = p.d.T, C = p.d.C;
  const auto opts = p.em.options();
  Tensor log_z = at::empty({B}, opts), alpha = at::zeros({B, T, C}, opts), marg = at::zeros({B, T, C}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::crf_forward(p.dt, B, T, C, p.em.const_data_ptr(), p.len.const_data_ptr<int64_t>(), nullptr,
                                 p.eff.trans.const_data_ptr(), p.eff.start.const_data_ptr(),
                                 p.eff.end.const_data_ptr(), alpha.data_ptr(), log_z.data_ptr(), nullptr, stream),
               "crf_forward");
  check_launch(cuda::crf_backward(p.dt, B, T, C, p.em.const_data_ptr(), p.len.const_data_ptr<int64_t>(), nullptr,
                                  p.eff.trans.const_data_ptr(), p.eff.start.const_data_ptr(),
                                  p.eff.end.const_data_ptr(), alpha.const_data_ptr(), log_z.const_data_ptr(),
                                  nullptr, marg.data_ptr(), nullptr, nullptr, nullptr, stream),
               "crf_backward");
  return marg;
}

Tensor crf_decode_cuda(const Tensor& emissions, const Tensor& lengths, const Tensor& transitions, const Tensor& start,
                       const Tensor& end, const OptT& allowed, const OptT& allowed_start, const OptT& allowed_end) {
  const c10::cuda::CUDAGuard guard(emissions.device());
  Prep p = prepare("crf_decode", emissions, nullptr, lengths, transitions, start, end, allowed, allowed_start,
                   allowed_end);
  const int64_t B = p.d.B, T = p.d.T, C = p.d.C;
  Tensor path = at::empty({B, T}, p.len.options());
  Tensor hist = at::empty({B, T, C}, p.len.options().dtype(at::kInt));
  check_launch(cuda::crf_viterbi(p.dt, B, T, C, p.em.const_data_ptr(), p.len.const_data_ptr<int64_t>(),
                                 p.eff.trans.const_data_ptr(), p.eff.start.const_data_ptr(),
                                 p.eff.end.const_data_ptr(), hist.data_ptr<int32_t>(), path.data_ptr<int64_t>(),
                                 c10::cuda::getCurrentCUDAStream()),
               "crf_viterbi");
  return path;
}

}  // namespace
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("crf_nll_fwd", &fastmtl::crf_nll_fwd_cuda);
  m.impl("crf_nll_bwd", &fastmtl::crf_nll_bwd_cuda);
  m.impl("crf_decode", &fastmtl::crf_decode_cuda);
  m.impl("crf_marginals", &fastmtl::crf_marginals_cuda);
}
