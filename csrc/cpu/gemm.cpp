// The float32 GEMM dispatcher (csrc/cpu/kernels/gemm.h): the active ISA's kernel table, the per-thread packing
// workspace and the split of C over the threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "fastmtl/cpu_isa.h"
#include "kernels/gemm.h"
#include "matmul.h"

namespace fastmtl {
namespace cpu_kernels {
const GemmKernels& gemm_kernels() {
  return cpu::select_kernels(gemm_kernels_scalar(), gemm_kernels_avx2(), gemm_kernels_avx512());
}
}  // namespace cpu_kernels

namespace cpu {
namespace {

// The packing workspace of the calling thread (64-byte aligned), kept across calls: at most a few MiB.
float* workspace(int64_t floats) {
  struct Buf {
    float* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf buf;
  if (buf.n < floats) {
    std::free(buf.p);
    buf.p = nullptr;
    buf.n = 0;
    const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + 63) / 64 * 64;
    buf.p = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(buf.p != nullptr, "fastmtl gemm_f32: out of memory for a ", bytes, "-byte packing workspace");
    buf.n = floats;
  }
  return buf.p;
}

// Below this many multiply-adds a GEMM runs on one thread (the split would cost more than it saves).
constexpr double kParallelMacs = 1 << 20;

}  // namespace

// Measured (1 and 2 threads, AMD EPYC Zen 5, torch's MKL): the AVX-512 kernel about 2x torch (190-210 against
// 90-98 GFLOP/s per core) on the large LSTM GEMMs and from one register tile of rows up (14 x 512 x 2048: 0.21
// against 0.42 ms), the AVX2 one 1.05-1.25x on the large ones and on par from 6 rows. For a few rows the whole of
// B is packed and torch's GEMV-like path wins (1 x 512 x 2048: 0.06 against 0.22 ms). The per-ISA choice
// (GemmKernels::beats_blas) was measured against MKL on this AMD CPU only: on an Intel CPU MKL's own AVX2/AVX-512
// paths are tuned and may match or beat these kernels. On a Zen 4 the LSTM's input projection with few rows is
// the exception (matmul.h: kInputProjectionMinRows).
bool use_own_gemm_f32(int64_t m, int64_t n, int64_t k) {
  const cpu_kernels::GemmKernels& t = cpu_kernels::gemm_kernels();
  return t.beats_blas && m >= t.mr && n > 0 && k > 0;
}

void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  TORCH_CHECK(beta == 0.f || beta == 1.f, "fastmtl gemm_f32: beta must be 0 or 1, got ", beta);
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (beta == 0.f)
      for (int64_t i = 0; i < m; ++i) std::memset(C + i * ldc, 0, sizeof(float) * n);
    return;
  }
  const cpu_kernels::GemmKernels& t = cpu_kernels::gemm_kernels();
  cpu_kernels::GemmF32 g;
  g.trans_a = trans_a;
  g.trans_b = trans_b;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = A;
  g.lda = lda;
  g.b = B;
  g.ldb = ldb;
  g.beta = beta;
  g.c = C;
  g.ldc = ldc;
  g.mc = t.mc;
  g.kc = t.kc;
  g.nc = t.nc;
  const int64_t ws = cpu_kernels::gemm_workspace_floats(g, t.mr, t.nr);
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  // Split the larger of m and n into whole register tiles, one part per thread; each part packs its own panels
  // (the other operand's packing is repeated per part, a cost of order 1/m or 1/n of the product).
  const bool split_m = m >= n;
  const int64_t unit = split_m ? t.mr : t.nr, blocks = ((split_m ? m : n) + unit - 1) / unit;
  const int64_t parts = double(m) * double(n) * double(k) < kParallelMacs ? 1 : std::min<int64_t>(nt, blocks);
  if (parts <= 1) {
    t.gemm_f32(g, 0, m, 0, n, workspace(ws));
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    float* w = workspace(ws);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t lo = std::min(p * blocks / parts * unit, split_m ? m : n);
      const int64_t hi = std::min((p + 1) * blocks / parts * unit, split_m ? m : n);
      if (hi <= lo) continue;
      if (split_m) t.gemm_f32(g, lo, hi, 0, n, w);
      else t.gemm_f32(g, 0, m, lo, hi, w);
    }
  });
}

// How gemm_f32 addresses a 2-D view (rows x cols): stored row-major (unit column stride, ld = row stride) or
// transposed (unit row stride, ld = column stride); false when neither stride is 1.
static bool gemm_operand(const at::Tensor& t, bool& trans, int64_t& ld) {
  if (t.size(1) <= 1 || t.stride(1) == 1) {
    trans = false;
    ld = t.stride(0);
    return true;
  }
  if (t.size(0) <= 1 || t.stride(0) == 1) {
    trans = true;
    ld = t.stride(1);
    return true;
  }
  return false;
}

// See matmul.h. The ATen side calls the public CPU kernels (at::cpu::mm_out / addmm_, the structured kernels behind
// at::mm_out) directly: torch's BLAS without a dispatcher round trip per call (the LSTM's per-step GEMMs are many
// and small, and in its concurrent-directions path they run on worker threads where every dispatcher call would
// go through the autograd layers again).
void matmul_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, float beta,
                 int64_t min_own_rows) {
  if (c.numel() == 0) return;
  if (a.size(1) == 0) {
    if (beta == 0.f) c.zero_();
    return;
  }
  const int64_t m = c.size(0), n = c.size(1), k = a.size(1);
  bool ta = false, tb = false;
  int64_t lda = 0, ldb = 0;
  if (c.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
      (n <= 1 || c.stride(1) == 1) && m >= min_own_rows && cpu::use_own_gemm_f32(m, n, k) &&
      gemm_operand(a, ta, lda) && gemm_operand(b, tb, ldb)) {
    cpu::gemm_f32(ta, tb, m, n, k, a.const_data_ptr<float>(), lda, b.const_data_ptr<float>(), ldb, beta,
                  c.data_ptr<float>(), c.stride(0));
    return;
  }
  at::Tensor out = c;
  if (beta == 0.f) at::cpu::mm_out(out, a, b);
  else at::cpu::addmm_(out, a, b);
}

}  // namespace cpu
}  // namespace fastmtl
