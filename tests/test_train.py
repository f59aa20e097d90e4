"""Trainer and command line: end to end on tiny data, metrics.json, atomic writes, resume, determinism, DDP."""
import glob
import json
import os
import random

import pytest
import torch

from fastmtl import cli
from fastmtl import train as T
from fastmtl.checkpoint import load_checkpoint_tree
from train_data import data_args as _data_args
from train_data import assert_ddp_matches_one_process, write_splits
from train_data import params as _params

TINY = dict(embedding_dim=8, hidden_size=8, batch_size=8, warmup_steps=0, progress=False, quiet=True, threads=1)
TINY_ARGS = ["--embedding-dim", "8", "--hidden-size", "8", "--batch-size", "8", "--no-progress", "--quiet",
             "--threads", "1"]


@pytest.fixture
def files(tmp_path, _fresh_seed):
    return write_splits(tmp_path, random.Random(_fresh_seed), (("train", 48), ("dev", 16), ("test", 16)))


def test_cli_train_evaluate_predict(files, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "2", "--output-dir", out])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m == printed
    assert set(m) == {"tags", "label", "frame_accuracy"}
    assert set(m["tags"]) == {"accuracy", "precision", "recall", "f1"} and set(m["label"]) == {"accuracy"}
    assert all(0.0 <= v <= 1.0 for v in [m["frame_accuracy"], *m["tags"].values(), m["label"]["accuracy"]])
    for name in ("best.pt", "last.pt", "log.jsonl"):
        assert os.path.exists(os.path.join(out, name))
    assert not glob.glob(os.path.join(out, "*.tmp*")) and not glob.glob(os.path.join(out, ".*"))  # no temporaries
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(l) for l in f]
    assert [r["epoch"] for r in log] == [1, 2] and all("dev" in r and r["tokens_per_s"] > 0 for r in log)
    try:
        import matplotlib  # noqa: F401

        assert os.path.exists(os.path.join(out, "learning_curve.png"))
    except ImportError:
        pass

    rc = cli.main(["evaluate", os.path.join(out, "best.pt"), files["test"]])
    assert rc == 0 and json.loads(capsys.readouterr().out) == m  # the best checkpoint gives the same metrics
    rc = cli.main(["predict", os.path.join(out, "best.pt"), "w1 w2 w9", "w7"])
    assert rc == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert lines[0]["tokens"] == ["w1", "w2", "w9"] and len(lines[0]["tags"]) == 3
    assert lines[1]["label"] in ("odd", "even") and lines[1]["tags"][0] in ("O", "B-E", "I-E")
    rc = cli.main(["predict", os.path.join(out, "best.pt"), "w1 w2 w9", "--details", "--top-k", "1"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tokens"] == ["w1", "w2", "w9"] and d["tags"]["labels"] == lines[0]["tags"]
    assert d["label"]["label"] == lines[0]["label"] and len(d["label"]["probs"]) == 1
    assert 0 < d["label"]["confidence"] <= 1 and isinstance(d["tags"]["spans"], list)
    assert cli.main(["predict", os.path.join(out, "best.pt"), "w1", "--top-k", "1"]) == 2


def test_cli_errors(files, tmp_path, capsys):
    assert cli.main(["train", "--format", "jsonl", "--train", files["train"], "--task", "x:token:nope"]
                    + TINY_ARGS) == 2
    assert "no field 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": ["a"], "t": ["O"]}\n{"tokens": "a b"}\n')
    assert cli.main(["train", "--format", "jsonl", "--train", str(bad), "--task", "t:token:t"] + TINY_ARGS) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--sharing", "medium"])


def test_atis_tiny_subset(tmp_path, capsys):
    out = str(tmp_path / "atis")
    rc = cli.main(["train", "--max-train", "300", "--epochs", "2", "--lr", "0.02", "--output-dir", out] + TINY_ARGS)
    assert rc == 0
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert set(m) == {"intent", "slots", "frame_accuracy"}
    assert set(m["intent"]) == {"accuracy"} and set(m["slots"]) == {"accuracy", "precision", "recall", "f1"}
    assert m["intent"]["accuracy"] > 0.5  # the majority intent alone gives ~0.71


@pytest.mark.parametrize("at", ["epoch_start", "mid_epoch"])
def test_deterministic_and_resume(files, tmp_path, monkeypatch, at):
    cfg = T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=None,
                        tasks=["tags:token:tags", "label:sequence:label"], epochs=3, patience=10, **TINY)
    a = T.train(cfg)
    b = T.train(cfg)
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]

    # interrupt (Ctrl-C) at the start or in the middle of epoch 2 (after some of its optimizer steps), then
    # --resume: same result as the uninterrupted run, bitwise
    out = str(tmp_path / "r")
    per_epoch = len(T.D.bucket_batches([0] * 48, cfg.batch_size))
    assert per_epoch >= 3
    stop_at = per_epoch + (1 if at == "epoch_start" else per_epoch // 2 + 1)
    calls = {"n": 0}
    opt_cls = type(torch.optim.Adam([torch.zeros(1, requires_grad=True)]))  # the trainer's default optimizer
    real_step = opt_cls.step

    def interrupting_step(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == stop_at:  # this step of epoch 2 never happens; the earlier ones did
            raise KeyboardInterrupt
        return real_step(self, *args, **kw)

    assert cfg.optimizer == "adam"
    monkeypatch.setattr(opt_cls, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, output_dir=out)
    assert calls["n"] == stop_at
    monkeypatch.setattr(opt_cls, "step", real_step)
    ck = load_checkpoint_tree(os.path.join(out, "last.pt"))
    assert ck["epoch"] == 1
    c = T.train(cfg, output_dir=out, resume=True)
    assert len(c["history"]) == 3
    pc = _params(c)
    assert all(torch.equal(pa[k], pc[k]) for k in pa)


@pytest.mark.parametrize("weighting,sharing", [("uncertainty", "hard"), ("dwa", "hard"), ("gradnorm", "hard"),
                                               ("static", "soft"), ("static", "hierarchical")])
def test_strategies_train(files, weighting, sharing):
    r = T.train(T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=files["test"],
                              tasks=["tags:token:tags", "label:sequence:label"], epochs=2, weighting=weighting,
                              sharing=sharing, num_layers=2 if sharing == "hierarchical" else 1,
                              task_layers={"tags": 1} if sharing == "hierarchical" else None, **TINY))
    assert set(r["test"]) == {"tags", "label", "frame_accuracy"}
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in r["history"])
    w = r["history"][-1]["task_weights"]
    if weighting == "gradnorm":
        assert sum(w.values()) == pytest.approx(2.0, rel=1e-4)
    if weighting == "uncertainty":
        assert w != {"tags": 1.0, "label": 1.0}  # learned


def test_transfer_init_encoder(files, tmp_path):
    out = str(tmp_path / "src")
    T.train(T.TrainConfig(format="jsonl", train=files["train"], tasks=["tags:token:tags"], epochs=1,
                          output_dir=out, **TINY))
    r = T.train(T.TrainConfig(format="jsonl", train=files["train"], test=files["test"], tasks=["label:sequence:label"],
                              epochs=1, init_encoder=os.path.join(out, "best.pt"), freeze_encoder=True, **TINY))
    src = load_checkpoint_tree(os.path.join(out, "best.pt"))["model"]
    sd = r["model"].state_dict()
    for k, v in src.items():
        if not k.startswith("heads."):
            assert torch.equal(sd[k], v), k  # frozen encoder unchanged
    assert set(r["test"]) == {"label"}


def test_ddp_two_processes_match_one(files, tmp_path):
    """Two gloo processes, each with half of every global batch, end with the parameters one process gets on the
    whole batches (uneven token counts per rank included)."""
    cfg = T.TrainConfig(format="jsonl", train=files["train"], tasks=["tags:token:tags", "label:sequence:label"],
                        epochs=1, dropout=0.0, unk_alpha=0.0, device="cpu", weighting="uncertainty", **TINY)
    assert_ddp_matches_one_process(cfg, tmp_path)


def test_sequence_aux_task_is_trained_not_reported(files, tmp_path):
    out = str(tmp_path / "aux")
    r = T.train(T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=files["test"],
                              tasks=["tags:token:tags", "label:sequence:label"], epochs=1, sequence_aux=0.5,
                              output_dir=out, **TINY))
    assert set(r["test"]) == {"tags", "label", "frame_accuracy"}
    assert "label@token" in r["history"][0]["train_losses"]
    assert r["history"][0]["task_weights"]["label@token"] == 0.5
    preds = T.predict_sentences(os.path.join(out, "best.pt"), ["w1 w2"])
    assert set(preds[0]) == {"tokens", "tags", "label"}


def test_char_features_train_and_unknown_words(files, tmp_path):
    """--char-dim: trains, checkpoints, and an out-of-vocabulary word gets its real characters at prediction."""
    out = str(tmp_path / "char")
    rc = cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1", "--char-dim", "4", "--char-filters",
                                                                "6", "--output-dir", out])
    assert rc == 0
    model, vocab, lvs, specs, cfg = T.load_checkpoint(os.path.join(out, "best.pt"))
    assert cfg.char_dim == 4 and model.char_cnn is not None
    seen = []
    orig = model.char_cnn.forward

    def spy(ids, chars=None):
        seen.append(chars)
        return orig(ids, chars)

    model.char_cnn.forward = spy
    T.predict_examples(model, vocab, lvs, specs, [{"tokens": ["w1", "zz9q"]}], torch.device("cpu"))
    assert seen[0] is not None and seen[0][0, 1, :4].tolist() == model.char_cnn.encode_words(["zz0q"])[0]
    preds = T.predict_sentences(os.path.join(out, "best.pt"), ["w1 zz9q w3"])
    assert len(preds[0]["tags"]) == 3


def test_constrained_decoding_checkpointed(files, tmp_path):
    """BIO tags: the checkpoint records the scheme, evaluation decodes valid sequences; off: plain argmax."""
    from fastmtl.decoding import _valid

    out = str(tmp_path / "con")
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", out]) == 0
    ck = load_checkpoint_tree(os.path.join(out, "best.pt"))
    assert ck["decoding"] == {"tags": "bio"}
    model, vocab, lvs, specs, cfg = T.load_checkpoint(os.path.join(out, "best.pt"))
    assert set(model.decode_constraints) == {"tags"}
    exs = [json.loads(l) for l in open(files["test"])]
    preds = T.predict_examples(model, vocab, lvs, specs, exs, torch.device("cpu"))
    assert all(_valid(p["tags"], "bio") and len(p["tags"]) == len(e["tokens"]) for p, e in zip(preds, exs))
    off = str(tmp_path / "off")
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", off,
                                                                "--constrained-decoding", "false"]) == 0
    model, *_ = T.load_checkpoint(os.path.join(off, "best.pt"))
    assert model.decode_constraints == {}


def test_cli_train_without_output_dir_saves_in_a_new_runs_folder(files, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "myruns"
    monkeypatch.setenv("FASTMTL_RUNS_DIR", str(runs))
    args = ["train"] + _data_args(files) + [a for a in TINY_ARGS if a != "--quiet"] + ["--epochs", "1"]
    assert cli.main(args) == 0
    assert cli.main(args) == 0  # a second run in the same second gets a folder of its own
    err = capsys.readouterr().err
    made = sorted(os.listdir(runs))
    assert len(made) == 2 and all(len(m.split("-")[0]) == 8 for m in made)
    for m in made:
        assert "fastmtl: the run is saved in %s" % (runs / m) in err
        assert os.path.isfile(runs / m / "best.pt") and os.path.isfile(runs / m / "metrics.json")
    assert cli.main(["predict", str(runs / made[0] / "best.pt"), "w1 w2"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ["w1", "w2"]
    from fastmtl.cli import new_run_dir

    a, b = new_run_dir(str(tmp_path / "r"), now=0), new_run_dir(str(tmp_path / "r"), now=0)
    assert os.path.basename(b) == os.path.basename(a) + "-2"
