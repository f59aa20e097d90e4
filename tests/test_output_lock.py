"""One run per --output-dir: a lock that a second run meets with a one-line error, released when the run ends (also
when it fails) and by the kernel when its process dies."""
import os
import random
import subprocess
import sys

import pytest

from fastmtl import cli
from fastmtl.training.output import LOCK_FILE, OutputDirLock

from train_data import TINY_ARGS, data_args, one_line_error, write_splits


@pytest.fixture
def files(tmp_path, _fresh_seed):
    return write_splits(tmp_path, random.Random(_fresh_seed), (("train", 16), ("dev", 8), ("test", 8)))


def test_a_second_run_into_a_locked_folder_stops_with_one_line(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = OutputDirLock(str(out)).acquire()  # another run holds the folder
    try:
        rc = cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)])
        assert rc == 2
        one_line_error(capsys, "--output-dir %s is in use by another fastmtl run (pid %d)" % (out, os.getpid()))
        assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing written, nothing removed
    finally:
        held.release()
    # released: the same command now runs, and leaves the folder free for --resume afterwards
    assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert (out / "last.pt").exists()
    assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "2", "--output-dir", str(out),
                                                                 "--resume"]) == 0


def test_overwrite_does_not_remove_the_files_of_a_running_run(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"of the running run")
    held = OutputDirLock(str(out)).acquire()
    try:
        assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--output-dir", str(out), "--overwrite"]) == 2
        one_line_error(capsys, "is in use by another fastmtl run")
        assert (out / "best.pt").read_bytes() == b"of the running run"
    finally:
        held.release()


def test_the_lock_of_a_dead_process_is_free(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # a process that takes the lock and is killed without releasing it
    code = ("import sys, os, signal; from fastmtl.training.output import OutputDirLock; "
            "OutputDirLock(sys.argv[1]).acquire(); print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and p.stdout.strip().isdigit()
    assert (out / LOCK_FILE).read_text().strip() == p.stdout.strip()  # the stale file is still there
    assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)]) == 0


def test_a_planted_link_as_lock_file_is_refused(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    os.symlink(target, out / LOCK_FILE)
    assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)]) == 2
    one_line_error(capsys, "cannot open its lock file")
    assert target.read_text() == "keep me"


def test_lock_is_released_when_the_run_fails(files, tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert cli.main(["train", "--format", "jsonl", "--train", str(bad), "--task", "tags:token:tags",
                     "--output-dir", str(out)] + TINY_ARGS) == 2
    capsys.readouterr()
    lock = OutputDirLock(str(out)).acquire()  # free again
    lock.release()


def test_resume_removes_the_temporaries_of_a_save_cut_short(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    # what a kill during atomic_write leaves: a mkstemp file next to its destination (and a link of the same shape)
    (out / ".last.pt.k2j4h1x0.tmp").write_bytes(b"half a checkpoint")
    (out / ".best.pt.abcd1234.tmp").write_bytes(b"")
    target = tmp_path / "keep.txt"
    target.write_text("not the run's")
    os.symlink(target, out / ".metrics.json.zz99zz99.tmp")
    (out / ".notes.txt.tmp").write_text("the user's own file")  # not a temporary of a run file: stays
    loud = [a for a in TINY_ARGS if a != "--quiet"]
    assert cli.main(["train"] + data_args(files) + loud + ["--epochs", "2", "--output-dir", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "removed 3 temporary files of an interrupted save" in err
    left = sorted(os.listdir(out))
    assert not [n for n in left if n.endswith(".tmp") and n != ".notes.txt.tmp"], left
    assert (out / ".notes.txt.tmp").exists() and target.read_text() == "not the run's"
