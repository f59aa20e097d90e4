// Inference of a whole MultiTaskLSTM (hard or hierarchical sharing) on the CPU in one op: word embeddings and the
// character CNN, the LSTM layers (the fused layer of lstm.cpp, called directly), and every task head's scores.
// Schema: csrc/fastmtl.cpp (tagger_forward); Python: fastmtl/ops/tagger.py, MultiTaskLSTM.scores.
//
// What it saves is the eager framework around the LSTM: at one sentence, about fifty PyTorch ops (each a
// dispatcher call and an allocation, 3-10 us apiece) for work that takes tens of microseconds. The arithmetic is
// the model's, in the same order where it matters (each GEMM is a GEMM of the same operands), so the scores agree
// with the module's to float rounding.
//
//   * x (T, B', E + F), time-major and in the LSTM's order (B' = the batch sorted by non-increasing length):
//     the word embedding rows, then the character features of each real word: a Conv1d (zero padding k / 2) as
//     one GEMM over the windows of the word's real characters, + bias, ReLU, max over the word (0 for a word
//     without characters; padding characters are zeroed before the max, as in CharCNN). Padded positions are 0.
//   * the LSTM layers, h0 = c0 = 0, no dropout (inference).
//   * head k reads layer head_layers[k]: a token task's (B, T, C) scores from every position, a sequence task's
//     (B, C) from the pooled real states (last, first, mean, max, last_first); log-softmax where outputs[k] = 1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "fastmtl/checks.h"
#include "kernels/gemm.h"
#include "kernels/lstm_cell.h"
#include "lstm.h"

namespace fastmtl {
namespace {

constexpr const char* kOp = "tagger_forward";

// NaN-propagating max and ReLU (as torch.max / torch.relu).
template <typename T>
inline T nan_max(T m, T v) {
  return (v > m || v != v) ? v : m;
}
template <typename T>
inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// Up to this many rows linear_rows (the heads) uses the dot-product kernel. Measured on a Zen 4 (1 thread, the
// default ATIS model, when the character CNN's convolution went through linear_rows too): one sentence (~60-100
// rows there, the heads' ~11) 0.85 against 0.95 ms for the whole op with ATen's addmm; batches of 64 (thousands of
// rows) 3400 against 3650 sentences/s.
constexpr int64_t kDotRowsMax = 128;

// out (n x C) = x (n x I, rows of ld x.stride(0)) @ w^T (w: C x I) + bias. A few float32 rows with a vector ISA:
// the unpacked dot-product kernel (DotRows; a few rows against a small weight, where a GEMM's packing and call
// overhead are most of the cost), the columns split over the threads when there is enough work; otherwise ATen's
// addmm.
void linear_rows(const at::Tensor& x, const at::Tensor& w_, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t n = x.size(0), I = x.size(1), C = w_.size(0);
  const cpu_kernels::LstmCellKernels& kernels = cpu_kernels::lstm_cell_kernels();
  if (x.scalar_type() != at::kFloat || kernels.lanes_f32 < 4 || n > kDotRowsMax || x.stride(1) != 1 ||
      out.stride(1) != 1) {
    at::addmm_out(const_cast<at::Tensor&>(out), bias, x, w_.t());
    return;
  }
  if (n == 0 || C == 0) return;
  const at::Tensor w = w_.is_contiguous() ? w_ : w_.contiguous(), b = bias.is_contiguous() ? bias : bias.contiguous();
  cpu_kernels::DotRows<float> a{x.const_data_ptr<float>(), x.stride(0), n, I, w.const_data_ptr<float>(),
                                b.const_data_ptr<float>(), out.data_ptr<float>(), out.stride(0)};
  const int64_t W = kernels.lanes_f32, blocks = (C + W - 1) / W;
  const int64_t per_block = std::max<int64_t>(1, n * I * W);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / per_block);  // >= 256k multiply-adds a task
  at::parallel_for(0, blocks, grain, [&](int64_t q0, int64_t q1) {
    kernels.dot_rows_f32(a, q0 * W, std::min(C, q1 * W));
  });
}

void check_ids(const at::Tensor& ids, int64_t n, const char* name, const char* table) {
  const int64_t* p = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < n, "fastmtl: ", kOp, ": ", name, " holds ", p[i], ", outside [0, ", n,
                      ") (the rows of ", table, ")");
}

// Character features of the real words: out (T, B', F) rows at column offset col of x (T, B', ld).
template <typename T>
void char_features(const at::Tensor& chars, const int64_t* perm, const int64_t* len, const at::Tensor& cw,
                   const at::Tensor& conv_w, const at::Tensor& conv_b, T* x, int64_t ld, int64_t col) {
  const int64_t B = chars.size(0), Tn = chars.size(1), L = chars.size(2), C = cw.size(1), F = conv_w.size(0),
                k = conv_w.size(2), p = k / 2, kC = k * C;
  const int64_t* ch = chars.const_data_ptr<int64_t>();
  const T* emb = cw.const_data_ptr<T>();
  // rows of the window matrix: (word, position) of every real character of every real word, by word
  std::vector<int64_t> word_of_row, pos_of_row, first_row;  // first_row: per real word (t, b'), its first row
  std::vector<int64_t> words;                                // t * B + b' of each real word
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t bs = 0; bs < B; ++bs) {
      const int64_t b = perm[bs];
      if (t >= len[b]) continue;
      words.push_back(t * B + bs);
      first_row.push_back(static_cast<int64_t>(pos_of_row.size()));
      const int64_t* c = ch + (b * Tn + t) * L;
      for (int64_t l = 0; l < L; ++l)
        if (c[l] != 0) {
          word_of_row.push_back((b * Tn + t));
          pos_of_row.push_back(l);
        }
    }
  first_row.push_back(static_cast<int64_t>(pos_of_row.size()));
  const int64_t R = static_cast<int64_t>(pos_of_row.size());
  at::Tensor y;
  if (R > 0) {
    at::Tensor win = at::empty({R, kC}, cw.options());
    T* wp = win.data_ptr<T>();
    at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t* c = ch + word_of_row[r] * L;
        for (int64_t i = 0; i < k; ++i) {
          const int64_t q = pos_of_row[r] - p + i;
          T* dst = wp + r * kC + i * C;
          if (q >= 0 && q < L) std::memcpy(dst, emb + c[q] * C, C * sizeof(T));
          else std::memset(dst, 0, C * sizeof(T));
        }
      }
    });
    // (F, C, k) -> (k, C, F): the weight as the GEMM's right operand, rows in the windows' position-major order
    at::Tensor w2 = at::empty({kC, F}, cw.options());
    {
      const T* src = conv_w.const_data_ptr<T>();
      T* dst = w2.data_ptr<T>();
      for (int64_t f = 0; f < F; ++f)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < k; ++i) dst[(i * C + c) * F + f] = src[(f * C + c) * k + i];
    }
    y = at::empty({R, F}, cw.options());
    // A small right operand: the own packed GEMM (where it beats torch's BLAS on this ISA) from one row up.
    bool own = false;
    if constexpr (std::is_same_v<T, float>) own = cpu_kernels::gemm_kernels().beats_blas;
    if (own) {
      cpu::gemm_f32(false, false, R, F, kC, reinterpret_cast<const float*>(win.const_data_ptr<T>()), kC,
                    reinterpret_cast<const float*>(w2.const_data_ptr<T>()), F, 0.f,
                    reinterpret_cast<float*>(y.data_ptr<T>()), F);
    } else {
      at::mm_out(y, win, w2);
    }
  }
  const T* yp = R > 0 ? y.const_data_ptr<T>() : nullptr;
  const T* bias = conv_b.const_data_ptr<T>();
  const int64_t nw = static_cast<int64_t>(words.size());
  at::parallel_for(0, nw, 64, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      T* dst = x + words[w] * ld + col;
      const int64_t r0 = first_row[w], r1 = first_row[w + 1];
      for (int64_t f = 0; f < F; ++f) dst[f] = T(0);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t f = 0; f < F; ++f) dst[f] = nan_max(dst[f], relu(yp[r * F + f] + bias[f]));
    }
  });
}

// Pooled real states (B, DH) of hidden (T, B', DH) for the original rows b (at b' = pos[b]).
template <typename T>
void pool(const at::Tensor& hidden, const int64_t* pos, const int64_t* len, int64_t code, T* out) {
  const int64_t B = hidden.size(1), DH = hidden.size(2);
  const T* h = hidden.const_data_ptr<T>();
  auto row = [&](int64_t t, int64_t b) { return h + (t * B + pos[b]) * DH; };
  for (int64_t b = 0; b < B; ++b) {
    T* o = out + b * DH;
    const int64_t n = len[b];
    switch (code) {
      case 0:  // last
        std::memcpy(o, row(n - 1, b), DH * sizeof(T));
        break;
      case 1:  // first
        std::memcpy(o, row(0, b), DH * sizeof(T));
        break;
      case 2: {  // mean
        for (int64_t j = 0; j < DH; ++j) o[j] = T(0);
        for (int64_t t = 0; t < n; ++t) {
          const T* r = row(t, b);
          for (int64_t j = 0; j < DH; ++j) o[j] += r[j];
        }
        for (int64_t j = 0; j < DH; ++j) o[j] /= T(n);
        break;
      }
      case 3: {  // max
        std::memcpy(o, row(0, b), DH * sizeof(T));
        for (int64_t t = 1; t < n; ++t) {
          const T* r = row(t, b);
          for (int64_t j = 0; j < DH; ++j) o[j] = nan_max(o[j], r[j]);
        }
        break;
      }
      default: {  // last_first: the forward direction's last state, the backward direction's first
        const int64_t half = DH / 2;
        std::memcpy(o, row(n - 1, b), half * sizeof(T));
        std::memcpy(o + half, row(0, b) + half, (DH - half) * sizeof(T));
      }
    }
  }
}

std::vector<at::Tensor> tagger_forward_cpu(
    const at::Tensor& ids_, const at::Tensor& lengths_, const std::optional<at::Tensor>& chars_,
    const at::Tensor& word_weight_, const std::optional<at::Tensor>& char_weight_,
    const std::optional<at::Tensor>& conv_weight_, const std::optional<at::Tensor>& conv_bias_,
    at::TensorList lstm_weights, int64_t num_layers, bool bidirectional, at::TensorList head_weights,
    at::TensorList head_biases, at::IntArrayRef head_layers, at::IntArrayRef levels, at::IntArrayRef poolings,
    at::IntArrayRef outputs) {
  // ---- arguments
  FASTMTL_CHECK_TYPE(ids_.scalar_type() == at::kLong, kOp, ": ids must be int64, got ", ids_.scalar_type());
  FASTMTL_CHECK_VALUE(ids_.dim() == 2, kOp, ": ids must be (B, T), got shape ", shape_str(ids_));
  const int64_t B = ids_.size(0), T = ids_.size(1);
  FASTMTL_CHECK_VALUE(T >= 1, kOp, ": ids must have at least one position (T >= 1), got shape ", shape_str(ids_));
  FASTMTL_CHECK_TYPE(lengths_.scalar_type() == at::kLong, kOp, ": lengths must be int64, got ",
                     lengths_.scalar_type());
  FASTMTL_CHECK_VALUE(lengths_.dim() == 1 && lengths_.size(0) == B, kOp, ": lengths must have shape (B,) = (", B,
                      ",), got ", shape_str(lengths_));
  check_dim(word_weight_, 2, "tagger_forward: word_weight");
  check_floating(word_weight_, "tagger_forward: word_weight");
  const at::ScalarType dt = word_weight_.scalar_type();
  FASTMTL_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, kOp, ": the weights must be float32 or float64, got ",
                     dt);
  const auto ids = ids_.contiguous();
  const auto lengths = lengths_.contiguous();
  const auto word_weight = word_weight_.contiguous();
  const int64_t E = word_weight.size(1);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    FASTMTL_CHECK_VALUE(len[b] >= 1 && len[b] <= T, "fastmtl: lengths[", b, "] = ", len[b],
                        " is out of range: every length must be in [1, T] with T = ids.size(1) = ", T);
  check_ids(ids, word_weight.size(0), "ids", "word_weight");

  const bool has_chars = char_weight_.has_value() && char_weight_->defined();
  FASTMTL_CHECK_VALUE(has_chars == (conv_weight_.has_value() && conv_weight_->defined()) &&
                          has_chars == (conv_bias_.has_value() && conv_bias_->defined()) &&
                          has_chars == (chars_.has_value() && chars_->defined()),
                      kOp, ": chars, char_weight, conv_weight and conv_bias are given together or not at all");
  at::Tensor chars, char_weight, conv_weight, conv_bias;
  int64_t F = 0;
  if (has_chars) {
    chars = chars_->contiguous();
    char_weight = char_weight_->contiguous();
    conv_weight = conv_weight_->contiguous();
    conv_bias = conv_bias_->contiguous();
    FASTMTL_CHECK_TYPE(chars.scalar_type() == at::kLong, kOp, ": chars must be int64, got ", chars.scalar_type());
    FASTMTL_CHECK_VALUE(chars.dim() == 3 && chars.size(0) == B && chars.size(1) == T && chars.size(2) >= 1, kOp,
                        ": chars must be (B, T, L) = (", B, ", ", T, ", L >= 1), got ", shape_str(chars));
    check_dim(char_weight, 2, "tagger_forward: char_weight");
    check_dim(conv_weight, 3, "tagger_forward: conv_weight");
    check_dim(conv_bias, 1, "tagger_forward: conv_bias");
    check_same_dtype(char_weight, word_weight, "tagger_forward: char_weight", "word_weight");
    check_same_dtype(conv_weight, word_weight, "tagger_forward: conv_weight", "word_weight");
    check_same_dtype(conv_bias, word_weight, "tagger_forward: conv_bias", "word_weight");
    F = conv_weight.size(0);
    FASTMTL_CHECK_VALUE(conv_weight.size(1) == char_weight.size(1) && conv_weight.size(2) % 2 == 1, kOp,
                        ": conv_weight must be (F, C, k) with C = char_weight.size(1) = ", char_weight.size(1),
                        " and an odd k, got ", shape_str(conv_weight));
    check_shape(conv_bias, {F}, "tagger_forward: conv_bias");
    check_ids(chars, char_weight.size(0), "chars", "char_weight");
  }

  const int64_t D = bidirectional ? 2 : 1;
  FASTMTL_CHECK_VALUE(num_layers >= 1, kOp, ": num_layers must be >= 1, got ", num_layers);
  const int64_t nw = static_cast<int64_t>(lstm_weights.size());
  FASTMTL_CHECK_VALUE(nw == num_layers * D * 4 || nw == num_layers * D * 2, kOp, ": expected ",
                      num_layers * D * 4, " (with biases) or ", num_layers * D * 2, " LSTM weight tensors, got ",
                      nw);
  const int64_t per_layer = nw / num_layers;
  for (int64_t i = 0; i < nw; ++i)
    check_same_dtype(lstm_weights[i], word_weight, "tagger_forward: lstm_weights[i]", "word_weight");
  FASTMTL_CHECK_VALUE(lstm_weights[1].dim() == 2, kOp, ": lstm_weights[1] (W_hh of layer 0) must be 2-D, got ",
                      shape_str(lstm_weights[1]));
  const int64_t H = lstm_weights[1].size(1), DH = D * H;
  FASTMTL_CHECK_VALUE(lstm_weights[0].dim() == 2 && lstm_weights[0].size(1) == E + F, kOp,
                      ": lstm_weights[0] (W_ih of layer 0) must have E + F = ", E + F, " columns (word embedding ",
                      E, " + character features ", F, "), got shape ", shape_str(lstm_weights[0]));

  const int64_t K = static_cast<int64_t>(head_weights.size());
  FASTMTL_CHECK_VALUE(static_cast<int64_t>(head_biases.size()) == K &&
                          static_cast<int64_t>(head_layers.size()) == K && static_cast<int64_t>(levels.size()) == K &&
                          static_cast<int64_t>(poolings.size()) == K && static_cast<int64_t>(outputs.size()) == K,
                      kOp, ": head_weights, head_biases, head_layers, levels, poolings and outputs must have one "
                      "entry per head (", K, ")");
  for (int64_t k = 0; k < K; ++k) {
    check_same_dtype(head_weights[k], word_weight, "tagger_forward: head_weights[k]", "word_weight");
    check_same_dtype(head_biases[k], word_weight, "tagger_forward: head_biases[k]", "word_weight");
    FASTMTL_CHECK_VALUE(head_weights[k].dim() == 2 && head_weights[k].size(1) == DH, kOp, ": head_weights[", k,
                        "] must be (C, ", DH, "), got ", shape_str(head_weights[k]));
    FASTMTL_CHECK_VALUE(head_biases[k].dim() == 1 && head_biases[k].size(0) == head_weights[k].size(0), kOp,
                        ": head_biases[", k, "] must be (", head_weights[k].size(0), ",), got ",
                        shape_str(head_biases[k]));
    FASTMTL_CHECK_VALUE(head_layers[k] >= 0 && head_layers[k] < num_layers, kOp, ": head_layers[", k, "] = ",
                        head_layers[k], " is not a layer in [0, ", num_layers, ")");
    FASTMTL_CHECK_VALUE(levels[k] == 0 || levels[k] == 1, kOp, ": levels[", k, "] must be 0 (sequence) or 1 "
                        "(token), got ", levels[k]);
    FASTMTL_CHECK_VALUE(poolings[k] >= 0 && poolings[k] <= 4, kOp, ": poolings[", k, "] must be in [0, 4] (last, "
                        "first, mean, max, last_first), got ", poolings[k]);
    FASTMTL_CHECK_VALUE(outputs[k] == 0 || outputs[k] == 1, kOp, ": outputs[", k, "] must be 0 (scores) or 1 "
                        "(log-probabilities), got ", outputs[k]);
  }
  const auto opts = word_weight.options();

  // ---- the batch in the LSTM's order: non-increasing lengths (stable)
  std::vector<int64_t> perm(B), pos(B);
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  for (int64_t i = 0; i < B; ++i) pos[perm[i]] = i;
  at::Tensor lens_sorted = at::empty({B}, lengths.options());
  for (int64_t i = 0; i < B; ++i) lens_sorted.data_ptr<int64_t>()[i] = len[perm[i]];

  // ---- the LSTM's input: word embeddings and character features, 0 at padded positions
  const int64_t In = E + F;
  at::Tensor x = at::empty({T, B, In}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "tagger_forward_cpu_x", [&] {
    using T_ = scalar_t;
    T_* xp = x.data_ptr<T_>();
    const T_* we = word_weight.const_data_ptr<T_>();
    const int64_t* id = ids.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t bs = 0; bs < B; ++bs) {
        const int64_t b = perm[bs];
        T_* dst = xp + (t * B + bs) * In;
        if (t < len[b]) std::memcpy(dst, we + id[b * T + t] * E, E * sizeof(T_));
        else std::memset(dst, 0, In * sizeof(T_));
      }
    if (has_chars) char_features<T_>(chars, perm.data(), len, char_weight, conv_weight, conv_bias, xp, In, E);
  });

  // ---- the LSTM layers
  std::vector<at::Tensor> layer_out;
  {
    at::Tensor h0 = at::zeros({D, B, H}, opts);
    at::Tensor in = x;
    for (int64_t l = 0; l < num_layers; ++l) {
      auto res = cpu::lstm_layer_forward(in, lens_sorted, h0, h0, lstm_weights.slice(l * per_layer, per_layer),
                                         bidirectional, false);
      in = std::get<0>(res);
      layer_out.push_back(in);
    }
  }

  // ---- the heads
  std::vector<at::Tensor> out;
  const bool sorted = std::is_sorted(perm.begin(), perm.end());  // B' order == batch order
  at::Tensor inv = sorted ? at::Tensor() : at::from_blob(pos.data(), {B}, lengths.options()).clone();
  std::vector<at::Tensor> pooled(static_cast<size_t>(num_layers * 5));
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& hidden = layer_out[head_layers[k]];  // (T, B', DH)
    const at::Tensor w = head_weights[k], bias = head_biases[k];
    at::Tensor z;
    if (levels[k] == 1) {
      // every position's scores, computed in the LSTM's layout, then (B, T, C)
      z = at::empty({T * B, w.size(0)}, opts);
      linear_rows(hidden.view({T * B, DH}), w, bias, z);
      z = z.view({T, B, w.size(0)});
      z = sorted ? z.transpose(0, 1) : z.index_select(1, inv).transpose(0, 1);
      z = z.contiguous();
    } else {
      at::Tensor& p = pooled[head_layers[k] * 5 + poolings[k]];
      if (!p.defined()) {
        p = at::empty({B, DH}, opts);
        AT_DISPATCH_FLOATING_TYPES(dt, "tagger_forward_cpu_pool", [&] {
          pool<scalar_t>(hidden, pos.data(), len, poolings[k], p.data_ptr<scalar_t>());
        });
      }
      z = at::empty({B, w.size(0)}, opts);
      linear_rows(p, w, bias, z);
    }
    out.push_back(outputs[k] == 1 ? at::log_softmax(z, -1) : z);
  }
  return out;
}

// The op has no gradient: with grad mode on, an input that requires one is an error here, at the call (rather than
// a missing gradient later); otherwise the call goes on to the backend below autograd (a redispatch with the keys
// after autograd: no thread-local guard). In C++, so an inference call pays no Python autograd layer.
std::vector<at::Tensor> tagger_forward_autograd(
    c10::DispatchKeySet ks, const at::Tensor& ids, const at::Tensor& lengths, const std::optional<at::Tensor>& chars,
    const at::Tensor& word_weight, const std::optional<at::Tensor>& char_weight,
    const std::optional<at::Tensor>& conv_weight, const std::optional<at::Tensor>& conv_bias,
    at::TensorList lstm_weights, int64_t num_layers, bool bidirectional, at::TensorList head_weights,
    at::TensorList head_biases, at::IntArrayRef head_layers, at::IntArrayRef levels, at::IntArrayRef poolings,
    at::IntArrayRef outputs) {
  if (at::GradMode::is_enabled()) {
    auto needs = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
    bool any = needs(word_weight) || (char_weight && needs(*char_weight)) || (conv_weight && needs(*conv_weight)) ||
               (conv_bias && needs(*conv_bias));
    for (const auto& t : lstm_weights) any = any || needs(t);
    for (const auto& t : head_weights) any = any || needs(t);
    for (const auto& t : head_biases) any = any || needs(t);
    FASTMTL_CHECK(!any, kOp, " is an inference op and has no gradient, but an input requires one: call it under "
                  "torch.no_grad() (or on detached tensors), or run the model's modules (MultiTaskLSTM.encode and "
                  "its heads) to differentiate");
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastmtl::tagger_forward", "")
                             .typed<decltype(tagger_forward_cpu)>();
  return op.redispatch(ks & c10::after_autograd_keyset, ids, lengths, chars, word_weight, char_weight, conv_weight,
                       conv_bias, lstm_weights, num_layers, bidirectional, head_weights, head_biases, head_layers,
                       levels, poolings, outputs);
}

}  // namespace
}  // namespace fastmtl

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("tagger_forward", &fastmtl::tagger_forward_cpu);
}

TORCH_LIBRARY_IMPL(fastmtl, Autograd, m) {
  m.impl("tagger_forward", &fastmtl::tagger_forward_autograd);
}
