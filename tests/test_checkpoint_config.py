"""A checkpoint's configuration is validated and bounded before any model is built: a hand-edited file of a few KB
cannot make evaluate, predict or --resume hang or allocate gigabytes."""
import random
import time
import tracemalloc

import pytest

from fastmtl import checkpoint as C
from fastmtl import cli
from fastmtl import train as T

from train_data import TINY_ARGS, data_args, one_line_error, write_splits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckcfg")
    files = write_splits(tmp, random.Random(random.SystemRandom().randrange(2**31)),
                         (("train", 16), ("dev", 8), ("test", 8)))
    out = tmp / "run"
    assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)]) == 0
    return out, files


def _edited(run, tmp_path, name, **config):
    out, _ = run
    tree = C.load_checkpoint_tree(str(out / name))
    tree["config"].update(config)
    path = tmp_path / name
    C.save_checkpoint(tree, str(path))  # a valid checksum: anyone can compute one
    return str(path)


@pytest.mark.parametrize("edit,words", [
    (dict(num_layers=100000), "num_layers = 100000, more than 64"),
    (dict(hidden_size=8000), "describes a model of"),
    (dict(bidirectional="yes"), "--bidirectional must be true or false, got 'yes'"),
    (dict(dropout=-1), "--dropout must be a finite number"),
    (dict(embedding_dim=0), "--embedding-dim must be an integer >= 1"),
])
def test_model_checkpoint_config_is_checked_before_building(run, tmp_path, capsys, edit, words):
    path = _edited(run, tmp_path, "best.pt", **edit)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(C.CheckpointError, match="best.pt") as e:
        T.load_checkpoint(path)
    took = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert words in str(e.value) and "\n" not in str(e.value)
    assert took < 30 and peak < 200 << 20, (took, peak)  # refused at once, nothing large allocated
    for cmd in (["predict", path, "w1 w2"], ["evaluate", path, run[1]["test"]]):
        assert cli.main(cmd) == 2
        one_line_error(capsys, path, words)


def test_resume_checks_the_saved_configuration(run, tmp_path, capsys):
    out, files = run
    d = tmp_path / "resume"
    d.mkdir()
    tree = C.load_checkpoint_tree(str(out / "last.pt"))
    tree["config"]["num_layers"] = 100000
    C.save_checkpoint(tree, str(d / "last.pt"))
    assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "2", "--output-dir", str(d),
                                                                 "--resume"]) == 2
    one_line_error(capsys, "last.pt", "num_layers = 100000")


def test_an_honest_checkpoint_still_loads(run):
    model = T.load_checkpoint(str(run[0] / "best.pt"))[0]
    assert sum(p.numel() for p in model.parameters()) > 0
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_evaluate_reads_the_checkpoints_test_path_only_when_confirmed(run, tmp_path, capsys, monkeypatch):
    secret = tmp_path / "not_yours.jsonl"
    secret.write_text(open(run[1]["test"]).read())
    path = _edited(run, tmp_path, "best.pt", test=str(secret))
    opened = []
    import fastmtl.data.text as text

    real = text.open_regular
    monkeypatch.setattr(text, "open_regular", lambda p, *a, **k: opened.append(str(p)) or real(p, *a, **k))
    assert cli.main(["evaluate", path]) == 2
    one_line_error(capsys, "the checkpoint names its test file %s" % secret, "--stored-test")
    assert str(secret) not in opened
    assert cli.main(["evaluate", path, "--stored-test"]) == 0
    assert str(secret) in opened


def test_resume_refuses_options_that_contradict_the_run(run, tmp_path, capsys):
    out, files = run
    d = tmp_path / "again"
    d.mkdir()
    (d / "last.pt").write_bytes((out / "last.pt").read_bytes())
    base = ["train"] + data_args(files) + TINY_ARGS + ["--output-dir", str(d), "--resume"]
    assert cli.main(base + ["--epochs", "2", "--hidden-size", "12", "--lr", "0.05"]) == 2
    one_line_error(capsys, "--resume continues the run saved in %s" % (d / "last.pt"),
                   "--hidden-size 12 (the run: 8)", "--lr 0.05 (the run: 0.002)", "another --output-dir")
    other = tmp_path / "other_train.jsonl"
    other.write_text(open(files["train"]).read())
    args = list(base)
    args[args.index(files["train"])] = str(other)
    assert cli.main(args + ["--epochs", "2"]) == 2
    one_line_error(capsys, "--train %s (the run: %s)" % (other, files["train"]))
    assert cli.main(base + ["--epochs", "2", "--task", "tags:token:tags"]) == 2
    one_line_error(capsys, "--task")
    assert cli.main(base + ["--epochs", "2", "--threads", "2"]) == 0  # the session's options may change


@pytest.mark.parametrize("version", [5, "4", None])
def test_a_newer_content_version_is_refused(run, tmp_path, capsys, version):
    """best.pt records the version of what it holds; a version this fastmtl does not know is one clear error."""
    out, _ = run
    tree = C.load_checkpoint_tree(str(out / "best.pt"))
    assert tree["format_version"] == 4
    tree["format_version"] = version
    path = tmp_path / "best.pt"
    C.save_checkpoint(tree, str(path))
    assert cli.main(["predict", str(path), "w1 w2"]) == 2
    one_line_error(capsys, "content version %r; this fastmtl reads versions up to 4" % (version,))


def test_resume_of_a_run_saved_before_the_crf_option(tmp_path, capsys):
    """A last.pt whose configuration has no crf key (version 3) trained ATIS-format slots with cross-entropy:
    --resume rebuilds that model, not today's CRF default."""
    from fastmtl.training.checkpoint_content import config_from

    assert config_from({"epochs": 2}).crf is False
    assert config_from({"epochs": 2, "crf": None}).crf is None
