"""Per-class reports (fastmtl.reports, `fastmtl evaluate --report`) and prediction files (`--predictions`)."""
import json
import os
import math
import random

import pytest

from fastmtl import cli
from fastmtl import data as D
from fastmtl import metrics as M
from fastmtl import reports as R
from train_data import TINY_ARGS, data_args, write_splits

seqeval = pytest.importorskip("seqeval.metrics")


def _random_tags(rng, n, scheme):
    types = ["PER", "LOC", "ORG", "MISC"][: rng.randint(1, 4)]
    prefixes = "BI" if scheme == "bio" else "BIES"
    out = []
    for _ in range(n):
        seq = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.4:
                seq.append("O")
            else:
                seq.append("%s-%s" % (rng.choice(prefixes), rng.choice(types)))
        out.append(seq)
    return out


def _noisy(rng, gold, scheme):
    """Predictions: the gold tags with some of them changed (so many spans match and some do not)."""
    pool = _random_tags(rng, 1, scheme)[0] + ["O"]
    return [[t if rng.random() < 0.75 else rng.choice(pool + ["O", "B-PER", "I-LOC"]) for t in g] for g in gold]


@pytest.mark.parametrize("scheme", ["bio", "iobes"])
def test_span_report_equals_seqeval(scheme, _fresh_seed):
    rng = random.Random(_fresh_seed)
    for _ in range(20):
        gold = _random_tags(rng, rng.randint(1, 30), scheme)
        pred = _noisy(rng, gold, scheme)
        ours = R.span_report(gold, pred)
        ref = seqeval.classification_report(gold, pred, output_dict=True, zero_division=0)
        avgs = {"micro avg": "micro", "macro avg": "macro", "weighted avg": "weighted"}
        assert set(ref) == set(ours["per_class"]) | set(avgs)
        for key, v in ref.items():
            mine = ours[avgs[key]] if key in avgs else ours["per_class"][key]
            for k, k2 in (("precision", "precision"), ("recall", "recall"), ("f1-score", "f1"), ("support", "support")):
                if key == "macro avg" and not ours["per_class"]:  # no span in gold or pred: seqeval's mean of nothing
                    assert mine[k2] == 0 and (k == "support" or math.isnan(float(v[k])))
                    continue
                assert mine[k2] == pytest.approx(float(v[k]), abs=1e-9), (key, k)
        # the micro figures are span_f1's
        f = M.span_f1(gold, pred)
        assert {k: ours["micro"][k] for k in f} == pytest.approx(f)


def test_label_report():
    gold = ["a", "a", "b", "c", "a", "b"]
    pred = ["a", "b", "b", "a", "a", "d"]
    r = R.label_report(gold, pred)
    assert list(r["per_class"]) == ["a", "b", "c", "d"]
    assert r["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert r["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert r["per_class"]["c"]["f1"] == 0.0 and r["per_class"]["d"]["support"] == 0
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["micro"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 6})
    assert r["macro"]["f1"] == pytest.approx((2 / 3 + 0.5) / 4)
    assert r["weighted"]["f1"] == pytest.approx((2 / 3 * 3 + 0.5 * 2) / 6)
    old = M.classification_report(gold, pred)  # the metrics module's report agrees
    assert old["per_class"]["a"] == pytest.approx(r["per_class"]["a"])
    assert old["macro"] == pytest.approx({k: r["macro"][k] for k in old["macro"]})
    tok = R.label_report([["x", "y"], ["y"]], [["x", "x"], ["y"]])  # token tasks: flattened
    assert tok["per_class"]["y"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    with pytest.raises(ValueError, match="sequence 0"):
        R.label_report([["x", "y"]], [["x"]])
    assert R.label_report([], [])["accuracy"] == 0.0


def test_task_reports_and_text():
    specs = [D.TaskSpec("intent", "sequence", "intent"), D.TaskSpec("ner", "token", "tags"),
             D.TaskSpec("pos", "token", "pos")]
    ex = [{"tokens": ["a", "b"], "intent": "x", "tags": ["B-P", "I-P"], "pos": ["N", "V"]},
          {"tokens": ["c"], "intent": None, "tags": ["O"], "pos": ["N"]}]
    pr = [{"intent": "x", "ner": ["B-P", "O"], "pos": ["N", "N"]}, {"intent": "y", "ner": ["B-P"], "pos": ["N"]}]
    rep = R.task_reports(specs, ex, pr)
    assert [rep[t]["unit"] for t in ("intent", "ner", "pos")] == ["sentence", "span", "token"]
    assert rep["intent"]["examples"] == 1 and rep["intent"]["accuracy"] == 1.0  # no gold: left out
    assert set(rep["ner"]["per_class"]) == {"P"} and rep["ner"]["per_class"]["P"]["support"] == 1
    assert rep["ner"]["per_class"]["P"]["precision"] == 0.0 and "accuracy" not in rep["ner"]
    assert rep["pos"]["per_class"]["N"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8,
                                                          "support": 2})
    json.dumps(rep)
    text = R.format_report(rep)
    assert "intent (sequence task, counted per sentence, 1 examples)" in text
    assert "weighted avg" in text and "accuracy" in text and "f1-score" in text
    rows = R.prediction_records(specs, ex, pr)
    assert rows[1] == {"tokens": ["c"], "gold": {"intent": None, "ner": ["O"], "pos": ["N"]},
                       "predicted": {"intent": "y", "ner": ["B-P"], "pos": ["N"]}}


def test_cli_evaluate_report_and_predictions(tmp_path, capsys, _fresh_seed):
    files = write_splits(tmp_path, random.Random(_fresh_seed))
    out = str(tmp_path / "run")
    assert cli.main(["train"] + data_args(files, test=False) + TINY_ARGS + ["--epochs", "1", "--output-dir", out]) == 0
    capsys.readouterr()
    ck = os.path.join(out, "best.pt")
    rep_json, rep_txt, preds = (str(tmp_path / n) for n in ("rep.json", "rep.txt", "preds.jsonl"))
    assert cli.main(["evaluate", ck, files["test"], "--report", rep_json, "--predictions", preds]) == 0
    metrics = json.loads(capsys.readouterr().out)
    with open(rep_json) as f:
        rep = json.load(f)
    assert set(rep) == {"tags", "label"}
    assert rep["tags"]["unit"] == "span" and set(rep["tags"]["per_class"]) <= {"E"}
    assert rep["label"]["unit"] == "sentence" and rep["label"]["accuracy"] == pytest.approx(
        metrics["label"]["accuracy"])
    for k in ("precision", "recall", "f1"):
        assert rep["tags"]["micro"][k] == pytest.approx(metrics["tags"][k])  # the span F1 of metrics.json
    with open(preds) as f:
        rows = [json.loads(l) for l in f]
    test_ex = D.read_examples(files["test"], "jsonl")
    assert len(rows) == len(test_ex)
    for row, ex in zip(rows, test_ex):
        assert row["tokens"] == ex["tokens"] and row["gold"] == {"tags": ex["tags"], "label": ex["label"]}
        assert len(row["predicted"]["tags"]) == len(ex["tokens"]) and row["predicted"]["label"] in ("odd", "even")
    acc = sum(r["gold"]["label"] == r["predicted"]["label"] for r in rows) / len(rows)
    assert acc == pytest.approx(metrics["label"]["accuracy"])
    assert cli.main(["evaluate", ck, files["test"], "--report", rep_txt]) == 0
    with open(rep_txt) as f:
        text = f.read()
    assert text.startswith("tags (token task, counted per span, ") and "label (sequence task" in text
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".") or ".tmp" in n]  # atomic writes, no leftovers
    capsys.readouterr()
    assert cli.main(["evaluate", ck, files["test"], "--report", str(tmp_path / "no" / "dir" / "r.json")]) == 2
    assert "no/dir" in capsys.readouterr().err  # one line naming the place, exit 2
