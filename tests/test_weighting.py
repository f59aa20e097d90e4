"""Task weighting strategies against hand-computed cases."""
import math

import pytest
import torch

from fastmtl import weighting as W


def test_static():
    w = W.make_weighting("static", ["a", "b"], {"b": 2.5})
    assert w.weights() == {"a": 1.0, "b": 2.5}
    assert w.regularizer() is None
    with pytest.raises(ValueError, match="unknown weighting"):
        W.make_weighting("nope", ["a"])


def test_uncertainty_hand_computed():
    # L = sum_t exp(-s_t) L_t + s_t / 2 with s = (0.5, -1), L = (2, 3)
    w = W.UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.5, -1.0]))
    L = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
    total = sum(w.weights()[t] * L[t] for t in L) + w.regularizer()
    expected = math.exp(-0.5) * 2 + 0.25 + math.exp(1.0) * 3 - 0.5
    assert float(total.detach()) == pytest.approx(expected, rel=1e-6)
    total.backward()
    # d/ds (e^{-s} L + s/2) = -e^{-s} L + 1/2
    assert w.log_vars.grad.tolist() == pytest.approx([-math.exp(-0.5) * 2 + 0.5, -math.exp(1.0) * 3 + 0.5], rel=1e-6)
    ref = W.uncertainty_loss(torch.tensor([2.0, 3.0]), torch.tensor([0.5, -1.0]))
    assert float(ref) == pytest.approx(expected, rel=1e-6)


def test_dwa_hand_computed():
    w = W.DWAWeighting(["a", "b"], temperature=2.0)
    assert w.weights() == {"a": 1.0, "b": 1.0}
    w.epoch_end({"a": 1.0, "b": 2.0})
    assert w.weights() == {"a": 1.0, "b": 1.0}  # first two epochs: 1
    w.epoch_end({"a": 0.5, "b": 1.8})
    r = [0.5 / 1.0, 1.8 / 2.0]
    e = [math.exp(x / 2.0) for x in r]
    expected = [2 * x / sum(e) for x in e]
    got = w.weights()
    assert [got["a"], got["b"]] == pytest.approx(expected)
    assert sum(got.values()) == pytest.approx(2.0)
    assert got["b"] > got["a"]  # the task whose loss falls slower gets more weight


def test_gradnorm_loss_hand_computed():
    # w = (1, 2), g = (3, 1): G = (3, 2), Gbar = 2.5; ratios (0.5, 1.0) -> r = (2/3, 4/3); alpha = 1
    # targets = (5/3, 10/3); L = |3 - 5/3| + |2 - 10/3| = 4/3 + 4/3
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    L = W.gradnorm_loss(w, [3.0, 1.0], [0.5, 1.0], alpha=1.0)
    assert float(L.detach()) == pytest.approx(8 / 3, rel=1e-6)
    L.backward()
    # dL/dw_t = sign(G_t - target_t) * g_t (targets held constant)
    assert w.grad.tolist() == pytest.approx([3.0, -1.0])


def test_gradnorm_step_renormalises():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    x = torch.randn(8, 4)
    h = shared(x)
    losses = {"a": (h ** 2).mean(), "b": 10 * h.abs().mean()}
    gn = W.GradNormWeighting(["a", "b"], alpha=1.5, lr=0.1)
    gn.after_backward(losses, list(shared.parameters()))
    w = gn.weights()
    assert sum(w.values()) == pytest.approx(2.0, rel=1e-5)
    # task b has the larger gradient norm, so GradNorm lowers its weight
    assert w["b"] < w["a"]
