// The LSTM recurrent-step kernels of the CPU op (csrc/cpu/lstm.cpp), one set per instruction set
// (lstm_cell_<isa>.cpp), chosen at run time (fastmtl/cpu_isa.h).
//
// Everything is row-major (sequence b major, hidden unit j minor), the layout of the op's output, so a step reads
// h_{t-1} straight from the previous step's output rows and writes h_t straight into its own; nothing is
// transposed. Per step and direction the kernels compute, for the n active sequences (a prefix of the batch),
//   forward : gates (n x 4H) = gx_t + bias + h_{t-1} @ W_hh^T, then the cell, in one pass: a register tile holds
//             the four gates (i, f, g, o) of W consecutive hidden units (W = vector lanes) for MR sequences, the
//             K = H loop runs over a panel of W_hh packed for that tile (pack_fwd below), and the epilogue applies
//             the gate nonlinearities and the cell update while the tile is in registers, writing h_t, c_t and
//             (for backward) the activated gates and c_t. The gate pre-activations never go to memory.
//   backward: dh_t (n x H) = dG_{t+1} @ W_hh (+ grad_output_t), the K = 4H loop over W_hh packed for a tile of 4W
//             consecutive units (pack_bwd), and the epilogue forms the pre-activation gradients dG_t of those units
//             and dc_{t-1} in registers. dG_t is kept (the weight gradients are large GEMMs over all steps after
//             the loop) and feeds the next step's recurrent product.
// A call handles a range of unit blocks (forward: blocks of W units; backward: blocks of 4W units) for all active
// rows, so the op splits the hidden units of a step over threads with one barrier per step.
#pragma once

#include <cstdint>

#include "fastmtl/cpu_isa.h"

namespace fastmtl {
namespace cpu_kernels {

// Packed W_hh (4H x H, row-major, gate-major rows i, f, g, o as torch.nn.LSTM) for the forward tile with W lanes:
// block p (units p*W .. p*W+W-1) is H rows of 4W values: dst[(p*H + k)*4W + g*W + u] = W_hh[g*H + p*W + u, k]
// (zero past H).
inline int64_t fwd_blocks(int64_t H, int W) { return (H + W - 1) / W; }
inline int64_t fwd_packed_size(int64_t H, int W) { return fwd_blocks(H, W) * H * 4 * W; }
// A transpose of the block's 4W rows: done a tile of kKT columns at a time (each source row read as one short
// contiguous run, the tile written as kKT contiguous destination rows), so both sides stay in L1 and the source is
// streamed row by row (a per-column walk touches 4W lines per element; at B = 1 the pack is most of a call).
template <typename T>
void pack_fwd(const T* w_hh, int64_t H, int W, T* dst, int64_t p0, int64_t p1) {
  constexpr int64_t kKT = 16;
  const int64_t W4 = 4 * int64_t(W);
  for (int64_t p = p0; p < p1; ++p) {
    T* d = dst + p * H * W4;
    for (int64_t k0 = 0; k0 < H; k0 += kKT) {
      const int64_t kn = H - k0 < kKT ? H - k0 : kKT;
      for (int64_t g = 0; g < 4; ++g)
        for (int64_t u = 0; u < W; ++u) {
          const int64_t j = p * W + u;
          T* out = d + k0 * W4 + g * W + u;
          if (j < H) {
            const T* src = w_hh + (g * H + j) * H + k0;
            for (int64_t kk = 0; kk < kn; ++kk) out[kk * W4] = src[kk];
          } else {
            for (int64_t kk = 0; kk < kn; ++kk) out[kk * W4] = T(0);
          }
        }
    }
  }
}

// For the backward tile: block q (units q*4W .. q*4W+4W-1) is 4H rows of 4W values:
// dst[(q*4H + k)*4W + u] = W_hh[k, q*4W + u] (zero past H).
inline int64_t bwd_blocks(int64_t H, int W) { return (H + 4 * W - 1) / (4 * W); }
inline int64_t bwd_packed_size(int64_t H, int W) { return bwd_blocks(H, W) * 4 * H * 4 * W; }
template <typename T>
void pack_bwd(const T* w_hh, int64_t H, int W, T* dst, int64_t q0, int64_t q1) {
  const int64_t W4 = 4 * int64_t(W), K = 4 * H;
  for (int64_t q = q0; q < q1; ++q) {
    T* d = dst + q * K * W4;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j0 = q * W4, cnt = H - j0 < W4 ? H - j0 : W4;
      for (int64_t u = 0; u < cnt; ++u) d[k * W4 + u] = w_hh[k * H + j0 + u];
      for (int64_t u = cnt; u < W4; ++u) d[k * W4 + u] = T(0);
    }
  }
}

// One forward step of one direction. Row b (0 <= b < n) of each operand is at ptr + b * ld.
template <typename T>
struct FwdStep {
  const T* gx;       // input projection of this step: gate k, unit j at gx[b * gx_ld + k*H + j]
  int64_t gx_ld;
  const T* bias;     // 4H combined bias b_ih + b_hh, or nullptr
  const T* hp_a;     // h_{t-1} of rows b < split
  int64_t hp_a_ld;
  const T* hp_b;     // h_{t-1} of rows b >= split (the initial state)
  int64_t hp_b_ld;
  int64_t split;
  T* c;              // running c (read c_{t-1}, write c_t), row ld H
  T* out;            // h_t rows (the op's output)
  int64_t out_ld;
  T* reserve;        // this step's rows of 5H: i, f, g, o, c (activated); or nullptr (inference)
  const T* wp;       // W_hh packed by pack_fwd (fwd_*), or W_hh itself, 4H x H row-major (fwd_gemv_*)
  int64_t H, n;
};

// One backward step of one direction (processing order: the step after t in time for the forward direction).
template <typename T>
struct BwdStep {
  const T* dgn;      // dG of the previously processed step (rows b < np; 4H values, ld dgn_ld)
  int64_t dgn_ld;
  int64_t np;
  const T* carry;    // dL/dh_t of rows b >= np (from grad_hy), ld H
  const T* gout;     // grad of this step's output rows, ld gout_ld
  int64_t gout_ld;
  const T* reserve;  // this step's rows of 5H (forward's i, f, g, o, c)
  const T* cp_a;     // c_{t-1} of rows b < split (ld cp_a_ld)
  int64_t cp_a_ld;
  const T* cp_b;     // c_{t-1} of rows b >= split (the initial state, ld H)
  int64_t split;
  T* dc;             // running dL/dc (read dc_t, write dc_{t-1}), ld H
  T* dg;             // output: pre-activation gradients of this step, gate k unit j at dg[b * dg_ld + k*H + j]
  int64_t dg_ld;
  const T* wp;       // W_hh packed by pack_bwd
  int64_t H, n;
  // Gradient rows per forward row: gradient row b belongs to forward row b / rep (reserve, c_{t-1} and split are
  // in forward rows). 1 for one backward; K for lstm_layer_backward_multi, whose K cotangents of forward row b are
  // the consecutive gradient rows b*K .. b*K+K-1 (so the active rows stay a prefix).
  int64_t rep = 1;
};

// A product of a few rows with a weight matrix as it is (nothing packed): out[r * out_ld + c] = x_r . w_c (+ bias[c])
// for the n rows x_r (I values, ld x_ld) and the weight rows w_c (I values, ld I) of the columns asked for. The LSTM
// op's input projection of few rows (each worker of the time loop computes its own units' gate columns, so no
// barrier separates the projection from the first step) and the heads' small products in the whole-model
// inference op (csrc/cpu/tagger.cpp).
template <typename T>
struct DotRows {
  const T* x;
  int64_t x_ld, n, I;
  const T* w;
  const T* bias;     // or nullptr
  T* out;
  int64_t out_ld;
};

struct LstmCellKernels {
  int lanes_f32;  // W of the float kernels (units per forward block; the backward block is 4W)
  int lanes_f64;
  void (*fwd_f32)(const FwdStep<float>&, int64_t p0, int64_t p1);
  void (*fwd_f64)(const FwdStep<double>&, int64_t p0, int64_t p1);
  // The forward for few rows on W_hh unpacked (FwdStep::wp = W_hh itself, 4H x H row-major), same blocks p of W.
  void (*fwd_gemv_f32)(const FwdStep<float>&, int64_t p0, int64_t p1);
  void (*fwd_gemv_f64)(const FwdStep<double>&, int64_t p0, int64_t p1);
  // DotRows, float32 only: columns [c0, c1).
  void (*dot_rows_f32)(const DotRows<float>&, int64_t c0, int64_t c1);
  void (*bwd_f32)(const BwdStep<float>&, int64_t q0, int64_t q1);
  void (*bwd_f64)(const BwdStep<double>&, int64_t q0, int64_t q1);
};

// One table per ISA file; nullptr when the ISA is not compiled into this build.
const LstmCellKernels* lstm_cell_kernels_scalar();
const LstmCellKernels* lstm_cell_kernels_avx2();
const LstmCellKernels* lstm_cell_kernels_avx512();

// The table of cpu::active_isa().
const LstmCellKernels& lstm_cell_kernels();

}  // namespace cpu_kernels
}  // namespace fastmtl
