"""Tiny synthetic multi-task data shared by the trainer tests (test_train, test_checkpoint_safety,
test_train_options): sentences of words w0..w19, where w0-w4 are entities (B-E, following ones I-E) and the sentence
label is the parity of the number of entity words."""
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
