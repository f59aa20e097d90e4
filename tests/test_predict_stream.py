"""fastmtl predict streams: records come out while the input is still being read, block by block, with the line
rules of every reader (fastmtl.data.iter_line_blocks)."""
import io
import json
import os
import random
import select
import subprocess
import sys

import pytest

from fastmtl import cli
from fastmtl import data as D
from fastmtl import train as T
from fastmtl.data import DataFormatError
from fastmtl.predictor import load
from train_data import TASKS, TINY, write_splits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    files = write_splits(d, random.Random(random.SystemRandom().randrange(2**31)))
    T.train(T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=None, tasks=TASKS, epochs=1,
                          output_dir=str(d / "run"), **TINY))
    return str(d / "run" / "best.pt")


def _blocks(data, max_lines=3, read_size=4):
    return list(D.iter_line_blocks(io.BytesIO(data), "in.txt", max_lines, read_size))


def test_blocks_keep_the_line_rules():
    data = b"\xef\xbb\xbfa b\r\nc\n\nd \xe2\x80\xa8 e\nf\xef\xbb\xbf\ng"  # BOM, CRLF, empty line, U+2028, no final \n
    blocks = _blocks(data)
    assert all(1 <= len(b) <= 3 for b in blocks)
    lines = [l for b in blocks for l in b]
    assert lines == D.decode_lines(data, "in.txt") == ["a b", "c", "", "d \u2028 e", "f\ufeff", "g"]
    # a BOM is dropped at the start of the input only, also when a block boundary falls just before a line
    assert [l for b in _blocks(b"x\n\xef\xbb\xbfy\n", 1, 2) for l in b] == ["x", "\ufeffy"]
    assert _blocks(b"") == [] and _blocks(b"\n") == [[""]]


@pytest.mark.parametrize("read_size", [1, 3, 64])
def test_invalid_utf8_names_its_line_across_blocks(read_size):
    data = b"ok\n" * 5 + b"still ok\nbad \xff here\nafter\n"
    got = []
    with pytest.raises(DataFormatError) as e:
        for b in D.iter_line_blocks(io.BytesIO(data), "in.txt", 2, read_size):
            got += b
    assert e.value.line == 7 and "in.txt:7: not valid UTF-8 (byte 0xff at column 5" in str(e.value)
    assert got == ["ok"] * 5 + ["still ok"]  # every line before the bad one, whatever the reads


def test_a_long_line_is_read_in_linear_time():
    data = b"w " * 2_000_000 + b"\nlast\n"  # 4 MB in one line, read 16 bytes at a time would be quadratic if rescanned
    lines = [l for b in D.iter_line_blocks(io.BytesIO(data), "in.txt", 8, 1 << 12) for l in b]
    assert len(lines) == 2 and lines[1] == "last" and len(lines[0]) == 4_000_000


def test_a_pipe_gets_each_answer_before_the_next_line_is_written(checkpoint):
    """A writer that feeds one line and waits for its record (an interactive session, a service) is answered at
    once: the first record comes out before the input ends."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; from fastmtl.cli import main; sys.exit(main())",
                          "predict", checkpoint], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for words in (["w1", "w2"], ["w3"], ["w4", "w5", "w6"]):
            p.stdin.write((" ".join(words) + "\n").encode())
            p.stdin.flush()
            ready, _, _ = select.select([p.stdout], [], [], 120)
            assert ready, "no record for a line the process has read (stderr: %r)" % p.stderr.read1(10000)
            rec = json.loads(p.stdout.readline())
            assert rec["tokens"] == words and set(rec) == {"tokens", "tags", "label"}
        p.stdin.close()
        assert p.stdout.read() == b"" and p.wait(timeout=120) == 0
    finally:
        p.kill()
        p.wait()


def test_input_file_in_blocks_equals_one_call(checkpoint, tmp_path, capsys, monkeypatch):
    rng = random.Random(5)
    lines = [" ".join("w%d" % rng.randrange(25) for _ in range(rng.randint(0, 9))) for _ in range(50)]
    path = tmp_path / "in.txt"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(cli, "PREDICT_BLOCK", 7)
    monkeypatch.setattr(cli, "PREDICT_BATCH", 3)
    for details in ([], ["--details"]):
        assert cli.main(["predict", checkpoint, "--input", str(path)] + details) == 0
        got = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
        pred = load(checkpoint)  # the same predictor, all lines in one call
        want = pred.predict(lines) if details else pred.predict_labels(lines)
        # the same records; probabilities up to rounding (other batches: other GEMM shapes)
        assert _close(got, json.loads(json.dumps(want)))


def _close(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):  # (key order too: distributions are sorted)
        return list(a) == list(b) and all(_close(a[k], b[k]) for k in a)
    return a == b


def test_bad_utf8_after_good_lines_is_one_line_error_and_the_good_records_are_out(checkpoint, tmp_path, capsys,
                                                                                     monkeypatch):
    path = tmp_path / "in.txt"
    path.write_bytes(b"w1 w2\n" * 12000 + b"w\xff\n")  # 72 kB: the bad line is in the second read of 64 kB
    monkeypatch.setattr(cli, "PREDICT_BLOCK", 5000)
    assert cli.main(["predict", checkpoint, "--input", str(path)]) == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 12000  # every line before the bad one was answered, whatever the reads
    assert err.strip().endswith("in.txt:12001: not valid UTF-8 (byte 0xff at column 2: invalid start byte); save the "
                                "file as UTF-8") and len(err.strip().splitlines()) == 1


def test_stdin_without_newlines_stops_with_one_line(checkpoint):
    """/dev/zero on stdin (bytes without end, never a newline): bounded memory, a one-line error."""
    with open("/dev/zero", "rb") as zero:
        p = subprocess.run([sys.executable, "-c", "import sys; from fastmtl.cli import main; sys.exit(main())",
                            "predict", checkpoint], stdin=zero, capture_output=True, timeout=120)
    assert p.returncode == 2 and p.stdout == b""
    assert p.stderr.decode().strip() == ("fastmtl: <stdin>:1: a line of more than 1048576 bytes; one record per line "
                                         "is expected")
