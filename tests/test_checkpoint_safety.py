"""Checkpoints are never unpickled, corrupted ones are refused by name, and every file is written atomically without
following planted symlinks."""
import glob
import json
import os
import pickle
import random
import stat
import tempfile

import pytest
import torch

import fastmtl
from fastmtl import checkpoint as C
from fastmtl import cli
from fastmtl import fileio
from fastmtl import train as T
from fastmtl.nn import SequenceTask, TokenTask

from train_data import TASKS, TINY, TINY_ARGS, one_line_error, write_splits
from train_data import data_args as _data_args
from train_data import synthetic as _synthetic


@pytest.fixture
def files(tmp_path, _fresh_seed):
    return write_splits(tmp_path, random.Random(_fresh_seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 1-epoch run (module-wide): its output folder and data files."""
    tmp = tmp_path_factory.mktemp("trained")
    rng = random.Random(random.SystemRandom().randrange(2**31))
    data = {}
    for split, n in (("train", 40), ("dev", 12), ("test", 12)):
        p = tmp / ("%s.jsonl" % split)
        p.write_text("".join(json.dumps(r) + "\n" for r in _synthetic(n, rng)))
        data[split] = str(p)
    out = str(tmp / "run")
    assert cli.main(["train"] + _data_args(data) + TINY_ARGS + ["--epochs", "1", "--output-dir", out]) == 0
    return out, data


# ----------------------------------------------------------------------------------------------------------------
# pickle payloads

class _Payload:
    """Unpickling this creates the file ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


KINDS = ["torch-zip", "torch-legacy", "pickle-2", "pickle-0"]


def _plant(path, marker, kind):
    obj = {"model": _Payload(marker), "vocab": _Payload(marker), "config": {}, "epoch": 1}
    if kind == "torch-zip":
        torch.save(obj, path)
    elif kind == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            f.write(pickle.dumps(obj, protocol=int(kind[-1])))
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_payload_is_live(tmp_path, kind):
    """The planted files really run their payload when unpickled (so the refusals below are not vacuous)."""
    marker = str(tmp_path / "ran")
    path = _plant(str(tmp_path / "evil.pt"), marker, kind)
    if kind.startswith("torch"):
        try:
            torch.load(path, weights_only=False)
        except Exception:
            pass
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert os.path.exists(marker)


def _refusal_words(kind):
    return ["pickle"] if kind != "pickle-0" else ["not a fastmtl checkpoint"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_entry_point_refuses_a_pickle(files, tmp_path, capsys, kind):
    marker = str(tmp_path / "payload-ran")
    evil = _plant(str(tmp_path / "evil.pt"), marker, kind)
    words = _refusal_words(kind)

    assert cli.main(["evaluate", evil, files["test"]]) != 0
    one_line_error(capsys, evil, *words)
    assert cli.main(["predict", evil, "w1 w2"]) != 0
    one_line_error(capsys, evil, *words)
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1", "--init-encoder", evil]) != 0
    one_line_error(capsys, evil, *words)
    out = tmp_path / "run"
    out.mkdir()
    last = _plant(str(out / "last.pt"), marker, kind)
    with open(last, "rb") as f:
        planted = f.read()
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(out),
                                                                "--resume"]) != 0
    one_line_error(capsys, last, *words)

    model = fastmtl.MultiTaskLSTM(30, 8, 8, [TokenTask("tags", 3), SequenceTask("label", 2)])
    with pytest.raises(C.CheckpointError, match="evil.pt"):
        model.load_encoder(evil)
    with pytest.raises(C.CheckpointError, match="evil.pt"):
        T.load_checkpoint(evil)
    with pytest.raises(C.CheckpointError, match="evil.pt"):
        T.predict_sentences(evil, ["w1"])
    assert not os.path.exists(marker)
    with open(last, "rb") as f:  # refused, not replaced or "repaired"
        assert f.read() == planted


def test_loading_never_unpickles(trained, tmp_path, monkeypatch, capsys):
    """Evaluate, predict, --init-encoder, load_encoder and --resume of real checkpoints with every unpickling
    route disabled."""
    out, data = trained

    def no(*a, **k):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", no)
    monkeypatch.setattr(pickle, "load", no)
    monkeypatch.setattr(pickle, "loads", no)
    monkeypatch.setattr(pickle, "Unpickler", no)
    best = os.path.join(out, "best.pt")
    assert cli.main(["evaluate", best, data["test"]]) == 0
    assert cli.main(["predict", best, "w1 w2"]) == 0
    capsys.readouterr()
    T.train(T.TrainConfig(format="jsonl", train=data["train"], tasks=["label:sequence:label"], epochs=1,
                          init_encoder=best, **TINY))
    model, vocab, *_ = T.load_checkpoint(best)
    m = fastmtl.MultiTaskLSTM(len(vocab), 8, 8, [TokenTask("x", 3)], char_words=vocab.itos, char_dim=4,
                              char_filters=6)
    m.load_encoder(best)
    run = str(tmp_path / "resume")
    cfg = T.TrainConfig(format="jsonl", train=data["train"], tasks=TASKS, epochs=1, output_dir=run, **TINY)
    T.train(cfg)
    r = T.train(cfg, epochs=2, resume=True)
    assert [h["epoch"] for h in r["history"]] == [1, 2]


# ----------------------------------------------------------------------------------------------------------------
# corrupted checkpoints

def _corruptions(raw, rng):
    n = int.from_bytes(raw[:8], "little")
    cuts = {0, 5, 8, 8 + n // 2, 8 + n, len(raw) - 1, rng.randrange(1, len(raw))}
    for c in sorted(cuts):
        yield "truncated to %d bytes" % c, raw[:c]
    flips = {0, 3, 8, 9, 8 + n // 3, 8 + n - 1, 8 + n, len(raw) - 1, rng.randrange(len(raw)), rng.randrange(len(raw))}
    sum_at = raw.find(b'"fastmtl_sha256":"') + len(b'"fastmtl_sha256":"')
    flips |= {sum_at, sum_at + 63}
    for p in sorted(flips):
        b = bytearray(raw)
        b[p] ^= 1 << rng.randrange(8)
        yield "bit flipped at byte %d" % p, bytes(b)
    yield "appended byte", raw + b"\0"


def test_corrupted_checkpoints_refused_by_name(trained, tmp_path, capsys, _fresh_seed):
    out, data = trained
    rng = random.Random(_fresh_seed)
    with open(os.path.join(out, "best.pt"), "rb") as f:
        raw = f.read()
    C.load_checkpoint_tree(os.path.join(out, "best.pt"))  # the intact file loads
    for i, (what, bad) in enumerate(_corruptions(raw, rng)):
        path = str(tmp_path / ("bad%d.pt" % i))
        with open(path, "wb") as f:
            f.write(bad)
        assert cli.main(["evaluate", path, data["test"]]) != 0, what
        one_line_error(capsys, path)
        assert cli.main(["predict", path, "w1"]) != 0, what
        one_line_error(capsys, path)
        with pytest.raises(C.CheckpointError, match="bad%d.pt" % i):
            T.load_checkpoint(path)
        with pytest.raises(C.CheckpointError, match="bad%d.pt" % i):
            fastmtl.MultiTaskLSTM(30, 8, 8, [TokenTask("x", 3)]).load_encoder(path)


def test_corrupted_last_and_init_encoder_refused(trained, files, tmp_path, capsys):
    out, _ = trained
    with open(os.path.join(out, "last.pt"), "rb") as f:
        raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0x10
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(bytes(raw))
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1", "--output-dir", str(run),
                                                                "--resume"]) != 0
    one_line_error(capsys, str(run / "last.pt"), "checksum")
    short = tmp_path / "short.pt"
    with open(os.path.join(out, "best.pt"), "rb") as f:
        short.write_bytes(f.read()[:-100])
    assert cli.main(["train"] + _data_args(files) + TINY_ARGS + ["--epochs", "1", "--init-encoder",
                                                                str(short)]) != 0
    one_line_error(capsys, str(short))


def test_wrong_kind_and_missing_files(trained, tmp_path, capsys):
    out, data = trained
    last = os.path.join(out, "last.pt")
    assert cli.main(["evaluate", last, data["test"]]) != 0
    one_line_error(capsys, last, "--resume")
    missing = str(tmp_path / "nope.pt")
    assert cli.main(["predict", missing, "w1"]) != 0
    one_line_error(capsys, missing)
    assert cli.main(["evaluate", str(tmp_path), data["test"]]) != 0  # a folder
    one_line_error(capsys, str(tmp_path))
    plain = str(tmp_path / "plain.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.randn(3)}, plain)  # valid safetensors, not a fastmtl checkpoint
    assert cli.main(["evaluate", plain, data["test"]]) != 0
    one_line_error(capsys, plain, "not a fastmtl checkpoint")


def test_well_checksummed_but_malformed_body(tmp_path, capsys):
    """A file that passes the checksum (anyone can compute one) but holds wrong fields: still a one-line error."""
    path = str(tmp_path / "odd.pt")
    C.save_checkpoint({"model": {"x": torch.ones(2)}, "vocab": {"itos": 3}, "label_vocabs": {}, "tasks": [[1]],
                       "config": {"hidden_size": "big"}}, path)
    with pytest.raises(C.CheckpointError, match="odd.pt"):
        T.load_checkpoint(path)
    assert cli.main(["predict", path, "w1"]) != 0
    one_line_error(capsys, path)


# ----------------------------------------------------------------------------------------------------------------
# the format and the round trip

def test_format_is_safetensors_with_json_header(trained):
    out, _ = trained
    from safetensors import safe_open

    best = os.path.join(out, "best.pt")
    with open(best, "rb") as f:
        head = f.read(16)
    assert not head.startswith(b"PK") and head[:1] != b"\x80"
    with safe_open(best, framework="pt") as f:  # any safetensors reader opens it
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == C.FORMAT and len(meta["fastmtl_sha256"]) == 64
    doc = json.loads(meta["fastmtl"])
    assert doc["config"]["hidden_size"] == 8 and doc["tasks"] == [t.split(":") + ["data"] for t in TASKS]
    assert doc["vocab"]["itos"][:2] and all(k.startswith("model/") for k in keys)
    ck = C.load_checkpoint_tree(os.path.join(out, "last.pt"))
    rng = ck["rng"]
    assert rng["torch"].dtype == torch.uint8 and len(rng["python"]["state"]) == 625
    assert len(rng["numpy"]["key"]) == 624
    assert isinstance(ck["optimizer"]["state"], dict) and all(isinstance(k, int) for k in ck["optimizer"]["state"])


def test_tree_round_trip_exact(tmp_path):
    t = torch.randn(4, 6)
    tree = {"a": {0: t[:, 1], 7: torch.arange(5, dtype=torch.int64), (1, 2): None}, "b": [1, 2.5, float("nan"),
            float("-inf"), True, None, ("x", 3)], "$odd": "é\udc80", "bf": torch.randn(3).to(torch.bfloat16),
            "shared": t, "view": t[1:3], "empty": torch.zeros(0, 3), "scalar": torch.tensor(7.5)}
    path = str(tmp_path / "t.pt")
    C.save_checkpoint(tree, path)
    back = C.load_checkpoint_tree(path)
    assert set(back) == set(tree) and set(back["a"]) == {0, 7, (1, 2)}
    assert torch.equal(back["a"][0], t[:, 1]) and torch.equal(back["shared"], t) and torch.equal(back["view"], t[1:3])
    assert back["bf"].dtype == torch.bfloat16 and torch.equal(back["bf"], tree["bf"])
    assert back["scalar"].shape == () and back["empty"].shape == (0, 3)
    b = back["b"]
    assert b[:2] == [1, 2.5] and b[2] != b[2] and b[3] == float("-inf") and b[4:6] == [True, None]
    assert b[6] == ("x", 3) and back["$odd"] == "é\udc80"
    with pytest.raises(TypeError, match="cannot checkpoint"):
        C.save_checkpoint({"f": object()}, str(tmp_path / "u.pt"))
    assert not os.path.exists(tmp_path / "u.pt")


def test_header_length_that_starts_like_a_pickle(tmp_path):
    """A checkpoint whose header is 640 = 0x0280 bytes long starts with 0x80 0x02, as a protocol-2 pickle does: it
    still loads (the format is recognised first)."""
    path = str(tmp_path / "h.pt")

    def header_len(pad):
        C.save_checkpoint({"pad": "x" * pad, "w": torch.ones(2)}, path)
        with open(path, "rb") as f:
            return int.from_bytes(f.read(8), "little")

    n0 = header_len(0)
    assert n0 < 600
    for pad in range(640 - n0 - 16, 640 - n0 + 16):
        if header_len(pad) == 640:
            break
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x02"
    back = C.load_checkpoint_tree(path)
    assert torch.equal(back["w"], torch.ones(2)) and back["pad"] == "x" * pad


def test_rng_states_round_trip(tmp_path):
    import numpy as np

    random.seed(random.SystemRandom().randrange(2**31))
    np.random.seed(random.randrange(2**31))
    random.gauss(0, 1)  # a cached Gaussian in both
    np.random.standard_normal()
    dev = torch.device("cpu")
    path = str(tmp_path / "rng.pt")
    C.save_checkpoint({"rng": T._rng_state(dev)}, path)
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    T._set_rng_state(C.load_checkpoint_tree(path)["rng"], dev)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert want[:3] == got[:3] and torch.equal(want[3], got[3])


def test_save_load_round_trip_same_predictions(files, tmp_path, capsys):
    """Train (1 epoch), evaluate and predict from best.pt: the same as the model in memory; resume to 2 epochs:
    the same as an uninterrupted 2-epoch run."""
    out = str(tmp_path / "a")
    cfg = T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=files["test"], tasks=TASKS,
                        schedule="constant", patience=10, **TINY)
    r1 = T.train(cfg, epochs=1, output_dir=out)
    model, vocab, lvs, specs, _ = T.load_checkpoint(os.path.join(out, "best.pt"))
    sd, sd1 = model.state_dict(), r1["model"].state_dict()
    assert set(sd) == set(sd1) and all(torch.equal(sd[k], sd1[k]) for k in sd)
    exs = [json.loads(l) for l in open(files["test"])]
    mem = T.predict_examples(r1["model"], vocab, lvs, specs, exs, torch.device("cpu"))
    disk = T.predict_sentences(os.path.join(out, "best.pt"), [e["tokens"] for e in exs])
    assert [{k: v for k, v in d.items() if k != "tokens"} for d in disk] == mem
    assert cli.main(["evaluate", os.path.join(out, "best.pt"), files["test"]]) == 0
    assert json.loads(capsys.readouterr().out) == r1["test"]

    r2 = T.train(cfg, epochs=2, output_dir=out, resume=True)
    ref = T.train(cfg, epochs=2, output_dir=str(tmp_path / "b"))
    p2, pref = r2["model"].state_dict(), ref["model"].state_dict()
    assert all(torch.equal(p2[k], pref[k]) for k in pref)
    assert [h["train_loss"] for h in r2["history"]] == [h["train_loss"] for h in ref["history"]]
    assert r2["test"] == ref["test"]
    assert cli.main(["predict", os.path.join(out, "best.pt"), "w1 w2 w3", "w9"]) == 0
    a = capsys.readouterr().out
    assert cli.main(["predict", str(tmp_path / "b" / "best.pt"), "w1 w2 w3", "w9"]) == 0
    assert capsys.readouterr().out == a


# ----------------------------------------------------------------------------------------------------------------
# atomic_write

def _victim(tmp_path):
    v = tmp_path / "victim.txt"
    v.write_text("precious")
    return v


def test_atomic_write_ignores_symlink_at_old_temp_name(tmp_path):
    victim = _victim(tmp_path)
    dest = tmp_path / "metrics.json"
    os.symlink(victim, "%s.tmp%d" % (dest, os.getpid()))  # the name the old code opened
    fileio.atomic_write(str(dest), "new")
    assert victim.read_text() == "precious" and dest.read_text() == "new" and not dest.is_symlink()


@pytest.mark.skipif(not hasattr(tempfile, "_get_candidate_names"), reason="needs tempfile's name generator")
def test_atomic_write_never_opens_an_existing_temp_name(tmp_path, monkeypatch):
    """Even a symlink planted at the very name the temporary file draws is not followed (O_EXCL): another name is
    drawn."""
    victim = _victim(tmp_path)
    dest = tmp_path / "best.pt"
    names = iter(["planted", "fresh"])

    class Names:
        def __iter__(self):
            return self

        def __next__(self):
            return next(names)

    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: Names())
    os.symlink(victim, tmp_path / ".best.pt.planted.tmp")
    fileio.atomic_write(str(dest), b"data")
    assert victim.read_text() == "precious" and dest.read_bytes() == b"data"
    assert os.path.islink(tmp_path / ".best.pt.planted.tmp")  # left alone, not written through


def test_atomic_write_replaces_a_symlinked_destination(tmp_path):
    victim = _victim(tmp_path)
    dest = tmp_path / "log.jsonl"
    os.symlink(victim, dest)
    fileio.atomic_write(str(dest), "line\n")
    assert victim.read_text() == "precious"
    assert not dest.is_symlink() and dest.read_text() == "line\n"


@pytest.mark.parametrize("where", ["write", "fsync", "replace", "interrupt"])
def test_atomic_write_failure_keeps_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    dest = tmp_path / "metrics.json"
    dest.write_text("old")

    def boom(*a, **k):
        if where == "interrupt":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device")

    if where == "fsync" or where == "interrupt":
        monkeypatch.setattr(fileio.os, "fsync", boom)
    elif where == "replace":
        monkeypatch.setattr(fileio.os, "replace", boom)

    data = "x" * 100
    if where == "write":
        real_fdopen = os.fdopen

        def fdopen(fd, *a, **k):
            f = real_fdopen(fd, *a, **k)

            class F:
                def __enter__(self):
                    return self

                def __exit__(self, *e):
                    f.close()

                def fileno(self):
                    return f.fileno()

                def write(self, b):
                    f.write(b[:10])
                    boom()

                def flush(self):
                    f.flush()

            return F()

        monkeypatch.setattr(fileio.os, "fdopen", fdopen)
    with pytest.raises(KeyboardInterrupt if where == "interrupt" else OSError):
        fileio.atomic_write(str(dest), data)
    assert dest.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_atomic_write_permissions_follow_umask(tmp_path):
    old = os.umask(0o027)
    try:
        fileio.atomic_write(str(tmp_path / "f"), "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o640


def test_trainer_and_bench_never_write_through_symlinks(files, tmp_path):
    """A shared output folder with planted symlinks at every name the trainer writes: the targets survive."""
    from fastmtl.bench.common import atomic_write_json

    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("best.pt", "last.pt", "log.jsonl", "metrics.json", "learning_curve.png"):
        v = tmp_path / ("victim-" + name)
        v.write_text("precious " + name)
        os.symlink(v, out / name)
        os.symlink(v, out / ("%s.tmp%d" % (name, os.getpid())))
        victims[name] = v
    T.train(T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=files["test"], tasks=TASKS,
                          epochs=1, output_dir=str(out), overwrite=True, **TINY))  # a non-empty folder
    for name, v in victims.items():
        assert v.read_text() == "precious " + name
    for name in ("best.pt", "last.pt", "log.jsonl", "metrics.json"):
        assert not (out / name).is_symlink()
    C.load_checkpoint_tree(str(out / "best.pt"))
    bench = tmp_path / "bench.json"
    v = tmp_path / "victim-bench"
    v.write_text("precious")
    os.symlink(v, bench)
    atomic_write_json(str(bench), {"a": 1})
    assert v.read_text() == "precious" and json.loads(bench.read_text()) == {"a": 1}
    assert not glob.glob(str(tmp_path / ".*.tmp"))


def test_predict_file_one_record_per_line(trained, tmp_path, capsys):
    # a line holding U+2028 / U+0085 / a form feed is still one sentence (str.splitlines would make two)
    out, _ = trained
    f = tmp_path / "sentences.txt"
    f.write_text("w1 w2\u2028w3\nw4\x0cw5 w6\r\nw7\u0085w8\n", encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["predict", os.path.join(out, "best.pt"), "--input", str(f)]) == 0
    records = [line for line in capsys.readouterr().out.split("\n") if line.strip()]
    assert len(records) == 3, records
