"""The gradient-based methods and FAMO in the trainer: every one trains (one dataset with two tasks; two datasets,
whose batches hold one task: K = 1), PCGrad's seeded task order resumes bitwise, soft sharing is refused clearly,
and two DDP processes (gloo) match one process on the global batches."""
import os
import random

import pytest
import torch

from fastmtl import train as T
from fastmtl.checkpoint import load_checkpoint_tree
from fastmtl.training import read_toml
from fastmtl.training.config import WEIGHTINGS, TrainConfig
from fastmtl.weighting import GRADIENT_METHODS
from train_data import assert_ddp_matches_one_process, write_splits, write_two_corpora
from train_data import params as _params

TINY = dict(embedding_dim=8, hidden_size=8, batch_size=8, warmup_steps=0, progress=False, quiet=True, threads=1,
            char_dim=4, char_filters=6)
NEW = list(GRADIENT_METHODS) + ["famo"]


@pytest.fixture
def files(tmp_path):
    return write_splits(tmp_path, random.Random(5), (("train", 40), ("dev", 12), ("test", 12)))


def _cfg(files, **kw):
    kw = {**TINY, "dev": files["dev"], "test": files["test"], **kw}
    return TrainConfig(format="jsonl", train=files["train"], tasks=["tags:token:tags", "label:sequence:label"], **kw)


def test_the_methods_are_options():
    assert set(NEW) <= set(WEIGHTINGS)


@pytest.mark.parametrize("method", NEW)
def test_every_method_trains(files, method):
    r = T.train(_cfg(files, epochs=2, weighting=method, num_layers=2))
    assert {"tags", "label"} <= set(r["test"])
    h = r["history"]
    assert all(v == v and v < 1e6 for e in h for v in e["train_losses"].values())
    assert set(h[-1]["task_weights"]) == {"tags", "label"}
    init = T.train(_cfg(files, epochs=0, weighting=method, num_layers=2))
    assert any(not torch.equal(init["model"].state_dict()[k], v) for k, v in _params(r).items())


def _two(tmp_path):
    return read_toml(write_two_corpora(tmp_path, (("train", 32), ("dev", 8), ("test", 8)), "epochs = 2\n"))


@pytest.mark.parametrize("method", ["pcgrad", "mgda", "mgda_ub", "nash_mtl", "famo"])
def test_one_task_per_batch(tmp_path, method):
    res = T.train(TrainConfig(**{**_two(tmp_path), "weighting": method, "task_weights": {"tags": 2.0}}))
    assert set(res["test"]) == {"tags", "label"}
    assert all(v == v for h in res["history"] for v in h["train_losses"].values())


def test_soft_sharing_is_refused(files):
    with pytest.raises(ValueError, match="sharing='soft'"):
        T.train(_cfg(files, epochs=1, weighting="pcgrad", sharing="soft"))


@pytest.mark.parametrize("method", ["pcgrad", "famo"])
def test_deterministic_and_resumable(files, tmp_path, monkeypatch, method):
    cfg = _cfg(files, epochs=3, weighting=method, patience=10, test=None)
    a, b = T.train(cfg), T.train(cfg)
    pa = _params(a)
    assert all(torch.equal(pa[k], v) for k, v in _params(b).items())
    out = str(tmp_path / "r")
    calls = {"n": 0}
    opt_cls = type(torch.optim.Adam([torch.zeros(1, requires_grad=True)]))
    real_step = opt_cls.step
    # 5 batches an epoch; FAMO's own Adam step follows each model step: stop in the middle of epoch 2
    stop_at = 13 if method == "famo" else 8

    def interrupting_step(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real_step(self, *args, **kw)

    monkeypatch.setattr(opt_cls, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, output_dir=out)
    monkeypatch.setattr(opt_cls, "step", real_step)
    assert load_checkpoint_tree(os.path.join(out, "last.pt"))["epoch"] == 1
    c = T.train(cfg, output_dir=out, resume=True)
    pc = _params(c)
    assert calls["n"] == stop_at and all(torch.equal(pa[k], pc[k]) for k in pa)


@pytest.mark.parametrize("method", ["pcgrad", "mgda_ub", "cagrad", "famo"])
def test_ddp_two_processes_match_one(files, tmp_path, method):
    """Two gloo processes, each with half of every global batch: the per-task gradients (or the representation
    Gram matrix, or FAMO's losses) are reduced before the method reads them, so they end where one process on the
    whole batches ends."""
    cfg = _cfg(files, epochs=1, dropout=0.0, unk_alpha=0.0, device="cpu", weighting=method, dev=None, test=None,
               char_dim=0)
    assert_ddp_matches_one_process(cfg, tmp_path)


def test_frozen_encoder_trains_the_heads_only(files, tmp_path):
    out = str(tmp_path / "enc")
    T.train(_cfg(files, epochs=1, output_dir=out))
    r = T.train(_cfg(files, epochs=1, weighting="pcgrad", init_encoder=os.path.join(out, "best.pt"),
                     freeze_encoder=True))
    src = load_checkpoint_tree(os.path.join(out, "best.pt"))["model"]
    sd = r["model"].state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.items() if not k.startswith("heads."))


def test_vmap_schedule_trains_as_the_loop(files):
    cfg = _cfg(files, epochs=1, weighting="mgda", dropout=0.0, num_layers=2)
    a = _params(T.train(cfg))
    b = _params(T.train(cfg, task_backward="vmap"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    T.train(cfg, task_backward="vmap", dropout=0.3)  # and with dropout (one draw, under torch.func.vjp)
