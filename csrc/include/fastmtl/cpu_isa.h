// Run-time choice of the CPU kernels' instruction set.
//
// The hot loops of the CPU ops (LSTM cell passes, cross-entropy row passes) are compiled once per instruction set
// in csrc/cpu/kernels/<op>_<isa>.cpp (baseline "scalar", "avx2" = AVX2 + FMA, "avx512" = AVX-512 F/BW/DQ/VL), the
// extension itself for the baseline ISA. Which one runs is decided at run time from the CPU's real features
// (CPUID, with the operating system's support for the vector state), so one binary runs on every x86-64 and
// aarch64 CPU. One override, for tests and debugging: the environment variable FASTMTL_CPU_KERNEL=auto|scalar|
// avx2|avx512 (read on first use), or set_active_isa() (Python: fastmtl.set_cpu_kernel). Asking for an ISA this
// CPU or build lacks is an error, never a silent fallback and never an illegal instruction.
#pragma once

#include <string>
#include <vector>

// The x86 kernels (avx2, avx512) are compiled with GCC and Clang (function target attributes, vector extensions,
// __builtin_cpu_supports from libgcc / compiler-rt); not with MSVC or clang-cl.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64)) && !defined(_MSC_VER)
#define FASTMTL_X86_KERNELS 1
// The function attributes of the per-ISA entry points (csrc/cpu/kernels/<op>_<isa>.cpp), and only of them.
#define FASTMTL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define FASTMTL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"), min_vector_width(512)))
#else
#define FASTMTL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")))
#endif
#endif

namespace fastmtl {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumIsa = 3;

const char* isa_name(Isa isa);
// Compiled into this build (x86-64 with GCC or Clang for avx2/avx512; always for scalar).
bool isa_compiled(Isa isa);
// Compiled and executable on this CPU.
bool isa_supported(Isa isa);
// The best supported ISA.
Isa best_isa();
// The ISA the kernels use now: the override when set, else best_isa(). Throws (c10::Error, a RuntimeError in
// Python) when FASTMTL_CPU_KERNEL names an unknown or unsupported ISA.
Isa active_isa();
// "auto" (back to best_isa()), "scalar", "avx2" or "avx512" (case-insensitive); throws ValueError-type errors for
// unknown or unsupported names. Process-wide (every thread), from the next op call on; it replaces the environment
// variable's choice.
void set_active_isa(const std::string& name);
// "auto" or the forced ISA's name (set_active_isa, or FASTMTL_CPU_KERNEL), e.g. to restore it later.
std::string isa_override();
// Names of the supported ISAs, baseline first.
std::vector<std::string> supported_isa_names();

// The kernel table of active_isa() among an op's per-ISA tables (nullptr: not compiled into this build).
template <typename Table>
const Table& select_kernels(const Table* scalar, const Table* avx2, const Table* avx512) {
  switch (active_isa()) {
    case Isa::kAvx512:
      if (avx512) return *avx512;
      break;
    case Isa::kAvx2:
      if (avx2) return *avx2;
      break;
    default:
      break;
  }
  return *scalar;
}

}  // namespace cpu
}  // namespace fastmtl
