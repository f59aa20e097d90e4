"""Constrained (BIO / IOBES) Viterbi decoding: exact against brute force, valid outputs, the model and trainer path."""
import itertools

import pytest
import torch

import fastmtl
from fastmtl.decoding import _valid, detect_scheme, span_constraints, viterbi_decode
from fastmtl.nn import SequenceTask, TokenTask

BIO = ["O", "B-a", "I-a", "B-b", "I-b"]
IOBES = ["O", "B-a", "I-a", "E-a", "S-a", "B-b", "E-b", "S-b"]


def _brute(lp, length, labels, scheme):
    best, arg = -float("inf"), None
    for seq in itertools.product(range(len(labels)), repeat=length):
        if not _valid([labels[c] for c in seq], scheme):
            continue
        s = sum(float(lp[t, c]) for t, c in enumerate(seq))
        if s > best:
            best, arg = s, list(seq)
    return arg


@pytest.mark.parametrize("labels,scheme", [(BIO, "bio"), (IOBES, "iobes")])
def test_viterbi_matches_brute_force_and_is_valid(labels, scheme):
    B, T, C = 12, 4, len(labels)
    lp = torch.randn(B, T, C).mul(2).log_softmax(-1)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    out = viterbi_decode(lp, lengths, *span_constraints(labels, scheme))
    assert out.shape == (B, T) and out.dtype == torch.long
    for b in range(B):
        n = int(lengths[b])
        assert (out[b, n:] == -1).all()
        got = out[b, :n].tolist()
        assert _valid([labels[c] for c in got], scheme)
        want = _brute(lp[b], n, labels, scheme)
        s_got = sum(float(lp[b, t, c]) for t, c in enumerate(got))
        s_want = sum(float(lp[b, t, c]) for t, c in enumerate(want))
        assert s_got == pytest.approx(s_want, abs=1e-5)


def test_unconstrained_viterbi_is_argmax_and_fixes_invalid_bio():
    lp = torch.randn(6, 7, len(BIO)).log_softmax(-1)
    lengths = torch.tensor([7, 3, 1, 5, 7, 2])
    free = torch.ones(len(BIO), len(BIO), dtype=torch.bool)
    out = viterbi_decode(lp, lengths, free)
    arg = lp.argmax(-1).masked_fill(torch.arange(7)[None] >= lengths[:, None], -1)
    assert torch.equal(out, arg)
    # "O I-a" is what argmax picks; the constrained decoder must start the span with B-a instead
    lp = torch.log(torch.tensor([[[0.9, 0.05, 0.02, 0.02, 0.01], [0.1, 0.35, 0.45, 0.05, 0.05]]]))
    got = viterbi_decode(lp, torch.tensor([2]), *span_constraints(BIO, "bio"))[0].tolist()
    assert [BIO[c] for c in got] == ["O", "B-a"]


def test_span_constraints_rules_and_errors():
    allowed, start, end = span_constraints(BIO + ["<odd>"], "bio")
    i = {l: k for k, l in enumerate(BIO + ["<odd>"])}
    assert allowed[i["B-a"], i["I-a"]] and allowed[i["I-a"], i["I-a"]]
    assert not allowed[i["O"], i["I-a"]] and not allowed[i["B-b"], i["I-a"]]
    assert not start[i["I-a"]] and start[i["B-a"]] and end.all()
    assert allowed[i["<odd>"]].all() and allowed[:, i["<odd>"]].all()  # labels of another shape: unconstrained
    allowed, start, end = span_constraints(IOBES, "iobes")
    j = {l: k for k, l in enumerate(IOBES)}
    assert not allowed[j["B-a"], j["O"]] and allowed[j["B-a"], j["E-a"]] and not allowed[j["E-a"], j["I-a"]]
    assert not end[j["B-a"]] and end[j["S-a"]] and not start[j["E-a"]]
    with pytest.raises(ValueError, match="scheme"):
        span_constraints(BIO, "iob1")
    with pytest.raises(ValueError, match="allowed"):
        viterbi_decode(torch.zeros(1, 2, 5), torch.tensor([2]), torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="lengths"):
        viterbi_decode(torch.zeros(1, 2, 5), torch.tensor([3]), torch.ones(5, 5, dtype=torch.bool))


def test_detect_scheme():
    assert detect_scheme([["O", "B-a", "I-a"], ["B-b"]]) == "bio"
    assert detect_scheme([["S-a", "B-b", "E-b"]]) == "iobes"
    assert detect_scheme([["I-a", "I-a", "O"]]) is None          # IOB1: I- opens a span
    assert detect_scheme([["B-a", "I-a"], ["O", "I-b"]]) is None


def test_model_predict_uses_constraints():
    torch.manual_seed(0)
    m = fastmtl.MultiTaskLSTM(30, 8, 6, [SequenceTask("intent", 3), TokenTask("slots", len(BIO))], dropout=0.0)
    m.eval()
    with torch.no_grad():  # a head that prefers I-a everywhere, then B-a
        m.heads["top"]["slots"].bias.copy_(torch.tensor([0.0, 4.0, 8.0, 0.0, 0.0]))
    ids = torch.randint(1, 30, (4, 5))
    lengths = torch.tensor([5, 4, 2, 1])
    free = m.predict(ids, lengths)
    assert (free["slots"][:, 0] == 2).all()                      # argmax: invalid I-a at the start
    m.decode_constraints = {"slots": span_constraints(BIO, "bio")}
    con = m.predict(ids, lengths)
    assert torch.equal(con["intent"], free["intent"])
    for b in range(4):
        n = int(lengths[b])
        seq = [BIO[c] for c in con["slots"][b, :n].tolist()]
        assert _valid(seq, "bio") and seq[0] == "B-a" and all(s == "I-a" for s in seq[1:])
        assert (con["slots"][b, n:] == -1).all()
