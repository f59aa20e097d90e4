"""The small defects of the second hostile-input probe (item 6): each a one-line error or a right answer, never a
traceback."""
import random
import subprocess
import sys

import pytest

from fastmtl import cli
from fastmtl.training.config import MAX_SEED, TrainConfig, read_toml
from fastmtl.training.data import EpochPlanner

from train_data import TINY_ARGS, data_args, one_line_error, write_splits


def test_temperature_sampling_has_no_overflow():
    for t in (0.005, 1e-9, 1.0, 50.0):
        p = EpochPlanner([3000, 40], 8, "temperature", t).probabilities()
        assert abs(sum(p) - 1) < 1e-12 and all(0 <= x <= 1 for x in p)
    assert EpochPlanner([3000, 40], 8, "temperature", 0.005).probabilities()[0] == 1.0
    p = EpochPlanner([300, 100], 8, "temperature", 2.0).probabilities()
    assert abs(p[0] / p[1] - 3 ** 0.5) < 1e-12


def test_deeply_nested_toml_is_one_error(tmp_path):
    p = tmp_path / "deep.toml"
    p.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError, match="nested too deeply|deep"):
        read_toml(str(p))


@pytest.mark.parametrize("kw,words", [(dict(lr=1e308), "--lr must be a finite number in (0, 1000]"),
                                      (dict(seed=2**70), "--seed must be an integer in 0..%d" % MAX_SEED),
                                      (dict(seed=-1), "--seed must be an integer in 0..")])
def test_extreme_numbers_are_refused(kw, words):
    with pytest.raises(ValueError) as e:
        TrainConfig(**kw).validate()
    assert words in str(e.value)


@pytest.mark.parametrize("name", ["tokens", "frame_accuracy", "frame_accuracy_x", "dataset", "a@b", "x y", ".x"])
def test_reserved_or_odd_task_names_are_refused(name, tmp_path, capsys, _fresh_seed):
    files = write_splits(tmp_path, random.Random(_fresh_seed), (("train", 8), ("dev", 4)))
    args = ["train", "--format", "jsonl", "--train", files["train"], "--task", "%s:token:tags" % name] + TINY_ARGS
    assert cli.main(args) == 2
    one_line_error(capsys, "task name %r" % name)


def test_predict_on_stdin_refuses_invalid_utf8_as_input_does(tmp_path, _fresh_seed):
    files = write_splits(tmp_path, random.Random(_fresh_seed), (("train", 16), ("dev", 8), ("test", 8)))
    out = tmp_path / "run"
    assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)]) == 0
    bad = b"w1 w2\n\xff\xfe w3\n"
    (tmp_path / "bad.txt").write_bytes(bad)
    code = "import sys; from fastmtl import cli; sys.exit(cli.main(sys.argv[1:]))"
    via_stdin = subprocess.run([sys.executable, "-c", code, "predict", str(out / "best.pt")], input=bad,
                               capture_output=True, timeout=300)
    via_file = subprocess.run([sys.executable, "-c", code, "predict", str(out / "best.pt"), "--input",
                               str(tmp_path / "bad.txt")], capture_output=True, timeout=300)
    assert via_stdin.returncode == via_file.returncode == 2
    err = via_stdin.stderr.decode()
    assert "<stdin>:2: not valid UTF-8" in err and "Traceback" not in err, err


def test_atis_format_files_train_without_task(tmp_path, capsys):
    # the README's own example: --format atis --train FILE trains the format's two tasks
    line = "show:O flights:O from:O boston:B-fromloc to:O denver:B-toloc <=> atis_flight\n"
    other = "what:O is:O the:O fare:O to:O boston:B-toloc <=> atis_airfare\n"
    for split in ("train", "dev", "test"):
        (tmp_path / ("%s.txt" % split)).write_text((line + other) * 6)
    out = tmp_path / "run"
    assert cli.main(["train", "--format", "atis", "--train", str(tmp_path / "train.txt"), "--dev",
                     str(tmp_path / "dev.txt"), "--test", str(tmp_path / "test.txt"), "--epochs", "1",
                     "--output-dir", str(out)] + TINY_ARGS) == 0
    assert {"intent", "slots"} <= set(__import__("json").loads(capsys.readouterr().out))


def test_disk_full_names_the_file(tmp_path, monkeypatch, capsys):
    import errno

    from fastmtl import fileio

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    target = tmp_path / "metrics.json"
    with pytest.raises(OSError) as e:
        fileio.atomic_write(str(target), "{}")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert cli._one_line(e.value) == "fastmtl: %s: No space left on device" % target
    assert not target.exists() and not list(tmp_path.iterdir())  # no temporary left


def test_nan_weight_of_an_unused_class_leaves_gradients_finite():
    # item 7: torch's cross_entropy reads the weights of the target classes only; so do the fused heads (without
    # label smoothing: with it every class's weight is part of the loss, in torch too)
    import torch

    from fastmtl.functional import multitask_cross_entropy

    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 1, 2], [1, 0, 2]])
    cw = torch.tensor([1.0, 2.0, 0.5, float("nan"), 1.0], dtype=torch.float64)
    total, _ = multitask_cross_entropy(h, [w], [y], ["token"], class_weights=[cw])
    gh, gw = torch.autograd.grad(total, (h, w))
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h2 @ w2.t()).reshape(-1, 5), y.reshape(-1), weight=cw)
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
