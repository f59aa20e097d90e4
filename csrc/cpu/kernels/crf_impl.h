// Body of the linear-chain CRF step loops, included by each csrc/cpu/kernels/crf_<isa>.cpp, whose entry points
// (function attributes for their ISA) inline it; see simd_math.h for why everything here is always_inline and
// crf.h for the algorithm.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "simd_math.h"  // first: its diagnostic settings cover the instantiations below
#include "crf.h"

namespace fastmtl {
namespace cpu_kernels {

// Lanes of T in VB-byte vectors (the compilers' vector extensions, simd_math.h's Vec): float with the branch-free exp
// of simd_math.h (exactly 0 below -87, so a forbidden transition or a -inf score contributes nothing) and a
// Cephes-style log; double with the library functions (float64 is for accuracy, not speed).
// (Primary templates of their own, and bit casts through memcpy in place: GCC drops the vector attribute of such
// typedefs in partial specialisations and in deduced template arguments.)
template <int VB>
struct CrfLanesF : VecF<VB> {
  typedef typename VecF<VB>::type type;
  typedef typename VecF<VB>::itype itype;
  using VecF<VB>::splat;
  static constexpr int W = VecF<VB>::kWidth;
  // A scaled sum below kTiny is recomputed exactly (its terms may have underflowed); a pairwise-marginal scale
  // above exp(kMaxScale) takes the exact path (its factors could overflow).
  static constexpr float kTiny = 1e-30f;
  static constexpr float kMaxScale = 40.0f;
  static FASTMTL_KERNEL_INLINE type exp(type x) {
    const type r = VecF<VB>::exp(x);
    return x < splat(-87.0f) ? splat(0.0f) : r;
  }
  // Natural log of positive normal floats (Cephes logf: x = m 2^e, m in [sqrt(1/2), sqrt(2)), degree-8
  // polynomial; about 1 ulp). Other inputs give unspecified values: callers only use it on sums >= kTiny.
  static FASTMTL_KERNEL_INLINE type log(type x) {
    itype xi;
    std::memcpy(&xi, &x, sizeof(xi));
    itype e = ((xi >> 23) & 0xff) - 126;
    const itype mi = (xi & 0x007fffff) | 0x3f000000;
    type m;
    std::memcpy(&m, &mi, sizeof(m));  // [0.5, 1)
    const itype small = m < splat(0.707106781186547524f);
    e = e + small;  // -1 where small
    m = (small ? m + m : m) - 1.0f;
    const type z = m * m;
    type y = splat(7.0376836292E-2f);
    y = y * m - 1.1514610310E-1f;
    y = y * m + 1.1676998740E-1f;
    y = y * m - 1.2420140846E-1f;
    y = y * m + 1.4249322787E-1f;
    y = y * m - 1.6668057665E-1f;
    y = y * m + 2.0000714765E-1f;
    y = y * m - 2.4999993993E-1f;
    y = y * m + 3.3333331174E-1f;
    y = y * m * z;
    // float(e) through the 1.5 * 2^23 trick (|e| < 2^22)
    const itype ei = e + 0x4B400000;
    type fe;
    std::memcpy(&fe, &ei, sizeof(fe));
    fe = fe - 12582912.0f;
    y = y + fe * -2.12194440e-4f;
    y = y - 0.5f * z;
    return (m + y) + fe * 0.693359375f;
  }
};

template <int VB>
struct CrfLanesD : Vec<double, VB> {
  typedef typename Vec<double, VB>::type type;
  typedef int64_t itype __attribute__((vector_size(VB)));
  static constexpr int W = Vec<double, VB>::kWidth;
  static constexpr double kTiny = 1e-280;
  static constexpr double kMaxScale = 600.0;
  static FASTMTL_KERNEL_INLINE type exp(type x) { return each<false>(x); }
  static FASTMTL_KERNEL_INLINE type log(type x) { return each<true>(x); }
  // std::log (kLog) or std::exp of every lane.
  template <bool kLog>
  static FASTMTL_KERNEL_INLINE type each(type x) {
    double l[W];
    std::memcpy(l, &x, sizeof(x));
    for (int k = 0; k < W; ++k) l[k] = kLog ? std::log(l[k]) : std::exp(l[k]);
    std::memcpy(&x, l, sizeof(x));
    return x;
  }
};

template <typename T, int VB>
using CrfLanes = typename std::conditional<sizeof(T) == sizeof(float), CrfLanesF<VB>, CrfLanesD<VB>>::type;

template <typename T>
FASTMTL_KERNEL_INLINE T crf_ninf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
FASTMTL_KERNEL_INLINE T crf_max(const T* x, int64_t n) {
  T m = crf_ninf<T>();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// log sum_i exp(x[i * sx] + y[i * sy]) over i < n, exactly (accumulated in double); -inf when every term is.
template <typename T>
FASTMTL_KERNEL_INLINE T crf_lse(const T* x, int64_t sx, const T* y, int64_t sy, int64_t n) {
  T m = crf_ninf<T>();
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i * sx] + y[i * sy];
    m = v > m ? v : m;
  }
  if (m == crf_ninf<T>()) return m;
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(double(x[i * sx] + y[i * sy]) - double(m));
  return T(double(m) + std::log(s));
}

// out_s[j] = sum_{i < C} w_s[i] * M[i * Cp + j] for j < Cp and the S sequences s of the group: each row of M is
// loaded once for the whole group (two vectors of columns at a time, S x 2 accumulators in registers).
template <typename T, int VB, int S>
FASTMTL_KERNEL_INLINE void crf_matvec_n(T* const* w, const T* M, int64_t C, int64_t Cp, T* const* out) {
  using L = CrfLanes<T, VB>;
  using V = typename L::type;
  constexpr int W = L::W;
  int64_t j = 0;
  for (; j + 2 * W <= Cp; j += 2 * W) {
    V a0[S], a1[S];
    for (int s = 0; s < S; ++s) a0[s] = a1[s] = L::splat(T(0));
    const T* m = M + j;
    for (int64_t i = 0; i < C; ++i, m += Cp) {
      const V m0 = L::load(m), m1 = L::load(m + W);
      for (int s = 0; s < S; ++s) {
        const V ws = L::splat(w[s][i]);
        a0[s] += ws * m0;
        a1[s] += ws * m1;
      }
    }
    for (int s = 0; s < S; ++s) {
      L::store(out[s] + j, a0[s]);
      L::store(out[s] + j + W, a1[s]);
    }
  }
  for (; j < Cp; j += W) {
    V a0[S];
    for (int s = 0; s < S; ++s) a0[s] = L::splat(T(0));
    const T* m = M + j;
    for (int64_t i = 0; i < C; ++i, m += Cp) {
      const V m0 = L::load(m);
      for (int s = 0; s < S; ++s) a0[s] += L::splat(w[s][i]) * m0;
    }
    for (int s = 0; s < S; ++s) L::store(out[s] + j, a0[s]);
  }
}

template <typename T, int VB>
FASTMTL_KERNEL_INLINE void crf_matvec(T* const* w, const T* M, int64_t C, int64_t Cp, T* const* out, int ns) {
  static_assert(kCrfGroup == 4, "crf_matvec dispatches groups of up to 4 sequences");
  switch (ns) {
    case 1: crf_matvec_n<T, VB, 1>(w, M, C, Cp, out); break;
    case 2: crf_matvec_n<T, VB, 2>(w, M, C, Cp, out); break;
    case 3: crf_matvec_n<T, VB, 3>(w, M, C, Cp, out); break;
    case 4: crf_matvec_n<T, VB, 4>(w, M, C, Cp, out); break;
    default: break;
  }
}

// dst[0, Cp) = src[0, C) then `pad`.
template <typename T>
FASTMTL_KERNEL_INLINE void crf_load_row(T* dst, const T* src, int64_t C, int64_t Cp, T pad) {
  std::memcpy(dst, src, sizeof(T) * size_t(C));
  for (int64_t j = C; j < Cp; ++j) dst[j] = pad;
}

// The number of leading sequences of the group (longest first) still running at step t.
FASTMTL_KERNEL_INLINE int crf_active(const int64_t* lens, int ns, int64_t t) {
  int na = 0;
  while (na < ns && lens[na] > t) ++na;
  return na;
}

// ------------------------------------------------------------------------------------------------- forward
template <typename T, int VB>
FASTMTL_KERNEL_INLINE void crf_forward_impl(const CrfArgs<T>& a, const int64_t* ids, int ns, T* work) {
  using L = CrfLanes<T, VB>;
  using V = typename L::type;
  constexpr int W = L::W;
  const int64_t C = a.C, Cp = a.Cp, Tn = a.Tn;
  const T ninf = crf_ninf<T>();
  T* cur[kCrfGroup];
  T* p[kCrfGroup];
  T* s[kCrfGroup];
  int64_t lens[kCrfGroup];
  for (int k = 0; k < ns; ++k) {
    cur[k] = work + (3 * k) * Cp;
    p[k] = cur[k] + Cp;
    s[k] = p[k] + Cp;
    const int64_t b = ids[k];
    lens[k] = a.len[b];
    if (lens[k] == 0) continue;
    const T* e0 = a.em + b * Tn * C;
    T* al = a.alpha + b * Tn * C;
    for (int64_t j = 0; j < C; ++j) al[j] = cur[k][j] = a.start[j] + e0[j];
    for (int64_t j = C; j < Cp; ++j) cur[k][j] = ninf;
  }
  const int64_t tmax = ns > 0 ? lens[0] : 0;
  T ms[kCrfGroup];
  for (int64_t t = 1; t < tmax; ++t) {
    const int na = crf_active(lens, ns, t);
    for (int k = 0; k < na; ++k) {
      T m = crf_max(cur[k], C);
      if (!(m > ninf)) m = T(0);  // no allowed state (or NaN): every p is 0 and the exact path decides
      ms[k] = m;
      const V vm = L::splat(m);
      for (int64_t j = 0; j < Cp; j += W) L::store(p[k] + j, L::exp(L::load(cur[k] + j) - vm));
    }
    crf_matvec<T, VB>(p, a.E, C, Cp, s, na);
    for (int k = 0; k < na; ++k) {
      const int64_t row = ids[k] * Tn + t;
      const T* et = a.em + row * C;
      T* al = a.alpha + row * C;
      for (int64_t j = 0; j < Cp; j += W) L::store(p[k] + j, L::log(L::load(s[k] + j)));
      for (int64_t j = 0; j < C; ++j) {
        al[j] = s[k][j] >= L::kTiny ? ms[k] + a.tm[j] + p[k][j] + et[j]
                                    : crf_lse(cur[k], 1, a.trans_p + j, Cp, C) + et[j];
      }
      std::memcpy(cur[k], al, sizeof(T) * size_t(C));
    }
  }
  for (int k = 0; k < ns; ++k) {
    const int64_t b = ids[k];
    a.log_z[b] = lens[k] == 0 ? T(0) : crf_lse(cur[k], 1, a.end, 1, C);
  }
}

// ------------------------------------------------------------------------------------------------ backward
template <typename T, int VB>
FASTMTL_KERNEL_INLINE void crf_backward_impl(const CrfArgs<T>& a, const int64_t* ids, int ns, T* work,
                                             double* fallback) {
  using L = CrfLanes<T, VB>;
  using V = typename L::type;
  constexpr int W = L::W;
  const int64_t C = a.C, Cp = a.Cp, Tn = a.Tn;
  const T ninf = crf_ninf<T>();
  const bool marginals = a.tags == nullptr;
  T* beta[kCrfGroup];
  T* v[kCrfGroup];
  T* w[kCrfGroup];
  T* r[kCrfGroup];
  T* abuf[kCrfGroup];
  T* tmp[kCrfGroup];
  int64_t lens[kCrfGroup];
  T gs[kCrfGroup], lz[kCrfGroup], mv[kCrfGroup];
  bool skip[kCrfGroup];
  for (int k = 0; k < ns; ++k) {
    beta[k] = work + (6 * k) * Cp;
    v[k] = beta[k] + Cp;
    w[k] = v[k] + Cp;
    r[k] = w[k] + Cp;
    abuf[k] = r[k] + Cp;
    tmp[k] = abuf[k] + Cp;
    const int64_t b = ids[k];
    lens[k] = a.len[b];
    gs[k] = a.g ? a.g[b] : T(1);
    lz[k] = a.log_z[b];
    // nothing to propagate: a zero scale, or no allowed path at all (log Z = -inf: marginals are 0)
    skip[k] = (!marginals && gs[k] == T(0)) || lz[k] == ninf;
    crf_load_row(beta[k], a.end, C, Cp, ninf);
    for (int64_t j = 0; j < Cp; ++j) w[k][j] = T(0);
  }
  const int64_t tmax = ns > 0 ? lens[0] : 0;
  for (int64_t t = tmax - 1; t >= 0; --t) {
    const int na = crf_active(lens, ns, t);
    for (int k = 0; k < na; ++k) {
      const int64_t b = ids[k], row = b * Tn + t;
      T* ge = a.grad_em + row * C;
      if (skip[k]) {
        for (int64_t j = 0; j < C; ++j) ge[j] = T(0);
        if (t == 0 && a.gstart)
          for (int64_t j = 0; j < C; ++j) a.gstart[b * C + j] = T(0);
        if (t == lens[k] - 1 && a.gend)
          for (int64_t j = 0; j < C; ++j) a.gend[b * C + j] = T(0);
        continue;
      }
      crf_load_row(abuf[k], a.alpha + row * C, C, Cp, ninf);
      const V vz = L::splat(lz[k]);
      for (int64_t j = 0; j < Cp; j += W)
        L::store(tmp[k] + j, L::exp(L::load(abuf[k] + j) + L::load(beta[k] + j) - vz));
      const T g = gs[k];
      if (marginals) {
        std::memcpy(ge, tmp[k], sizeof(T) * size_t(C));
      } else {
        for (int64_t j = 0; j < C; ++j) ge[j] = g * tmp[k][j];
        ge[a.tags[row]] -= g;
        if (t == 0 && a.gstart) {
          T* gr = a.gstart + b * C;
          for (int64_t j = 0; j < C; ++j) gr[j] = g * tmp[k][j];
          gr[a.tags[row]] -= g;
        }
        if (t == lens[k] - 1 && a.gend) {
          T* gr = a.gend + b * C;
          for (int64_t j = 0; j < C; ++j) gr[j] = g * tmp[k][j];
          gr[a.tags[row]] -= g;
        }
      }
      if (t >= 1) {
        const T* et = a.em + row * C;
        for (int64_t j = 0; j < C; ++j) v[k][j] = et[j] + beta[k][j];
        for (int64_t j = C; j < Cp; ++j) v[k][j] = ninf;
        T m = crf_max(v[k], C);
        if (!(m > ninf)) m = T(0);
        mv[k] = m;
        const V vm = L::splat(m);
        for (int64_t j = 0; j < Cp; j += W) L::store(w[k] + j, L::exp(L::load(v[k] + j) - vm));
      }
    }
    if (t == 0) break;
    for (int k = 0; k < na; ++k)
      if (skip[k])
        for (int64_t j = 0; j < Cp; ++j) w[k][j] = T(0);
    crf_matvec<T, VB>(w, a.ET, C, Cp, r, na);
    for (int k = 0; k < na; ++k) {
      if (skip[k]) continue;
      const int64_t b = ids[k], row = b * Tn + t;
      const T* aprev = a.alpha + (row - 1) * C;
      if (a.P != nullptr) {
        // pairwise marginals of (t-1, t): exp(alpha_{t-1}(i) + A(i, j) + v_j - log Z)
        //   = [exp(alpha_{t-1}(i) - ma) c] E(i, j) [exp(v_j + tm_j - mb)],  c = g exp(ma + mb - log Z)
        crf_load_row(abuf[k], aprev, C, Cp, ninf);
        const T ma = crf_max(abuf[k], C);
        T mb = ninf;
        for (int64_t j = 0; j < C; ++j) {
          const T q = v[k][j] + a.tm[j];
          mb = q > mb ? q : mb;
        }
        if (ma > ninf && mb > ninf) {
          const T sc = ma + mb - lz[k];
          if (sc <= T(L::kMaxScale)) {
            const T c = gs[k] * T(std::exp(double(sc)));
            const V vma = L::splat(ma), vmb = L::splat(mb), vc = L::splat(c);
            T* P = a.P + row * Cp;
            T* Q = a.Q + row * Cp;
            for (int64_t j = 0; j < Cp; j += W) {
              L::store(P + j, L::exp(L::load(abuf[k] + j) - vma) * vc);
              L::store(Q + j, L::exp(L::load(v[k] + j) + L::load(a.tm + j) - vmb));
            }
          } else {
            const double g = double(gs[k]), z = double(lz[k]);
            for (int64_t i = 0; i < C; ++i) {
              if (!(aprev[i] > ninf)) continue;
              const T* Ai = a.trans_p + i * Cp;
              double* fr = fallback + i * C;
              for (int64_t j = 0; j < C; ++j) fr[j] += g * std::exp(double(aprev[i] + Ai[j] + v[k][j]) - z);
            }
          }
        }
      }
      // beta_{t-1}(i) = mv + tr_i + log(r_i), exactly where r_i underflowed
      for (int64_t j = 0; j < Cp; j += W) L::store(tmp[k] + j, L::log(L::load(r[k] + j)));
      for (int64_t i = 0; i < C; ++i) {
        beta[k][i] = r[k][i] >= L::kTiny ? mv[k] + a.tr[i] + tmp[k][i]
                                         : crf_lse(a.trans_p + i * Cp, 1, v[k], 1, C);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------- Viterbi
// One step of the max-product recursion for S sequences: for each column block, for from = 0..C-1 in order,
// (score[from] + A[from, :]) + e[:] (the operation order of pytorch-crf, so ties round alike) with a strict
// comparison, so the first maximal `from` wins, as torch.max.
template <typename T, int VB, int S>
FASTMTL_KERNEL_INLINE void crf_viterbi_step_n(const T* A, int64_t C, int64_t Cp, T* const* score,
                                              T* const* ebuf, T* const* nscore, int32_t* const* hist) {
  using L = CrfLanes<T, VB>;
  using V = typename L::type;
  using I = typename L::itype;
  using IE = typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type;
  constexpr int W = L::W;
  for (int64_t j = 0; j < Cp; j += W) {
    V best[S], ev[S];
    I idx[S];
    const V a0 = L::load(A + j);
    for (int s = 0; s < S; ++s) {
      ev[s] = L::load(ebuf[s] + j);
      best[s] = (L::splat(score[s][0]) + a0) + ev[s];
      idx[s] = I{};
    }
    for (int64_t f = 1; f < C; ++f) {
      const V af = L::load(A + f * Cp + j);
      const I fv = I{} + IE(f);
      for (int s = 0; s < S; ++s) {
        const V x = (L::splat(score[s][f]) + af) + ev[s];
        const I gt = x > best[s];
        best[s] = gt ? x : best[s];
        idx[s] = gt ? fv : idx[s];
      }
    }
    for (int s = 0; s < S; ++s) {
      L::store(nscore[s] + j, best[s]);
      IE lanes[W];
      std::memcpy(lanes, &idx[s], sizeof(lanes));
      for (int l = 0; l < W; ++l) hist[s][j + l] = int32_t(lanes[l]);
    }
  }
}

template <typename T, int VB>
FASTMTL_KERNEL_INLINE void crf_viterbi_impl(const CrfArgs<T>& a, const int64_t* ids, int ns, T* work,
                                            int32_t* hist) {
  const int64_t C = a.C, Cp = a.Cp, Tn = a.Tn;
  T* score[kCrfGroup];
  T* nscore[kCrfGroup];
  T* ebuf[kCrfGroup];
  int32_t* h[kCrfGroup];
  int64_t lens[kCrfGroup];
  for (int k = 0; k < ns; ++k) {
    score[k] = work + (3 * k) * Cp;
    nscore[k] = score[k] + Cp;
    ebuf[k] = nscore[k] + Cp;
    const int64_t b = ids[k];
    lens[k] = a.len[b];
    const T* e0 = a.em + b * Tn * C;
    for (int64_t j = 0; j < C; ++j) score[k][j] = a.start[j] + e0[j];
    for (int64_t j = C; j < Cp; ++j) score[k][j] = crf_ninf<T>();
  }
  const int64_t tmax = ns > 0 ? lens[0] : 0;
  for (int64_t t = 1; t < tmax; ++t) {
    const int na = crf_active(lens, ns, t);
    for (int k = 0; k < na; ++k) {
      crf_load_row(ebuf[k], a.em + (ids[k] * Tn + t) * C, C, Cp, T(0));
      h[k] = hist + (int64_t(k) * Tn + t) * Cp;
    }
    switch (na) {
      case 1: crf_viterbi_step_n<T, VB, 1>(a.trans_p, C, Cp, score, ebuf, nscore, h); break;
      case 2: crf_viterbi_step_n<T, VB, 2>(a.trans_p, C, Cp, score, ebuf, nscore, h); break;
      case 3: crf_viterbi_step_n<T, VB, 3>(a.trans_p, C, Cp, score, ebuf, nscore, h); break;
      case 4: crf_viterbi_step_n<T, VB, 4>(a.trans_p, C, Cp, score, ebuf, nscore, h); break;
      default: break;
    }
    for (int k = 0; k < na; ++k) {
      T* x = score[k];
      score[k] = nscore[k];
      nscore[k] = x;
    }
  }
  for (int k = 0; k < ns; ++k) {
    const int64_t b = ids[k], len = lens[k];
    int64_t* out = a.path + b * Tn;
    for (int64_t t = len; t < Tn; ++t) out[t] = -1;
    if (len == 0) continue;
    int64_t best = 0;
    T bv = score[k][0] + a.end[0];
    for (int64_t j = 1; j < C; ++j) {
      const T x = score[k][j] + a.end[j];
      if (x > bv) {
        bv = x;
        best = j;
      }
    }
    out[len - 1] = best;
    for (int64_t t = len - 1; t >= 1; --t) {
      best = hist[(int64_t(k) * Tn + t) * Cp + best];
      out[t - 1] = best;
    }
  }
}

}  // namespace cpu_kernels
}  // namespace fastmtl

// Defines the entry points and the table of one ISA: FASTMTL_DEFINE_CRF_KERNELS(name, vector bytes, attribute).
#define FASTMTL_DEFINE_CRF_KERNELS(isa, VB, ATTR)                                                               \
  namespace fastmtl {                                                                                           \
  namespace cpu_kernels {                                                                                       \
  namespace {                                                                                                   \
  ATTR void crf_fwd_f32_##isa(const CrfArgs<float>& a, const int64_t* ids, int ns, float* work) {               \
    crf_forward_impl<float, VB>(a, ids, ns, work);                                                              \
  }                                                                                                             \
  ATTR void crf_fwd_f64_##isa(const CrfArgs<double>& a, const int64_t* ids, int ns, double* work) {             \
    crf_forward_impl<double, VB>(a, ids, ns, work);                                                             \
  }                                                                                                             \
  ATTR void crf_bwd_f32_##isa(const CrfArgs<float>& a, const int64_t* ids, int ns, float* work, double* fb) {   \
    crf_backward_impl<float, VB>(a, ids, ns, work, fb);                                                         \
  }                                                                                                             \
  ATTR void crf_bwd_f64_##isa(const CrfArgs<double>& a, const int64_t* ids, int ns, double* work, double* fb) { \
    crf_backward_impl<double, VB>(a, ids, ns, work, fb);                                                        \
  }                                                                                                             \
  ATTR void crf_vit_f32_##isa(const CrfArgs<float>& a, const int64_t* ids, int ns, float* work, int32_t* h) {   \
    crf_viterbi_impl<float, VB>(a, ids, ns, work, h);                                                           \
  }                                                                                                             \
  ATTR void crf_vit_f64_##isa(const CrfArgs<double>& a, const int64_t* ids, int ns, double* work, int32_t* h) { \
    crf_viterbi_impl<double, VB>(a, ids, ns, work, h);                                                          \
  }                                                                                                             \
  const CrfKernels kCrfTable_##isa{&crf_fwd_f32_##isa, &crf_fwd_f64_##isa, &crf_bwd_f32_##isa,                  \
                                   &crf_bwd_f64_##isa, &crf_vit_f32_##isa, &crf_vit_f64_##isa};                 \
  }                                                                                                             \
  const CrfKernels* crf_kernels_##isa() { return &kCrfTable_##isa; }                                            \
  }                                                                                                             \
  }
