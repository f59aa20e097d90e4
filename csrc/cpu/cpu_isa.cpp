// Run-time ISA selection for the CPU kernels (see fastmtl/cpu_isa.h).
#include "fastmtl/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

#include "fastmtl/checks.h"

namespace fastmtl {
namespace cpu {
namespace {


bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
#ifdef FASTMTL_X86_KERNELS
    // __builtin_cpu_supports reads CPUID and checks that the OS saves the vector state (XGETBV), so a CPU
    // whose kernel or hypervisor disables AVX-512 reports it unsupported.
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
    default:
      return false;
  }
}

bool parse(std::string s, Isa& out, bool& is_auto) {
  is_auto = false;
  // case-insensitive, surrounding blanks ignored
  const auto b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  s = b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (s == "auto" || s.empty()) {
    is_auto = true;
    return true;
  }
  for (int i = 0; i < kNumIsa; ++i) {
    if (s == isa_name(static_cast<Isa>(i))) {
      out = static_cast<Isa>(i);
      return true;
    }
  }
  return false;
}

std::string supported_list() {
  std::string r;
  for (const auto& n : supported_isa_names()) r += (r.empty() ? "" : ", ") + n;
  return r;
}

// -2: not initialised yet; -1: auto; >= 0: forced ISA.
std::atomic<int> g_forced{-2};

int init_from_env() {
  const char* env = std::getenv("FASTMTL_CPU_KERNEL");
  const std::string s = env ? env : "";
  Isa isa = Isa::kScalar;
  bool is_auto = false;
  FASTMTL_CHECK(parse(s, isa, is_auto), "FASTMTL_CPU_KERNEL=", s,
                " is not a CPU kernel name; expected auto, scalar, avx2 or avx512 (supported here: ",
                supported_list(), ")");
  if (is_auto) return -1;
  FASTMTL_CHECK(isa_supported(isa), "FASTMTL_CPU_KERNEL=", s, " but this ",
                isa_compiled(isa) ? "CPU does not support it" : "build does not contain it",
                " (supported here: ", supported_list(), ")");
  return static_cast<int>(isa);
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

bool isa_compiled(Isa isa) {
#ifdef FASTMTL_X86_KERNELS
  return true;
#else
  return isa == Isa::kScalar;
#endif
}

bool isa_supported(Isa isa) {
  static const bool ok[kNumIsa] = {isa_compiled(Isa::kScalar) && cpu_has(Isa::kScalar),
                                   isa_compiled(Isa::kAvx2) && cpu_has(Isa::kAvx2),
                                   isa_compiled(Isa::kAvx512) && cpu_has(Isa::kAvx512)};
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kNumIsa && ok[i];
}

Isa best_isa() {
  for (int i = kNumIsa - 1; i > 0; --i)
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kScalar;
}

Isa active_isa() {
  int f = g_forced.load(std::memory_order_relaxed);
  if (f == -2) {
    f = init_from_env();  // throws on a bad value, leaving the state uninitialised (every call reports it)
    int expected = -2;
    if (!g_forced.compare_exchange_strong(expected, f)) f = expected;
  }
  return f < 0 ? best_isa() : static_cast<Isa>(f);
}

void set_active_isa(const std::string& name) {
  Isa isa = Isa::kScalar;
  bool is_auto = false;
  FASTMTL_CHECK_VALUE(parse(name, isa, is_auto), "set_cpu_kernel: '", name,
                      "' is not a CPU kernel name; expected auto, scalar, avx2 or avx512 (supported here: ",
                      supported_list(), ")");
  if (!is_auto) {
    FASTMTL_CHECK_VALUE(isa_supported(isa), "set_cpu_kernel: '", name, "' is not available: this ",
                        isa_compiled(isa) ? "CPU does not support it" : "build does not contain it",
                        " (supported here: ", supported_list(), ")");
  }
  g_forced.store(is_auto ? -1 : static_cast<int>(isa));
}

std::string isa_override() {
  active_isa();  // reads FASTMTL_CPU_KERNEL on first use
  const int f = g_forced.load();
  return f < 0 ? std::string("auto") : std::string(isa_name(static_cast<Isa>(f)));
}

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> r;
  for (int i = 0; i < kNumIsa; ++i)
    if (isa_supported(static_cast<Isa>(i))) r.emplace_back(isa_name(static_cast<Isa>(i)));
  return r;
}

}  // namespace cpu
}  // namespace fastmtl
