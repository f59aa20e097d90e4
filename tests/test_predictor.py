"""fastmtl.load / Predictor, MultiTaskLSTM.predict (eval mode, no grad, probabilities) and constrained marginals."""
import itertools
import json
import math
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch

import fastmtl
from fastmtl import data as D
from fastmtl import train as T
from fastmtl.decoding import constrained_marginals, span_constraints, viterbi_decode
from fastmtl.metrics import get_spans
from fastmtl.nn import SequenceTask, TokenTask
from fastmtl.predictor import Predictor
from train_data import TASKS, TINY, write_splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastmtl.__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny trained run (the trainer's own checkpoint, read back by fastmtl.load)."""
    d = tmp_path_factory.mktemp("predictor")
    files = write_splits(d, random.Random(random.SystemRandom().randrange(2**31)))
    T.train(T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=None, tasks=TASKS, epochs=2,
                          output_dir=str(d / "run"), **TINY))
    return str(d / "run" / "best.pt")


def _sentences(rng, n):
    out = []
    for _ in range(n):
        toks = ["w%d" % rng.randrange(25) for _ in range(rng.randint(1, 11))]  # w20-w24: unknown words
        out.append(" ".join(toks) if rng.random() < 0.5 else toks)
    return out


def _check_result(r, p):
    assert json.loads(json.dumps(r)) == r  # plain JSON values
    for task, level in p.tasks.items():
        t = r[task]
        labels = p.labels[task]
        if level == "sequence":
            assert t["label"] in labels and list(t["probs"]) [0] == t["label"]
            assert t["confidence"] == t["probs"][t["label"]]
            assert sum(t["probs"].values()) == pytest.approx(1.0, abs=1e-5)
            assert list(t["probs"].values()) == sorted(t["probs"].values(), reverse=True)
        else:
            assert len(t["labels"]) == len(t["confidences"]) == len(r["tokens"])
            assert all(l in labels for l in t["labels"]) and all(0.0 <= c <= 1.0 for c in t["confidences"])


def test_load_predicts_like_the_cli(checkpoint, _fresh_seed):
    p = fastmtl.load(checkpoint)
    assert isinstance(p, fastmtl.Predictor) and p.tasks == {"tags": "token", "label": "sequence"}
    assert set(p.labels["label"]) == {"even", "odd"} and set(p.labels["tags"]) <= {"O", "B-E", "I-E"}
    assert p.span_tasks == ["tags"]
    sents = _sentences(random.Random(_fresh_seed), 23)
    res = p.predict(sents, batch_size=4)
    ref = T.predict_sentences(checkpoint, sents)  # the `fastmtl predict` path
    assert len(res) == len(sents)
    for s, r, q in zip(sents, res, ref):
        assert r["tokens"] == (s.split() if isinstance(s, str) else s) == q["tokens"]
        assert r["label"]["label"] == q["label"] and r["tags"]["labels"] == q["tags"]
        _check_result(r, p)
        spans = [(x["type"], x["start"], x["end"] - 1) for x in r["tags"]["spans"]]
        assert spans == get_spans(r["tags"]["labels"])
    # batching and order change nothing
    again = p.predict(list(reversed(sents)), batch_size=1)[::-1]
    for a, b in zip(res, again):
        assert a["tags"]["labels"] == b["tags"]["labels"] and a["label"]["label"] == b["label"]["label"]
        assert a["label"]["confidence"] == pytest.approx(b["label"]["confidence"], abs=1e-5)
        assert a["tags"]["confidences"] == pytest.approx(b["tags"]["confidences"], abs=1e-5)
    assert "tasks={'tags': 'token', 'label': 'sequence'}" in repr(p)


def test_empty_sentences_and_bad_input(checkpoint):
    p = fastmtl.load(checkpoint, batch_size=2)
    res = p.predict(["", "w1 w2", [], "   \t ", ("w3",)])
    assert [r["tokens"] for r in res] == [[], ["w1", "w2"], [], [], ["w3"]]
    for i in (0, 2, 3):
        assert res[i]["label"] == {"label": None, "confidence": None, "probs": {}}
        assert res[i]["tags"] == {"labels": [], "confidences": [], "spans": []}
    assert p.predict([]) == [] and p.predict(["", ""])[1]["tokens"] == []
    assert p.predict(iter(["w1"]))[0]["tokens"] == ["w1"]
    with pytest.raises(TypeError, match="predict\\(\\[sentence\\]\\)"):
        p.predict("w1 w2")
    with pytest.raises(TypeError, match="sentence 1"):
        p.predict(["w1", ["w2", 3]])
    with pytest.raises(TypeError, match="sentence 0"):
        p.predict([None])
    with pytest.raises(ValueError, match="empty token"):
        p.predict([["w1", ""]])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            p.predict(["w1"], batch_size=bad)
        with pytest.raises(ValueError, match="top_k"):
            p.predict(["w1"], top_k=bad)


def test_top_k_and_token_probs(checkpoint):
    p = fastmtl.load(checkpoint)
    full = p.predict(["w1 w2 w9 w0"], token_probs=True)[0]
    top = p.predict(["w1 w2 w9 w0"], top_k=1, token_probs=True)[0]
    assert len(full["label"]["probs"]) == 2 and list(top["label"]["probs"]) == [top["label"]["label"]]
    assert len(full["tags"]["probs"]) == 4 and all(len(d) == len(p.labels["tags"]) for d in full["tags"]["probs"])
    for d, lab, c in zip(full["tags"]["probs"], full["tags"]["labels"], full["tags"]["confidences"]):
        assert sum(d.values()) == pytest.approx(1.0, abs=1e-5) and d[lab] == c
    assert all(len(d) == 1 for d in top["tags"]["probs"])
    assert "probs" not in p.predict(["w1"])[0]["tags"]


def test_import_stays_light_and_load_is_lazy():
    code = ("import sys, fastmtl; heavy = [m for m in ('fastmtl.train', 'fastmtl.predictor', 'fastmtl.model', "
            "'fastmtl.data') if m in sys.modules]; assert not heavy, heavy; f = fastmtl.load; "
            "assert callable(f) and f.__module__ == 'fastmtl.predictor'; assert 'fastmtl.train' not in sys.modules; "
            "assert fastmtl.Predictor.__name__ == 'Predictor'; print('ok')")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    with pytest.raises(AttributeError):
        fastmtl.no_such_thing


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch %s" % os.environ["FASTMTL_PAYLOAD_MARK"],))


def test_load_never_unpickles(tmp_path, monkeypatch):
    mark = tmp_path / "ran"
    monkeypatch.setenv("FASTMTL_PAYLOAD_MARK", str(mark))
    bad = tmp_path / "evil.pt"
    torch.save({"model": _Payload(), "x": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="evil.pt"):
        fastmtl.load(str(bad))
    bad.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ValueError, match="evil.pt"):
        fastmtl.load(str(bad))
    assert not mark.exists()
    with pytest.raises((ValueError, OSError), match="nothere.pt"):
        fastmtl.load(str(tmp_path / "nothere.pt"))


# -- predictors built by hand: spans, constrained decoding -----------------------------------------------------

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _hand_model(scheme="bio", scale=3.0, constrained=True, crf=False):
    tags = TAGS if scheme == "bio" else TAGS + ["E-PER", "S-PER", "E-LOC", "S-LOC"]
    words = ["<pad>", "<unk>"] + ["w%d" % i for i in range(12)]
    vocab = D.Vocab(words)
    lvs = {"ner": D.LabelVocab(tags), "cls": D.LabelVocab(["a", "b", "c"])}
    specs = [D.TaskSpec("ner", "token", "ner", crf=crf), D.TaskSpec("cls", "sequence", "cls")]
    m = fastmtl.MultiTaskLSTM(len(words), 8, 6, [TokenTask("ner", len(tags), crf=crf), SequenceTask("cls", 3)],
                              dropout=0.3)
    with torch.no_grad():
        for prm in m.heads.parameters():
            prm.mul_(scale).add_(torch.randn_like(prm))  # confident, varied predictions
        m.heads["top"].ner.bias[0] -= 3.0  # and not all "O"
    if constrained:
        m.decode_constraints = {"ner": span_constraints(tags, scheme)}
    return m, vocab, lvs, specs


@pytest.mark.parametrize("scheme", ["bio", "iobes"])
def test_spans_follow_constrained_decoding(scheme, _fresh_seed):
    rng = random.Random(_fresh_seed)
    m, vocab, lvs, specs = _hand_model(scheme)
    p = Predictor(m, vocab, lvs, specs, batch_size=3)
    sents = [["w%d" % rng.randrange(14) for _ in range(rng.randint(1, 9))] for _ in range(40)]
    n_spans = 0
    from fastmtl.decoding import _valid

    for s, r in zip(sents, p.predict(sents)):
        tags, conf = r["ner"]["labels"], r["ner"]["confidences"]
        assert _valid(tags, scheme), tags  # constrained decoding: always a well-formed tag sequence
        assert [(x["type"], x["start"], x["end"] - 1) for x in r["ner"]["spans"]] == get_spans(tags)
        for x in r["ner"]["spans"]:
            n_spans += 1
            assert x["text"] == " ".join(s[x["start"]:x["end"]])
            assert x["confidence"] == min(conf[x["start"]:x["end"]]) and x["type"] in ("PER", "LOC")
            assert tags[x["start"]][0] in "BS"
        _check_result(r, p)
    assert n_spans > 0


@pytest.mark.parametrize("crf,constrained", [(False, False), (False, True), (True, False), (True, True)])
def test_predictor_and_evaluation_run_one_prediction_loop(crf, constrained, _fresh_seed):
    """`fastmtl predict` (Predictor) and evaluation (predict_examples: the trainer's dev scores, `fastmtl evaluate`)
    give the same labels for every sentence (argmax, span-constrained Viterbi, CRF Viterbi), whatever the batches."""
    rng = random.Random(_fresh_seed)
    m, vocab, lvs, specs = _hand_model(constrained=constrained, crf=crf)
    sents = [["w%d" % rng.randrange(14) for _ in range(rng.randint(1, 9))] for _ in range(30)]
    p = Predictor(m, vocab, lvs, specs, batch_size=4)
    labels = p.predict_labels(sents)
    details = p.predict(sents, batch_size=7)
    assert m.training  # the predictor leaves the module's mode alone
    for bs in (1, 5, 256):
        got = T.predict_examples(m, vocab, lvs, specs, [{"tokens": s} for s in sents], torch.device("cpu"), bs)
        assert not m.training  # evaluation leaves the model in eval mode
        m.train()
        for s, r, d, g in zip(sents, labels, details, got):
            assert r == {"tokens": s, "ner": g["ner"], "cls": g["cls"]} and list(g) == ["ner", "cls"]
            assert d["ner"]["labels"] == g["ner"] and d["cls"]["label"] == g["cls"]
    assert T.predict_examples(m, vocab, lvs, specs, [], torch.device("cpu")) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        T.predict_examples(m, vocab, lvs, specs, [{"tokens": ["w1"]}], torch.device("cpu"), 0)


def test_without_constraints_probs_are_the_softmax(_fresh_seed):
    m, vocab, lvs, specs = _hand_model(constrained=False)
    p = Predictor(m, vocab, lvs, specs)
    r = p.predict([["w1", "w2", "w3", "w4"]], token_probs=True)[0]
    ids = torch.tensor([vocab.encode(r["tokens"])])
    lengths = torch.tensor([4])
    with torch.no_grad():
        h = m.eval().encode(ids, lengths)["top"]
        soft_all = torch.softmax(m.heads["top"].ner(h[0]), -1)
    for soft, d, lab in zip(soft_all, r["ner"]["probs"], r["ner"]["labels"]):
        assert d[lab] == pytest.approx(float(soft.max()), abs=1e-5)
        assert lab == lvs["ner"].itos[int(soft.argmax())]


def test_model_predict_eval_mode_no_grad_probs(_fresh_seed):
    m, vocab, lvs, specs = _hand_model()
    B, Tm = 6, 7
    lengths = torch.randint(1, Tm + 1, (B,))
    lengths[0] = Tm
    ids = torch.randint(2, len(vocab), (B, Tm)) * (torch.arange(Tm)[None] < lengths[:, None])
    m.train()
    a = m.predict(ids, lengths)
    assert m.training  # restored
    b, probs = m.predict(ids, lengths, return_probs=True)
    assert m.training and all(torch.equal(a[k], b[k]) for k in a)  # no dropout: deterministic, same labels
    m.eval()
    c = m.predict(ids, lengths)
    assert not m.training and all(torch.equal(a[k], c[k]) for k in a)
    assert all(not v.requires_grad for v in list(a.values()) + list(probs.values()))
    assert probs["cls"].shape == (B, 3) and probs["ner"].shape == (B, Tm, len(TAGS))
    assert torch.allclose(probs["cls"].sum(-1), torch.ones(B), atol=1e-5)
    valid = torch.arange(Tm)[None] < lengths[:, None]
    assert torch.allclose(probs["ner"].sum(-1), valid.float(), atol=1e-5)  # 0 at padding
    only = m.predict(ids, lengths, tasks=["cls"])
    assert set(only) == {"cls"} and torch.equal(only["cls"], a["cls"])
    with pytest.raises(ValueError, match="unknown tasks"):
        m.predict(ids, lengths, tasks=["nope"])


def _brute_marginals(lp, allowed, start, end):
    T, C = lp.shape
    p = torch.zeros(T, C, dtype=torch.float64)
    z = 0.0
    for seq in itertools.product(range(C), repeat=T):
        if not start[seq[0]] or not end[seq[-1]] or not all(allowed[a, b] for a, b in zip(seq, seq[1:])):
            continue
        w = math.exp(sum(float(lp[t, c]) for t, c in enumerate(seq)))
        z += w
        for t, c in enumerate(seq):
            p[t, c] += w
    return p / z


@pytest.mark.parametrize("scheme", ["bio", "iobes"])
def test_constrained_marginals_exact(scheme):
    tags = ["O", "B-X", "I-X"] + (["E-X", "S-X"] if scheme == "iobes" else []) + ["B-Y", "I-Y"]
    allowed, start, end = span_constraints(tags, scheme)
    B, Tm, C = 4, 4, len(tags)
    lp = torch.randn(B, Tm, C).mul(2).log_softmax(-1)
    lengths = torch.tensor([4, 1, 3, 2])
    got = constrained_marginals(lp, lengths, allowed, start, end)
    best = viterbi_decode(lp, lengths, allowed, start, end)
    for b in range(B):
        L = int(lengths[b])
        ref = _brute_marginals(lp[b, :L], allowed, start, end)
        torch.testing.assert_close(got[b, :L].double(), ref, atol=1e-5, rtol=1e-4)
        assert (got[b, L:] == 0).all()
        for t in range(L):  # tags that no valid sequence has there get probability 0; Viterbi's are possible
            assert got[b, t, int(best[b, t])] > 0
    free = constrained_marginals(lp, lengths, torch.ones(C, C, dtype=torch.bool))
    for b in range(B):
        L = int(lengths[b])
        torch.testing.assert_close(free[b, :L], lp[b, :L].exp(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="lengths"):
        constrained_marginals(lp, torch.tensor([0, 1, 1, 1]), allowed)
    with pytest.raises(ValueError, match="allowed"):
        constrained_marginals(lp, lengths, allowed[:2])


def test_predictor_checks_its_parts():
    m, vocab, lvs, specs = _hand_model()
    with pytest.raises(ValueError, match="no label vocabulary"):
        Predictor(m, vocab, {"cls": lvs["cls"]}, specs)
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(m, vocab, lvs, specs, batch_size=0)


def test_model_of_two_datasets(tmp_path):
    """A model trained on two corpora (a token task on one, a sentence task on the other) predicts both tasks for
    any sentence."""
    from train_data import synthetic

    rng = random.Random(5)
    lines = ["embedding_dim = 8", "hidden_size = 8", "batch_size = 8", "char_dim = 0", "warmup_steps = 0",
             "threads = 1", "progress = false", "quiet = true", "epochs = 1", 'output_dir = "%s"' % (tmp_path / "o")]
    for d, keep in (("a", "tags"), ("b", "label")):
        for split, n in (("train", 24), ("dev", 8)):
            rows = [{"tokens": r["tokens"], keep: r[keep]} for r in synthetic(n, rng)]
            (tmp_path / ("%s_%s.jsonl" % (d, split))).write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines += ["[[datasets]]", 'name = "%s"' % d, 'train = "%s_train.jsonl"' % d, 'dev = "%s_dev.jsonl"' % d]
    lines += ["[[tasks]]", 'name = "tags"', 'level = "token"', 'dataset = "a"',
              "[[tasks]]", 'name = "label"', 'level = "sequence"', 'dataset = "b"']
    (tmp_path / "run.toml").write_text("\n".join(lines) + "\n")
    from fastmtl.training import read_toml

    T.train(T.TrainConfig(**read_toml(tmp_path / "run.toml")))
    p = fastmtl.load(str(tmp_path / "o" / "best.pt"))
    assert p.tasks == {"tags": "token", "label": "sequence"}
    [r] = p.predict(["w1 w2 w3"])
    assert len(r["tags"]["labels"]) == 3 and r["label"]["label"] in ("odd", "even")
    _check_result(r, p)


@pytest.mark.parametrize("kw", [dict(sharing="soft"), dict(sharing="hierarchical", num_layers=2,
                                                          task_layers={"ner": 1}), dict(token_context=True)])
def test_probs_under_every_sharing(kw):
    m = fastmtl.MultiTaskLSTM(30, 8, 6, [TokenTask("ner", len(TAGS)), SequenceTask("cls", 3)], **kw)
    m.decode_constraints = {"ner": span_constraints(TAGS, "bio")}
    ids, lengths = torch.randint(2, 30, (5, 6)), torch.tensor([6, 1, 3, 6, 2])
    plain = m.predict(ids, lengths)
    labels, probs = m.predict(ids, lengths, return_probs=True)
    assert m.training and all(torch.equal(plain[k], labels[k]) for k in plain)
    assert torch.allclose(probs["cls"].sum(-1), torch.ones(5), atol=1e-5)
    valid = (torch.arange(6)[None] < lengths[:, None]).float()
    assert torch.allclose(probs["ner"].sum(-1), valid, atol=1e-5)


def test_cli_predict_sentences_before_or_after_options(checkpoint, capsys):
    from fastmtl.cli import main

    assert main(["predict", checkpoint, "w1 w2", "--details", "--top-k", "1"]) == 0
    before = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert main(["predict", checkpoint, "--details", "--top-k", "1", "w1 w2"]) == 0
    after = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(before) == 1 and before == after and before[0]["tokens"] == ["w1", "w2"]
    assert len(after[0]["label"]["probs"]) == 1
    with pytest.raises(SystemExit):  # an unknown option is still a usage error
        main(["predict", checkpoint, "--no-such-option", "w1"])
