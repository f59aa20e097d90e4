"""Metrics: span F1 against seqeval (conlleval semantics), accuracy, classification report, frame accuracy."""
import random
import warnings

import pytest

from fastmtl import metrics as M

import seqeval.metrics as seqeval  # a [test] dependency: its absence is a failure, not a skip


def _random_tags(rng, n, tagset):
    return [rng.choice(tagset) for _ in range(n)]


@pytest.mark.parametrize("scheme", ["BIO", "IOBES", "mixed"])
def test_span_f1_matches_seqeval_default_mode(scheme, _fresh_seed):
    rng = random.Random(_fresh_seed)
    types = ["PER", "LOC", "fromloc.city_name"]
    prefixes = {"BIO": "BI", "IOBES": "BIES", "mixed": "BIES"}[scheme]
    tagset = ["O"] * 3 + ["%s-%s" % (p, t) for p in prefixes for t in types]
    for _ in range(400):
        gold = [_random_tags(rng, rng.randint(1, 12), tagset) for _ in range(rng.randint(1, 5))]
        if scheme == "mixed":
            pred = [_random_tags(rng, len(s), tagset) for s in gold]
        else:  # predictions close to gold: flip a few tags
            pred = [[t if rng.random() < 0.7 else rng.choice(tagset) for t in s] for s in gold]
        got = M.span_f1(gold, pred)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = (seqeval.precision_score(gold, pred), seqeval.recall_score(gold, pred),
                   seqeval.f1_score(gold, pred))
        assert got["precision"] == pytest.approx(ref[0], abs=1e-12)
        assert got["recall"] == pytest.approx(ref[1], abs=1e-12)
        assert got["f1"] == pytest.approx(ref[2], abs=1e-12)


def test_span_f1_hand_case():
    gold = [["B-A", "I-A", "O", "B-B"], ["S-C", "O"]]
    pred = [["B-A", "I-A", "O", "I-B"], ["B-C", "O"]]  # I-B after O starts a chunk (conlleval)
    r = M.span_f1(gold, pred)
    assert r["precision"] == pytest.approx(1.0)  # (A,0,1), (B,3,3), (C,0,0) all match
    assert r["recall"] == pytest.approx(1.0)
    pred2 = [["B-A", "O", "O", "O"], ["O", "O"]]
    r = M.span_f1(gold, pred2)
    assert r == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.get_spans(["I-X", "I-X", "I-Y", "E-Y", "E-Y"]) == [("X", 0, 1), ("Y", 2, 3), ("Y", 4, 4)]


def test_span_f1_errors():
    with pytest.raises(ValueError, match="lengths"):
        M.span_f1([["O"]], [])
    with pytest.raises(ValueError, match="sequence 0"):
        M.span_f1([["O", "B-X"]], [["O"]])


def test_accuracy_and_report():
    gold = ["a", "b", "b", "c", "a"]
    pred = ["a", "b", "c", "c", "b"]
    assert M.accuracy(gold, pred) == pytest.approx(0.6)
    r = M.classification_report(gold, pred)
    assert r["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert r["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert r["per_class"]["c"]["recall"] == pytest.approx(1.0)
    assert r["micro"]["f1"] == pytest.approx(0.6)
    macro_f1 = (2 / 3 + 0.5 + 2 / 3) / 3
    assert r["macro"]["f1"] == pytest.approx(macro_f1)
    assert M.accuracy([["a", "b"], ["c"]], [["a", "x"], ["c"]]) == pytest.approx(2 / 3)


def test_frame_accuracy_and_tagset():
    assert M.frame_accuracy(["x", "y", "x"], ["x", "y", "y"], [["O"], ["B-A"], ["O"]],
                            [["O"], ["O"], ["O"]]) == pytest.approx(1 / 3)
    assert M.is_span_tagset(["O", "B-A", "I-A"])
    assert not M.is_span_tagset(["NOUN", "VERB"])
    assert not M.is_span_tagset(["O"])
