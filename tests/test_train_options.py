"""Every training option is validated with a one-line message and exit code 2; a run whose loss turns nan or inf stops
without metrics; a non-empty --output-dir is refused unless --resume or --overwrite."""
import json
import math
import os
import random

import pytest
import torch

from fastmtl import cli
from fastmtl import train as T
from fastmtl.checkpoint import load_checkpoint_tree

from train_data import TASKS, TINY, TINY_ARGS, write_splits
from train_data import one_line_error as _one_line_error
from train_data import data_args as _data_args


@pytest.fixture
def files(tmp_path, _fresh_seed):
    return write_splits(tmp_path, random.Random(_fresh_seed))


# ----------------------------------------------------------------------------------------------------------------
# options

BAD_OPTIONS = [
    ("--warmup-steps", "-1"), ("--max-train", "0"), ("--max-train", "-3"), ("--threads", "0"), ("--threads", "-1"),
    ("--epochs", "-1"), ("--epochs", "0"), ("--batch-size", "0"), ("--batch-size", "-8"), ("--hidden-size", "0"),
    ("--embedding-dim", "-4"), ("--num-layers", "0"), ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "nan"),
    ("--lr", "inf"), ("--dropout", "1"), ("--dropout", "-0.1"), ("--dropout", "nan"), ("--label-smoothing", "1"),
    ("--label-smoothing", "-0.5"), ("--task-weights", "tags:nan"), ("--task-weights", "tags:inf"),
    ("--task-weights", "label:-1"), ("--task-weights", "nosuch:1"), ("--weight-decay", "-1"), ("--grad-clip", "-1"),
    ("--grad-clip", "nan"), ("--ema", "1"), ("--ema", "-0.5"), ("--patience", "0"), ("--max-minutes", "0"),
    ("--max-minutes", "-1"), ("--min-count", "0"), ("--unk-alpha", "-1"), ("--char-dim", "-1"),
    ("--char-filters", "0"), ("--char-kernel", "4"), ("--dwa-temperature", "0"), ("--sequence-aux", "-1"),
    ("--soft-lambda", "nan"), ("--gradnorm-alpha", "-1"), ("--task-layers", "tags:0"),
    ("--device", "cuda:x"), ("--device", "tpu"),
]


@pytest.mark.parametrize("option,value", BAD_OPTIONS, ids=["%s=%s" % ov for ov in BAD_OPTIONS])
def test_bad_option_is_one_line_and_exit_2(files, tmp_path, capsys, option, value):
    out = tmp_path / "run"
    extra = ["--sharing", "hierarchical", "--num-layers", "2"] if option == "--task-layers" else []
    # the option comes last (argparse: the last occurrence wins over TINY_ARGS and --epochs 1)
    rc = cli.main(["train"] + _data_args(files) + TINY_ARGS + extra + ["--epochs", "1", "--output-dir", str(out),
                                                                      option, value])
    assert rc == 2
    _one_line_error(capsys, option)
    assert not (out / "metrics.json").exists() and not (out / "best.pt").exists()


def test_flag_combinations(files, tmp_path, capsys):
    base = ["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1"]
    assert cli.main(base + ["--freeze-encoder"]) == 2
    _one_line_error(capsys, "--freeze-encoder", "--init-encoder")
    assert cli.main(base + ["--overwrite"]) == 2
    _one_line_error(capsys, "--overwrite", "--output-dir")
    assert cli.main(base + ["--resume", "--overwrite", "--output-dir", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--resume", "--overwrite")


def test_python_api_validates_the_same(files):
    cfg = T.TrainConfig(format="jsonl", train=files["train"], tasks=TASKS, epochs=1, **TINY)
    assert cfg.validate() is cfg
    assert T.TrainConfig().validate()  # the defaults are valid
    for field, value, name in [("warmup_steps", -1, "--warmup-steps"), ("dropout", "0.5", "--dropout"),
                               ("lr", float("nan"), "--lr"), ("epochs", -1, "--epochs"), ("lower", 1, "--lower"),
                               ("task_weights", {"tags": float("nan")}, "--task-weights"),
                               ("batch_size", 2.5, "--batch-size"), ("format", "csv", "--format"),
                               ("eval_batch_size", 0, "--eval-batch-size")]:
        with pytest.raises(ValueError, match=name):
            T.train(cfg, **{field: value})
    r = T.train(cfg, epochs=0)  # from Python, epochs=0 returns the untrained model
    assert r["history"] == []


def test_missing_input_file_is_exit_2(files, tmp_path, capsys):
    assert cli.main(["train", "--format", "jsonl", "--train", str(tmp_path / "nope.jsonl"), "--task", TASKS[0]]
                    + TINY_ARGS) == 2
    _one_line_error(capsys, "nope.jsonl")
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--pretrained", str(tmp_path / "none.vec")]) == 2
    _one_line_error(capsys, "none.vec")


def test_unexpected_errors_keep_their_traceback(files, monkeypatch):
    def boom(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(T, "train", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train"] + _data_args(files) + TINY_ARGS)


# ----------------------------------------------------------------------------------------------------------------
# --device

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(files, tmp_path, capsys):
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--device", "cuda"]) == 2
    _one_line_error(capsys, "--device cuda", "--device cpu")
    assert cli.main(["evaluate", str(tmp_path / "best.pt"), files["test"], "--device", "cuda"]) == 2
    _one_line_error(capsys, "--device cuda")
    assert cli.main(["predict", str(tmp_path / "best.pt"), "w1 w2", "--device", "cuda:0"]) == 2
    _one_line_error(capsys, "--device cuda:0")


def test_device_cuda_build_without_gpu(files, monkeypatch, capsys):
    """A CUDA build on a machine without a GPU, or an index past the GPUs: one line, not an AssertionError."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--device", "cuda"]) == 2
    _one_line_error(capsys, "--device cuda", "no CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--device", "cuda:3"]) == 2
    _one_line_error(capsys, "--device cuda:3", "1 CUDA GPU")


# ----------------------------------------------------------------------------------------------------------------
# non-finite losses

def test_nan_pretrained_vectors_refused(files, tmp_path, capsys):
    vec = tmp_path / "vectors.txt"
    rows = ["w%d %s" % (i, " ".join("0.1" for _ in range(8))) for i in range(20)]
    rows[0] = "w0 " + " ".join(["0.1"] * 7 + ["nan"])  # digits are normalised: every word of the data is 'w0'
    vec.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1", "--pretrained", str(vec),
                                                                "--output-dir", str(out)]) == 2
    _one_line_error(capsys, "--pretrained", "w0", "nan")
    assert not (out / "metrics.json").exists()


def _nan_weights_from(monkeypatch, step):
    """Task weights turn nan from optimizer step ``step`` on (a stand-in for any way the loss can diverge)."""
    real = T.make_weighting  # the trainer's stage that builds the weighting
    calls = {"n": 0}

    def patched(*args, **kw):
        w = real(*args, **kw)
        orig = w.weights

        def weights():
            calls["n"] += 1
            got = orig()
            return {k: float("nan") for k in got} if calls["n"] >= step else got

        w.weights = weights
        return w

    from fastmtl.training import trainer

    monkeypatch.setattr(trainer, "make_weighting", patched)


def test_nan_loss_stops_training_python(files, tmp_path, monkeypatch):
    per_epoch = len(T.D.bucket_batches([0] * 40, 8))
    _nan_weights_from(monkeypatch, per_epoch + 2)  # in the second epoch
    out = str(tmp_path / "run")
    cfg = T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=files["test"], tasks=TASKS,
                        epochs=3, patience=5, output_dir=out, **TINY)
    with pytest.raises(T.NonFiniteLossError, match="at epoch 2, step ") as e:
        T.train(cfg)
    assert "\n" not in str(e.value) and "nan" in str(e.value)
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    last = load_checkpoint_tree(os.path.join(out, "last.pt"))  # epoch 1's checkpoints are intact
    assert last["epoch"] == 1
    best = load_checkpoint_tree(os.path.join(out, "best.pt"))
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    with open(os.path.join(out, "log.jsonl")) as f:
        assert [json.loads(l)["epoch"] for l in f] == [1]


def test_nan_loss_cli_exit_2_without_metrics(files, tmp_path, monkeypatch, capsys):
    _nan_weights_from(monkeypatch, 1)
    out = tmp_path / "run"
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)]) == 2
    _one_line_error(capsys, "training loss is nan")
    assert not (out / "metrics.json").exists() and not (out / "best.pt").exists()
    assert capsys.readouterr().out == ""  # no metrics printed


# ----------------------------------------------------------------------------------------------------------------
# --output-dir reuse

def _run(files, out, *extra, test=True):
    return cli.main(["train"] + _data_args(files, test) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)]
                    + list(extra))


def test_output_dir_reuse_refused(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(files, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _run(files, out) == 2
    _one_line_error(capsys, str(out), "not empty", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    with pytest.raises(ValueError, match="not empty"):  # Python users too
        T.train(format="jsonl", train=files["train"], tasks=TASKS, epochs=1, output_dir=str(out), **TINY)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _run(files, other) == 2  # any non-empty folder
    _one_line_error(capsys, str(other), "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(files, empty) == 0  # an existing empty folder is fine
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _run(files, afile, "--overwrite") == 2
    _one_line_error(capsys, str(afile), "not a folder")


def test_output_dir_overwrite(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(files, out) == 0
    assert (out / "metrics.json").exists()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    target = tmp_path / "target.txt"
    target.write_text("keep")
    (out / "learning_curve.png").unlink(missing_ok=True)  # (written where matplotlib is installed)
    os.symlink(str(target), str(out / "learning_curve.png"))  # a link is removed, never its target
    (out / ".best.pt.abc123.tmp").write_text("left over")
    # a bad option or bad data leaves the earlier run alone
    assert _run(files, out, "--overwrite", "--lr", "-1") == 2
    assert (out / "metrics.json").exists()
    capsys.readouterr()
    assert _run(files, out, "--overwrite", test=False) == 0  # no --test: the old metrics.json would be stale
    names = {p.name for p in out.iterdir()}
    assert "metrics.json" not in names and ".best.pt.abc123.tmp" not in names
    assert {"best.pt", "last.pt", "log.jsonl", "notes.txt", "sub"} <= names
    assert (out / "notes.txt").read_text() == "mine" and target.read_text() == "keep"
    assert not os.path.islink(out / "learning_curve.png")
    with open(out / "log.jsonl") as f:
        assert [json.loads(l)["epoch"] for l in f] == [1]
    # the run saved with --overwrite continues with --resume (its saved configuration does not clash)
    assert cli.main(["train"] + _data_args(files, False) + TINY_ARGS + ["--epochs", "2", "--output-dir", str(out),
                                                                       "--resume"]) == 0
    assert load_checkpoint_tree(str(out / "last.pt"))["epoch"] == 2


def test_output_dir_resume_allowed(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(files, out) == 0
    capsys.readouterr()
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "2", "--output-dir", str(out),
                                                                "--resume"]) == 0
    assert load_checkpoint_tree(str(out / "last.pt"))["epoch"] == 2
    m = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v["accuracy"]) for k, v in m.items() if isinstance(v, dict))
