// Fused CPU LSTM layer (both directions), forward and backward. Schema and layout: csrc/fastmtl.cpp.
//
// Forward, per layer:
//   * the input projection of every (active) time step of both directions is one GEMM per direction:
//       gx (N, D*4H) = X_packed (N, I) @ W_ih^T       (the biases are added in the step kernel)
//     X_packed holds, for t = 0..T-1, the rows x[t, :n_t] (n_t = number of sequences with length > t, a prefix of
//     the batch because the caller sorts by length). With equal lengths X_packed is the input itself (no copy).
//   * the time loop is fastmtl's own step kernel (csrc/cpu/kernels/lstm_cell_<isa>.cpp, chosen at run time from
//     the CPU's features): per step and direction a register-blocked GEMM h_{t-1} @ W_hh^T against W_hh packed
//     once per call into the micro-kernel's panel layout, whose epilogue adds gx_t and the bias, applies the gates
//     and the cell update while the tile is in registers and writes h_t into the output rows, c_t and the reserve.
//     One sequence (B <= kGemvRows) skips the pack: its step kernel (fwd_gemv_*) reads W_hh as it is.
//     h_{t-1} is read from the previous step's output rows (or hx where a sequence starts), so nothing is copied
//     or transposed per step. The hidden units are split over the threads of one parallel region for the whole
//     loop (both directions concurrently, a barrier per step among the threads of a direction; none at all with
//     two threads and two directions).
//   * a sequence that stops keeps its state: c lives in cy and is only touched while the sequence runs; hy is
//     read from the output at its last real token. The reverse direction starts a row at its last real token
//     simply because the row only becomes active there.
// Backward: the same walk in the other order with the backward step kernel: dh_t = dG_{t+1} @ W_hh (packed) +
//   grad_output_t, and the epilogue forms the pre-activation gradients dG_t (packed (N, D*4H)) and dc_{t-1} in
//   registers; then the weight gradients as large GEMMs over all steps: dW_ih = dG^T X_packed,
//   dW_hh = dG^T H_prev_packed, db = sum dG, grad_input = dG W_ih (scattered back to the padded layout).
// The reserve (D, T, B, 5H) holds per step and row the activated gates i, f, g, o and c (row-major).
// The float32 GEMMs run on fastmtl's own packed GEMM (csrc/cpu/kernels/gemm.h) where the active ISA's kernel was
// measured faster than torch's BLAS (AVX-512 and AVX2 here; cpu::use_own_gemm_f32), everything else (float64, the
// scalar ISA) through ATen's public CPU API (at::cpu::mm_out, addmm_); nothing private of torch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <utility>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastmtl/checks.h"
#include "fastmtl/cpu_isa.h"
#include "fastmtl/lstm_checks.h"
#include "kernels/gemm.h"
#include "kernels/lstm_cell.h"
#include "lstm.h"
#include "matmul.h"

namespace fastmtl {
namespace {

template <typename T>
using FwdFn = void (*)(const cpu_kernels::FwdStep<T>&, int64_t, int64_t);
template <typename T>
using BwdFn = void (*)(const cpu_kernels::BwdStep<T>&, int64_t, int64_t);

// The step kernels of the ISA chosen for this call (fastmtl/cpu_isa.h).
template <typename T>
FwdFn<T> fwd_kernel(const cpu_kernels::LstmCellKernels& k) {
  if constexpr (std::is_same_v<T, float>) return k.fwd_f32;
  else return k.fwd_f64;
}
template <typename T>
FwdFn<T> fwd_gemv_kernel(const cpu_kernels::LstmCellKernels& k) {
  if constexpr (std::is_same_v<T, float>) return k.fwd_gemv_f32;
  else return k.fwd_gemv_f64;
}
template <typename T>
BwdFn<T> bwd_kernel(const cpu_kernels::LstmCellKernels& k) {
  if constexpr (std::is_same_v<T, float>) return k.bwd_f32;
  else return k.bwd_f64;
}
template <typename T>
int lanes(const cpu_kernels::LstmCellKernels& k) {
  return std::is_same_v<T, float> ? k.lanes_f32 : k.lanes_f64;
}

using cpu::matmul_into;  // csrc/cpu/matmul.h

// Row-major C (m x n, ldc) = op(A) @ op(B) + beta * C; op(A) = A^T with A stored (k x m, lda) when trans_a, else
// A (m x k, lda); op(B) = B^T with B stored (n x k, ldb) when trans_b, else B (k x n, ldb). beta is 0 or 1.
// On raw pointers into the caller's buffers (no copies; grad_hx's GEMM on the rows where sequences start), as
// matmul_into (float32 through gemm_f32 where cpu::use_own_gemm_f32 says so).
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda,
                    const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (k > 0 && cpu::use_own_gemm_f32(m, n, k)) {
      cpu::gemm_f32(trans_a, trans_b, m, n, k, A, lda, B, ldb, beta, C, ldc);
      return;
    }
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto Cv = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  if (k == 0) {
    if (beta == T(0)) Cv.zero_();
    return;
  }
  auto Av = trans_a ? at::from_blob(const_cast<T*>(A), {k, m}, {lda, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opts);
  auto Bv = trans_b ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opts);
  if (beta == T(0)) at::cpu::mm_out(Cv, Av, Bv);
  else at::cpu::addmm_(Cv, Av, Bv);
}

// Scratch buffers reused across calls, per thread and per purpose ("slot"). A fresh multi-MiB allocation costs a
// page fault and a page clear per 4 KiB on first touch (the allocator hands large blocks back to the OS), which
// measured as 20-35 % of a layer's time here. A slot keeps its largest buffer up to 64 MiB; larger requests
// are allocated per call. Scratch never escapes an op call.
enum ScratchSlot { kGates = 0, kPackedX, kPackW, kDGates, kHPrev0, kHPrev1, kNumSlots };

at::Tensor scratch(ScratchSlot slot, at::IntArrayRef shape, const at::TensorOptions& opts) {
  constexpr int64_t cap_bytes = int64_t(64) << 20;
  thread_local at::Tensor cache[kNumSlots];
  const int64_t numel = c10::multiply_integers(shape);
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  if (bytes > cap_bytes) return at::empty(shape, opts);
  at::Tensor& buf = cache[slot];
  if (!buf.defined() || buf.dtype() != opts.dtype() || buf.numel() < numel) {
    buf = at::Tensor();
    buf = at::empty({numel}, opts);
  }
  return buf.narrow(0, 0, numel).view(shape);
}

// Active rows per step: n[t] = #{b : length_b > t} (a prefix), off[t] = sum_{t' < t} n[t'], N = sum n[t].
struct Steps {
  std::vector<int64_t> n, off;
  int64_t N = 0;
  bool full = true;  // every sequence runs all T steps (the packed layout is the padded one)
};

Steps make_steps(const std::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  Steps s;
  s.n.assign(T, B);
  s.off.assign(T, 0);
  if (lengths.has_value()) {
    const int64_t* len = lengths->data_ptr<int64_t>();
    std::vector<int64_t> cnt(T + 1, 0);
    for (int64_t b = 0; b < B; ++b) cnt[len[b]]++;  // number of sequences of each length
    int64_t running = B;
    for (int64_t t = 0; t < T; ++t) {
      running -= cnt[t];  // sequences with length <= t have stopped
      s.n[t] = running;
      if (running != B) s.full = false;
    }
  }
  int64_t acc = 0;
  for (int64_t t = 0; t < T; ++t) {
    s.off[t] = acc;
    acc += s.n[t];
  }
  s.N = acc;
  return s;
}

// Rows x[t, :n_t] for all t, stacked: (N, F). The input itself when every sequence is full length.
at::Tensor pack_rows(const at::Tensor& x, const Steps& s) {
  const int64_t T = x.size(0), B = x.size(1), F = x.size(2);
  if (s.full) return x.view({T * B, F});
  auto out = scratch(kPackedX, {s.N, F}, x.options());
  const int64_t row_bytes = F * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      if (s.n[t] > 0) std::memcpy(dst + s.off[t] * row_bytes, src + t * B * row_bytes, s.n[t] * row_bytes);
  });
  return out;
}

// Inverse of pack_rows: (N, F) -> (T, B, F) with zero rows at padded positions.
at::Tensor unpack_rows(const at::Tensor& p, const Steps& s, int64_t T, int64_t B) {
  const int64_t F = p.size(1);
  if (s.full) return p.view({T, B, F});
  auto out = at::empty({T, B, F}, p.options());
  const int64_t row_bytes = F * p.element_size();
  const char* src = static_cast<const char*>(p.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (s.n[t] > 0) std::memcpy(dst + t * B * row_bytes, src + s.off[t] * row_bytes, s.n[t] * row_bytes);
      if (s.n[t] < B) std::memset(dst + (t * B + s.n[t]) * row_bytes, 0, (B - s.n[t]) * row_bytes);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The step loop: one parallel region for the whole time loop.
// ---------------------------------------------------------------------------------------------------------
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// A barrier for `size` participants in which a caller may stand for several (weight): the per-step
// synchronisation of the threads sharing a direction's hidden units. Spins briefly, then yields (the machine may be
// shared).
class StepBarrier {
 public:
  void reset(int size) {
    size_ = size;
    count_.store(0);
  }
  void arrive_and_wait(int weight) {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(weight, std::memory_order_acq_rel) + weight == size_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 20000) cpu_relax();
      else std::this_thread::yield();
    }
  }

 private:
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> gen_{0};
  int size_ = 1;
};

// Workers of a layer: a direction's hidden-unit blocks are split over its group of workers. Both directions run
// concurrently, each on half of the threads (with two threads: one direction each, no synchronisation at all in
// the time loop); one direction gets all of them. Worker v of the parallel_for range [0, nv) belongs to
// direction dir_of(v) with rank v - start[dir] in a group of size[dir].
struct Team {
  int D = 1, nv = 1;
  int start[2] = {0, 0}, size[2] = {1, 1};
  int dir_of(int v) const { return D == 2 && v >= start[1] ? 1 : 0; }
};

Team make_team(int64_t D) {
  Team tm;
  tm.D = static_cast<int>(D);
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  if (D == 2) {
    tm.size[0] = std::max(1, nt / 2);
    tm.size[1] = std::max(1, nt - tm.size[0]);
    tm.start[1] = tm.size[0];
    tm.nv = tm.size[0] + tm.size[1];
  } else {
    tm.size[0] = nt;
    tm.nv = nt;
  }
  return tm;
}

// Runs worker(dir, rank, group_size) for every worker once ("setup"), then step(dir, rank, group_size, s) for
// s = 0..steps-1 with a barrier per step within each direction's group. A thread of the parallel region may stand
// for several consecutive workers (when the runtime gives fewer threads); it then runs their steps in turn and
// arrives at the barrier for all of them, so nothing can deadlock.
template <typename Setup, typename Step>
void run_team(const Team& tm, int64_t steps, const Setup& setup, const Step& step) {
  StepBarrier bar[2];
  bar[0].reset(tm.size[0]);
  bar[1].reset(tm.size[1]);
  auto body = [&](int64_t v0, int64_t v1) {
    int weight[2] = {0, 0};
    for (int64_t v = v0; v < v1; ++v) {
      const int dir = tm.dir_of(int(v));
      ++weight[dir];
      setup(dir, int(v) - tm.start[dir], tm.size[dir]);
    }
    for (int64_t s = 0; s < steps; ++s) {
      for (int64_t v = v0; v < v1; ++v) {
        const int dir = tm.dir_of(int(v));
        step(dir, int(v) - tm.start[dir], tm.size[dir], s);
      }
      for (int dir = 0; dir < tm.D; ++dir)
        if (weight[dir] > 0 && weight[dir] < tm.size[dir]) bar[dir].arrive_and_wait(weight[dir]);
    }
  };
  if (tm.nv == 1) body(0, 1);
  else at::parallel_for(0, tm.nv, 1, body);
}

// Blocks [lo, hi) of `count` owned by rank r of a group of g.
inline std::pair<int64_t, int64_t> share(int64_t count, int r, int g) {
  return {count * r / g, count * (r + 1) / g};
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
// Up to this many rows (sequences) the forward step reads W_hh unpacked (LstmCellKernels::fwd_gemv_*).
constexpr int64_t kGemvRows = 1;
// Up to this many active rows (all steps) the float32 input projection is DotRows in the time loop's workers.
// Measured on a Zen 4 (B = 1, H = 256, bidirectional; the whole op against the same op with torch's BLAS for the
// projection): one thread 0.29 against 0.34 ms at 5 rows, 0.41 against 0.44 at 8, even at 14 (-2 to +4 %), 3-10 %
// slower from 20 rows on (E = 300: from 14); two threads 5-25 % faster up to 20 rows (each direction projects its
// own columns on its own thread). Above this, the GEMM.
constexpr int64_t kProjRowsMax = 16;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cpu(
    const at::Tensor& input_, const std::optional<at::Tensor>& lengths, const at::Tensor& hx_,
    const at::Tensor& cx, at::TensorList weights, bool bidirectional, bool need_reserve) {
  const LstmDims d = check_lstm_layer_args(input_, lengths, hx_, cx, weights, bidirectional, "lstm_layer_forward",
                                           /*cuda=*/false);
  const int64_t T = d.T, B = d.B, H = d.H, D = d.D, G4 = 4 * H, per = d.bias ? 4 : 2, DH = D * H;
  auto input = input_.contiguous();
  auto output = at::empty({T, B, D * H}, input.options());
  auto reserve = need_reserve ? at::empty({D, T, B, 5 * H}, input.options()) : at::empty({0}, input.options());
  if (T == 0 || B == 0 || H == 0) {
    if (need_reserve) reserve.zero_();
    output.zero_();
    return {output, hx_.contiguous().clone(), cx.contiguous().clone(), reserve};
  }
  std::optional<at::Tensor> len_c;
  if (lengths.has_value()) len_c = lengths->contiguous();
  const Steps s = make_steps(len_c, T, B);
  const int64_t N = s.N;
  auto hx = hx_.contiguous();
  auto cy = cx.contiguous().clone();  // the running cell state (D, B, H), updated in place
  auto Xp = pack_rows(input, s);
  // gx (N, D*4H): the input projection of every active row, one GEMM per direction into its columns (the biases
  // are added in the step kernel). Step t's rows are [off_t, off_t + n_t).
  // A few float32 rows (with a vector ISA): each worker of the time loop projects its own units' columns first
  // (DotRows, W_ih unpacked); otherwise one GEMM per direction here.
  const cpu_kernels::LstmCellKernels& kernels = cpu_kernels::lstm_cell_kernels();
  const bool proj_rows = input.scalar_type() == at::kFloat && N <= kProjRowsMax && kernels.lanes_f32 >= 4;
  at::Tensor gx = scratch(kGates, {N, D * G4}, input.options());
  at::Tensor bias = d.bias ? at::empty({D, G4}, input.options()) : at::Tensor();
  std::vector<at::Tensor> w_hh(D), w_ih(D);
  for (int64_t dir = 0; dir < D; ++dir) {
    if (proj_rows) w_ih[dir] = weights[dir * per].contiguous();
    else matmul_into(Xp, weights[dir * per].t(), gx.narrow(1, dir * G4, G4), 0.f, cpu::kInputProjectionMinRows);
    if (d.bias) {
      at::Tensor bd = bias[dir];
      at::add_out(bd, weights[dir * per + 2], weights[dir * per + 3]);
    }
    w_hh[dir] = weights[dir * per + 1].contiguous();
  }

  const Team tm = make_team(D);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_forward_cpu", [&] {
    using T_ = scalar_t;
    // Few rows: the step kernel reads W_hh as it is (kGemvRows); otherwise it is packed once per call for the tile
    // kernel, whose panels pay for the pack from a few rows on.
    const bool gemv = B <= kGemvRows;
    const FwdFn<T_> kernel = gemv ? fwd_gemv_kernel<T_>(kernels) : fwd_kernel<T_>(kernels);
    const int W = lanes<T_>(kernels);
    const int64_t PF = cpu_kernels::fwd_blocks(H, W), psize = cpu_kernels::fwd_packed_size(H, W);
    at::Tensor packed = gemv ? at::Tensor() : scratch(kPackW, {D, psize}, input.options());
    T_* wp = gemv ? nullptr : packed.data_ptr<T_>();
    const T_* gxp = gx.const_data_ptr<T_>();
    T_* outp = output.data_ptr<T_>();
    const T_* hxp = hx.const_data_ptr<T_>();
    T_* cp = cy.data_ptr<T_>();
    T_* resp = need_reserve ? reserve.data_ptr<T_>() : nullptr;
    const T_* biasp = ptr_or_null<T_>(bias);
    auto setup = [&](int dir, int rank, int g) {
      const auto [p0, p1] = share(PF, rank, g);
      if constexpr (std::is_same_v<T_, float>) {
        const int64_t j0 = std::min(H, p0 * W), j1 = std::min(H, p1 * W);
        if (proj_rows && j0 < j1) {
          const int64_t I = Xp.size(1);
          for (int64_t g4 = 0; g4 < 4; ++g4) {  // gate g4's columns of this worker's units
            cpu_kernels::DotRows<float> dr{Xp.const_data_ptr<float>(), I, N, I,
                                           w_ih[dir].const_data_ptr<float>() + g4 * H * I, nullptr,
                                           gx.data_ptr<float>() + dir * G4 + g4 * H, D * G4};
            kernels.dot_rows_f32(dr, j0, j1);
          }
        }
      }
      if (gemv) return;
      cpu_kernels::pack_fwd<T_>(w_hh[dir].const_data_ptr<T_>(), H, W, wp + dir * psize, p0, p1);
    };
    auto step = [&](int dir, int rank, int g, int64_t st) {
      const auto [p0, p1] = share(PF, rank, g);
      const int64_t t = dir == 0 ? st : T - 1 - st;
      const int64_t n = s.n[t];
      T_* out_t = outp + t * B * DH + dir * H;
      T_* res_t = resp ? resp + (dir * T + t) * B * 5 * H : nullptr;
      if (n > 0 && p0 < p1) {
        cpu_kernels::FwdStep<T_> a{};
        a.gx = gxp + s.off[t] * D * G4 + dir * G4;
        a.gx_ld = D * G4;
        a.bias = biasp ? biasp + dir * G4 : nullptr;
        const int64_t tp = dir == 0 ? t - 1 : t + 1;  // the step that produced h_{t-1}
        a.hp_b = hxp + dir * B * H;
        a.hp_b_ld = H;
        if (tp >= 0 && tp < T) {
          a.hp_a = outp + tp * B * DH + dir * H;
          a.hp_a_ld = DH;
          a.split = s.n[tp];
        } else {
          a.hp_a = a.hp_b;
          a.hp_a_ld = H;
          a.split = 0;
        }
        a.c = cp + dir * B * H;
        a.out = out_t;
        a.out_ld = DH;
        a.reserve = res_t;
        a.wp = gemv ? w_hh[dir].const_data_ptr<T_>() : wp + dir * psize;
        a.H = H;
        a.n = n;
        kernel(a, p0, p1);
      }
      // padded rows: zero output (and reserve, so that it is fully defined) in this worker's units
      const int64_t j0 = std::min(H, p0 * W), j1 = std::min(H, p1 * W);
      if (j1 > j0) {
        for (int64_t b = n; b < B; ++b) {
          std::memset(out_t + b * DH + j0, 0, (j1 - j0) * sizeof(T_));
          if (res_t)
            for (int64_t k = 0; k < 5; ++k) std::memset(res_t + b * 5 * H + k * H + j0, 0, (j1 - j0) * sizeof(T_));
        }
      }
    };
    run_team(tm, T, setup, step);
  });
  // hy: h at each sequence's last real token (forward: t = len - 1; reverse: t = 0), hx for empty sequences.
  auto hy = at::empty({D, B, H}, input.options());
  {
    const int64_t es = input.element_size();
    const char* outb = static_cast<const char*>(output.const_data_ptr());
    const char* hxb = static_cast<const char*>(hx.const_data_ptr());
    char* hyb = static_cast<char*>(hy.data_ptr());
    const int64_t* len = len_c.has_value() ? len_c->const_data_ptr<int64_t>() : nullptr;
    for (int64_t dir = 0; dir < D; ++dir)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t L = len ? len[b] : T;
        const char* src = L == 0 ? hxb + (dir * B + b) * H * es
                                 : outb + ((dir == 0 ? L - 1 : 0) * B * DH + b * DH + dir * H) * es;
        std::memcpy(hyb + (dir * B + b) * H * es, src, H * es);
      }
  }
  return {output, hy, cy, reserve};
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------
// Steps of the gradient rows when every forward row carries K cotangents (rows b*K .. b*K+K-1): n_t*K rows per
// step, still a prefix.
Steps scale_steps(const Steps& s, int64_t K) {
  if (K == 1) return s;
  Steps g = s;
  for (auto& v : g.n) v *= K;
  for (auto& v : g.off) v *= K;
  g.N = s.N * K;
  return g;
}

struct BackwardResult {
  at::Tensor grad_input;  // (T, B*K, I), gradient row b*K + k
  at::Tensor grad_hx;     // (D, B*K, H)
  at::Tensor grad_cx;     // (D, B*K, H)
  std::vector<at::Tensor> grad_w;  // each (K, *weight.shape)
};

// The backward of one layer for K cotangents against one saved forward (K = 1: lstm_layer_backward). The
// cotangents come interleaved: go (T, B*K, D*H), ghy and gcy (D, B*K, H), gradient row b*K + k the k-th cotangent
// of forward row b. The time loop runs on B*K gradient rows (the recurrent GEMMs see K times the rows, the step
// kernel reads the forward's gates and c of row b for its K gradient rows, BwdStep::rep); after the loop every
// weight gradient is one large GEMM per (cotangent, direction) over the saved activations and grad_input one GEMM
// per direction over all K*N rows.
BackwardResult lstm_backward_rows(const at::Tensor& go, const at::Tensor& ghy, const at::Tensor& gcy,
                                  const at::Tensor& input, const std::optional<at::Tensor>& len_c,
                                  const at::Tensor& hx_c, const at::Tensor& cx_c, at::TensorList weights,
                                  const LstmDims& d, const at::Tensor& output, const at::Tensor& reserve, int64_t K) {
  const int64_t T = d.T, B = d.B, H = d.H, D = d.D, G4 = 4 * H, I = d.I, per = d.bias ? 4 : 2, DH = D * H;
  const int64_t BK = B * K;
  BackwardResult res;
  if (T == 0 || B == 0 || H == 0 || K == 0) {
    for (const auto& w : weights) {
      auto sizes = w.sizes().vec();
      sizes.insert(sizes.begin(), K);
      res.grad_w.push_back(at::zeros(sizes, w.options()));
    }
    res.grad_input = at::zeros({T, BK, I}, input.options());
    res.grad_hx = ghy.clone();
    res.grad_cx = gcy.clone();
    return res;
  }
  const Steps s = make_steps(len_c, T, B);  // forward rows
  const Steps sg = scale_steps(s, K);       // gradient rows
  const int64_t N = s.N, LG = D * G4;
  auto dcs = gcy.clone();  // running dL/dc (D, B*K, H), becomes grad_cx
  std::vector<at::Tensor> w_hh(D);
  for (int64_t dir = 0; dir < D; ++dir) w_hh[dir] = weights[dir * per + 1].contiguous();
  auto dG = scratch(kDGates, {sg.N, LG}, input.options());  // packed pre-activation gradients (N*K, D*4H)
  std::vector<at::Tensor> hprev(D);  // packed h_{t-1} (fwd) / h_{t+1} (rev) per direction, forward rows
  for (int64_t dir = 0; dir < D; ++dir) hprev[dir] = scratch(dir == 0 ? kHPrev0 : kHPrev1, {N, H}, input.options());

  const cpu_kernels::LstmCellKernels& kernels = cpu_kernels::lstm_cell_kernels();
  const Team tm = make_team(D);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_backward_cpu", [&] {
    using T_ = scalar_t;
    const BwdFn<T_> kernel = bwd_kernel<T_>(kernels);
    const int W = lanes<T_>(kernels);
    const int64_t PB = cpu_kernels::bwd_blocks(H, W), psize = cpu_kernels::bwd_packed_size(H, W);
    at::Tensor packed = scratch(kPackW, {D, psize}, input.options());
    T_* wp = packed.data_ptr<T_>();
    const T_* resp = reserve.const_data_ptr<T_>();
    const T_* gop = go.const_data_ptr<T_>();
    const T_* ghyp = ghy.const_data_ptr<T_>();
    const T_* cxp = cx_c.const_data_ptr<T_>();
    T_* dGp = dG.data_ptr<T_>();
    T_* dcp = dcs.data_ptr<T_>();
    auto setup = [&](int dir, int rank, int g) {
      const auto [q0, q1] = share(PB, rank, g);
      cpu_kernels::pack_bwd<T_>(w_hh[dir].const_data_ptr<T_>(), H, W, wp + dir * psize, q0, q1);
    };
    auto step = [&](int dir, int rank, int g, int64_t st) {
      const auto [q0, q1] = share(PB, rank, g);
      const int64_t t = dir == 0 ? T - 1 - st : st;
      const int64_t n = s.n[t];
      if (n == 0 || q0 >= q1) return;
      cpu_kernels::BwdStep<T_> a{};
      const int64_t tp = dir == 0 ? t + 1 : t - 1;  // the step processed before (its dG feeds dh_t)
      if (tp >= 0 && tp < T && s.n[tp] > 0) {
        a.dgn = dGp + sg.off[tp] * LG + dir * G4;
        a.np = sg.n[tp];
      } else {
        a.dgn = nullptr;
        a.np = 0;
      }
      a.dgn_ld = LG;
      a.carry = ghyp + dir * BK * H;
      a.gout = gop + t * BK * DH + dir * H;
      a.gout_ld = DH;
      a.reserve = resp + (dir * T + t) * B * 5 * H;
      a.cp_b = cxp + dir * B * H;
      const int64_t tn = dir == 0 ? t - 1 : t + 1;  // the step that produced c_{t-1}
      if (tn >= 0 && tn < T) {
        a.cp_a = resp + (dir * T + tn) * B * 5 * H + 4 * H;
        a.cp_a_ld = 5 * H;
        a.split = dir == 0 ? n : s.n[tn];
      } else {
        a.cp_a = a.cp_b;
        a.cp_a_ld = H;
        a.split = 0;
      }
      a.dc = dcp + dir * BK * H;
      a.dg = dGp + sg.off[t] * LG + dir * G4;
      a.dg_ld = LG;
      a.wp = wp + dir * psize;
      a.H = H;
      a.n = sg.n[t];
      a.rep = K;
      kernel(a, q0, q1);
    };
    run_team(tm, T, setup, step);
  });

  // grad_hx: dh of the state each sequence started from, dG of its first processed step @ W_hh (forward: t = 0;
  // reverse: t = len - 1, the rows [n_{t+1}, n_t) of step t); grad_hy for empty sequences.
  auto dhx = ghy.clone();
  for (int64_t dir = 0; dir < D; ++dir) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r0 = dir == 0 ? 0 : (t + 1 < T ? sg.n[t + 1] : 0), r1 = sg.n[t];
      if (dir == 0 && t > 0) break;
      if (r1 <= r0) continue;
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_backward_cpu_hx", [&] {
        gemm_rm<scalar_t>(false, false, r1 - r0, H, G4,
                          dG.const_data_ptr<scalar_t>() + (sg.off[t] + r0) * LG + dir * G4, LG,
                          w_hh[dir].const_data_ptr<scalar_t>(), H, scalar_t(0),
                          dhx.data_ptr<scalar_t>() + (dir * BK + r0) * H, H);
      });
    }
  }

  // Packed previous hidden states for dW_hh: fwd h_{t-1} (hx at t = 0); rev h_{t+1} (hx at the last token).
  const int64_t es = input.element_size();
  const char* outb = static_cast<const char*>(output.const_data_ptr());
  const char* hxb = static_cast<const char*>(hx_c.const_data_ptr());
  for (int64_t dir = 0; dir < D; ++dir) {
    char* hpv = static_cast<char*>(hprev[dir].data_ptr());
    const char* hx_d = hxb + dir * B * H * es;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = s.n[t];
        char* dst = hpv + s.off[t] * H * es;
        int64_t from_out = 0;  // rows taking h from the neighbouring step's output
        const char* src = nullptr;
        if (dir == 0 && t > 0) {
          from_out = n;
          src = outb + (t - 1) * B * DH * es;
        } else if (dir == 1 && t + 1 < T) {
          from_out = std::min(n, s.n[t + 1]);
          src = outb + ((t + 1) * B * DH + H) * es;
        }
        for (int64_t b = 0; b < from_out; ++b) std::memcpy(dst + b * H * es, src + b * DH * es, H * es);
        if (n > from_out) std::memcpy(dst + from_out * H * es, hx_d + from_out * H * es, (n - from_out) * H * es);
      }
    });
  }

  // Weight gradients and the input gradient: large GEMMs over all steps. Row n*K + k of dG is cotangent k of
  // packed forward row n, so cotangent k's rows are a strided (N, D*4H) view.
  auto Xp = pack_rows(input, s);
  auto gin = at::empty({sg.N, I}, input.options());
  const auto dG3 = dG.view({N, K, LG});
  for (int64_t dir = 0; dir < D; ++dir) {
    matmul_into(dG.narrow(1, dir * G4, G4), weights[dir * per].contiguous(), gin, dir == 0 ? 0.f : 1.f);
    auto dW_ih = at::empty({K, G4, I}, input.options());
    auto dW_hh = at::empty({K, G4, H}, input.options());
    for (int64_t k = 0; k < K; ++k) {
      const auto dG_kd = dG3.select(1, k).narrow(1, dir * G4, G4);  // (N, 4H)
      matmul_into(dG_kd.t(), Xp, dW_ih[k], 0.f);
      matmul_into(dG_kd.t(), hprev[dir], dW_hh[k], 0.f);
    }
    res.grad_w.push_back(dW_ih);
    res.grad_w.push_back(dW_hh);
    if (d.bias) {
      auto db = dG3.narrow(2, dir * G4, G4).sum(0);  // (K, 4H)
      res.grad_w.push_back(db);
      res.grad_w.push_back(db.clone());
    }
  }
  res.grad_input = unpack_rows(gin, sg, T, BK);
  res.grad_hx = dhx;
  res.grad_cx = dcs;
  return res;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_layer_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
    const at::Tensor& input, const std::optional<at::Tensor>& lengths, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList weights, bool bidirectional, const at::Tensor& output, const at::Tensor& reserve) {
  const char* op = "lstm_layer_backward";
  const LstmDims d = check_lstm_layer_args(input, lengths, hx, cx, weights, bidirectional, op, /*cuda=*/false);
  check_lstm_backward_args(grad_output, grad_hy, grad_cy, output, reserve, input, d, op);
  std::optional<at::Tensor> len_c;
  if (lengths.has_value()) len_c = lengths->contiguous();
  BackwardResult r = lstm_backward_rows(grad_output.contiguous(), grad_hy.contiguous(), grad_cy.contiguous(),
                                        input.contiguous(), len_c, hx.contiguous(), cx.contiguous(), weights, d,
                                        output.contiguous(), reserve.contiguous(), 1);
  std::vector<at::Tensor> grad_w;
  for (auto& g : r.grad_w) grad_w.push_back(g.squeeze(0));
  return {r.grad_input, r.grad_hx, r.grad_cx, grad_w};
}

// K cotangents (leading dimension of grad_output, grad_hy, grad_cy) against one saved forward; every result has
// the leading K. Exactly K lstm_layer_backward calls, computed as one (lstm_backward_rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_layer_backward_multi_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
    const at::Tensor& input, const std::optional<at::Tensor>& lengths, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList weights, bool bidirectional, const at::Tensor& output, const at::Tensor& reserve) {
  const char* op = "lstm_layer_backward_multi";
  const LstmDims d = check_lstm_layer_args(input, lengths, hx, cx, weights, bidirectional, op, /*cuda=*/false);
  const int64_t K = check_lstm_backward_multi_args(grad_output, grad_hy, grad_cy, output, reserve, input, d, op);
  std::optional<at::Tensor> len_c;
  if (lengths.has_value()) len_c = lengths->contiguous();
  const int64_t T = d.T, B = d.B, H = d.H, D = d.D;
  // interleave: gradient row b*K + k is cotangent k of forward row b
  auto go = grad_output.permute({1, 2, 0, 3}).contiguous().view({T, B * K, D * H});
  auto ghy = grad_hy.permute({1, 2, 0, 3}).contiguous().view({D, B * K, H});
  auto gcy = grad_cy.permute({1, 2, 0, 3}).contiguous().view({D, B * K, H});
  BackwardResult r = lstm_backward_rows(go, ghy, gcy, input.contiguous(), len_c, hx.contiguous(), cx.contiguous(),
                                        weights, d, output.contiguous(), reserve.contiguous(), K);
  auto deinterleave = [B, K](const at::Tensor& t) {  // (X, B*K, F) -> (K, X, B, F); any size may be 0
    return t.view({t.size(0), B, K, t.size(2)}).permute({2, 0, 1, 3}).contiguous();
  };
  return {deinterleave(r.grad_input), deinterleave(r.grad_hx), deinterleave(r.grad_cx), r.grad_w};
}

}  // namespace

namespace cpu {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& lengths, const at::Tensor& hx, const at::Tensor& cx,
    at::TensorList weights, bool bidirectional, bool need_reserve) {
  return lstm_layer_forward_cpu(input, lengths, hx, cx, weights, bidirectional, need_reserve);
}
}  // namespace cpu
}  // namespace fastmtl

namespace fastmtl {
namespace cpu_kernels {
const LstmCellKernels& lstm_cell_kernels() {
  return cpu::select_kernels(lstm_cell_kernels_scalar(), lstm_cell_kernels_avx2(), lstm_cell_kernels_avx512());
}
}  // namespace cpu_kernels
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("lstm_layer_forward", &fastmtl::lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &fastmtl::lstm_layer_backward_cpu);
  m.impl("lstm_layer_backward_multi", &fastmtl::lstm_layer_backward_multi_cpu);
}
