// C++ test of the fastmtl ops through the dispatcher (libtorch only, no Python), against ATen references.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

static int failures = 0;

#define EXPECT_CLOSE(a, b, tol, what)                                                                   \
  do {                                                                                                  \
    double err = ((a) - (b)).abs().max().item<double>();                                                \
    if (!(err <= (tol))) {                                                                              \
      std::fprintf(stderr, "FAIL %s: max abs error %g > %g\n", what, err, (double)(tol));             \
      ++failures;                                                                                       \
    } else {                                                                                            \
      std::printf("ok   %s (max abs error %.3g)\n", what, err);                                        \
    }                                                                                                   \
  } while (0)

using LstmFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, at::TensorList, bool,
    bool);

static void test_lstm() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastmtl::lstm_layer_forward", "").typed<LstmFwd>();
  const int64_t T = 7, B = 5, I = 3, H = 4;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = at::randn({T, B, I}, opts);
  auto h0 = at::randn({1, B, H}, opts), c0 = at::randn({1, B, H}, opts);
  std::vector<at::Tensor> w = {at::randn({4 * H, I}, opts), at::randn({4 * H, H}, opts), at::randn({4 * H}, opts),
                               at::randn({4 * H}, opts)};
  auto lengths = at::tensor(std::vector<int64_t>{7, 6, 4, 4, 1}, at::kLong);
  auto [y, hy, cy, reserve] = op.call(x, lengths, h0, c0, w, false, true);

  // Reference: at::lstm_cell per step, sequences stop at their lengths.
  auto h = h0[0].clone(), c = c0[0].clone();
  auto yref = at::zeros({T, B, H}, opts);
  for (int64_t t = 0; t < T; ++t) {
    auto hc = at::lstm_cell(x[t], {h, c}, w[0], w[1], w[2], w[3]);
    for (int64_t b = 0; b < B; ++b) {
      if (t < lengths[b].item<int64_t>()) {
        h[b] = std::get<0>(hc)[b];
        c[b] = std::get<1>(hc)[b];
        yref[t][b] = h[b];
      }
    }
  }
  EXPECT_CLOSE(y, yref, 1e-10, "lstm_layer_forward output (variable lengths)");
  EXPECT_CLOSE(hy[0], h, 1e-10, "lstm_layer_forward h_n");
  EXPECT_CLOSE(cy[0], c, 1e-10, "lstm_layer_forward c_n");
}

using LossFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
    const at::Tensor&, const std::optional<at::Tensor>&, at::TensorList, const c10::List<std::optional<at::Tensor>>&,
    at::TensorList, const c10::List<std::optional<at::Tensor>>&, const at::Tensor&, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef, c10::ArrayRef<double>, bool);

static void test_heads() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastmtl::multitask_loss", "").typed<LossFn>();
  const int64_t B = 4, T = 6, D = 8, C0 = 5, C1 = 11;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto hidden = at::randn({B, T, D}, opts);
  auto lengths = at::tensor(std::vector<int64_t>{6, 3, 1, 5}, at::kLong);
  auto w0 = at::randn({C0, D}, opts), b0 = at::randn({C0}, opts), w1 = at::randn({C1, D}, opts);
  auto y0 = at::randint(C0, {B}, at::kLong), y1 = at::randint(C1, {B, T}, at::kLong);
  c10::List<std::optional<at::Tensor>> biases({std::optional<at::Tensor>(b0), std::optional<at::Tensor>()});
  c10::List<std::optional<at::Tensor>> cw({std::optional<at::Tensor>(), std::optional<at::Tensor>()});
  auto lambdas = at::tensor(std::vector<double>{0.7, 1.3}, opts);
  std::vector<int64_t> levels = {0, 1}, poolings = {2, 0}, ignore = {-100, -100};
  std::vector<double> smoothing = {0.0, 0.1};
  auto [total, losses, gh, gw, gb] =
      op.call(hidden, lengths, {w0, w1}, biases, {y0, y1}, cw, lambdas, levels, poolings, ignore, smoothing, false);

  // Reference: mean pooling over real tokens + cross entropy; token task over real tokens only.
  auto mask = at::arange(T, at::kLong).unsqueeze(0) < lengths.unsqueeze(1);  // (B, T)
  auto maskd = mask.to(at::kDouble).unsqueeze(-1);
  auto pooled = (hidden * maskd).sum(1) / lengths.to(at::kDouble).unsqueeze(1);
  auto l0 = at::cross_entropy_loss(at::linear(pooled, w0, b0), y0);
  auto y1m = at::where(mask, y1, at::full_like(y1, -100));
  auto l1 = at::cross_entropy_loss(at::linear(hidden, w1).reshape({B * T, C1}), y1m.reshape({B * T}), {},
                                   at::Reduction::Mean, -100, 0.1);
  EXPECT_CLOSE(losses[0], l0, 1e-10, "multitask_loss sequence task (mean pooling)");
  EXPECT_CLOSE(losses[1], l1, 1e-10, "multitask_loss token task (label smoothing)");
  EXPECT_CLOSE(total, 0.7 * l0 + 1.3 * l1, 1e-10, "multitask_loss total");
}

int main() {
  at::manual_seed(1234);
  try {
    test_lstm();
    test_heads();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL exception: %s\n", e.what());
    return 1;
  }
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all C++ checks passed\n");
  return 0;
}
