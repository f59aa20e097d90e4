"""Several datasets in one model: TOML run files, the epoch planner's sampling strategies, per-dataset batches,
selection, resume; and the CLI generated from TrainConfig."""
import dataclasses
import json
import os
from collections import Counter

import pytest

from fastmtl import cli
from fastmtl import train as T
from fastmtl.training import EpochPlanner, read_toml
from fastmtl.training.config import TrainConfig, option_name

from train_data import SMALL_TOML, write_two_corpora

SMALL = SMALL_TOML


@pytest.fixture
def two(tmp_path):
    """Two corpora in tmp_path: ``a`` with BIO tags (token task), ``b`` with a sentence label, and run.toml."""
    write_two_corpora(tmp_path, extra="epochs = 2\n\n[sampling]\nstrategy = \"temperature\"\ntemperature = 2.0\n")
    return tmp_path


def test_toml_run_trains_one_model_on_two_datasets(two, tmp_path, monkeypatch):
    monkeypatch.chdir("/")  # relative file names are relative to the run file, not the current folder
    out = str(tmp_path / "out")
    assert cli.main(["train", "--config", str(two / "run.toml"), "--output-dir", out]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert set(m) == {"tags", "label"} and "f1" in m["tags"] and "accuracy" in m["label"]
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 2 and set(log[0]["train_losses"]) == {"tags", "label"}
    model, vocab, lvs, specs, cfg = T.load_checkpoint(os.path.join(out, "best.pt"))
    assert [(s.name, s.dataset) for s in specs] == [("tags", "a"), ("label", "b")]
    assert cfg.sampling == "temperature" and len(cfg.datasets) == 2
    # the model predicts every task for any sentence
    p = T.predict_sentences(os.path.join(out, "best.pt"), ["w1 w2 w3"])[0]
    assert len(p["tags"]) == 3 and p["label"] in ("odd", "even")


def test_command_line_overrides_the_file(two, tmp_path):
    res = T.train(TrainConfig(**{**read_toml(two / "run.toml"), "epochs": 1, "sampling": "round_robin"}))
    assert len(res["history"]) == 1
    out = str(tmp_path / "o")
    assert cli.main(["train", "--config", str(two / "run.toml"), "--epochs", "1", "--sampling", "uniform",
                     "--output-dir", out]) == 0
    _, _, _, _, cfg = T.load_checkpoint(os.path.join(out, "best.pt"))
    assert cfg.epochs == 1 and cfg.sampling == "uniform" and cfg.hidden_size == 8


def test_batches_come_from_one_dataset_and_other_tasks_contribute_nothing(two, monkeypatch):
    from fastmtl.model import MultiTaskLSTM

    seen = []
    real = MultiTaskLSTM.forward

    def spy(self, ids, lengths, targets, weights=None, chars=None):
        out = real(self, ids, lengths, targets, weights, chars)
        seen.append((set(targets), set(out.losses)))
        return out

    monkeypatch.setattr(MultiTaskLSTM, "forward", spy)
    T.train(TrainConfig(**{**read_toml(two / "run.toml"), "epochs": 1, "sampling": "proportional"}))
    assert seen and all(t in ({"tags"}, {"label"}) and l == t for t, l in seen)
    counts = Counter(frozenset(t) for t, _ in seen)
    assert counts[frozenset({"tags"})] == 6 and counts[frozenset({"label"})] == 3  # 48/8 and 24/8 batches


def test_one_dataset_as_a_table_is_the_single_file_run(two):
    """[[datasets]] with one entry trains exactly like --train/--dev/--test (the same batches and results)."""
    common = dict(tasks=["tags:token:tags"], epochs=2, embedding_dim=8, hidden_size=8, batch_size=8, char_dim=0,
                  warmup_steps=0, threads=1, progress=False, quiet=True)
    files = {s: str(two / ("a_%s.jsonl" % s)) for s in ("train", "dev", "test")}
    r1 = T.train(TrainConfig(**files, **common))
    r2 = T.train(TrainConfig(datasets=[{"name": "data", **files}], **common))
    assert r1["test"] == r2["test"] and [h["train_loss"] for h in r1["history"]] == \
        [h["train_loss"] for h in r2["history"]]


@pytest.mark.parametrize("strategy", ["proportional", "uniform", "temperature", "round_robin"])
def test_planner_strategies(strategy):
    sizes = [400, 100, 20]
    lengths = [[5] * n for n in sizes]
    p = EpochPlanner(sizes, 10, strategy, 2.0, seed=7, lengths=lengths)
    plan = p.plan(0)
    assert plan == p.plan(0) and plan != p.plan(1)  # a pure function of (seed, epoch)
    assert len(plan) == p.steps() == 40 + 10 + 2
    for d, idx in plan:
        assert all(0 <= i < sizes[d] for i in idx) and len(idx) == 10
    share = Counter(d for d, _ in plan)
    if strategy == "proportional":  # every batch of every dataset exactly once
        assert share == {0: 40, 1: 10, 2: 2}
        for d in range(3):
            assert sorted(i for dd, idx in plan if dd == d for i in idx) == list(range(sizes[d]))
    elif strategy == "round_robin":
        assert [d for d, _ in plan[:6]] == [0, 1, 2, 0, 1, 2]
    if strategy in ("uniform", "temperature"):
        total = Counter(d for e in range(30) for d, _ in p.plan(e))
        n = sum(total.values())
        expect = p.probabilities()
        for d in range(3):
            assert abs(total[d] / n - expect[d]) < 0.03, (total, expect)
    if strategy == "temperature":
        w = [s ** 0.5 for s in sizes]
        assert p.probabilities() == pytest.approx([x / sum(w) for x in w])


def test_selection_on_one_task(two):
    res = T.train(TrainConfig(**{**read_toml(two / "run.toml"), "epochs": 2, "select": "label"}))
    for h in res["history"]:
        assert h["dev_score"] == h["dev"]["label"]["accuracy"]
    with pytest.raises(ValueError, match="--select: 'nope'"):
        T.train(TrainConfig(**{**read_toml(two / "run.toml"), "select": "nope"}))


def test_resume_after_interrupt_is_the_uninterrupted_run(two, tmp_path, monkeypatch):
    full = T.train(TrainConfig(**{**read_toml(two / "run.toml"), "epochs": 3}))
    out = str(tmp_path / "r")
    from fastmtl.training import trainer

    real = trainer.Trainer.run_epoch
    calls = {"n": 0}

    def interrupted(self, epoch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(trainer.Trainer, "run_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train(TrainConfig(**{**read_toml(two / "run.toml"), "epochs": 3, "output_dir": out}))
    monkeypatch.setattr(trainer.Trainer, "run_epoch", real)
    res = T.train(TrainConfig(**{**read_toml(two / "run.toml"), "epochs": 3, "output_dir": out, "resume": True}))
    assert res["test"] == full["test"]


@pytest.mark.parametrize("body,message", [
    ("epochz = 3\n", "unknown key 'epochz'"),
    ("[sampling]\nstrategi = 'uniform'\n", "has no key 'strategi'"),
    ("resume = true\n", "resume is a command-line choice"),
    ("epochs = 'ten'\n", "--epochs must be an integer"),
    ("[[datasets]]\nname = 'x'\n", "needs train"),
    ("[[datasets]]\nname = 'x'\ntrain = 'a_train.jsonl'\ncolour = 1\n", "unknown key colour"),
    ("[[datasets]]\nname = 'x'\ntrain = 'a_train.jsonl'\n[[datasets]]\nname = 'x'\ntrain = 'b_train.jsonl'\n",
     "duplicate dataset name"),
    ("[[datasets]]\nname = 'x'\ntrain = 'a_train.jsonl'\n[[tasks]]\nname = 't'\nlevel = 'token'\ndataset = 'y'\n"
     "source = 'tags'\n", "reads dataset 'y'"),
    ("[[datasets]]\nname = 'x'\ntrain = 'a_train.jsonl'\n[[datasets]]\nname = 'y'\ntrain = 'b_train.jsonl'\n"
     "[[tasks]]\nname = 't'\nlevel = 'token'\nsource = 'tags'\n", "name its dataset"),
    ("[[datasets]]\nname = 'x'\ntrain = 'a_train.jsonl'\n[[datasets]]\nname = 'y'\ntrain = 'b_train.jsonl'\n"
     "[[tasks]]\nname = 't'\nlevel = 'token'\nsource = 'tags'\ndataset = 'x'\n", "dataset 'y' has no task"),
    ("epochs = [\n", "--config"),
])
def test_bad_run_files_are_one_line_errors(two, capsys, body, message):
    bad = two / "bad.toml"
    bad.write_text(SMALL + body)
    assert cli.main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_data_given_twice_is_refused(two):
    cfg = TrainConfig(**{**read_toml(two / "run.toml"), "train": str(two / "a_train.jsonl")})
    with pytest.raises(ValueError, match="either as \\[\\[datasets\\]\\] or with --train"):
        cfg.validate()


def test_cli_is_generated_from_the_config():
    """One declaration per option: every TrainConfig field (but the [[datasets]] tables) is an option of
    `fastmtl train` with its help and default, and nothing else is."""
    p = cli.build_parser()
    train = p._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions} - {"help", "config"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert dests == fields - {"datasets"}
    text = train.format_help()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "datasets":
            continue
        assert option_name(f.name) in text
        if f.default is not None and not isinstance(f.default, bool):
            assert "(default: %s)" % (("%g" % f.default) if isinstance(f.default, float) else f.default) in \
                " ".join(text.split()), f.name
    ns = p.parse_args(["train", "--epochs", "3", "--lower", "false", "--task", "a:token:b", "--task-weights", "a:2"])
    assert ns.epochs == 3 and ns.lower is False and ns.tasks == ["a:token:b"] and ns.task_weights == {"a": 2.0}
    assert not hasattr(ns, "hidden_size")  # options not given stay out: a --config file's values apply


@pytest.mark.parametrize("weighting", ["static", "uncertainty", "dwa", "gradnorm"])
def test_every_weighting_method_trains_on_two_datasets(two, weighting):
    res = T.train(TrainConfig(**{**read_toml(two / "run.toml"), "epochs": 2, "weighting": weighting,
                                 "task_weights": {"tags": 2.0, "label": 0.5}}))
    assert set(res["test"]) == {"tags", "label"}
    assert set(res["history"][-1]["task_weights"]) == {"tags", "label"}
    assert all(v == v for h in res["history"] for v in h["train_losses"].values())  # finite per-task means


def test_progress_bar_only_on_a_terminal():
    import io

    from fastmtl.training.output import Logger

    class Tty(io.StringIO):
        def isatty(self):
            return True

    cfg = TrainConfig(progress=True)
    assert Logger(cfg, stream=io.StringIO()).bar(10, "epoch") is None  # a log file or a pipe: no bar
    pytest.importorskip("tqdm")
    bar = Logger(cfg, stream=Tty()).bar(10, "epoch")
    assert bar is not None
    bar.close()
    assert Logger(TrainConfig(progress=False), stream=Tty()).bar(10, "epoch") is None


def test_evaluate_a_two_dataset_model(two, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["train", "--config", str(two / "run.toml"), "--output-dir", out]) == 0
    best = os.path.join(out, "best.pt")
    with open(os.path.join(out, "metrics.json")) as f:
        expected = json.load(f)
    capsys.readouterr()
    preds = str(tmp_path / "p.jsonl")
    assert cli.main(["evaluate", best, "--predictions", preds, "--report", str(tmp_path / "r.json")]) == 2
    assert "the checkpoint names its test files %s, %s; give the data file" % (two / "a_test.jsonl",
                                                                                two / "b_test.jsonl") \
        in capsys.readouterr().err  # not read unless confirmed
    assert cli.main(["evaluate", best, "--predictions", preds, "--report", str(tmp_path / "r.json"),
                     "--stored-test"]) == 0
    assert json.loads(capsys.readouterr().out) == expected  # every dataset's test set, as at the end of training
    recs = [json.loads(l) for l in open(preds)]
    assert Counter(r["dataset"] for r in recs) == {"a": 16, "b": 8}
    assert set(json.load(open(tmp_path / "r.json"))) == {"tags", "label"}
    assert cli.main(["evaluate", best, str(two / "b_test.jsonl"), "--dataset", "b"]) == 0
    assert json.loads(capsys.readouterr().out) == {"label": expected["label"]}
    assert cli.main(["evaluate", best, "--dataset", "a", "--stored-test"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tags": expected["tags"]}
    assert cli.main(["evaluate", best, str(two / "b_test.jsonl")]) == 0  # the tasks whose field the file has
    assert json.loads(capsys.readouterr().out) == {"label": expected["label"]}
    assert cli.main(["evaluate", best, "--dataset", "c"]) == 2
    assert "--dataset 'c' is not a dataset of this model (a, b)" in capsys.readouterr().err


def test_dwa_and_uncertainty_with_a_task_missing_from_batches_or_epochs():
    from fastmtl.weighting import make_weighting

    dwa = make_weighting("dwa", ["a", "b"])
    dwa.epoch_end({"a": 1.0, "b": 2.0})
    dwa.epoch_end({"a": 0.5})  # b had no batch in this epoch: no KeyError, b keeps ratio 1
    dwa.epoch_end({"a": 0.5, "b": 1.0})
    assert all(v == v and v > 0 for v in dwa.weights().values())
    unc = make_weighting("uncertainty", ["a", "b"])
    reg = unc.regularizer(["a"])
    reg.backward()
    assert unc.log_vars.grad.tolist() == [0.5, 0.0]  # the absent task's s gets no push
    assert float(unc.regularizer().detach()) == 0.0


def test_ddp_needs_a_batch_per_dataset():
    p = EpochPlanner([1, 40], 8, lengths=[[3], [3] * 40], min_batch=2)
    assert p.batches_of(0) == [] and len(p.batches_of(1)) == 5


def test_columns_as_string_or_list_and_bad_types(tmp_path, capsys):
    (tmp_path / "tr.txt").write_text("a DT B-X\nb NN O\n\nc DT O\n")
    for cols in ('"word,pos,ner"', '["word", "pos", "ner"]'):
        (tmp_path / "r.toml").write_text(SMALL + 'epochs = 1\ncolumns = %s\ntrain = "tr.txt"\ntasks = ["ner:token:ner"]\n'
                                         % cols)
        assert cli.main(["train", "--config", str(tmp_path / "r.toml")]) == 0, capsys.readouterr().err
    (tmp_path / "r.toml").write_text(SMALL + 'columns = 5\ntrain = "tr.txt"\ntasks = ["ner:token:ner"]\n')
    assert cli.main(["train", "--config", str(tmp_path / "r.toml")]) == 2
    err = capsys.readouterr().err
    assert "--columns must be a comma-separated string or a list of names, got 5 (columns in" in err


def test_file_values_can_be_undone_on_the_command_line(two, capsys):
    capsys.readouterr()
    assert cli.main(["train", "--config", str(two / "run.toml"), "--epochs", "1", "--no-quiet"]) == 0
    assert "epoch 1:" in capsys.readouterr().err  # quiet = true in the file


def test_select_needs_dev_data(two, tmp_path):
    cfg = read_toml(two / "run.toml")
    del cfg["datasets"][1]["dev"]
    with pytest.raises(ValueError, match="--select: 'label' has no dev data \\(dataset 'b' has no dev split\\)"):
        T.train(TrainConfig(**{**cfg, "select": "label"}))
    res = T.train(TrainConfig(**{**cfg, "epochs": 1}))  # mean: over the datasets that have dev data
    assert set(res["dev"]) == {"tags"}


def test_evaluate_a_file_without_dataset_names_the_dataset(two, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["train", "--config", str(two / "run.toml"), "--output-dir", out]) == 0
    capsys.readouterr()
    p = str(tmp_path / "p.jsonl")
    assert cli.main(["evaluate", os.path.join(out, "best.pt"), str(two / "a_test.jsonl"), "--predictions", p]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"tags"}
    assert {json.loads(l)["dataset"] for l in open(p)} == {"a"}
