"""Per-task gradients of the shared encoder (fastmtl.gradients) against K separate autograd backward passes over the
model's ordinary forward."""
import pytest
import torch

import fastmtl
from fastmtl.gradients import gram, per_task_gradients, shared_named_parameters, task_gradients

WORDS = ["<pad>", "<unk>"] + ["w%d%s" % (i, "xyz"[i % 3] * (i % 4)) for i in range(38)]


def _model(bidirectional, layers, chars, sharing="hard", token_context=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    tasks = [fastmtl.nn.SequenceTask("intent", 5, pooling="mean"), fastmtl.nn.TokenTask("slots", 7),
             fastmtl.nn.TokenTask("pos", 4, weight=0.5)]
    kw = dict(num_layers=layers, bidirectional=bidirectional, dropout=0.0, sharing=sharing,
              token_context=token_context)
    if chars:
        kw.update(char_words=WORDS, char_dim=3, char_filters=4)
    if sharing == "hierarchical":
        kw["task_layers"] = {"pos": 1}
    return fastmtl.MultiTaskLSTM(len(WORDS), 6, 5, tasks, **kw).to(dtype)


def _batch(B=6, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    ids = torch.randint(2, len(WORDS), (B, T), generator=g)
    ids[torch.arange(T)[None] >= lengths[:, None]] = 0
    targets = {"intent": torch.randint(0, 5, (B,), generator=g), "slots": torch.randint(0, 7, (B, T), generator=g),
               "pos": torch.randint(0, 4, (B, T), generator=g)}
    return ids, lengths, targets


def _reference(model, ids, lengths, targets, weights):
    """K separate torch.autograd.grad passes (LibMTL's way): {task: {name: grad of w_k L_k}} for every parameter."""
    out = model(ids, lengths, {n: targets[n] for n in weights}, weights)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = {}
    for t, w in weights.items():
        gs = torch.autograd.grad(w * out.losses[t], [p for _, p in named], retain_graph=True, allow_unused=True)
        ref[t] = {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, gs)}
    return out.losses, ref


CASES = [(bi, layers, chars) for bi in (False, True) for layers in (1, 2) for chars in (False, True)]


@pytest.mark.parametrize("bidirectional,layers,chars", CASES)
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_per_task_gradients_match_separate_backward_passes(bidirectional, layers, chars, mode):
    model = _model(bidirectional, layers, chars)
    ids, lengths, targets = _batch(seed=layers * 10 + chars)
    weights = {"intent": 1.0, "slots": 2.0, "pos": 0.5}
    losses, grads, head_grads = per_task_gradients(model, ids, lengths, targets, weights, mode=mode)
    ref_losses, ref = _reference(model, ids, lengths, targets, weights)
    shared = [n for n, _ in shared_named_parameters(model)]
    assert any(n.startswith("encoder.") for n in shared) and "embedding.weight" in shared
    assert any(n.startswith("char_cnn.") for n in shared) == chars
    for t in weights:
        assert torch.allclose(losses[t], ref_losses[t].detach(), rtol=1e-12, atol=1e-14)
        assert set(grads[t]) == set(shared)
        for n, g in grads[t].items():
            torch.testing.assert_close(g, ref[t][n], rtol=1e-9, atol=1e-12, msg=lambda m: "%s %s: %s" % (t, n, m))
        assert set(head_grads[t]) == {"heads.top.%s.weight" % t, "heads.top.%s.bias" % t}
        for n, g in head_grads[t].items():
            torch.testing.assert_close(g, ref[t][n], rtol=1e-9, atol=1e-12)
    # a task's gradient is nonzero on the whole encoder and no task leaks into another's head
    assert all(float(g.detach().abs().sum()) > 0 for g in grads["slots"].values() if g.dim() > 1)


@pytest.mark.parametrize("sharing,token_context", [("hierarchical", False), ("hard", True)])
def test_hierarchical_and_token_context(sharing, token_context):
    model = _model(True, 2, True, sharing=sharing, token_context=token_context)
    ids, lengths, targets = _batch(seed=5)
    weights = {"intent": 1.0, "slots": 1.0, "pos": 0.5}
    for mode in ("loop", "vmap"):
        _, grads, head_grads = per_task_gradients(model, ids, lengths, targets, weights, mode=mode)
        _, ref = _reference(model, ids, lengths, targets, weights)
        for t in weights:
            for n, g in list(grads[t].items()) + list(head_grads[t].items()):
                torch.testing.assert_close(g, ref[t][n], rtol=1e-9, atol=1e-12)
    if sharing == "hierarchical":  # pos reads layer 1: no gradient on layer 2
        assert all(float(g.abs().max()) == 0 for n, g in grads["pos"].items() if n.startswith("encoder.layers.1."))


def test_float32_dropout_and_a_subset_of_tasks():
    model = _model(True, 2, True, dtype=torch.float32)
    model.dropout = 0.3
    model.train()
    ids, lengths, targets = _batch(B=9, T=11, seed=7)
    targets = {"slots": targets["slots"]}  # one dataset's batch: K = 1
    torch.manual_seed(11)
    tg = task_gradients(model, ids, lengths, targets, {"slots": 1.0})
    assert tg.tasks == ["slots"] and tg.K == 1
    g = tg.shared()
    torch.manual_seed(11)  # the same dropout masks
    _, ref = _reference(model, ids, lengths, targets, {"slots": 1.0})
    for n, gg in zip(tg.names, g):
        torch.testing.assert_close(gg[0], ref["slots"][n], rtol=1e-5, atol=1e-6)
    # vmap: one forward under torch.func.vjp (its own dropout draw), the K backwards through the vmap rules; the
    # combination of its per-task gradients is its own one-backward gradient
    tv = task_gradients(model, ids, lengths, targets, {"slots": 1.0}, mode="vmap")
    for a, b in zip(tv.shared(), tv.backward([1.0])):
        torch.testing.assert_close(a[0], b, rtol=1e-5, atol=1e-6)


def test_backward_of_a_combination_is_the_combination_of_the_gradients():
    model = _model(True, 2, False)
    ids, lengths, targets = _batch(seed=3)
    tg = task_gradients(model, ids, lengths, targets)
    stacked = tg.shared()
    assert all(not s.requires_grad for s in stacked)
    c = [0.3, -1.2, 2.0]
    one = tg.backward(c)
    for s, g in zip(stacked, one):
        torch.testing.assert_close(torch.tensordot(torch.tensor(c, dtype=s.dtype), s, dims=1), g)
    G = gram(stacked)
    flat = torch.cat([s.reshape(3, -1) for s in stacked], 1)
    torch.testing.assert_close(G, flat @ flat.t())
    assert G.shape == (3, 3) and tg.rep_gram().shape == (3, 3)


def test_soft_sharing_is_rejected_clearly():
    model = _model(True, 1, False, sharing="soft")
    ids, lengths, targets = _batch()
    with pytest.raises(ValueError, match="sharing='soft'"):
        per_task_gradients(model, ids, lengths, targets)


def test_frozen_embeddings_are_not_shared_parameters():
    model = _model(True, 1, False)
    model.embedding.weight.requires_grad_(False)
    assert "embedding.weight" not in dict(shared_named_parameters(model))
    ids, lengths, targets = _batch()
    _, grads, _ = per_task_gradients(model, ids, lengths, targets)
    assert "embedding.weight" not in grads["slots"]


@pytest.mark.parametrize("method", ["pcgrad", "mgda", "mgda_ub", "nash_mtl"])
def test_benchmark_providers_do_the_same_step(method):
    """fastmtl.bench.train_step_mtl: the fused step and LibMTL's K-backward step move the model identically."""
    from fastmtl.bench import train_step_mtl as M
    from fastmtl.weighting import make_weighting

    batches = M._batches(1, 3, 5, 6, 40, "cpu", torch.Generator().manual_seed(0))
    params = []
    for kind in ("fused", "separate"):
        torch.manual_seed(0)
        model = M._model(3, 40, 6, 5, 2, "cpu").double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = make_weighting(method, model.task_names, seed=1) if method == "pcgrad" else \
            make_weighting(method, model.task_names)
        step = M._fused_step(model, opt, batches, m, "loop") if kind == "fused" else \
            M._separate_step(model, opt, batches, m)
        step()
        params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    moved = False
    for k in params[0]:
        torch.testing.assert_close(params[0][k], params[1][k], rtol=1e-6, atol=1e-8, msg=k)
    torch.manual_seed(0)
    init = M._model(3, 40, 6, 5, 2, "cpu").double().state_dict()
    moved = any(not torch.allclose(init[k], params[0][k]) for k in init)
    assert moved
