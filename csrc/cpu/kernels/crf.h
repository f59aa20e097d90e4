// The per-time-step loops of the CPU linear-chain CRF ops (csrc/cpu/crf.cpp), one per instruction set
// (crf_<isa>.cpp), chosen at run time (fastmtl/cpu_isa.h).
//
// Each entry point runs a group of up to kCrfGroup sequences in lockstep (their ids, sorted by length, longest
// first, so the sequences still running at step t are a prefix of the group): the transition matrix is read once
// per step for the whole group. Scores live in log space; each step of the forward (alpha) and backward (beta)
// recursions is a small mat-vec in the scaled domain:
//   alpha_t(j) = m + tm_j + log(sum_i exp(alpha_{t-1}(i) - m) E(i, j)) + e_t(j),  E(i, j) = exp(A(i, j) - tm_j),
//   beta_{t-1}(i) = mv + tr_i + log(sum_j exp(v_j - mv) ET(j, i)),                 ET(j, i) = exp(A(i, j) - tr_i),
// with A the effective transitions (-inf where forbidden), tm / tr their column / row maxima, m = max alpha_{t-1},
// v = e_t + beta_t, mv = max v. A column whose scaled sum falls below a safe threshold (underflow: very negative or
// forbidden transitions) is recomputed exactly with a log-sum-exp, so the result never loses a path.
// The pairwise marginals of step t factor as p_{t-1}(i) E(i, j) q_t(j) * c_t; the backward writes the factors as
// rows of P and Q (row b * T + t) and the caller forms sum_t,b of them as one GEMM (P^T Q) .* E. A step whose
// factorisation could overflow adds its exact pairwise marginals to the `fallback` (C x C, double) instead.
#pragma once

#include <cstdint>

#include "fastmtl/cpu_isa.h"

namespace fastmtl {
namespace cpu_kernels {

constexpr int kCrfGroup = 4;    // sequences per group
constexpr int64_t kCrfPad = 16; // rows of the padded matrices are a multiple of this (the widest vector)
constexpr int64_t kCrfWork = 12; // work buffer: kCrfWork * kCrfGroup * Cp elements per group

inline int64_t crf_padded(int64_t C) { return (C + kCrfPad - 1) / kCrfPad * kCrfPad; }

template <typename T>
struct CrfArgs {
  int64_t B = 0, Tn = 0, C = 0, Cp = 0;
  const T* em = nullptr;          // (B, Tn, C) emissions
  const int64_t* len = nullptr;   // (B) lengths in [0, Tn]
  const int64_t* tags = nullptr;  // (B, Tn) gold tags (backward); nullptr: the backward writes marginals
  const T* trans_p = nullptr;     // (C, Cp) effective transitions [from, to] (-inf: forbidden), padded
  const T* start = nullptr;       // (C) effective start scores
  const T* end = nullptr;         // (C) effective end scores
  const T* E = nullptr;           // (C, Cp) exp(A(i, j) - tm_j), zero padded
  const T* tm = nullptr;          // (Cp) column maxima of A (0 for a column without any allowed entry, and padding)
  const T* ET = nullptr;          // (C, Cp) ET[j * Cp + i] = exp(A(i, j) - tr_i)
  const T* tr = nullptr;          // (Cp) row maxima of A (0 for a row without any allowed entry, and padding)
  T* alpha = nullptr;             // (B, Tn, C) log alpha: written by forward, read by backward
  T* log_z = nullptr;             // (B) log partition: written by forward, read by backward
  const T* g = nullptr;           // (B) backward: scale per sequence (0: no gradient for it)
  T* grad_em = nullptr;           // (B, Tn, C) backward: g * (marginal - onehot(tag)), or the marginals
  T* gstart = nullptr;            // (B, C) backward: g * (marginal_0 - onehot(tag_0)), or nullptr
  T* gend = nullptr;              // (B, C) backward: g * (marginal_{L-1} - onehot(tag_{L-1})), or nullptr
  T* P = nullptr;                 // (B * Tn, Cp) pairwise-marginal factors, or nullptr (no transition gradient)
  T* Q = nullptr;                 // (B * Tn, Cp)
  int64_t* path = nullptr;        // (B, Tn) Viterbi paths (-1 at padding)
};

// ids: the group's sequences (ns <= kCrfGroup), longest first. work: kCrfWork * kCrfGroup * Cp elements.
// fallback: (C, C) double accumulator of exact pairwise marginals (backward). hist: kCrfGroup * Tn * Cp (Viterbi).
template <typename T>
using CrfForwardFn = void (*)(const CrfArgs<T>& a, const int64_t* ids, int ns, T* work);
template <typename T>
using CrfBackwardFn = void (*)(const CrfArgs<T>& a, const int64_t* ids, int ns, T* work, double* fallback);
template <typename T>
using CrfViterbiFn = void (*)(const CrfArgs<T>& a, const int64_t* ids, int ns, T* work, int32_t* hist);

struct CrfKernels {
  CrfForwardFn<float> fwd_f32;
  CrfForwardFn<double> fwd_f64;
  CrfBackwardFn<float> bwd_f32;
  CrfBackwardFn<double> bwd_f64;
  CrfViterbiFn<float> vit_f32;
  CrfViterbiFn<double> vit_f64;
};

// One table per ISA file; nullptr when the ISA is not compiled into this build.
const CrfKernels* crf_kernels_scalar();
const CrfKernels* crf_kernels_avx2();
const CrfKernels* crf_kernels_avx512();

// The table of cpu::active_isa().
const CrfKernels& crf_kernels();

}  // namespace cpu_kernels
}  // namespace fastmtl
