"""Multi-task heads: fastmtl.functional.multitask_cross_entropy / multitask_predict and fastmtl.nn.MultiTaskHeads
against the pure-PyTorch reference (Linear + pooling + F.cross_entropy per task, summed)."""
import pytest
import torch
import torch.nn.functional as F

import fastmtl  # noqa: F401
from fastmtl.functional import multitask_cross_entropy, multitask_predict
from fastmtl.nn import MultiTaskHeads, SequenceTask, TaskOutput, TokenTask
from fastmtl.reference.heads import multitask_cross_entropy_reference, multitask_predict_reference

POOLINGS = ["last", "first", "mean", "max", "last_first"]


def make_problem(device, dtype, B, T, D, tasks, lengths="random", noncontig=False, all_ignored=(), ignore_frac=0.2,
                 bias_mask=None):
    """tasks: list of dicts with C, level, pooling, ignore_index, label_smoothing, class_weights (bool)."""
    g = dict(device=device, dtype=dtype)
    if noncontig:
        hidden = torch.randn(T, B, D, **g).transpose(0, 1)
    else:
        hidden = torch.randn(B, T, D, **g)
    hidden.requires_grad_(True)
    if lengths == "random":
        lens = torch.randint(1, T + 1, (B,), device=device)
        lens[0] = 1  # one-token sequence
        if B > 1:
            lens[1] = T
    elif lengths is None:
        lens = None
    else:
        lens = torch.as_tensor(lengths, device=device)
    weights, biases, targets, cws = [], [], [], []
    for k, t in enumerate(tasks):
        C = t["C"]
        weights.append((torch.randn(C, D, **g) / D ** 0.5).requires_grad_(True))
        has_bias = True if bias_mask is None else bias_mask[k]
        biases.append((torch.randn(C, **g) * 0.1).requires_grad_(True) if has_bias else None)
        shape = (B,) if t["level"] == "sequence" else (B, T)
        y = torch.randint(0, C, shape, device=device)
        ign = t.get("ignore_index", -100)
        if ignore_frac:
            y = y.masked_fill(torch.rand(shape, device=device) < ignore_frac, ign)
        if k in all_ignored:
            y = torch.full(shape, ign, device=device, dtype=torch.long)
        targets.append(y)
        cws.append(torch.rand(C, **g) + 0.1 if t.get("class_weights") else None)
    kwargs = dict(
        biases=biases, lengths=lens, poolings=[t.get("pooling", "last") for t in tasks],
        ignore_index=[t.get("ignore_index", -100) for t in tasks],
        label_smoothing=[t.get("label_smoothing", 0.0) for t in tasks], class_weights=cws)
    return hidden, weights, targets, [t["level"] for t in tasks], kwargs


def params_of(hidden, weights, kwargs):
    return [hidden] + list(weights) + [b for b in kwargs["biases"] if b is not None]


def run_both(hidden, weights, targets, levels, kwargs, lambdas, loss_coeffs=None):
    """Total, losses and every gradient (of total + sum_k c_k L_k) for fastmtl and the reference."""
    out = []
    for fn in (multitask_cross_entropy, multitask_cross_entropy_reference):
        lam = [l.detach().clone().requires_grad_(True) if isinstance(l, torch.Tensor) else l for l in lambdas]
        total, losses = fn(hidden, weights, targets, levels, task_weights=lam, **kwargs)
        obj = total if loss_coeffs is None else total + (losses * loss_coeffs).sum()
        inputs = params_of(hidden, weights, kwargs) + [l for l in lam if isinstance(l, torch.Tensor)]
        grads = torch.autograd.grad(obj, inputs)
        out.append((total.detach(), losses.detach(), grads))
    return out


def assert_match(a, b, rtol, atol):
    (t1, l1, g1), (t2, l2, g2) = a, b
    torch.testing.assert_close(t1, t2, rtol=rtol, atol=atol)
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=atol)
    assert len(g1) == len(g2)
    for i, (x, y) in enumerate(zip(g1, g2)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: "gradient %d: %s" % (i, m))


CASES = {
    "k1_token_c2_full": dict(B=5, T=7, D=9, lengths=None, tasks=[dict(C=2, level="token")]),
    "k2_atis_like": dict(B=7, T=11, D=16, tasks=[dict(C=26, level="sequence", pooling="last"),
                                                  dict(C=33, level="token")]),
    "k3_poolings": dict(B=6, T=9, D=12, tasks=[dict(C=5, level="sequence", pooling="first"),
                                                dict(C=7, level="sequence", pooling="mean", label_smoothing=0.2),
                                                dict(C=97, level="sequence", pooling="max")]),
    "k4_weights_smoothing": dict(B=6, T=8, D=10, tasks=[
        dict(C=3, level="sequence", pooling="last_first", class_weights=True),
        dict(C=17, level="token", class_weights=True, label_smoothing=0.1, ignore_index=0),
        dict(C=4, level="token", label_smoothing=0.3, ignore_index=-1),
        dict(C=6, level="sequence", pooling="max", class_weights=True, label_smoothing=0.05)]),
    "k5_mixed_large_vocab": dict(B=8, T=25, D=8, tasks=[
        dict(C=30000, level="token", label_smoothing=0.1),  # > 1 chunk of logits
        dict(C=50, level="token"), dict(C=50, level="token", class_weights=True),
        dict(C=26, level="sequence", pooling="mean"), dict(C=5000, level="sequence", pooling="last")]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_float64(device, case):
    c = CASES[case]
    hidden, weights, targets, levels, kw = make_problem(device, torch.float64, c["B"], c["T"], c["D"], c["tasks"],
                                                        lengths=c.get("lengths", "random"))
    K = len(weights)
    lambdas = [torch.tensor(0.5 + k, dtype=torch.float64, device=device) if k % 2 == 0 else 1.0 + 0.25 * k
               for k in range(K)]
    a, b = run_both(hidden, weights, targets, levels, kw, lambdas)
    assert_match(a, b, rtol=1e-9, atol=1e-11)
    # gradients through the per-task losses as well (GradNorm-like use)
    coeffs = torch.randn(K, dtype=torch.float64, device=device)
    a, b = run_both(hidden, weights, targets, levels, kw, lambdas, loss_coeffs=coeffs)
    assert_match(a, b, rtol=1e-9, atol=1e-11)


def test_float32_noncontiguous_mixed_bias(device):
    tasks = [dict(C=26, level="sequence", pooling="max"), dict(C=130, level="token", label_smoothing=0.1),
             dict(C=7, level="token", class_weights=True), dict(C=3, level="sequence", pooling="mean")]
    hidden, weights, targets, levels, kw = make_problem(device, torch.float32, 9, 13, 24, tasks, noncontig=True,
                                                        bias_mask=[True, False, True, False])
    assert not hidden.is_contiguous()
    a, b = run_both(hidden, weights, targets, levels, kw, [1.0, 0.5, 2.0, 0.3])
    assert_match(a, b, rtol=1e-4, atol=1e-5)


def test_all_ignored_task_is_zero_not_nan(device):
    tasks = [dict(C=5, level="token"), dict(C=4, level="sequence", class_weights=True), dict(C=3, level="token")]
    hidden, weights, targets, levels, kw = make_problem(device, torch.float64, 4, 6, 8, tasks, all_ignored=(0, 1))
    a, b = run_both(hidden, weights, targets, levels, kw, [1.0, 2.0, 0.7], loss_coeffs=torch.ones(3).double())
    assert a[1][0].item() == 0.0 and a[1][1].item() == 0.0
    assert torch.isfinite(a[0]) and all(torch.isfinite(g).all() for g in a[2])
    assert_match(a, b, rtol=1e-9, atol=1e-11)
    # every task ignored: total 0 and zero gradients
    for y in targets:
        y.fill_(-100)
    total, losses = multitask_cross_entropy(hidden, weights, targets, levels, task_weights=[1.0, 2.0, 0.7], **kw)
    total.backward()
    assert total.item() == 0.0 and hidden.grad.abs().max().item() == 0.0


def test_padding_never_counts(device):
    # targets and hidden states beyond the lengths are garbage; they must not change anything
    tasks = [dict(C=6, level="token"), dict(C=4, level="sequence", pooling="max"),
             dict(C=3, level="sequence", pooling="mean")]
    hidden, weights, targets, levels, kw = make_problem(device, torch.float64, 5, 7, 8, tasks, ignore_frac=0)
    lens = kw["lengths"]
    pad = torch.arange(7, device=device)[None, :] >= lens[:, None]
    total1, losses1 = multitask_cross_entropy(hidden, weights, targets, levels, **kw)
    h2 = hidden.detach().masked_fill(pad[..., None], 1e3)
    y2 = targets[0].masked_fill(pad, 12345)  # out of range, but padding
    total2, losses2 = multitask_cross_entropy(h2, weights, [y2] + targets[1:], levels, **kw)
    torch.testing.assert_close(losses1, losses2, rtol=1e-12, atol=1e-12)
    (gh,) = torch.autograd.grad(total1, hidden)
    assert gh[pad].abs().max().item() == 0.0


def test_lambda_gradients_and_tensor_task_weights(device):
    tasks = [dict(C=5, level="token"), dict(C=4, level="sequence", pooling="first")]
    hidden, weights, targets, levels, kw = make_problem(device, torch.float64, 4, 6, 8, tasks)
    lam = torch.tensor([0.3, 1.7], dtype=torch.float64, device=device, requires_grad=True)
    total, losses = multitask_cross_entropy(hidden, weights, targets, levels, task_weights=lam, **kw)
    (g,) = torch.autograd.grad(total * 3.0, lam)
    torch.testing.assert_close(g, 3.0 * losses.detach())
    torch.testing.assert_close(total, (lam * losses).sum())


def test_retain_graph_second_backward(device):
    tasks = [dict(C=5, level="token"), dict(C=4, level="sequence")]
    hidden, weights, targets, levels, kw = make_problem(device, torch.float64, 4, 6, 8, tasks)
    total, _ = multitask_cross_entropy(hidden, weights, targets, levels, **kw)
    total.backward(retain_graph=True)
    g1 = [p.grad.clone() for p in params_of(hidden, weights, kw)]
    total.backward()
    for p, g in zip(params_of(hidden, weights, kw), g1):
        torch.testing.assert_close(p.grad, 2 * g)


def test_gradcheck_float64(device):
    tasks = [dict(C=3, level="sequence", pooling="mean", label_smoothing=0.1, class_weights=True),
             dict(C=4, level="token", label_smoothing=0.2), dict(C=2, level="sequence", pooling="last_first")]
    hidden, weights, targets, levels, kw = make_problem(device, torch.float64, 3, 4, 4, tasks)
    biases = kw.pop("biases")
    lam = torch.tensor([0.7, 1.3, 0.4], dtype=torch.float64, device=device, requires_grad=True)

    def fn(h, w0, w1, w2, b0, b1, b2, lam):
        total, losses = multitask_cross_entropy(h, [w0, w1, w2], targets, levels, biases=[b0, b1, b2],
                                                task_weights=lam, **kw)
        return total, losses

    assert torch.autograd.gradcheck(fn, (hidden, *weights, *biases, lam))


def test_float16_bfloat16_close_to_float64(device):
    tasks = [dict(C=26, level="sequence", pooling="mean"), dict(C=130, level="token", label_smoothing=0.1)]
    hidden, weights, targets, levels, kw = make_problem(device, torch.float64, 8, 12, 32, tasks)
    ref_total, ref_losses = multitask_cross_entropy_reference(hidden, weights, targets, levels, **kw)
    (ref_gh,) = torch.autograd.grad(ref_total, hidden)
    for dt in (torch.bfloat16, torch.float16):
        h = hidden.detach().to(dt).requires_grad_(True)
        ws = [w.detach().to(dt) for w in weights]
        kw2 = dict(kw, biases=[b.detach().to(dt) for b in kw["biases"]])
        errs = []
        for fn in (multitask_cross_entropy, multitask_cross_entropy_reference):
            total, losses = fn(h, ws, targets, levels, **kw2)
            assert total.dtype == dt and losses.dtype == dt
            (gh,) = torch.autograd.grad(total, h)
            errs.append(((losses.double() - ref_losses).abs().max().item(),
                         (gh.double() - ref_gh).abs().max().item()))
        # no worse than twice PyTorch's own error in the same precision (plus one rounding of the output)
        assert errs[0][0] <= 2 * errs[1][0] + 2e-2 * ref_losses.abs().max().item()
        assert errs[0][1] <= 2 * errs[1][1] + torch.finfo(dt).eps * ref_gh.abs().max().item()


@pytest.mark.parametrize("with_lengths", [True, False])
def test_predict_matches_reference(device, with_lengths):
    tasks = [dict(C=26, level="sequence", pooling=p) for p in POOLINGS] + [dict(C=130, level="token"),
                                                                          dict(C=5000, level="token")]
    hidden, weights, _, levels, kw = make_problem(device, torch.float32, 6, 9, 16, tasks,
                                                  lengths="random" if with_lengths else None, bias_mask=[
                                                      True, False, True, True, False, True, False])
    pk = dict(biases=kw["biases"], lengths=kw["lengths"], poolings=kw["poolings"])
    with torch.no_grad():
        got = multitask_predict(hidden, weights, levels, **pk)
        exp = multitask_predict_reference(hidden, weights, levels, **pk)
        for g, e in zip(got, exp):
            assert g.dtype == torch.long and g.shape == e.shape
            assert torch.equal(g, e)
        logits = multitask_predict(hidden, weights, levels, output="logits", **pk)
        logp = multitask_predict(hidden, weights, levels, output="log_probs", **pk)
        for k, (z, lp, e) in enumerate(zip(logits, logp, exp)):
            torch.testing.assert_close(lp, z.log_softmax(-1))
            am = z.argmax(-1)
            if levels[k] == "token" and with_lengths:
                am = am.masked_fill(e == -1, -1)
            assert torch.equal(am, e)


def test_multitask_heads_module(device):
    heads = MultiTaskHeads(16, [SequenceTask("intent", 26, pooling="mean"),
                                TokenTask("slots", 33, label_smoothing=0.1, weight=0.5),
                                TokenTask("pos", 7, class_weights=torch.rand(7) + 0.5, bias=False)]).to(device)
    assert set(heads.state_dict()) == {"intent.weight", "intent.bias", "slots.weight", "slots.bias", "pos.weight"}
    # loads from a plain PyTorch model
    plain = torch.nn.ModuleDict({"intent": torch.nn.Linear(16, 26), "slots": torch.nn.Linear(16, 33),
                                 "pos": torch.nn.Linear(16, 7, bias=False)})
    heads.load_state_dict(plain.state_dict())
    B, T = 5, 6
    hidden = torch.randn(B, T, 16, device=device, requires_grad=True)
    lengths = torch.tensor([6, 1, 3, 4, 2])
    y = {"intent": torch.randint(0, 26, (B,), device=device), "slots": torch.randint(0, 33, (B, T), device=device),
         "pos": torch.randint(0, 7, (B, T), device=device)}
    out = heads(hidden, lengths=lengths, targets=y)
    assert isinstance(out, TaskOutput) and set(out.losses) == {"intent", "slots", "pos"}
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask = mask.to(device)
    h = hidden.detach()
    ref_intent = F.cross_entropy(plain["intent"].to(device)((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)),
                                 y["intent"])
    ref_slots = F.cross_entropy(plain["slots"].to(device)(h[mask]), y["slots"][mask], label_smoothing=0.1)
    ref_pos = F.cross_entropy(plain["pos"].to(device)(h[mask]), y["pos"][mask],
                              weight=heads._class_weights("pos", h.dtype))
    torch.testing.assert_close(out.losses["intent"], ref_intent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["slots"], ref_slots, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["pos"], ref_pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_intent + 0.5 * ref_slots + ref_pos, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert heads["pos"].weight.grad is not None and heads["intent"].bias.grad is not None

    # a subset of the tasks, weights overridden per call (a 0-d tensor gets its gradient)
    w = torch.tensor(2.0, requires_grad=True, device=device)
    sub = heads(hidden, lengths=lengths, targets={"slots": y["slots"]}, weights={"slots": w})
    assert set(sub.losses) == {"slots"}
    torch.testing.assert_close(sub.loss, 2.0 * ref_slots, rtol=1e-5, atol=1e-6)
    sub.loss.backward()
    torch.testing.assert_close(w.grad, ref_slots.detach(), rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="unknown task.*'slot'"):
        heads(hidden, lengths=lengths, targets={"slot": y["slots"]})
    with pytest.raises(ValueError, match="unknown task"):
        heads(hidden, targets={"slots": y["slots"]}, weights={"nope": 1.0})

    pred = heads.predict(hidden, lengths)
    assert set(pred) == {"intent", "slots", "pos"} and pred["slots"].shape == (B, T)
    assert (pred["slots"][~mask] == -1).all() and (pred["slots"][mask] >= 0).all()
    logp = heads.predict(hidden, lengths, tasks=["intent"], output="log_probs")
    assert list(logp) == ["intent"] and logp["intent"].shape == (B, 26)


def test_module_errors():
    with pytest.raises(ValueError, match="duplicate"):
        MultiTaskHeads(8, [TokenTask("a", 3), TokenTask("a", 4)])
    with pytest.raises(ValueError, match="clashes"):
        MultiTaskHeads(8, [TokenTask("forward", 3)])
    with pytest.raises(ValueError, match="pooling"):
        SequenceTask("a", 3, pooling="median")
    with pytest.raises(ValueError, match="class_weights"):
        TokenTask("a", 3, class_weights=torch.ones(4))


def test_opcheck(device):
    tasks = [dict(C=5, level="token"), dict(C=4, level="sequence", pooling="max", class_weights=True)]
    hidden, weights, targets, levels, kw = make_problem(device, torch.float32, 3, 5, 8, tasks)
    cw = kw["class_weights"]
    tw = torch.tensor([0.5, 1.5], device=device)
    for grad in (True, False):
        args = (hidden, kw["lengths"], weights, kw["biases"], targets, cw, tw, [1, 0], [0, 3], [-100, -100],
                [0.1, 0.0], grad)
        torch.library.opcheck(torch.ops.fastmtl.multitask_loss.default, args)
    torch.library.opcheck(torch.ops.fastmtl.multitask_loss.default,
                          (hidden, None, weights, [None, None], targets, [None, None], tw, [1, 0], [0, 2],
                           [-100, -100], [0.0, 0.0], True))
    torch.library.opcheck(torch.ops.fastmtl.multitask_predict.default,
                          (hidden.detach(), kw["lengths"], [w.detach() for w in weights], [None, None], [1, 0],
                           [0, 4]))


def test_compile_fullgraph(device):
    torch.compiler.reset()
    heads = MultiTaskHeads(8, [SequenceTask("intent", 6, pooling="max"), TokenTask("slots", 9)]).to(device)
    B, T = 4, 5
    hidden = torch.randn(B, T, 8, device=device, requires_grad=True)
    lengths = torch.tensor([5, 1, 3, 4], device=device)
    y = {"intent": torch.randint(0, 6, (B,), device=device), "slots": torch.randint(0, 9, (B, T), device=device)}
    lam = torch.tensor(0.7, device=device, requires_grad=True)

    def step(h):
        out = heads(h, lengths=lengths, targets=y, weights={"slots": lam})
        return out.loss + 0.1 * out.losses["intent"]

    params = [hidden, lam] + list(heads.parameters())
    eager = torch.autograd.grad(step(hidden), params)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(hidden), params)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _bad(device):
    tasks = [dict(C=5, level="token"), dict(C=4, level="sequence")]
    return make_problem(device, torch.float32, 3, 5, 8, tasks, ignore_frac=0)


def test_bad_targets(device):
    hidden, weights, targets, levels, kw = _bad(device)
    y = targets[1].clone()
    y[2] = 4
    with pytest.raises(ValueError, match=r"targets\[1\] \(task 1\) has value 4"):
        multitask_cross_entropy(hidden, weights, [targets[0], y], levels, **kw)
    y = targets[0].clone()
    y[0, 0] = -3
    with pytest.raises(ValueError, match=r"task 0\) has value -3 at \(b=0, t=0\)"):
        multitask_cross_entropy(hidden, weights, [y, targets[1]], levels, **kw)
    with pytest.raises(ValueError, match=r"targets\[0\].*must have shape \(B, T\)"):
        multitask_cross_entropy(hidden, weights, [targets[0][:, :2], targets[1]], levels, **kw)
    with pytest.raises(ValueError, match=r"targets\[1\].*must have shape \(B,\)"):
        multitask_cross_entropy(hidden, weights, [targets[0], targets[0]], levels, **kw)
    with pytest.raises(TypeError, match=r"targets\[0\].*int64"):
        multitask_cross_entropy(hidden, weights, [targets[0].float(), targets[1]], levels, **kw)
    with pytest.raises(ValueError, match="targets must be a list of 2"):
        multitask_cross_entropy(hidden, weights, [targets[0]], levels, **kw)


def test_bad_shapes_and_lengths(device):
    hidden, weights, targets, levels, kw = _bad(device)
    with pytest.raises(ValueError, match=r"weights\[1\] \(task 1\) must have shape \(num_classes, D\) with D = "
                                         r"hidden.size\(2\) = 8"):
        multitask_cross_entropy(hidden, [weights[0], torch.randn(4, 7, device=device)], targets, levels, **kw)
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, T, D\)"):
        multitask_cross_entropy(hidden[0], weights, targets, levels, **kw)
    for bad, what in ((0, "lengths\\[1\\] = 0"), (-2, "lengths\\[1\\] = -2"), (6, "lengths\\[1\\] = 6")):
        lens = torch.tensor([5, bad, 2], device=device)
        with pytest.raises(ValueError, match=what + " is out of range"):
            multitask_cross_entropy(hidden, weights, targets, levels, **dict(kw, lengths=lens))
    with pytest.raises(ValueError, match=r"lengths must have shape \(B,\)"):
        multitask_cross_entropy(hidden, weights, targets, levels, **dict(kw, lengths=torch.tensor([1, 2])))
    with pytest.raises(TypeError, match="lengths must hold integers"):
        multitask_cross_entropy(hidden, weights, targets, levels, **dict(kw, lengths=torch.ones(3)))
    with pytest.raises(ValueError, match="level of task 1"):
        multitask_cross_entropy(hidden, weights, targets, ["token", "sentence"], **kw)
    with pytest.raises(ValueError, match="pooling of task 1"):
        multitask_cross_entropy(hidden, weights, targets, levels, **dict(kw, poolings=["last", "avg"]))
    with pytest.raises(TypeError, match=r"weights\[0\].*dtype"):
        multitask_cross_entropy(hidden, [weights[0].double(), weights[1]], targets, levels, **kw)
    with pytest.raises(ValueError, match="label_smoothings\\[0\\]"):
        multitask_cross_entropy(hidden, weights, targets, levels, **dict(kw, label_smoothing=[1.5, 0.0]))
    with pytest.raises(ValueError, match="class_weights\\[1\\]"):
        multitask_cross_entropy(hidden, weights, targets, levels,
                                **dict(kw, class_weights=[None, torch.ones(5, device=device)]))
    with pytest.raises(ValueError, match="even hidden size"):
        multitask_cross_entropy(hidden[..., :7], [w[:, :7] for w in weights], targets, levels,
                                **dict(kw, poolings="last_first"))


def test_autocast_runs_heads_in_lower_precision(device):
    # Under autocast the heads run in the autocast dtype (float32 accumulation) like nn.Linear does; float32
    # parameters still get float32 gradients, close to the float32 result.
    dt = torch.bfloat16
    heads = MultiTaskHeads(32, [SequenceTask("intent", 7, pooling="mean"), TokenTask("slots", 11)]).to(device)
    hidden = torch.randn(6, 9, 32, device=device, requires_grad=True)
    lengths = torch.randint(1, 10, (6,), device=device)
    targets = {"intent": torch.randint(0, 7, (6,), device=device), "slots": torch.randint(0, 11, (6, 9), device=device)}
    ref = heads(hidden, lengths=lengths, targets=targets)
    g_ref = torch.autograd.grad(ref.loss, [hidden, heads.slots.weight])
    with torch.autocast(device, dtype=dt):
        out = heads(hidden, lengths=lengths, targets=targets)
    g = torch.autograd.grad(out.loss, [hidden, heads.slots.weight])
    assert g[0].dtype == torch.float32 and g[1].dtype == torch.float32
    assert abs(out.loss.float().item() - ref.loss.item()) < 3e-2 * max(1.0, abs(ref.loss.item()))
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max().item() < 3e-2 * max(1.0, b.abs().max().item())
    assert out.loss.float().item() != ref.loss.item()  # it really ran in bfloat16


def test_nan_class_weight_propagates_like_torch(device):
    # a NaN class weight makes torch's loss NaN; it must not silently turn the task off (loss 0, zero gradients)
    B, T, D, C = 4, 5, 6, 7
    hidden = torch.randn(B, T, D, device=device, requires_grad=True)
    W = torch.randn(C, D, device=device, requires_grad=True)
    y = torch.randint(0, C, (B, T), device=device)
    cw = torch.rand(C, device=device) + 0.1
    cw[y[0, 0]] = float("nan")
    total, losses = multitask_cross_entropy(hidden, [W], [y], ["token"], class_weights=[cw])
    ref = F.cross_entropy((hidden @ W.t()).reshape(-1, C), y.reshape(-1), weight=cw)
    assert torch.isnan(ref) and torch.isnan(total) and torch.isnan(losses[0])
    g = torch.autograd.grad(total, W)[0]
    assert torch.isnan(g).any()


@pytest.mark.parametrize("output", ["labels", "logits", "log_probs"])
def test_predict_checks_lengths_on_every_output(device, output):
    hidden = torch.randn(3, 5, 8, device=device)
    W = [torch.randn(4, 8, device=device), torch.randn(6, 8, device=device)]
    for bad in ([5, 0, 2], [5, 6, 2]):
        with pytest.raises(ValueError, match=r"lengths\[1\] = -?\d+ is out of range"):
            multitask_predict(hidden, W, ["sequence", "token"], lengths=torch.tensor(bad, device=device),
                              output=output)
    with pytest.raises(ValueError, match=r"lengths must have shape \(B,\)"):
        multitask_predict(hidden, W, ["sequence", "token"], lengths=torch.tensor([5, 2], device=device),
                          output=output)


def test_one_pooling_by_hand_and_where_max_ties_go(device):
    """The library's one pooling (the reference, functional.pool_hidden, the double backward of the heads and the
    model's token_context vector) against each sequence's real states by hand; the gradient of a maximum that several
    steps reach goes to the first of them in the reference, as in the fused kernel, and is shared evenly in
    pool_hidden."""
    from fastmtl.functional.heads import pool_hidden
    from fastmtl.reference.heads import pool_hidden_reference

    B, T, D = 5, 7, 6
    hidden = torch.randn(B, T, D, device=device, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), device=device)
    lengths[0], lengths[1] = 1, T
    for lens in (lengths, None):
        L = lens.tolist() if lens is not None else [T] * B
        real = [hidden[b, :L[b]] for b in range(B)]
        want = {"last": torch.stack([r[-1] for r in real]), "first": hidden[:, 0],
                "mean": torch.stack([r.mean(0) for r in real]), "max": torch.stack([r.max(0).values for r in real]),
                "last_first": torch.stack([torch.cat([r[-1, :D // 2], r[0, D // 2:]]) for r in real])}
        for code, (name, w) in enumerate(want.items()):
            for pooling in (name, code):
                torch.testing.assert_close(pool_hidden_reference(hidden, lens, pooling), w)
                torch.testing.assert_close(pool_hidden(hidden, lens, pooling), w)
    with pytest.raises(ValueError, match="pooling of task 0"):
        pool_hidden(hidden, lengths, "median")
    with pytest.raises(ValueError, match="max_ties"):
        pool_hidden_reference(hidden, lengths, "max", max_ties="last")

    # ties: every value in {-1, -0.5, ..., 1}, so most features reach their maximum at several steps
    tied = (torch.randint(-2, 3, (B, T, D), device=device) / 2).double().requires_grad_(True)
    hits = [tied[b, :int(lengths[b])] == tied[b, :int(lengths[b])].max(0).values for b in range(B)]
    assert any(bool((h.sum(0) > 1).any()) for h in hits)
    (g_first,) = torch.autograd.grad(pool_hidden_reference(tied, lengths, "max").sum(), tied)
    (g_split,) = torch.autograd.grad(pool_hidden(tied, lengths, "max").sum(), tied)
    for b, hit in enumerate(hits):
        n = int(lengths[b])
        torch.testing.assert_close(g_first[b, :n], (hit & (hit.cumsum(0) == 1)).double())
        torch.testing.assert_close(g_split[b, :n], hit.double() / hit.sum(0))
        assert not g_first[b, n:].any() and not g_split[b, n:].any()
    # the fused kernel routes the gradient of max pooling as the reference does
    W = torch.randn(4, D, device=device, dtype=torch.float64)
    y = torch.randint(0, 4, (B,), device=device)
    kw = dict(lengths=lengths, poolings="max")
    (g_op,) = torch.autograd.grad(multitask_cross_entropy(tied, [W], [y], "sequence", **kw)[0], tied)
    (g_ref,) = torch.autograd.grad(multitask_cross_entropy_reference(tied, [W], [y], "sequence", **kw)[0], tied)
    torch.testing.assert_close(g_op, g_ref)


def test_double_backward_at_tied_maxima_follows_the_first_order_gradient(device):
    # the kernel's gradient of max pooling goes to the first of tied maxima; the double backward differentiates that
    # same function, so the second derivatives at the other tied steps are zero too
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    hidden[:, 3] = hidden[:, 1] = hidden.abs().amax(dim=1) + 1.0  # steps 1 and 3 tie for the maximum
    hidden = hidden.to(device).requires_grad_()
    w = torch.randn(4, 3, dtype=torch.float64, generator=g).to(device).requires_grad_()
    y = torch.tensor([1, 3], device=device)
    total, _ = multitask_cross_entropy(hidden, [w], [y], "sequence", poolings="max")
    (gh,) = torch.autograd.grad(total, hidden, create_graph=True)
    assert float(gh[:, 1].abs().sum()) > 0 and float(gh[:, 3].abs().sum()) == 0
    (d_tied,) = torch.autograd.grad(gh[:, 3].sum(), w, retain_graph=True)
    assert float(d_tied.abs().sum()) == 0
    (d_first,) = torch.autograd.grad(gh[:, 1].sum(), w)
    pooled = hidden.detach()[:, 1]  # the reference: the same first-order gradient written out, differentiated
    wr = w.detach().clone().requires_grad_()
    p = torch.softmax(pooled @ wr.T, dim=1)
    ref = ((p - F.one_hot(y, 4).to(p)) @ wr).sum() / 2
    (d_ref,) = torch.autograd.grad(ref, wr)
    torch.testing.assert_close(d_first, d_ref)
