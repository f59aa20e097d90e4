// Multi-task heads + cross-entropy losses on the CPU, all K tasks in one call (schema: csrc/fastmtl.cpp).
//
// Rows feeding the heads come from "sources": the real (non-padding) token positions of hidden for token-level
// tasks, and one pooled (B, D) matrix per pooling used by sequence-level tasks. On each source, small-vocabulary
// tasks are concatenated into one segment (one GEMM for all of them); a large-vocabulary task has its own segment.
// A segment is processed a chunk of rows at a time, so logits never exist beyond one (rows x classes) chunk:
//   logits = X_chunk @ W^T + b                        (cpu::matmul_into: fastmtl's GEMM or torch's BLAS)
//   fused pass per row and task: max, logsumexp, item loss, and (compute_grad) the scaled gradient of the logits
//   written in place over the logits                   (csrc/cpu/kernels/heads_rows_<isa>.cpp, chosen at run
//                                                       time from the CPU; at::parallel_for over rows)
//   grad_X_chunk (+)= G @ W,  grad_W (+)= G^T @ X_chunk,  grad_b (+)= sum_rows G
// The per-task normalisers (sum of class weights over non-ignored items) are computed first in a cheap pass over
// the targets (which also validates them), so the chunk gradients already carry lambda_k / N_k.
// Pooling backward scatters the pooled gradients into grad_hidden (max routes to the arg-max time step).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "fastmtl/checks.h"
#include "fastmtl/heads_checks.h"
#include "fastmtl/heads_math.h"

#include "fastmtl/cpu_isa.h"
#include "kernels/heads_rows.h"
#include "matmul.h"

namespace fastmtl {
namespace heads_cpu {

using at::Tensor;
using OptTensorList = c10::List<std::optional<Tensor>>;

// Logits per chunk: 4M elements = 16 MiB in float32. Bounds the memory whatever the vocabulary.
constexpr int64_t kChunkElems = int64_t(1) << 22;
// Tasks with at most this many classes share one GEMM with the other small tasks on the same rows.
constexpr int64_t kConcatMaxClasses = 4096;

using cpu_kernels::SegTask;

// The cross-entropy row pass (csrc/cpu/kernels/heads_rows_<isa>.cpp) of the ISA chosen for this call.
inline cpu_kernels::XentRowsFn<float> xent_rows_fn(const cpu_kernels::HeadsRowKernels& k, float*) {
  return k.xent_f32;
}
inline cpu_kernels::XentRowsFn<double> xent_rows_fn(const cpu_kernels::HeadsRowKernels& k, double*) {
  return k.xent_f64;
}

// Arg-max per row and task (first maximal index, as torch.argmax), for prediction.
struct PredTask {
  int64_t offset, C;
  int64_t* out;
};

template <typename T>
void argmax_rows(const T* L, int64_t ld, int64_t rb, int64_t re, int64_t row0, const int64_t* rowpos,
                 const PredTask* pt, int64_t nt) {
  for (int64_t r = rb; r < re; ++r) {
    const T* zr = L + r * ld;
    const int64_t gi = rowpos ? rowpos[row0 + r] : row0 + r;
    for (int64_t j = 0; j < nt; ++j) {
      const T* z = zr + pt[j].offset;
      int64_t best = 0;
      T bv = z[0];
      for (int64_t c = 1; c < pt[j].C; ++c) {
        if (z[c] > bv || (std::isnan(z[c]) && !std::isnan(bv))) {
          bv = z[c];
          best = c;
        }
      }
      pt[j].out[gi] = best;
    }
  }
}

// ----------------------------------------------------------------------------------------------------------
// Pooling over the real tokens of each sequence (hidden contiguous (B, T, D)).
template <typename T>
void pool_forward(const T* H, int64_t B, int64_t Tn, int64_t D, const int64_t* lens, int p, T* out,
                  int64_t* argmax) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> acc;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t len = lens[b];
      const T* hb = H + b * Tn * D;
      T* o = out + b * D;
      switch (p) {
        case heads::kLast:
          std::copy(hb + (len - 1) * D, hb + len * D, o);
          break;
        case heads::kFirst:
          std::copy(hb, hb + D, o);
          break;
        case heads::kLastFirst: {
          const int64_t h = D / 2;
          std::copy(hb + (len - 1) * D, hb + (len - 1) * D + h, o);
          std::copy(hb + h, hb + D, o + h);
          break;
        }
        case heads::kMean: {
          acc.assign(D, 0.0);
          for (int64_t t = 0; t < len; ++t)
            for (int64_t d = 0; d < D; ++d) acc[d] += double(hb[t * D + d]);
          for (int64_t d = 0; d < D; ++d) o[d] = T(acc[d] / double(len));
          break;
        }
        case heads::kMax: {
          int64_t* am = argmax + b * D;
          for (int64_t d = 0; d < D; ++d) {
            o[d] = hb[d];
            am[d] = 0;
          }
          for (int64_t t = 1; t < len; ++t) {
            const T* ht = hb + t * D;
            for (int64_t d = 0; d < D; ++d) {
              if (ht[d] > o[d] || (std::isnan(ht[d]) && !std::isnan(o[d]))) {
                o[d] = ht[d];
                am[d] = t;
              }
            }
          }
          break;
        }
      }
    }
  });
}

// grad_hidden += pooling^T(grad_pooled)
template <typename T>
void pool_backward(const T* G, int64_t B, int64_t Tn, int64_t D, const int64_t* lens, int p, const int64_t* argmax,
                   T* GH) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t len = lens[b];
      T* gb = GH + b * Tn * D;
      const T* g = G + b * D;
      switch (p) {
        case heads::kLast:
          for (int64_t d = 0; d < D; ++d) gb[(len - 1) * D + d] += g[d];
          break;
        case heads::kFirst:
          for (int64_t d = 0; d < D; ++d) gb[d] += g[d];
          break;
        case heads::kLastFirst: {
          const int64_t h = D / 2;
          for (int64_t d = 0; d < h; ++d) gb[(len - 1) * D + d] += g[d];
          for (int64_t d = h; d < D; ++d) gb[d] += g[d];
          break;
        }
        case heads::kMean: {
          const T inv = T(1.0 / double(len));
          for (int64_t t = 0; t < len; ++t)
            for (int64_t d = 0; d < D; ++d) gb[t * D + d] += g[d] * inv;
          break;
        }
        case heads::kMax: {
          const int64_t* am = argmax + b * D;
          for (int64_t d = 0; d < D; ++d) gb[am[d] * D + d] += g[d];
          break;
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------------------
struct TaskInfo {
  int64_t C = 0;
  int level = 0;
  int pooling = 0;
  Tensor W;  // (C, D) compute dtype, contiguous
  Tensor b;  // (C,) or undefined
  // loss only
  Tensor tgt;  // int64 contiguous
  Tensor cw;   // (C,) compute dtype or undefined
  int64_t ignore = -100;
  double eps = 0.0;
  double sum_w = 0.0;
  double norm = 0.0;  // N_k: sum of w_y over counted items
  double lambda = 0.0;
  double loss_sum = 0.0;
};

struct Source {
  Tensor X;                     // (N, D) compute dtype, contiguous
  Tensor gX;                    // (N, D) gradient, when compute_grad
  Tensor rowidx;                // token source: int64 (N,) of b*T + t; undefined = identity
  const int64_t* rowpos = nullptr;
  Tensor argmax;                // max pooling: (B, D) int64
  std::vector<int64_t> tasks;
  bool gx_written = false;
};

struct Parsed {
  int64_t B = 0, Tn = 0, D = 0, K = 0;
  at::ScalarType in_dtype, cdtype;
  Tensor H;  // (B, T, D) compute dtype contiguous
  std::vector<int64_t> lens;
  bool full = true;
  std::vector<TaskInfo> tasks;
};

Parsed parse_common(const Tensor& hidden, const std::optional<Tensor>& lengths, at::TensorList weights,
                    const OptTensorList& biases, at::IntArrayRef levels, at::IntArrayRef poolings) {
  Parsed P;
  // shapes, dtypes, devices: the checks every backend shares (fastmtl/heads_checks.h)
  const HeadsDims dims = check_heads_args(hidden, lengths, weights, biases, levels, poolings);
  const auto dt = hidden.scalar_type();
  P.in_dtype = dt;
  P.cdtype = dt == at::kDouble ? at::kDouble : at::kFloat;
  P.B = dims.B;
  P.Tn = dims.T;
  P.D = dims.D;
  P.K = dims.K;
  const int64_t K = P.K;

  P.lens.assign(P.B, P.Tn);
  if (lengths.has_value() && lengths->defined()) {
    const Tensor& l = *lengths;
    Tensor lc = l.contiguous();
    const int64_t* lp = lc.data_ptr<int64_t>();
    for (int64_t b = 0; b < P.B; ++b) {
      FASTMTL_CHECK_VALUE(lp[b] >= 1 && lp[b] <= P.Tn, "lengths[", b, "] = ", lp[b],
                          " is out of range: every length must be in [1, T] with T = hidden.size(1) = ", P.Tn);
      P.lens[b] = lp[b];
      if (lp[b] != P.Tn) P.full = false;
    }
  }
  P.H = hidden.to(P.cdtype).contiguous();

  P.tasks.resize(K);
  for (int64_t k = 0; k < K; ++k) {
    TaskInfo& t = P.tasks[k];
    const Tensor& W = weights[k];
    t.C = W.size(0);
    t.W = W.to(P.cdtype).contiguous();
    const std::optional<Tensor> bo = biases.get(k);
    if (bo.has_value() && bo->defined()) t.b = bo->to(P.cdtype).contiguous();
    t.level = int(levels[k]);
    if (t.level == heads::kSequence) t.pooling = int(poolings[k]);
  }
  return P;
}

// Builds the sources: index 0 token rows, 1 + p pooled rows for pooling p.
template <typename T>
std::vector<Source> build_sources(Parsed& P) {
  std::vector<Source> S(6);
  for (int64_t k = 0; k < P.K; ++k) {
    const TaskInfo& t = P.tasks[k];
    S[t.level == heads::kToken ? 0 : 1 + t.pooling].tasks.push_back(k);
  }
  const int64_t B = P.B, Tn = P.Tn, D = P.D;
  if (!S[0].tasks.empty()) {
    if (P.full) {
      S[0].X = P.H.view({B * Tn, D});
    } else {
      int64_t N = 0;
      for (int64_t b = 0; b < B; ++b) N += P.lens[b];
      Tensor idx = at::empty({N}, at::kLong);
      int64_t* ip = idx.data_ptr<int64_t>();
      int64_t n = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < P.lens[b]; ++t) ip[n++] = b * Tn + t;
      S[0].rowidx = idx;
      S[0].rowpos = ip;
      S[0].X = P.H.view({B * Tn, D}).index_select(0, idx);
    }
  }
  for (int p = 0; p < 5; ++p) {
    Source& s = S[1 + p];
    if (s.tasks.empty()) continue;
    s.X = at::empty({B, D}, P.H.options());
    if (p == heads::kMax) s.argmax = at::empty({B, D}, at::kLong);
    if (B > 0)
      pool_forward<T>(P.H.data_ptr<T>(), B, Tn, D, P.lens.data(), p, s.X.data_ptr<T>(),
                      p == heads::kMax ? s.argmax.data_ptr<int64_t>() : nullptr);
  }
  return S;
}

// Splits a source's tasks into segments: small tasks together, large tasks alone.
std::vector<std::vector<int64_t>> make_segments(const Source& s, const Parsed& P) {
  std::vector<std::vector<int64_t>> segs;
  std::vector<int64_t> small;
  for (int64_t k : s.tasks) {
    if (P.tasks[k].C <= kConcatMaxClasses)
      small.push_back(k);
    else
      segs.push_back({k});
  }
  if (!small.empty()) segs.insert(segs.begin(), small);
  return segs;
}

// Concatenated weight and bias of a segment (no copy for a single task).
void segment_params(const std::vector<int64_t>& ids, const Parsed& P, Tensor& W, Tensor& bias,
                    std::vector<int64_t>& offs) {
  offs.clear();
  int64_t off = 0;
  bool any_bias = false;
  for (int64_t k : ids) {
    offs.push_back(off);
    off += P.tasks[k].C;
    any_bias = any_bias || P.tasks[k].b.defined();
  }
  if (ids.size() == 1) {
    W = P.tasks[ids[0]].W;
    bias = P.tasks[ids[0]].b;
    return;
  }
  std::vector<Tensor> Ws, bs;
  for (int64_t k : ids) {
    Ws.push_back(P.tasks[k].W);
    if (any_bias) bs.push_back(P.tasks[k].b.defined() ? P.tasks[k].b : at::zeros({P.tasks[k].C}, P.H.options()));
  }
  W = at::cat(Ws, 0);
  bias = any_bias ? at::cat(bs, 0) : Tensor();
}

int64_t chunk_rows(int64_t N, int64_t Cs) { return std::max<int64_t>(1, std::min<int64_t>(N, kChunkElems / Cs)); }

// logits (rows x Cs) = X_chunk @ W^T + bias, through cpu::matmul_into (fastmtl's GEMM where it is faster).
void logits_into(const Tensor& L, const Tensor& X, const Tensor& W, const Tensor& bias) {
  if (bias.defined()) {
    L.copy_(bias.unsqueeze(0).expand_as(L));
    cpu::matmul_into(X, W.t(), L, 1.f);
  } else {
    cpu::matmul_into(X, W.t(), L, 0.f);
  }
}

template <typename T>
void loss_segment(Source& src, const std::vector<int64_t>& ids, Parsed& P, bool compute_grad,
                  std::vector<Tensor>& gW, std::vector<Tensor>& gB) {
  const int64_t N = src.X.size(0), D = P.D;
  if (N == 0) return;
  Tensor W, bias;
  std::vector<int64_t> offs;
  segment_params(ids, P, W, bias, offs);
  const int64_t Cs = W.size(0);
  const int64_t R = chunk_rows(N, Cs);
  const int64_t nt = int64_t(ids.size());
  Tensor L = at::empty({R, Cs}, P.H.options());
  Tensor gWs, gBs;
  if (compute_grad) {
    gWs = at::empty({Cs, D}, P.H.options());
    if (bias.defined()) gBs = at::empty({Cs}, P.H.options());
  }
  std::vector<SegTask<T>> st(nt);
  for (int64_t j = 0; j < nt; ++j) {
    const TaskInfo& t = P.tasks[ids[j]];
    st[j].offset = offs[j];
    st[j].C = t.C;
    st[j].tgt = t.tgt.data_ptr<int64_t>();
    st[j].ignore = t.ignore;
    st[j].cw = t.cw.defined() ? t.cw.data_ptr<T>() : nullptr;
    st[j].sum_w = T(t.sum_w);
    st[j].eps = T(t.eps);
    st[j].active = t.norm != 0.0;  // NaN (non-finite class weights) and negative sums propagate as in torch
    st[j].scale = T(st[j].active ? t.lambda / t.norm : 0.0);
  }
  std::vector<double> row_losses(R * nt);
  std::vector<double> seg_loss(nt, 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / Cs);
  const cpu_kernels::XentRowsFn<T> xent_rows =
      xent_rows_fn(cpu_kernels::heads_row_kernels(), static_cast<T*>(nullptr));
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    Tensor Lc = L.narrow(0, 0, rc);
    Tensor Xc = src.X.narrow(0, r0, rc);
    logits_into(Lc, Xc, W, bias);
    T* lp = Lc.data_ptr<T>();
    at::parallel_for(0, rc, grain, [&](int64_t b, int64_t e) {
      xent_rows(lp, Cs, b, e, r0, src.rowpos, st.data(), nt, compute_grad, row_losses.data());
    });
    for (int64_t r = 0; r < rc; ++r)
      for (int64_t j = 0; j < nt; ++j) seg_loss[j] += row_losses[r * nt + j];
    if (compute_grad) {
      Tensor gXc = src.gX.narrow(0, r0, rc);
      cpu::matmul_into(Lc, W, gXc, src.gx_written ? 1.f : 0.f);
      cpu::matmul_into(Lc.t(), Xc, gWs, r0 == 0 ? 0.f : 1.f);
      if (bias.defined()) {
        if (r0 == 0)
          at::sum_out(gBs, Lc, {0});
        else
          gBs.add_(Lc.sum(0));
      }
    }
  }
  src.gx_written = true;
  for (int64_t j = 0; j < nt; ++j) {
    const int64_t k = ids[j];
    P.tasks[k].loss_sum += seg_loss[j];
    if (!compute_grad) continue;
    if (nt == 1) {
      gW[k] = gWs;
      if (P.tasks[k].b.defined()) gB[k] = gBs;
    } else {
      gW[k] = gWs.narrow(0, offs[j], P.tasks[k].C).clone();
      if (P.tasks[k].b.defined()) gB[k] = gBs.narrow(0, offs[j], P.tasks[k].C).clone();
    }
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> loss_impl(Parsed& P, bool compute_grad) {
  const int64_t B = P.B, Tn = P.Tn, D = P.D, K = P.K;
  std::vector<Source> S = build_sources<T>(P);
  Tensor gH;
  if (compute_grad) {
    // The token rows cover every position when there is no padding: their first GEMM writes all of grad_hidden.
    const bool covered = !S[0].tasks.empty() && P.full && B * Tn > 0;
    gH = covered ? at::empty({B, Tn, D}, P.H.options()) : at::zeros({B, Tn, D}, P.H.options());
    for (int i = 0; i < 6; ++i) {
      Source& s = S[i];
      if (s.tasks.empty()) continue;
      if (i == 0 && !s.rowidx.defined())
        s.gX = gH.view({B * Tn, D});
      else
        s.gX = at::empty_like(s.X);
    }
  }
  std::vector<Tensor> gW(K), gB(K);
  for (int i = 0; i < 6; ++i) {
    Source& s = S[i];
    if (s.tasks.empty()) continue;
    for (const auto& seg : make_segments(s, P)) loss_segment<T>(s, seg, P, compute_grad, gW, gB);
  }
  if (compute_grad) {
    if (S[0].gx_written && S[0].rowidx.defined()) gH.view({B * Tn, D}).index_copy_(0, S[0].rowidx, S[0].gX);
    for (int p = 0; p < 5; ++p) {
      Source& s = S[1 + p];
      if (s.tasks.empty() || !s.gx_written) continue;
      pool_backward<T>(s.gX.data_ptr<T>(), B, Tn, D, P.lens.data(), p,
                       p == heads::kMax ? s.argmax.data_ptr<int64_t>() : nullptr, gH.data_ptr<T>());
    }
  }
  // Per-task losses and the total.
  Tensor losses_d = at::empty({K}, at::kDouble);
  double* ld = losses_d.data_ptr<double>();
  double total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const TaskInfo& t = P.tasks[k];
    ld[k] = t.norm != 0.0 ? t.loss_sum / t.norm : 0.0;
    total += t.lambda * ld[k];
  }
  const auto out_opts = P.H.options().dtype(P.in_dtype);
  Tensor losses = losses_d.to(P.in_dtype);
  Tensor total_t = at::scalar_tensor(total, at::kDouble).to(P.in_dtype);
  std::vector<Tensor> gWo(K), gBo(K);
  Tensor gHo;
  if (compute_grad) {
    gHo = gH.to(P.in_dtype);
    for (int64_t k = 0; k < K; ++k) {
      const TaskInfo& t = P.tasks[k];
      gWo[k] = gW[k].defined() ? gW[k].to(P.in_dtype) : at::zeros({t.C, D}, out_opts);
      if (t.b.defined())
        gBo[k] = gB[k].defined() ? gB[k].to(P.in_dtype) : at::zeros({t.C}, out_opts);
      else
        gBo[k] = at::empty({0}, out_opts);
    }
  } else {
    gHo = at::empty({0}, out_opts);
    for (int64_t k = 0; k < K; ++k) {
      gWo[k] = at::empty({0}, out_opts);
      gBo[k] = at::empty({0}, out_opts);
    }
  }
  return {total_t, losses, gHo, gWo, gBo};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> multitask_loss_cpu(
    const Tensor& hidden, const std::optional<Tensor>& lengths, at::TensorList weights, const OptTensorList& biases,
    at::TensorList targets, const OptTensorList& class_weights, const Tensor& task_weights, at::IntArrayRef levels,
    at::IntArrayRef poolings, at::IntArrayRef ignore_indices, at::ArrayRef<double> label_smoothings,
    bool compute_grad) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Parsed P = parse_common(hidden, lengths, weights, biases, levels, poolings);
  const int64_t K = P.K, B = P.B, Tn = P.Tn;
  check_multitask_loss_args(hidden, B, Tn, K, weights, targets, class_weights, task_weights, levels,
                            ignore_indices, label_smoothings);
  Tensor lam = task_weights.detach().to(at::kDouble).contiguous();
  const double* lamp = lam.data_ptr<double>();

  for (int64_t k = 0; k < K; ++k) {
    TaskInfo& t = P.tasks[k];
    const Tensor& y = targets[k];
    t.tgt = y.contiguous();
    t.ignore = ignore_indices[k];
    t.eps = label_smoothings[k];
    t.lambda = lamp[k];
    const std::optional<Tensor> cwo = class_weights.get(k);
    const double* cwd = nullptr;
    Tensor cw_d;
    if (cwo.has_value() && cwo->defined()) {
      const Tensor& cw = *cwo;
      t.cw = cw.detach().to(P.cdtype).contiguous();
      cw_d = cw.detach().to(at::kDouble).contiguous();
      cwd = cw_d.data_ptr<double>();
      t.sum_w = 0.0;
      for (int64_t c = 0; c < t.C; ++c) t.sum_w += cwd[c];
    } else {
      t.sum_w = double(t.C);
    }
    // Normaliser and target validation (only counted positions: t < length).
    const int64_t* yp = t.tgt.data_ptr<int64_t>();
    double norm = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t tn = t.level == heads::kSequence ? 1 : P.lens[b];
      for (int64_t s = 0; s < tn; ++s) {
        const int64_t v = t.level == heads::kSequence ? yp[b] : yp[b * Tn + s];
        if (v == t.ignore) continue;
        if (v < 0 || v >= t.C) {
          if (t.level == heads::kSequence) {
            FASTMTL_CHECK_VALUE(false, "targets[", k, "] (task ", k, ") has value ", v, " at b=", b,
                                ", outside [0, ", t.C, ") and not ignore_index (", t.ignore, ")");
          } else {
            FASTMTL_CHECK_VALUE(false, "targets[", k, "] (task ", k, ") has value ", v, " at (b=", b, ", t=", s,
                                "), outside [0, ", t.C, ") and not ignore_index (", t.ignore, ")");
          }
        }
        norm += cwd ? cwd[v] : 1.0;
      }
    }
    t.norm = norm;
  }
  if (P.cdtype == at::kDouble) return loss_impl<double>(P, compute_grad);
  return loss_impl<float>(P, compute_grad);
}

// ----------------------------------------------------------------------------------------------------------
template <typename T>
std::vector<Tensor> predict_impl(Parsed& P) {
  const int64_t B = P.B, Tn = P.Tn, K = P.K;
  std::vector<Source> S = build_sources<T>(P);
  std::vector<Tensor> out(K);
  for (int64_t k = 0; k < K; ++k)
    out[k] = P.tasks[k].level == heads::kToken ? at::full({B, Tn}, -1, at::kLong) : at::empty({B}, at::kLong);
  for (int i = 0; i < 6; ++i) {
    Source& s = S[i];
    if (s.tasks.empty()) continue;
    const int64_t N = s.X.size(0);
    if (N == 0) continue;
    for (const auto& ids : make_segments(s, P)) {
      Tensor W, bias;
      std::vector<int64_t> offs;
      segment_params(ids, P, W, bias, offs);
      const int64_t Cs = W.size(0), R = chunk_rows(N, Cs), nt = int64_t(ids.size());
      std::vector<PredTask> pt(nt);
      for (int64_t j = 0; j < nt; ++j) pt[j] = PredTask{offs[j], P.tasks[ids[j]].C, out[ids[j]].data_ptr<int64_t>()};
      Tensor L = at::empty({R, Cs}, P.H.options());
      const int64_t grain = std::max<int64_t>(1, 16384 / Cs);
      for (int64_t r0 = 0; r0 < N; r0 += R) {
        const int64_t rc = std::min(R, N - r0);
        Tensor Lc = L.narrow(0, 0, rc);
        Tensor Xc = s.X.narrow(0, r0, rc);
        logits_into(Lc, Xc, W, bias);
        const T* lp = Lc.data_ptr<T>();
        at::parallel_for(0, rc, grain,
                         [&](int64_t b, int64_t e) { argmax_rows<T>(lp, Cs, b, e, r0, s.rowpos, pt.data(), nt); });
      }
    }
  }
  return out;
}

std::vector<Tensor> multitask_predict_cpu(const Tensor& hidden, const std::optional<Tensor>& lengths,
                                          at::TensorList weights, const OptTensorList& biases, at::IntArrayRef levels,
                                          at::IntArrayRef poolings) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Parsed P = parse_common(hidden, lengths, weights, biases, levels, poolings);
  if (P.cdtype == at::kDouble) return predict_impl<double>(P);
  return predict_impl<float>(P);
}

}  // namespace heads_cpu
}  // namespace fastmtl

namespace fastmtl {
namespace cpu_kernels {
const HeadsRowKernels& heads_row_kernels() {
  return cpu::select_kernels(heads_row_kernels_scalar(), heads_row_kernels_avx2(), heads_row_kernels_avx512());
}
}  // namespace cpu_kernels
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("multitask_loss", &fastmtl::heads_cpu::multitask_loss_cpu);
  m.impl("multitask_predict", &fastmtl::heads_cpu::multitask_predict_cpu);
}
