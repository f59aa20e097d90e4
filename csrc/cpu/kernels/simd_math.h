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

namespace fastmtl {
namespace cpu_kernels {

// A branch-free float exp (Cephes expf: Cody-Waite range reduction + degree-7 polynomial, about 1 ulp over the
// clamped range [-87.3, 88]) that vectorises; NaN propagates. double uses std::exp.
FASTMTL_KERNEL_INLINE float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln 2) with the 1.5 * 2^23 trick (no floor, so it vectorises without -ffast-math).
  const float magic = 12582912.0f;
  const float nm = x * 1.44269504088896341f + magic;
  const float n = nm - magic;
  int32_t ni;
  std::memcpy(&ni, &nm, sizeof(ni));
  ni -= 0x4B400000;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = uint32_t(ni + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return p * s;
}
FASTMTL_KERNEL_INLINE double exp_approx(double x) { return std::exp(x); }

#if defined(__GNUC__) || defined(__clang__)
#define FASTMTL_HAVE_VECTOR_EXT 1
// Passing wide vectors by value between functions of different ISAs would change the ABI; these helpers are only
// ever inlined into one entry point, so the warning does not apply.
#if defined(__clang__)
#if __has_warning("-Wpsabi")
#pragma clang diagnostic ignored "-Wpsabi"
#endif
#elif defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// Explicit SIMD through the compiler's generic vector types (GCC/Clang vector extensions): VB bytes of float, e.g.
// 32 for AVX2, 64 for AVX-512; the instructions come from the ISA of the inlining entry point. The compilers do not
// if-convert the clamps of exp_approx for AVX2 under the default -ftrapping-math, so the auto-vectoriser cannot be
// relied upon for these loops.
template <int VB>
struct VecF {
  typedef float type __attribute__((vector_size(VB)));
  typedef int32_t itype __attribute__((vector_size(VB)));
  typedef uint32_t utype __attribute__((vector_size(VB)));
  static constexpr int kWidth = VB / int(sizeof(float));
  static FASTMTL_KERNEL_INLINE type load(const float* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static FASTMTL_KERNEL_INLINE void store(float* p, const type& v) { std::memcpy(p, &v, sizeof(v)); }
  static FASTMTL_KERNEL_INLINE type splat(float x) { return type{} + x; }
  // exp_approx, lane-wise (same constants; NaN propagates).
  static FASTMTL_KERNEL_INLINE type exp(type x) {
    const type lo = splat(-87.3f), hi = splat(88.0f);
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const type magic = splat(12582912.0f);
    const type nm = x * 1.44269504088896341f + magic;
    const type n = nm - magic;
    const itype ni = (itype)nm - 0x4B400000;
    type r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    type p = splat(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    const type s = (type)(((utype)ni + 127u) << 23);  // unsigned: no signed overflow for NaN lanes
    return p * s;
  }
};

// Activations over VecF<VB>::type, the same formulas as KernelAct's float ones.
template <int VB>
struct VecAct {
  using V = typename VecF<VB>::type;
  static FASTMTL_KERNEL_INLINE V sigmoid(const V& x) { return 1.0f / (1.0f + VecF<VB>::exp(-x)); }
  static FASTMTL_KERNEL_INLINE V tanh(const V& x) { return 2.0f / (1.0f + VecF<VB>::exp(-2.0f * x)) - 1.0f; }
};
#endif

// Activations of the LSTM kernels. float: sigmoid(x) = 1 / (1 + e^-x), tanh(x) = 2 sigmoid(2x) - 1 (one exp, and
// vectorisable; the absolute error stays at float rounding level). double: the library functions.
struct KernelAct {
  static FASTMTL_KERNEL_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
  static FASTMTL_KERNEL_INLINE float tanh(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }
  static FASTMTL_KERNEL_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static FASTMTL_KERNEL_INLINE double tanh(double x) { return std::tanh(x); }
};

}  // namespace cpu_kernels
}  // namespace fastmtl
