"""Where a file is expected, only a regular file is read, and a bounded one for --config: a link to /dev/zero, a
named pipe or a folder is one clear error, never a hang or an unbounded read."""
import os
import random

import pytest

from fastmtl import cli
from fastmtl.checkpoint import CheckpointError, load_checkpoint_tree
from fastmtl.fileio import open_regular
from fastmtl.training.config import MAX_CONFIG_BYTES, read_toml

from train_data import TINY_ARGS, data_args, one_line_error, write_splits

ZERO = "/dev/zero"
needs_dev_zero = pytest.mark.skipif(not os.path.exists(ZERO), reason="no /dev/zero")


def _specials(tmp_path):
    """(name, path) of a link to /dev/zero, a named pipe and a folder."""
    out = []
    if os.path.exists(ZERO):
        link = tmp_path / "zero"
        os.symlink(ZERO, link)
        out.append(("link to /dev/zero", str(link), "a character device"))
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        out.append(("named pipe", str(fifo), "a named pipe"))
    d = tmp_path / "folder"
    d.mkdir()
    out.append(("folder", str(d), "a folder"))
    return out


def test_open_regular_refuses_every_special_file(tmp_path):
    for _, path, kind in _specials(tmp_path):
        with pytest.raises(ValueError, match="fastmtl: thing %s is %s, not a regular file" % (path, kind)):
            open_regular(path, "thing")
    p = tmp_path / "ok.txt"
    p.write_bytes(b"abc\n")
    with open_regular(str(p), "thing") as f:
        assert f.read() == b"abc\n"
    with open_regular(str(p), "thing", "r", encoding="utf-8") as f:
        assert f.read() == "abc\n"
    with pytest.raises(ValueError, match="is 4 bytes, more than the 3"):
        open_regular(str(p), "thing", max_bytes=3)
    with pytest.raises(FileNotFoundError):
        open_regular(str(tmp_path / "missing"), "thing")


def test_checkpoint_config_and_data_refuse_special_files(tmp_path):
    for _, path, _kind in _specials(tmp_path):
        with pytest.raises(CheckpointError, match="checkpoint %s is" % path):
            load_checkpoint_tree(path)
        with pytest.raises(ValueError, match="--config %s is" % path):
            read_toml(path)


def test_config_is_bounded(tmp_path):
    p = tmp_path / "big.toml"
    with open(p, "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ValueError, match="more than the %d" % MAX_CONFIG_BYTES):
        read_toml(str(p))


@pytest.fixture
def files(tmp_path, _fresh_seed):
    return write_splits(tmp_path, random.Random(_fresh_seed), (("train", 16), ("dev", 8), ("test", 8)))


@needs_dev_zero
def test_cli_data_file_linked_to_dev_zero(files, tmp_path, capsys):
    link = tmp_path / "train_zero.jsonl"
    os.symlink(ZERO, link)
    args = ["train", "--format", "jsonl", "--train", str(link), "--task", "tags:token:tags"] + TINY_ARGS
    assert cli.main(args) == 2
    one_line_error(capsys, "not a regular file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_cli_predict_input_fifo_does_not_hang(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    assert cli.main(["predict", str(out / "best.pt"), "--input", str(fifo)]) == 2
    one_line_error(capsys, "is a named pipe, not a regular file")
    zero = tmp_path / "ck_zero"
    if os.path.exists(ZERO):
        os.symlink(ZERO, zero)
        assert cli.main(["evaluate", str(zero), files["test"]]) == 2
        one_line_error(capsys, "checkpoint %s is a character device" % zero)
