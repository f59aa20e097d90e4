// Linear-chain CRF ops on the CPU (schemas: csrc/fastmtl.cpp): negative log-likelihood and its exact gradient by
// forward-backward, Viterbi decoding, per-token marginals.
//
// A call prepares the effective parameters once (forbidden entries -inf) and their scaled exponentials (the
// matrices E, ET of csrc/cpu/kernels/crf.h), sorts the sequences by length (longest first) and runs groups of
// kCrfGroup sequences in lockstep through the per-ISA step loops (csrc/cpu/kernels/crf_<isa>.cpp, chosen at run
// time from the CPU; at::parallel_for over groups). Positions t >= lengths[b] are never read (their tags need not be
// valid). bfloat16 / float16 inputs run in float32; float64 stays float64.
// The transition gradient sum_{b,t} g_b xi_{b,t}(i, j) is formed from the backward's factor rows as one GEMM,
// (P^T Q) .* E, plus the exact contributions of the rare steps whose factorisation could overflow.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>

#include "fastmtl/checks.h"
#include "fastmtl/cpu_isa.h"
#include "fastmtl/crf_checks.h"
#include "kernels/crf.h"

namespace fastmtl {
namespace cpu_kernels {
const CrfKernels& crf_kernels() {
  return cpu::select_kernels(crf_kernels_scalar(), crf_kernels_avx2(), crf_kernels_avx512());
}
}  // namespace cpu_kernels

namespace crf_cpu {

using at::Tensor;
using OptT = std::optional<Tensor>;
using cpu_kernels::CrfArgs;
using cpu_kernels::kCrfGroup;

// Groups per parallel_for chunk: a chunk gets at least ~64k multiply-adds (4 sequences x T steps x C^2), so small
// problems run on the calling thread instead of waking the pool.
inline int64_t group_grain(int64_t T, int64_t C) {
  const int64_t per_group = std::max<int64_t>(1, kCrfGroup * std::max<int64_t>(T, 1) * C * C);
  return std::max<int64_t>(1, (int64_t(1) << 16) / per_group);
}

inline cpu_kernels::CrfForwardFn<float> fwd_fn(const cpu_kernels::CrfKernels& k, float*) { return k.fwd_f32; }
inline cpu_kernels::CrfForwardFn<double> fwd_fn(const cpu_kernels::CrfKernels& k, double*) { return k.fwd_f64; }
inline cpu_kernels::CrfBackwardFn<float> bwd_fn(const cpu_kernels::CrfKernels& k, float*) { return k.bwd_f32; }
inline cpu_kernels::CrfBackwardFn<double> bwd_fn(const cpu_kernels::CrfKernels& k, double*) { return k.bwd_f64; }
inline cpu_kernels::CrfViterbiFn<float> vit_fn(const cpu_kernels::CrfKernels& k, float*) { return k.vit_f32; }
inline cpu_kernels::CrfViterbiFn<double> vit_fn(const cpu_kernels::CrfKernels& k, double*) { return k.vit_f64; }

// Everything a kernel call needs, prepared once per op call.
struct Prepared {
  CrfDims d;
  at::ScalarType ct;
  Tensor em, len, tags;          // compute dtype / int64, contiguous
  CrfEffective eff;              // effective transitions, start, end (compute dtype)
  Tensor scaled;                 // trans_p, E, ET (C, Cp), tm, tr (Cp): padded (see kernels/crf.h)
  std::vector<int64_t> order;    // sequence ids, longest first
  int64_t Cp;
};

Prepared prepare(const char* op, const Tensor& emissions, const Tensor* tags, const Tensor& lengths,
                 const Tensor& transitions, const Tensor& start, const Tensor& end, const OptT& allowed,
                 const OptT& allowed_start, const OptT& allowed_end, bool need_scaled) {
  Prepared p;
  p.d = check_crf_args(op, emissions, tags, lengths, transitions, start, end, allowed, allowed_start, allowed_end);
  FASTMTL_CHECK_VALUE(emissions.device().is_cpu(), op, ": expected CPU tensors, got ", emissions.device());
  const int64_t B = p.d.B, T = p.d.T, C = p.d.C;
  p.len = lengths.contiguous();
  if (tags != nullptr) p.tags = tags->contiguous();
  check_crf_values(op, p.d, p.len.const_data_ptr<int64_t>(), tags ? p.tags.const_data_ptr<int64_t>() : nullptr);
  p.ct = crf_compute_dtype(emissions.scalar_type());
  p.em = emissions.to(p.ct).contiguous();
  p.eff = crf_effective(transitions, start, end, allowed, allowed_start, allowed_end, p.ct);
  p.Cp = cpu_kernels::crf_padded(C);
  // trans_p, E, ET (C, Cp each) and tm, tr (Cp each) in one buffer, built by plain loops (tiny; no op overhead)
  const int64_t Cp = p.Cp;
  p.scaled = at::empty({3 * C * Cp + 2 * Cp}, p.em.options());
  AT_DISPATCH_FLOATING_TYPES(p.ct, "crf_prepare", [&] {
    using T = scalar_t;
    const T* A = p.eff.trans.const_data_ptr<T>();
    T* base = p.scaled.data_ptr<T>();
    T *tp = base, *E = base + C * Cp, *ET = base + 2 * C * Cp, *tm = base + 3 * C * Cp, *tr = tm + Cp;
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t j = 0; j < C; ++j) tp[i * Cp + j] = A[i * C + j];
      for (int64_t j = C; j < Cp; ++j) tp[i * Cp + j] = ninf;
    }
    if (!need_scaled) return;
    for (int64_t j = 0; j < Cp; ++j) tm[j] = tr[j] = ninf;
    for (int64_t i = 0; i < C; ++i)
      for (int64_t j = 0; j < C; ++j) {
        const T x = A[i * C + j];
        tm[j] = x > tm[j] ? x : tm[j];
        tr[i] = x > tr[i] ? x : tr[i];
      }
    for (int64_t j = 0; j < Cp; ++j) {  // a column / row without any allowed entry (and the padding): 0
      if (!std::isfinite(tm[j])) tm[j] = T(0);
      if (!std::isfinite(tr[j])) tr[j] = T(0);
    }
    std::fill(E, E + 2 * C * Cp, T(0));
    for (int64_t i = 0; i < C; ++i)
      for (int64_t j = 0; j < C; ++j) {
        const T x = A[i * C + j];
        E[i * Cp + j] = T(std::exp(double(x) - double(tm[j])));
        ET[j * Cp + i] = T(std::exp(double(x) - double(tr[i])));
      }
  });
  p.order.resize(size_t(B));
  std::iota(p.order.begin(), p.order.end(), int64_t(0));
  const int64_t* len = p.len.const_data_ptr<int64_t>();
  std::stable_sort(p.order.begin(), p.order.end(), [&](int64_t x, int64_t y) { return len[x] > len[y]; });
  (void)T;
  return p;
}

template <typename T>
CrfArgs<T> base_args(const Prepared& p) {
  CrfArgs<T> a;
  a.B = p.d.B;
  a.Tn = p.d.T;
  a.C = p.d.C;
  a.Cp = p.Cp;
  a.em = p.em.const_data_ptr<T>();
  a.len = p.len.const_data_ptr<int64_t>();
  const T* base = p.scaled.const_data_ptr<T>();
  const int64_t CCp = p.d.C * p.Cp;
  a.trans_p = base;
  a.start = p.eff.start.const_data_ptr<T>();
  a.end = p.eff.end.const_data_ptr<T>();
  a.E = base + CCp;
  a.ET = base + 2 * CCp;
  a.tm = base + 3 * CCp;
  a.tr = a.tm + p.Cp;
  return a;
}

// Runs fn(ids, ns, work) over the groups of the sorted batch, in parallel.
template <typename T, typename Fn>
void for_groups(const Prepared& p, int64_t work_elems, const Fn& fn) {
  const int64_t B = p.d.B;
  const int64_t ngroups = (B + kCrfGroup - 1) / kCrfGroup;
  if (ngroups == 0) return;
  at::parallel_for(0, ngroups, group_grain(p.d.T, p.d.C), [&](int64_t g0, int64_t g1) {
    std::vector<T> work(static_cast<size_t>(work_elems));
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t first = g * kCrfGroup;
      const int ns = int(std::min<int64_t>(kCrfGroup, B - first));
      fn(p.order.data() + first, ns, work.data(), g == g0);
    }
  });
}

// Score of the gold path of sequence b under the effective parameters (accumulated in double); -inf when it uses a
// forbidden transition, start or end.
template <typename T>
double gold_score(const Prepared& p, int64_t b) {
  const int64_t Tn = p.d.T, C = p.d.C, L = p.len.const_data_ptr<int64_t>()[b];
  if (L == 0) return 0.0;
  const T* em = p.em.const_data_ptr<T>() + b * Tn * C;
  const int64_t* y = p.tags.const_data_ptr<int64_t>() + b * Tn;
  const T* A = p.eff.trans.const_data_ptr<T>();
  double s = double(p.eff.start.const_data_ptr<T>()[y[0]]) + double(em[y[0]]);
  for (int64_t t = 1; t < L; ++t) s += double(A[y[t - 1] * C + y[t]]) + double(em[t * C + y[t]]);
  return s + double(p.eff.end.const_data_ptr<T>()[y[L - 1]]);
}

// ------------------------------------------------------------------------------------------------- NLL forward
// The forward recursion of every sequence: alpha (B, T, C) and log Z (B,) (the NLL's forward and the marginals').
template <typename T>
void forward_impl(const Prepared& p, Tensor& log_z, Tensor& alpha) {
  CrfArgs<T> a = base_args<T>(p);
  a.alpha = alpha.data_ptr<T>();
  a.log_z = log_z.data_ptr<T>();
  const auto fn = fwd_fn(cpu_kernels::crf_kernels(), static_cast<T*>(nullptr));
  for_groups<T>(p, cpu_kernels::kCrfWork * kCrfGroup * p.Cp,
                [&](const int64_t* ids, int ns, T* work, bool) { fn(a, ids, ns, work); });
}

template <typename T>
void nll_fwd_impl(const Prepared& p, Tensor& nll, Tensor& log_z, Tensor& alpha) {
  forward_impl<T>(p, log_z, alpha);
  T* out = nll.data_ptr<T>();
  const T* lz = log_z.data_ptr<T>();
  const double inf = std::numeric_limits<double>::infinity();
  at::parallel_for(0, p.d.B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const double s = gold_score<T>(p, b);
      out[b] = s == -inf ? T(inf) : T(double(lz[b]) - s);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> crf_nll_fwd_cpu(const Tensor& emissions, const Tensor& tags, const Tensor& lengths,
                                                   const Tensor& transitions, const Tensor& start, const Tensor& end,
                                                   const OptT& allowed, const OptT& allowed_start,
                                                   const OptT& allowed_end) {
  Prepared p = prepare("crf_nll_fwd", emissions, &tags, lengths, transitions, start, end, allowed, allowed_start,
                       allowed_end, true);
  const auto opts = p.em.options();
  Tensor nll = at::empty({p.d.B}, opts), log_z = at::empty({p.d.B}, opts);
  Tensor alpha = at::zeros({p.d.B, p.d.T, p.d.C}, opts);
  if (p.ct == at::kDouble) nll_fwd_impl<double>(p, nll, log_z, alpha);
  else nll_fwd_impl<float>(p, nll, log_z, alpha);
  return {nll, log_z, alpha};
}

// ------------------------------------------------------------------------------------- NLL backward / marginals
template <typename T>
void bwd_impl(const Prepared& p, const Tensor& log_z, const Tensor& alpha, const T* g, Tensor& grad_em,
              Tensor* gstart, Tensor* gend, Tensor* P, Tensor* Q, double* fb_total) {
  CrfArgs<T> a = base_args<T>(p);
  a.alpha = const_cast<T*>(alpha.const_data_ptr<T>());
  a.log_z = const_cast<T*>(log_z.const_data_ptr<T>());
  a.g = g;
  a.tags = p.tags.defined() ? p.tags.const_data_ptr<int64_t>() : nullptr;
  a.grad_em = grad_em.data_ptr<T>();
  a.gstart = gstart ? gstart->data_ptr<T>() : nullptr;
  a.gend = gend ? gend->data_ptr<T>() : nullptr;
  a.P = P ? P->data_ptr<T>() : nullptr;
  a.Q = Q ? Q->data_ptr<T>() : nullptr;
  const int64_t C = p.d.C;
  const auto fn = bwd_fn(cpu_kernels::crf_kernels(), static_cast<T*>(nullptr));
  std::mutex mu;
  const int64_t B = p.d.B, ngroups = (B + kCrfGroup - 1) / kCrfGroup;
  if (ngroups == 0) return;
  at::parallel_for(0, ngroups, group_grain(p.d.T, p.d.C), [&](int64_t g0, int64_t g1) {
    std::vector<T> work(size_t(cpu_kernels::kCrfWork * kCrfGroup * p.Cp));
    std::vector<double> fb(fb_total ? size_t(C * C) : size_t(0), 0.0);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t first = grp * kCrfGroup;
      const int ns = int(std::min<int64_t>(kCrfGroup, B - first));
      fn(a, p.order.data() + first, ns, work.data(), fb_total ? fb.data() : nullptr);
    }
    if (fb_total) {
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t i = 0; i < C * C; ++i) fb_total[i] += fb[size_t(i)];
    }
  });
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> nll_bwd_impl(const Prepared& p, const Tensor& grad_nll,
                                                        const Tensor& log_z, const Tensor& alpha) {
  const int64_t B = p.d.B, Tn = p.d.T, C = p.d.C;
  const auto opts = p.em.options();
  // per-sequence scale: 0 where the sequence has no gradient (length 0, or a gold path through a forbidden entry:
  // its NLL is +inf)
  Tensor gt = grad_nll.to(p.ct).contiguous().clone();
  T* g = gt.data_ptr<T>();
  const int64_t* len = p.len.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    if (len[b] == 0 || gold_score<T>(p, b) == -std::numeric_limits<double>::infinity()) g[b] = T(0);
  Tensor grad_em = at::zeros({B, Tn, C}, opts);
  Tensor gstart = at::zeros({B, C}, opts), gend = at::zeros({B, C}, opts);
  Tensor P = at::zeros({B * Tn, p.Cp}, opts), Q = at::zeros({B * Tn, p.Cp}, opts);
  std::vector<double> fallback(size_t(C * C), 0.0);
  bwd_impl<T>(p, log_z, alpha, g, grad_em, &gstart, &gend, &P, &Q, fallback.data());
  // d/d transitions = (P^T Q) .* E + exact fallback - gold counts; d/d start, end: sums of the per-sequence rows
  const Tensor G = at::mm(P.t(), Q).contiguous();
  const T* Gp = G.const_data_ptr<T>();
  const T* E = p.scaled.const_data_ptr<T>() + C * p.Cp;
  Tensor grad_trans = at::empty({C, C}, opts), grad_start = at::empty({C}, opts), grad_end = at::empty({C}, opts);
  T* gtr = grad_trans.data_ptr<T>();
  for (int64_t i = 0; i < C; ++i)
    for (int64_t j = 0; j < C; ++j)
      gtr[i * C + j] = Gp[i * p.Cp + j] * E[i * p.Cp + j] + T(fallback[size_t(i * C + j)]);
  const int64_t* y = p.tags.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    if (g[b] == T(0)) continue;
    for (int64_t t = 1; t < len[b]; ++t) gtr[y[b * Tn + t - 1] * C + y[b * Tn + t]] -= g[b];
  }
  const T* gs = gstart.const_data_ptr<T>();
  const T* gn = gend.const_data_ptr<T>();
  T* os = grad_start.data_ptr<T>();
  T* on = grad_end.data_ptr<T>();
  for (int64_t j = 0; j < C; ++j) {
    double a = 0.0, c = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      a += double(gs[b * C + j]);
      c += double(gn[b * C + j]);
    }
    os[j] = T(a);
    on[j] = T(c);
  }
  return {grad_em, grad_trans, grad_start, grad_end};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> crf_nll_bwd_cpu(const Tensor& grad_nll, const Tensor& emissions,
                                                           const Tensor& tags, const Tensor& lengths,
                                                           const Tensor& transitions, const Tensor& start,
                                                           const Tensor& end, const OptT& allowed,
                                                           const OptT& allowed_start, const OptT& allowed_end,
                                                           const Tensor& log_z, const Tensor& alpha) {
  Prepared p = prepare("crf_nll_bwd", emissions, &tags, lengths, transitions, start, end, allowed, allowed_start,
                       allowed_end, true);
  const int64_t B = p.d.B;
  FASTMTL_CHECK_VALUE(grad_nll.dim() == 1 && grad_nll.size(0) == B && grad_nll.is_floating_point(),
                      "crf_nll_bwd: grad_nll must be a floating (B,) tensor, got ", shape_str(grad_nll));
  FASTMTL_CHECK_VALUE(log_z.dim() == 1 && log_z.size(0) == B && log_z.scalar_type() == p.ct,
                      "crf_nll_bwd: log_z must be the (B,) ", p.ct, " tensor crf_nll_fwd returned, got ",
                      shape_str(log_z), " ", log_z.scalar_type());
  FASTMTL_CHECK_VALUE(alpha.dim() == 3 && alpha.size(0) == B && alpha.size(1) == p.d.T && alpha.size(2) == p.d.C &&
                          alpha.scalar_type() == p.ct,
                      "crf_nll_bwd: alpha must be the (B, T, C) ", p.ct, " tensor crf_nll_fwd returned, got ",
                      shape_str(alpha), " ", alpha.scalar_type());
  Tensor lz = log_z.contiguous(), al = alpha.contiguous();
  Tensor ge, gt, gs, gn;
  if (p.ct == at::kDouble) std::tie(ge, gt, gs, gn) = nll_bwd_impl<double>(p, grad_nll, lz, al);
  else std::tie(ge, gt, gs, gn) = nll_bwd_impl<float>(p, grad_nll, lz, al);
  return {ge.to(emissions.scalar_type()), gt.to(transitions.scalar_type()), gs.to(start.scalar_type()),
          gn.to(end.scalar_type())};
}

// -------------------------------------------------------------------------------------------------- marginals
Tensor crf_marginals_cpu(const Tensor& emissions, const Tensor& lengths, const Tensor& transitions,
                         const Tensor& start, const Tensor& end, const OptT& allowed, const OptT& allowed_start,
                         const OptT& allowed_end) {
  Prepared p = prepare("crf_marginals", emissions, nullptr, lengths, transitions, start, end, allowed, allowed_start,
                       allowed_end, true);
  const auto opts = p.em.options();
  Tensor log_z = at::empty({p.d.B}, opts), alpha = at::zeros({p.d.B, p.d.T, p.d.C}, opts);
  Tensor marg = at::zeros({p.d.B, p.d.T, p.d.C}, opts);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    forward_impl<T>(p, log_z, alpha);
    bwd_impl<T>(p, log_z, alpha, nullptr, marg, nullptr, nullptr, nullptr, nullptr, nullptr);
  };
  if (p.ct == at::kDouble) run(static_cast<double*>(nullptr));
  else run(static_cast<float*>(nullptr));
  return marg;
}

// ---------------------------------------------------------------------------------------------------- Viterbi
Tensor crf_decode_cpu(const Tensor& emissions, const Tensor& lengths, const Tensor& transitions, const Tensor& start,
                      const Tensor& end, const OptT& allowed, const OptT& allowed_start, const OptT& allowed_end) {
  Prepared p = prepare("crf_decode", emissions, nullptr, lengths, transitions, start, end, allowed, allowed_start,
                       allowed_end, false);
  Tensor path = at::empty({p.d.B, p.d.T}, p.len.options());
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    CrfArgs<T> a = base_args<T>(p);
    a.path = path.data_ptr<int64_t>();
    const auto fn = vit_fn(cpu_kernels::crf_kernels(), static_cast<T*>(nullptr));
    const int64_t B = p.d.B, ngroups = (B + kCrfGroup - 1) / kCrfGroup;
    if (ngroups == 0) return;
    at::parallel_for(0, ngroups, group_grain(p.d.T, p.d.C), [&](int64_t g0, int64_t g1) {
      std::vector<T> work(size_t(cpu_kernels::kCrfWork * kCrfGroup * p.Cp));
      std::vector<int32_t> hist(size_t(kCrfGroup * std::max<int64_t>(p.d.T, 1) * p.Cp));
      for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t first = grp * kCrfGroup;
        const int ns = int(std::min<int64_t>(kCrfGroup, B - first));
        fn(a, p.order.data() + first, ns, work.data(), hist.data());
      }
    });
  };
  if (p.ct == at::kDouble) run(static_cast<double*>(nullptr));
  else run(static_cast<float*>(nullptr));
  return path;
}

}  // namespace crf_cpu
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("crf_nll_fwd", &fastmtl::crf_cpu::crf_nll_fwd_cpu);
  m.impl("crf_nll_bwd", &fastmtl::crf_cpu::crf_nll_bwd_cpu);
  m.impl("crf_decode", &fastmtl::crf_cpu::crf_decode_cpu);
  m.impl("crf_marginals", &fastmtl::crf_cpu::crf_marginals_cpu);
}
