"""Gradient-based methods and tasks absent from a batch; non-finite coefficients and updates never reach a model
that is saved."""
import random

import pytest
import torch

import fastmtl
from fastmtl import weighting as W
from fastmtl.gradients import gradient_method_step, labelled_counts
from fastmtl.training.trainer import NonFiniteLossError
from fastmtl import train as T

from train_data import TINY, write_splits

METHODS = ["pcgrad", "cagrad", "mgda", "mgda_ub", "imtl", "aligned_mtl", "nash_mtl"]


def _model_batch(seed=0):
    torch.manual_seed(seed)
    tasks = [fastmtl.nn.SequenceTask("intent", 5), fastmtl.nn.TokenTask("slots", 7)]
    model = fastmtl.MultiTaskLSTM(30, 6, 5, tasks, num_layers=1, bidirectional=True, dropout=0.0).double()
    B, Tn = 4, 6
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.tensor([6, 5, 3, 2])
    ids = torch.randint(1, 30, (B, Tn), generator=g)
    targets = {"intent": torch.randint(0, 5, (B,), generator=g), "slots": torch.randint(0, 7, (B, Tn), generator=g)}
    return model, ids, lengths, targets


@pytest.mark.parametrize("method", METHODS)
def test_zero_gram_gives_no_update_not_huge_weights(method):
    m = W.make_weighting(method, ["a", "b"])
    c = m(torch.zeros(2, 2, dtype=torch.float64), ["a", "b"])
    assert torch.equal(c, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("method", METHODS)
def test_a_zero_gradient_task_is_left_out_of_the_solver(method):
    g = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -0.5], [0.3, -1.0, 2.0]], dtype=torch.float64)
    m = W.make_weighting(method, ["a", "b", "c"])
    c = m(g @ g.t(), ["a", "b", "c"])
    ref = W.make_weighting(method, ["b", "c"])
    want = ref(g[1:] @ g[1:].t(), ["b", "c"])
    assert float(c[0]) == 0.0
    torch.testing.assert_close(c[1:], want)
    assert float((c[1:, None] * g[1:]).sum(0).norm()) > 0  # the shared parameters move


@pytest.mark.parametrize("method", ["mgda", "mgda_ub", "imtl", "nash_mtl"])
def test_task_without_labels_does_not_freeze_the_encoder(method):
    model, ids, lengths, targets = _model_batch()
    targets["slots"] = torch.full_like(targets["slots"], -100)  # a batch of another dataset: no slot labels
    assert labelled_counts(model, targets, lengths) == {"intent": 4, "slots": 0}
    tg, c = gradient_method_step(model, W.make_weighting(method, ["intent", "slots"]), ids, lengths, targets)
    assert tg.tasks == ["intent"] and c.tolist() != [0.0]
    shared = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    assert sum(float(p.grad.abs().sum()) for p in shared if p.grad is not None) > 0


def test_labels_past_the_length_do_not_count():
    model, ids, lengths, targets = _model_batch()
    y = torch.full_like(targets["slots"], -100)
    y[3, 4] = 2  # position 4 of a sequence of length 2: padding
    targets["slots"] = y
    assert labelled_counts(model, targets, lengths)["slots"] == 0


def test_batch_without_any_label_makes_no_update():
    model, ids, lengths, targets = _model_batch()
    targets = {n: torch.full_like(y, -100) for n, y in targets.items()}
    assert gradient_method_step(model, W.make_weighting("nash_mtl", ["intent", "slots"]), ids, lengths,
                                targets) == (None, None)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_coefficients_raise(bad, monkeypatch):
    monkeypatch.setattr(W.MGDAWeighting, "coefficients", lambda self, G, tasks: torch.tensor([bad, 1.0]))
    with pytest.raises(FloatingPointError, match="non-finite coefficients"):
        W.make_weighting("mgda", ["a", "b"])(torch.eye(2, dtype=torch.float64), ["a", "b"])


def test_solver_overflow_is_a_clear_error(monkeypatch):
    def boom(G, c, rescale):
        raise OverflowError("math range error")

    monkeypatch.setattr(W.gradient, "cagrad_coefficients", boom)  # the solver the method calls
    with pytest.raises(FloatingPointError, match="cagrad: the solver failed"):
        W.make_weighting("cagrad", ["a", "b"])(torch.eye(2, dtype=torch.float64), ["a", "b"])


@pytest.fixture
def files(tmp_path, _fresh_seed):
    return write_splits(tmp_path, random.Random(_fresh_seed), (("train", 24), ("dev", 8), ("test", 8)))


def _cfg(files, **kw):
    return T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=files["test"],
                         tasks=["tags:token:tags", "label:sequence:label"], epochs=1, **dict(TINY, **kw))


def test_a_non_finite_update_stops_the_run_before_any_checkpoint(files, tmp_path, monkeypatch):
    # the loss of the last step is finite (computed before the update) but the update is not
    calls = {"n": 0}
    step = torch.optim.Adam.step

    def poisoned(self, *a, **k):
        out = step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # the last of the epoch's 3 steps (24 sentences, batches of 8)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="optimiser step at epoch 1, step 3 left nan or inf"):
        T.train(_cfg(files, optimizer="adam"), output_dir=str(out))
    assert calls["n"] == 3
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()
    assert not (out / "metrics.json").exists()


def test_non_finite_coefficients_stop_the_run(files, tmp_path, monkeypatch):
    monkeypatch.setattr(W.NashMTLWeighting, "coefficients",
                        lambda self, G, tasks: torch.full((len(tasks),), float("inf"), dtype=torch.float64))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="nash_mtl gave non-finite coefficients"):
        T.train(_cfg(files, weighting="nash_mtl"), output_dir=str(out))
    assert not (out / "best.pt").exists() and not (out / "metrics.json").exists()
