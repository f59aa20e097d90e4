"""CRF token tasks inside MultiTaskHeads and MultiTaskLSTM, and through the trainer, the checkpoints, the command
line (``--task NAME:token:SOURCE:crf``, ``--crf``, ``crf = true`` in ``[[tasks]]``) and the predictor."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

import fastmtl
from fastmtl import cli
from fastmtl import data as D
from fastmtl import train as T
from fastmtl.decoding import span_constraints
from fastmtl.functional import crf_decode, crf_marginals, crf_nll
from fastmtl.nn import CRFLinear, MultiTaskHeads, SequenceTask, TokenTask
from fastmtl.training import read_toml
from fastmtl.training.config import TrainConfig
from train_data import TINY, TINY_ARGS, data_args, one_line_error, write_splits, write_two_corpora

torchcrf = pytest.importorskip("torchcrf")


def _batch(B=5, T=7, D=6, C=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    tags = torch.randint(0, C, (B, T), generator=g)
    intent = torch.randint(0, 3, (B,), generator=g)
    return hidden, lengths, tags, intent


def _heads(D=6, C=4, dtype=torch.float64, weight=1.0):
    torch.manual_seed(0)
    return MultiTaskHeads(D, [SequenceTask("intent", 3, pooling="max"), TokenTask("slots", C, crf=True,
                                                                                   weight=weight)]).to(dtype)


def _torchcrf(head):
    C = head.transitions.shape[0]
    ref = torchcrf.CRF(C, batch_first=True).to(head.transitions.dtype)
    with torch.no_grad():
        ref.transitions.copy_(head.transitions)
        ref.start_transitions.copy_(head.start_transitions)
        ref.end_transitions.copy_(head.end_transitions)
    return ref


def test_crf_task_loss_and_gradients_match_cross_entropy_plus_torchcrf():
    hidden, lengths, tags, intent = _batch()
    heads = _heads(weight=0.7)
    out = heads(hidden, lengths=lengths, targets={"intent": intent, "slots": tags}, weights={"intent": 2.0})
    # the reference: the intent head as F.cross_entropy on max-pooled states, the CRF as pytorch-crf
    h2 = hidden.detach().clone().requires_grad_(True)
    mask = torch.arange(hidden.shape[1])[None] < lengths[:, None]
    pooled = h2.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
    ce = F.cross_entropy(F.linear(pooled, heads["intent"].weight, heads["intent"].bias), intent)
    ref = _torchcrf(heads["slots"])
    em = F.linear(h2, heads["slots"].weight, heads["slots"].bias)
    crf = -ref(em, tags, mask=mask, reduction="sum") / lengths.sum()
    torch.testing.assert_close(out.losses["intent"], ce, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.losses["slots"], crf, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, 2.0 * ce + 0.7 * crf, rtol=1e-10, atol=1e-12)
    assert out.weights == {"intent": 2.0, "slots": 0.7}

    out.loss.backward()
    (2.0 * ce + 0.7 * crf).backward()
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-9, atol=1e-12)
    for ours, theirs in ((heads["slots"].transitions, ref.transitions),
                         (heads["slots"].start_transitions, ref.start_transitions),
                         (heads["slots"].end_transitions, ref.end_transitions)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12)


def test_crf_parameters_live_in_the_heads_state_dict():
    heads = _heads()
    assert isinstance(heads["slots"], CRFLinear) and heads.is_crf("slots") and not heads.is_crf("intent")
    keys = set(heads.state_dict())
    assert {"slots.weight", "slots.bias", "slots.transitions", "slots.start_transitions",
            "slots.end_transitions"} <= keys
    assert list(heads) == ["intent", "slots"]  # still a ModuleDict of one head per task
    other = _heads()
    other.load_state_dict(heads.state_dict())
    assert "crf=True" in repr(heads)


def test_unlabelled_sequences_count_for_nothing():
    hidden, lengths, tags, intent = _batch()
    heads = _heads()
    tags2 = tags.clone()
    tags2[1] = -100  # no slot labels for sequence 1 (another dataset's example)
    out = heads(hidden, lengths=lengths, targets={"slots": tags2})
    keep = torch.tensor([i != 1 for i in range(len(lengths))])
    sub = heads(hidden[keep], lengths=lengths[keep], targets={"slots": tags[keep]})
    torch.testing.assert_close(out.losses["slots"], sub.losses["slots"], rtol=1e-12, atol=1e-12)
    none = heads(hidden, lengths=lengths, targets={"slots": torch.full_like(tags, -100)})
    assert float(none.losses["slots"].detach()) == 0.0
    pad = tags.clone()
    pad[2, int(lengths[2]):] = -100  # ignore_index at padding only: still labelled
    torch.testing.assert_close(heads(hidden, lengths=lengths, targets={"slots": pad}).losses["slots"],
                               heads(hidden, lengths=lengths, targets={"slots": tags}).losses["slots"])
    part = tags.clone()
    part[0, 3] = -100  # a labelled sequence with one unlabelled token
    with pytest.raises(ValueError, match="CRF task 'slots': sequence 0 has ignore_index"):
        heads(hidden, lengths=lengths, targets={"slots": part})


def test_crf_predictions_are_viterbi_paths_and_marginals():
    hidden, lengths, _, _ = _batch()
    heads = _heads()
    ref = _torchcrf(heads["slots"])
    mask = torch.arange(hidden.shape[1])[None] < lengths[:, None]
    with torch.no_grad():
        em = F.linear(hidden, heads["slots"].weight, heads["slots"].bias)
        labels = heads.predict(hidden, lengths)["slots"]
        logp = heads.predict(hidden, lengths, output="log_probs")["slots"]
        logits = heads.predict(hidden, lengths, output="logits")["slots"]
    paths = ref.decode(em, mask)
    for b, p in enumerate(paths):
        assert labels[b, :len(p)].tolist() == p and (labels[b, len(p):] == -1).all()
    torch.testing.assert_close(logits, em)
    torch.testing.assert_close(logp.exp(), crf_marginals(em, lengths, *heads["slots"].crf_params()))


def test_model_predict_decodes_crf_tasks_under_span_constraints():
    labels = ["O", "B-A", "I-A", "B-B", "I-B"]
    torch.manual_seed(1)
    model = fastmtl.MultiTaskLSTM(30, 8, 8, [SequenceTask("intent", 3), TokenTask("slots", 5, crf=True)])
    with torch.no_grad():  # transitions that favour I-X after O: decoding must still never produce one
        model.heads["top"]["slots"].transitions[0, 2] = 5.0
        model.heads["top"]["slots"].transitions[0, 4] = 5.0
    ids = torch.randint(1, 30, (6, 9))
    lengths = torch.tensor([9, 3, 1, 7, 9, 2])
    free = model.predict(ids, lengths)["slots"]
    model.decode_constraints = {"slots": span_constraints(labels)}
    preds, probs = model.predict(ids, lengths, return_probs=True)
    for b in range(6):
        seq = [labels[i] for i in preds["slots"][b, :lengths[b]].tolist()]
        for prev, cur in zip(["O"] + seq, seq):
            assert not (cur.startswith("I-") and prev[2:] != cur[2:]), seq
    assert probs["slots"].shape == (6, 9, 5)
    torch.testing.assert_close(probs["slots"].sum(-1)[torch.arange(9)[None] < lengths[:, None]],
                               torch.ones(int(lengths.sum())), atol=1e-5, rtol=0)
    assert (free != preds["slots"]).any()  # the constraints changed something


def test_model_forward_backward_and_gradient_methods():
    torch.manual_seed(2)
    model = fastmtl.MultiTaskLSTM(30, 8, 8, [SequenceTask("intent", 3), TokenTask("slots", 5, crf=True)])
    ids = torch.randint(1, 30, (4, 6))
    lengths = torch.tensor([6, 2, 5, 1])
    out = model(ids, lengths, {"intent": torch.tensor([0, 1, 2, 0]), "slots": torch.randint(0, 5, (4, 6))})
    out.loss.backward()
    crf = model.heads["top"]["slots"]
    assert crf.transitions.grad is not None and crf.transitions.grad.abs().sum() > 0
    assert model.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sharing", ["soft", "hierarchical"])
def test_crf_task_under_soft_and_hierarchical_sharing(sharing):
    torch.manual_seed(3)
    kw = {"task_layers": {"slots": 1, "intent": 2}} if sharing == "hierarchical" else {}
    model = fastmtl.MultiTaskLSTM(30, 8, 8, [SequenceTask("intent", 3), TokenTask("slots", 5, crf=True)],
                                  num_layers=2, sharing=sharing, **kw)
    ids = torch.randint(1, 30, (4, 6))
    lengths = torch.tensor([6, 2, 5, 1])
    out = model(ids, lengths, {"intent": torch.tensor([0, 1, 2, 0]), "slots": torch.randint(0, 5, (4, 6))})
    out.loss.backward()
    crf = [m for m in model.modules() if isinstance(m, CRFLinear)]
    assert len(crf) == 1 and crf[0].transitions.grad.abs().sum() > 0
    pred = model.predict(ids, lengths)["slots"]
    assert pred.shape == (4, 6) and (pred[1, 2:] == -1).all() and (pred[1, :2] >= 0).all()


def test_task_spec_parsing():
    assert D.parse_task("slots:token:slots:crf") == D.TaskSpec("slots", "token", "slots", None, True)
    assert D.parse_task("slots:token").crf is False
    with pytest.raises(ValueError, match="a CRF needs a token task"):
        D.parse_task("intent:sequence:intent:crf")
    with pytest.raises(ValueError, match="NAME:LEVEL:SOURCE"):
        D.parse_task("slots:token:slots:crff")
    with pytest.raises(ValueError, match="label_smoothing and class_weights"):
        TokenTask("slots", 5, crf=True, label_smoothing=0.1)


@pytest.fixture
def files(tmp_path):
    return write_splits(tmp_path, random.Random(11))


def test_cli_trains_a_crf_task_and_predicts_from_the_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--format", "jsonl", "--train", files["train"], "--dev", files["dev"], "--test", files["test"],
            "--task", "tags:token:tags:crf", "--task", "label:sequence:label"]
    assert cli.main(["train"] + args + TINY_ARGS + ["--epochs", "2", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    model, _, _, specs, _ = T.load_checkpoint(str(out / "best.pt"))
    assert [s.crf for s in specs] == [True, False]
    assert model.heads["top"].is_crf("tags")
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["tags"]["f1"] <= 1.0
    assert cli.main(["predict", str(out / "best.pt"), "--details", "w1 w2 w3 w0"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["tags"]["labels"]) == 4 and all(0.0 <= c <= 1.0 for c in rec["tags"]["confidences"])
    p = fastmtl.load(str(out / "best.pt"))
    assert p.predict_labels(["w1 w2 w3 w0"])[0]["tags"] == rec["tags"]["labels"]


def test_crf_option_and_toml_switch(files, tmp_path):
    res = T.train(TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=None,
                              tasks=["tags:token:tags", "label:sequence:label"], epochs=1, crf=True, **TINY))
    assert res["model"].heads["top"].is_crf("tags")
    write_two_corpora(tmp_path, extra="epochs = 1\n")
    text = (tmp_path / "run.toml").read_text().replace('name = "tags"\nlevel = "token"\n',
                                                       'name = "tags"\nlevel = "token"\ncrf = true\n')
    (tmp_path / "run.toml").write_text(text)
    cfg = read_toml(tmp_path / "run.toml")
    res = T.train(TrainConfig(**cfg))
    assert res["model"].heads["top"].is_crf("tags") and not res["model"].heads["top"].is_crf("label")


def test_crf_with_a_gradient_method(files):
    res = T.train(TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=None,
                              tasks=["tags:token:tags:crf", "label:sequence:label"], epochs=1, weighting="mgda",
                              **TINY))
    assert res["model"].heads["top"]["tags"].transitions.abs().sum() > 0


def test_ddp_two_processes_match_one_with_a_crf_task(files, tmp_path):
    """DDP (two gloo processes, half of every batch each) ends with the parameters of one process on the whole
    batches, transitions included: the CRF loss per labelled token is reduced like the token cross-entropy."""
    from train_data import assert_ddp_matches_one_process

    cfg = TrainConfig(format="jsonl", train=files["train"], tasks=["tags:token:tags:crf", "label:sequence:label"],
                      epochs=1, dropout=0.0, unk_alpha=0.0, device="cpu", **TINY)
    assert_ddp_matches_one_process(cfg, tmp_path)


def test_the_atis_default_scores_slots_with_a_crf():
    """Measured on ATIS (5 seeds): the built-in ATIS slots default to a CRF; --crf true/false overrides every token
    task; WNUT-16's NER and explicit --task without :crf do not use one."""
    from fastmtl.training.config import dataset_specs, task_specs

    def specs(**kw):
        cfg = TrainConfig(**kw)
        return {s.name: s.crf for s in task_specs(cfg, dataset_specs(cfg))}

    assert specs() == {"intent": False, "slots": True}
    assert specs(crf=False) == {"intent": False, "slots": False}
    assert specs(format="atis", train="x.txt") == {"intent": False, "slots": True}  # ATIS's format, its tasks
    assert specs(tasks=["slots:token:slots", "intent:sequence:intent"]) == {"slots": False, "intent": False}
    assert specs(datasets=[{"name": "w", "builtin": "wnut16"}]) == {"ner": False}
    assert specs(datasets=[{"name": "w", "builtin": "wnut16"}], crf=True) == {"ner": True}
    with pytest.raises(ValueError, match="--crf must be true, false or unset"):
        TrainConfig(crf="yes").validate()
