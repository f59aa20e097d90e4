// Element-wise math for the CPU kernels, written so that the compiler vectorises it with the instruction set of
// the kernel that inlines it (csrc/cpu/kernels/<op>_<isa>.cpp).
//
// Every function here is always_inline: its only copies are the ones inlined into the per-ISA entry points
// (functions with a target attribute), so no out-of-line copy compiled for a wider ISA exists that the linker
// could pick for baseline code. The ISA files therefore use function attributes, never a file-wide
// `#pragma GCC target` or -m flags (which would compile shared inline functions for the wider ISA).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define FASTMTL_KERNEL_INLINE inline __attribute__((always_inline))
#else
#define FASTMTL_KERNEL_INLINE inline
#endif

// Passing wide vectors by value between functions of different ISAs would change the ABI; these helpers are only
// ever inlined into one entry point, so the warning does not apply.
#if defined(__clang__)
#if __has_warning("-Wpsabi")
#pragma clang diagnostic ignored "-Wpsabi"
#endif
#elif defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fastmtl {
namespace cpu_kernels {

// A branch-free float exp (Cephes expf: Cody-Waite range reduction + degree-7 polynomial, about 1 ulp over the
// clamped range [-87.3, 88]) written once for the lanes L: L::type is a float or a vector of floats, L::itype /
// L::utype the signed / unsigned 32-bit integers of the same shape (ScalarLanes below, or VecF<VB>; the compilers'
// vector extensions give the lane-wise operators and selects). NaN propagates. No floor, so it vectorises without
// -ffast-math. (The types come through L, not as template arguments of their own: GCC drops the vector attribute of
// such typedefs there.)
template <typename To, typename From>
FASTMTL_KERNEL_INLINE To bit_cast_lanes(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}

template <typename L>
FASTMTL_KERNEL_INLINE typename L::type exp_lanes(typename L::type x) {
  using F = typename L::type;
  using I = typename L::itype;
  using U = typename L::utype;
  const F lo = F{} + -87.3f, hi = F{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // n = round(x / ln 2) with the 1.5 * 2^23 trick
  const F magic = F{} + 12582912.0f;
  const F nm = x * 1.44269504088896341f + magic;
  const F n = nm - magic;
  const I ni = bit_cast_lanes<I>(nm) - 0x4B400000;
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  // 2^n; unsigned, so no signed overflow for NaN lanes
  const U e = (bit_cast_lanes<U>(ni) + 127u) << 23;
  return p * bit_cast_lanes<F>(e);
}

struct ScalarLanes {
  typedef float type;
  typedef int32_t itype;
  typedef uint32_t utype;
};

FASTMTL_KERNEL_INLINE float exp_approx(float x) { return exp_lanes<ScalarLanes>(x); }
FASTMTL_KERNEL_INLINE double exp_approx(double x) { return std::exp(x); }

// Activations from an exp over the lane type F (a float or a vector of floats): sigmoid(x) = 1 / (1 + e^-x),
// tanh(x) = 2 sigmoid(2x) - 1 (one exp, and vectorisable; the absolute error stays at float rounding level).
template <typename Exp>
struct ExpAct {
  template <typename F>
  static FASTMTL_KERNEL_INLINE F sigmoid(const F& x) { return 1.0f / (1.0f + Exp::exp(-x)); }
  template <typename F>
  static FASTMTL_KERNEL_INLINE F tanh(const F& x) { return 2.0f / (1.0f + Exp::exp(-2.0f * x)) - 1.0f; }
};

struct ScalarExp {
  static FASTMTL_KERNEL_INLINE float exp(float x) { return exp_approx(x); }
};

#if defined(__GNUC__) || defined(__clang__)
#define FASTMTL_HAVE_VECTOR_EXT 1
// Explicit SIMD through the compiler's generic vector types (GCC/Clang vector extensions): VB bytes of E, e.g.
// 32 for AVX2, 64 for AVX-512; the instructions come from the ISA of the inlining entry point. Loads and stores go
// through memcpy (no alignment assumed), and a scalar is broadcast as 0 + x.
template <typename E, int VB>
struct Vec {
  typedef E type __attribute__((vector_size(VB)));
  static constexpr int kWidth = VB / int(sizeof(E));
  static FASTMTL_KERNEL_INLINE type load(const E* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static FASTMTL_KERNEL_INLINE void store(E* p, const type& v) { std::memcpy(p, &v, sizeof(v)); }
  static FASTMTL_KERNEL_INLINE type splat(E x) { return type{} + x; }
};

// VB bytes of float, with the integer vectors of exp_lanes. The compilers do not if-convert the clamps of exp_approx
// for AVX2 under the default -ftrapping-math, so the auto-vectoriser cannot be relied upon for these loops.
template <int VB>
struct VecF : Vec<float, VB> {
  typedef typename Vec<float, VB>::type type;
  typedef int32_t itype __attribute__((vector_size(VB)));
  typedef uint32_t utype __attribute__((vector_size(VB)));
  // exp_approx, lane-wise.
  static FASTMTL_KERNEL_INLINE type exp(type x) { return exp_lanes<VecF>(x); }
};

// Activations over VecF<VB>::type, the same formulas as KernelAct's float ones.
template <int VB>
using VecAct = ExpAct<VecF<VB>>;

// Whether a kernel of VB-byte vectors (0: none) runs its loops over T in explicit VecF<VB> vectors: float data only.
template <typename T, int VB>
constexpr bool kUseVecF = VB > 0 && sizeof(T) == sizeof(float);
#else
template <int VB>
struct VecF;  // no vector extensions: never instantiated
template <typename T, int VB>
constexpr bool kUseVecF = false;
#endif

// Activations of the LSTM kernels: float the approximations above, double the library functions.
struct KernelAct : ExpAct<ScalarExp> {
  using ExpAct<ScalarExp>::sigmoid;
  using ExpAct<ScalarExp>::tanh;
  static FASTMTL_KERNEL_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static FASTMTL_KERNEL_INLINE double tanh(double x) { return std::tanh(x); }
};

}  // namespace cpu_kernels
}  // namespace fastmtl
