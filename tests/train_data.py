"""Tiny synthetic multi-task data and helpers shared by the trainer tests (test_train, test_checkpoint_safety,
test_train_options, test_multi_dataset, test_weighting_train): sentences of words w0..w19, where w0-w4 are entities
(B-E, following ones I-E) and the sentence label is the parity of the number of entity words."""
import json

# A tiny default model (with the character CNN the default `fastmtl train` uses), as TrainConfig fields and as CLI
# options, and the two tasks of the data.
TINY = dict(embedding_dim=8, hidden_size=8, batch_size=8, warmup_steps=0, progress=False, quiet=True, threads=1,
            char_dim=4, char_filters=6)
TINY_ARGS = ["--embedding-dim", "8", "--hidden-size", "8", "--batch-size", "8", "--no-progress", "--quiet",
             "--threads", "1", "--char-dim", "4", "--char-filters", "6"]
TASKS = ["tags:token:tags", "label:sequence:label"]


def synthetic(n, rng):
    """``n`` JSONL records drawn with ``rng`` (a random.Random)."""
    rows = []
    for _ in range(n):
        toks = ["w%d" % rng.randrange(20) for _ in range(rng.randint(2, 9))]
        tags, prev = [], False
        for t in toks:
            ent = int(t[1:]) < 5
            tags.append(("I-E" if prev else "B-E") if ent else "O")
            prev = ent
        rows.append({"tokens": toks, "tags": tags, "label": "odd" if sum(t != "O" for t in tags) % 2 else "even"})
    return rows


def write_splits(directory, rng, sizes=(("train", 40), ("dev", 12), ("test", 12))):
    """Writes ``<split>.jsonl`` for each (split, n) into ``directory`` (a pathlib.Path); returns {split: path}."""
    out = {}
    for split, n in sizes:
        p = directory / ("%s.jsonl" % split)
        p.write_text("".join(json.dumps(r) + "\n" for r in synthetic(n, rng)))
        out[split] = str(p)
    return out


def data_args(files, test=True):
    """The CLI options that train on ``files`` (from :func:`write_splits`) with both tasks (and test on its test
    split when ``test``)."""
    args = ["--format", "jsonl", "--train", files["train"], "--dev", files["dev"], "--task", TASKS[0], "--task",
            TASKS[1]]
    return args + (["--test", files["test"]] if test else [])


def one_line_error(capsys, *must_contain):
    """The one stderr line a CLI error printed (no traceback), checked to contain every string in ``must_contain``."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for s in must_contain:
        assert s in lines[0], (s, lines[0])
    return lines[0]


# A tiny model without the character CNN, as the top of a TOML run file.
SMALL_TOML = """
embedding_dim = 8
hidden_size = 8
batch_size = 8
char_dim = 0
warmup_steps = 0
threads = 1
progress = false
quiet = true
"""


def write_two_corpora(directory, sizes=(("train", 48), ("dev", 16), ("test", 16)), extra=""):
    """Two corpora in ``directory`` (a pathlib.Path): ``a_<split>.jsonl`` with BIO tags (the token task ``tags``)
    and ``b_<split>.jsonl``, half as many, with a sentence label (``label``); and ``run.toml`` training both in one
    model (:data:`SMALL_TOML`, then ``extra``). Returns the run file's path."""
    import random

    rng = random.Random(3)
    for split, n in sizes:
        for d, rows in (("a", [{"tokens": r["tokens"], "tags": r["tags"]} for r in synthetic(n, rng)]),
                        ("b", [{"tokens": r["tokens"], "label": r["label"]} for r in synthetic(n // 2, rng)])):
            (directory / ("%s_%s.jsonl" % (d, split))).write_text("".join(json.dumps(r) + "\n" for r in rows))
    toml = SMALL_TOML + extra
    for d in "ab":
        toml += ('\n[[datasets]]\nname = "%s"\ntrain = "%s_train.jsonl"\ndev = "%s_dev.jsonl"\n'
                 'test = "%s_test.jsonl"\n' % (d, d, d, d))
    toml += ('\n[[tasks]]\nname = "tags"\nlevel = "token"\ndataset = "a"\n'
             '\n[[tasks]]\nname = "label"\nlevel = "sequence"\ndataset = "b"\nsource = "label"\n')
    path = directory / "run.toml"
    path.write_text(toml)
    return path


def params(result):
    """A copy of the trained model's state dict from a ``train`` result."""
    return {k: v.detach().clone() for k, v in result["model"].state_dict().items()}


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, port, cfg, path):
    import os

    import torch

    from fastmtl import train as T

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    r = T.train(cfg)
    if rank == 0:
        torch.save(params(r), path)


def assert_ddp_matches_one_process(cfg, tmp_path):
    """Trains ``cfg`` in one process and in two gloo processes (each with half of every global batch) and checks
    that both end with the same parameters, and that these moved from the initial ones (the check is not vacuous)."""
    import torch
    import torch.multiprocessing as mp

    from fastmtl import train as T

    single = params(T.train(cfg))
    path = str(tmp_path / "ddp.pt")
    mp.start_processes(ddp_worker, args=(2, free_port(), cfg, path), nprocs=2, join=True, start_method="spawn")
    ddp = torch.load(path)
    assert set(ddp) == set(single)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    init = T.train(cfg, epochs=0)
    assert any(not torch.allclose(init["model"].state_dict()[k], single[k]) for k in single)
