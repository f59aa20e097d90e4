"""Transforms over the fastmtl ops: double backward (create_graph, gradgradcheck, gradient penalties, Hessians),
vmap (torch.func.vmap, jacrev, per-sample gradients with vmap(grad)), gradcheck with check_batched_grad, for the
LSTM ops (lstm_layer_forward/backward) and the heads ops (multitask_loss/predict).

Ground truth: torch.nn.LSTM (float64) and the pure-PyTorch references in fastmtl.reference, or a Python loop over
the vmapped dimension. Tiny shapes, random inputs (fresh seeds, see conftest.py).
"""
import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import fastmtl  # noqa: F401
import fastmtl.ops.lstm as ops_lstm
from fastmtl.functional import lstm as f_lstm
from fastmtl.functional import multitask_cross_entropy, multitask_predict
from fastmtl.nn import LSTM
from fastmtl.reference.heads import multitask_cross_entropy_reference, multitask_predict_reference
from fastmtl.reference.lstm import lstm_reference, torch_lstm_padded

F64 = torch.float64
FWD = torch.ops.fastmtl.lstm_layer_forward
BWD = torch.ops.fastmtl.lstm_layer_backward


def _close(a, b, atol=1e-10, rtol=1e-8, what=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: "%s: %s" % (what, m))


def _all_close(xs, ys, **kw):
    xs, ys = list(xs), list(ys)
    assert len(xs) == len(ys)
    for i, (a, b) in enumerate(zip(xs, ys)):
        _close(a, b, what="item %d" % i, **kw)


# ---------------------------------------------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------------------------------------------
def _layer(device, bi, bias, lengths, T=3, B=3, I=2, H=2, requires_grad=True):
    """Arguments of lstm_layer_forward: x (T, B, I), lengths (sorted, one full) or None, hx, cx, weights."""
    D = 2 if bi else 1
    g = dict(dtype=F64, device=device)
    x = torch.randn(T, B, I, **g)
    hx, cx = torch.randn(D, B, H, **g), torch.randn(D, B, H, **g)
    ws = []
    for _ in range(D):
        ws += [torch.randn(4 * H, I, **g) * 0.6, torch.randn(4 * H, H, **g) * 0.6]
        if bias:
            ws += [torch.randn(4 * H, **g) * 0.3, torch.randn(4 * H, **g) * 0.3]
    lens = None
    if lengths:
        lens = torch.sort(torch.randint(1, T + 1, (B,)), descending=True).values
        lens[0] = T
    if requires_grad:
        x, hx, cx = (t.requires_grad_(True) for t in (x, hx, cx))
        ws = [w.requires_grad_(True) for w in ws]
    return x, lens, hx, cx, ws


def _ref_layer(x, lens, hx, cx, ws, bi):
    out, (hy, cy) = lstm_reference(x, (hx, cx), ws, 1, bi, False, lens)
    return out, hy, cy


def _op_layer(x, lens, hx, cx, ws, bi):
    return FWD(x, lens, hx, cx, list(ws), bi, True)[:3]


LAYER_CASES = [  # bi, bias, lengths
    (False, True, False),
    (False, False, True),
    (True, True, True),
    (True, False, False),
]


@pytest.mark.parametrize("bi,bias,lengths", LAYER_CASES)
def test_lstm_layer_gradgradcheck(device, bi, bias, lengths):
    x, lens, hx, cx, ws = _layer(device, bi, bias, lengths)

    def fn(x, hx, cx, *ws):
        return _op_layer(x, lens, hx, cx, ws, bi)

    assert torch.autograd.gradgradcheck(fn, (x, hx, cx, *ws), fast_mode=True)


def test_lstm_layer_gradgradcheck_full_jacobian(device):
    # Slow mode (every entry of the second-order Jacobian) on the smallest shapes.
    x, lens, hx, cx, ws = _layer(device, False, True, True, T=2, B=2, I=1, H=1)

    def fn(x, hx, cx, *ws):
        return _op_layer(x, lens, hx, cx, ws, False)

    assert torch.autograd.gradgradcheck(fn, (x, hx, cx, *ws))


def test_functional_lstm_gradgradcheck(device):
    # Two layers, both directions, unsorted lengths (the functional layer sorts and unsorts), given states.
    L, E, H, B, T = 2, 1, 1, 3, 3
    m = LSTM(E, H, L, bidirectional=True, dtype=F64, device=device)
    ws = [w.detach().clone().requires_grad_(True) for w in m._flat_weights]
    x = torch.randn(T, B, E, dtype=F64, device=device, requires_grad=True)
    h0, c0 = (torch.randn(2 * L, B, H, dtype=F64, device=device, requires_grad=True) for _ in range(2))
    lengths = torch.tensor([2, 3, 1])

    def fn(x, h0, c0, *w):
        out, (h, c) = f_lstm(x, (h0, c0), list(w), L, True, False, 0.0, False, lengths)
        return out, h, c

    assert torch.autograd.gradgradcheck(fn, (x, h0, c0, *ws), fast_mode=True)


def test_lstm_double_backward_matches_torch(device):
    # A gradient penalty (second order through input, states and every weight) against torch.nn.LSTM.
    E, H, L, B, T = 3, 4, 2, 4, 5
    ours = LSTM(E, H, L, bidirectional=True, batch_first=True, dtype=F64, device=device)
    ref = torch.nn.LSTM(E, H, L, bidirectional=True, batch_first=True, dtype=F64, device=device)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(B, T, E, dtype=F64, device=device, requires_grad=True)
    h0 = torch.randn(2 * L, B, H, dtype=F64, device=device, requires_grad=True)
    c0 = torch.randn(2 * L, B, H, dtype=F64, device=device, requires_grad=True)
    lengths = torch.tensor([5, 2, 4, 1])
    target = torch.randn(B, T, 2 * H, dtype=F64, device=device)
    results = []
    for mod, run in ((ours, lambda: ours(x, (h0, c0), lengths=lengths)),
                     (ref, lambda: torch_lstm_padded(ref, x, lengths, (h0, c0)))):
        params = [x, h0, c0] + list(mod.parameters())
        out, (h, c) = run()
        loss = ((out - target) ** 2).sum() + (h * c).sum()
        gs = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum((g ** 2).sum() for g in gs)
        results.append(torch.autograd.grad(penalty, params))
    _all_close(results[0], results[1], atol=1e-9, rtol=1e-7)


def test_lstm_double_backward_keeps_the_fused_first_backward(device, monkeypatch):
    # create_graph=True still runs the fused backward; the recomputation runs only when differentiated again.
    calls = []
    real = ops_lstm._reference_layer
    monkeypatch.setattr(ops_lstm, "_reference_layer", lambda *a: calls.append(1) or real(*a))
    x, lens, hx, cx, ws = _layer(device, True, True, True)
    out, hy, cy = _op_layer(x, lens, hx, cx, ws, True)
    gs = torch.autograd.grad(out.square().sum() + hy.sum(), [x] + ws, create_graph=True)
    assert not calls and all(g.requires_grad for g in gs)
    (gx2,) = torch.autograd.grad(sum(g.square().sum() for g in gs), [x])
    assert calls
    ro, rh, _ = _ref_layer(x, lens, hx, cx, ws, True)
    rgs = torch.autograd.grad(ro.square().sum() + rh.sum(), [x] + ws, create_graph=True)
    _all_close(gs, rgs)
    _close(gx2, torch.autograd.grad(sum(g.square().sum() for g in rgs), [x])[0])


@pytest.mark.parametrize("bi,bias,lengths", LAYER_CASES[1:3])
def test_lstm_layer_gradcheck_batched_grad(device, bi, bias, lengths):
    x, lens, hx, cx, ws = _layer(device, bi, bias, lengths)

    def fn(x, hx, cx, *ws):
        return _op_layer(x, lens, hx, cx, ws, bi)

    assert torch.autograd.gradcheck(fn, (x, hx, cx, *ws), check_batched_grad=True, fast_mode=True)


def test_functional_lstm_gradcheck_batched_grad(device):
    m = LSTM(2, 2, 2, bidirectional=True, dtype=F64, device=device)
    ws = [w.detach().clone().requires_grad_(True) for w in m._flat_weights]
    x = torch.randn(3, 3, 2, dtype=F64, device=device, requires_grad=True)
    lengths = [1, 3, 2]

    def fn(x, *w):
        out, (h, c) = f_lstm(x, None, list(w), 2, True, False, 0.0, False, lengths)
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, *ws), check_batched_grad=True)


# Which arguments of lstm_layer_forward are vmapped: "x" alone and "x+state" fold into one call; "state" (input
# shared, states per sample) folds too; "weights" and "lengths" loop.
VMAP_CASES = ["x", "x+state", "state", "weights", "lengths"]


def _vmapped_layer_args(device, bi, case, N=3):
    x, lens, hx, cx, ws = _layer(device, bi, True, True, requires_grad=False)
    X = torch.randn(N, *x.shape, dtype=F64, device=device) if case in ("x", "x+state", "weights", "lengths") else x
    HX = torch.randn(N, *hx.shape, dtype=F64, device=device) if "state" in case else hx
    CX = torch.randn(N, *cx.shape, dtype=F64, device=device) if "state" in case else cx
    WS = [torch.randn(N, *w.shape, dtype=F64, device=device) * 0.5 for w in ws] if case == "weights" else ws
    T, B = x.shape[:2]
    LENS = torch.stack([torch.sort(torch.randint(1, T + 1, (B,)), descending=True).values for _ in range(N)]) \
        if case == "lengths" else lens
    dims = (0 if X is not x else None, 0 if LENS is not lens else None, 0 if HX is not hx else None,
            0 if CX is not cx else None, [0] * len(ws) if WS is not ws else None)
    return (X, LENS, HX, CX, WS), dims


def _take(args, dims, n):
    out = []
    for a, d in zip(args, dims):
        if d is None:
            out.append(a)
        elif isinstance(a, list):
            out.append([t[n] for t in a])
        else:
            out.append(a[n])
    return out


@pytest.mark.parametrize("case", VMAP_CASES)
@pytest.mark.parametrize("bi", [False, True])
def test_lstm_vmap_forward_and_backward_match_loop(device, bi, case):
    N = 3
    args, dims = _vmapped_layer_args(device, bi, case, N)
    got = vmap(lambda x, l, h, c, w: _op_layer(x, l, h, c, w, bi), in_dims=dims)(*args)
    for n in range(N):
        want = _ref_layer(*_take(args, dims, n), bi)
        _all_close([g[n] for g in got], want)

    # The backward op under vmap, with the cotangents vmapped too, against a loop of plain calls.
    X, LENS, HX, CX, WS = args
    shapes = [tuple(t.shape[1:]) if d is not None else tuple(t.shape) for t, d in ((X, dims[0]), (HX, dims[2]))]
    T, B = shapes[0][:2]
    D, H = shapes[1][0], shapes[1][2]
    GO = torch.randn(N, T, B, D * H, dtype=F64, device=device)
    GH, GC = torch.randn(N, D, B, H, dtype=F64, device=device), torch.randn(N, D, B, H, dtype=F64, device=device)

    def bwd(go, gh, gc, x, l, h, c, w):
        out, _, _, reserve = FWD(x, l, h, c, w, bi, True)
        return BWD(go, gh, gc, x, l, h, c, w, bi, out, reserve)

    got = vmap(bwd, in_dims=(0, 0, 0) + dims)(GO, GH, GC, *args)
    for n in range(N):
        want = bwd(GO[n], GH[n], GC[n], *_take(args, dims, n))
        _all_close([got[0][n], got[1][n], got[2][n]] + [g[n] for g in got[3]],
                   [want[0], want[1], want[2]] + list(want[3]))


def test_lstm_vmap_backward_only_cotangents(device):
    # jacrev-like: one real forward, only the incoming gradients vmapped (reserve and output not vmapped).
    x, lens, hx, cx, ws = _layer(device, True, True, True, requires_grad=False)
    out, hy, cy, reserve = FWD(x, lens, hx, cx, ws, True, True)
    N = 4
    GO = torch.randn(N, *out.shape, dtype=F64, device=device)
    GH = torch.randn(N, *hy.shape, dtype=F64, device=device)
    got = vmap(lambda go, gh: BWD(go, gh, cy, x, lens, hx, cx, ws, True, out, reserve))(GO, GH)
    for n in range(N):
        want = BWD(GO[n], GH[n], cy, x, lens, hx, cx, ws, True, out, reserve)
        _all_close([got[0][n], got[1][n], got[2][n]] + [g[n] for g in got[3]],
                   [want[0], want[1], want[2]] + list(want[3]))


@pytest.mark.parametrize("bi,L,lengths", [(False, 1, None), (True, 2, None), (True, 2, [4, 2, 3])])
def test_per_sample_grads_match_torch_loop(device, bi, L, lengths, monkeypatch):
    # vmap(grad(...)) over functional_call of fastmtl.nn.LSTM against a loop over torch.nn.LSTM.
    folds = []
    real = ops_lstm._backward_vmap_fold
    monkeypatch.setattr(ops_lstm, "_backward_vmap_fold", lambda *a: folds.append(1) or real(*a))
    E, H, N, T = 3, 4, 5, 4
    ours = LSTM(E, H, L, bidirectional=bi, batch_first=True, dtype=F64, device=device)
    ref = torch.nn.LSTM(E, H, L, bidirectional=bi, batch_first=True, dtype=F64, device=device)
    ref.load_state_dict(ours.state_dict())
    params = {k: v.detach() for k, v in ours.named_parameters()}
    D = 2 if bi else 1
    if lengths is None:  # one unbatched sequence per sample
        X = torch.randn(N, T, E, dtype=F64, device=device)
        Y = torch.randn(N, T, D * H, dtype=F64, device=device)
    else:  # a padded batch per sample, the same lengths for every sample
        X = torch.randn(N, len(lengths), T, E, dtype=F64, device=device)
        Y = torch.randn(N, len(lengths), T, D * H, dtype=F64, device=device)

    def loss_ours(p, x, y):
        out, (h, c) = functional_call(ours, p, (x,), {"lengths": lengths} if lengths else {})
        return ((out - y) ** 2).sum() + (h * c).sum()

    got = vmap(grad(loss_ours), in_dims=(None, 0, 0))(params, X, Y)
    assert folds, "the vmapped backward should run as one folded call"
    for n in range(N):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        out, (h, c) = functional_call(ref, p, (X[n],)) if lengths is None else \
            torch_lstm_padded(functional_call_module(ref, p), X[n], lengths)
        loss = ((out - Y[n]) ** 2).sum() + (h * c).sum()
        want = torch.autograd.grad(loss, list(p.values()))
        for k, w in zip(p, want):
            _close(got[k][n], w, atol=1e-9, rtol=1e-7, what=k)


def functional_call_module(module, params):
    """``module`` with its parameters replaced by ``params`` (torch.nn.LSTM over packed input needs the module)."""
    clone = type(module)(module.input_size, module.hidden_size, module.num_layers, bias=module.bias,
                         batch_first=module.batch_first, bidirectional=module.bidirectional, dtype=F64,
                         device=next(iter(params.values())).device)
    with torch.no_grad():
        for k, v in params.items():
            getattr(clone, k).copy_(v)
    for k, v in params.items():  # keep the graph to params: reassign as non-leaf tensors
        delattr(clone, k)
        setattr(clone, k, v)
    clone._init_flat_weights()
    return clone


def test_jacrev_matches_torch(device):
    E, H, B, T = 2, 3, 2, 3
    ours = LSTM(E, H, 1, bidirectional=True, dtype=F64, device=device)
    ref = torch.nn.LSTM(E, H, 1, bidirectional=True, dtype=F64, device=device)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, E, dtype=F64, device=device)
    lengths = [3, 1]
    J = jacrev(lambda x: ours(x, lengths=lengths)[0])(x)
    J_ref = torch.autograd.functional.jacobian(lambda x: torch_lstm_padded(ref, x, lengths)[0], x)
    _close(J, J_ref)
    # with respect to every weight
    params = {k: v.detach() for k, v in ours.named_parameters()}
    Jw = jacrev(lambda p: functional_call(ours, p, (x,))[1][0])(params)
    names = list(params)
    Jw_ref = torch.autograd.functional.jacobian(
        lambda *ps: functional_call(ref, dict(zip(names, ps)), (x,))[1][0], tuple(params.values()))
    for k, j in zip(names, Jw_ref):
        _close(Jw[k], j, what=k)


def test_hessian_and_grad_of_vmap(device):
    x, lens, hx, cx, ws = _layer(device, True, True, True, T=2, B=2, I=2, H=2, requires_grad=False)

    def f(fn):
        return lambda x: (fn(x, lens, hx, cx, ws, True)[0] ** 2).sum() + fn(x, lens, hx, cx, ws, True)[1].sum()

    _close(jacrev(jacrev(f(_op_layer)))(x), jacrev(jacrev(f(_ref_layer)))(x))
    # grad(vmap(...)) with respect to the weights (an autograd level below the vmap)
    X = torch.randn(3, *x.shape, dtype=F64, device=device)

    def g(fn):
        return lambda w: (vmap(lambda xx: fn(xx, lens, hx, cx, w, True)[0])(X) ** 2).sum()

    _all_close(grad(g(_op_layer))(ws), grad(g(_ref_layer))(ws))


def test_grad_of_per_sample_grads(device):
    # A penalty on per-sample gradients: the vmapped backward is differentiated by an outer grad.
    x, lens, hx, cx, ws = _layer(device, True, True, True, requires_grad=False)
    X = torch.randn(3, *x.shape, dtype=F64, device=device)

    def penalty(fn):
        def loss(w, xx):
            o, h, c = fn(xx, lens, hx, cx, w, True)
            return (o ** 2).sum() + (h * c).sum()
        return lambda w: sum((g ** 2).sum() for g in vmap(grad(loss), in_dims=(None, 0))(w, X))

    _all_close(grad(penalty(_op_layer))(ws), grad(penalty(_ref_layer))(ws), atol=1e-9, rtol=1e-7)


def test_nested_vmap(device):
    # vmap(vmap(grad(...))) and vmap(vmap(backward op)): the inner rules see tensors batched at the outer level.
    x, lens, hx, cx, ws = _layer(device, True, True, True, requires_grad=False)
    X = torch.randn(2, 3, *x.shape, dtype=F64, device=device)

    def loss(fn):
        return lambda w, xx: (fn(xx, lens, hx, cx, w, True)[0] ** 2).sum() + fn(xx, lens, hx, cx, w, True)[2].sum()

    def per_sample(fn):
        return vmap(vmap(grad(loss(fn)), in_dims=(None, 0)), in_dims=(None, 0))(ws, X)

    _all_close(per_sample(_op_layer), per_sample(_ref_layer), atol=1e-9, rtol=1e-7)
    out, hy, cy, reserve = FWD(x, lens, hx, cx, ws, True, True)
    GO = torch.randn(2, 3, *out.shape, dtype=F64, device=device)
    got = vmap(vmap(lambda go: BWD(go, hy, cy, x, lens, hx, cx, ws, True, out, reserve)))(GO)
    for i in range(2):
        for j in range(3):
            want = BWD(GO[i, j], hy, cy, x, lens, hx, cx, ws, True, out, reserve)
            _all_close([got[0][i, j], got[1][i, j]] + [g[i, j] for g in got[3]],
                       [want[0], want[1]] + list(want[3]))


def test_vmap_without_grad_returns_a_reserve_placeholder(device):
    # Under vmap the reserve is not per-sample data: the forward returns a zero-memory placeholder of the right
    # shape, and a vmapped backward recomputes what it needs.
    x, lens, hx, cx, ws = _layer(device, False, True, True, requires_grad=False)
    X = torch.randn(2, *x.shape, dtype=F64, device=device)
    reserve = vmap(lambda xx: FWD(xx, lens, hx, cx, ws, False, True)[3])(X)
    assert reserve.shape == (2, 1, x.shape[0], x.shape[1], 5 * hx.shape[-1])
    assert vmap(lambda xx: FWD(xx, lens, hx, cx, ws, False, False)[3])(X).numel() == 0


def test_opcheck_backward_op_with_grad(device):
    # The backward op is differentiable now: opcheck's autograd and AOT checks run through its double backward.
    x, lens, hx, cx, ws = _layer(device, False, True, True, T=2, B=2, I=1, H=1)
    with torch.no_grad():
        out, hy, cy, reserve = FWD(x, lens, hx, cx, ws, False, True)
    go = torch.randn_like(out).requires_grad_(True)
    args = (go, torch.randn_like(hy), torch.randn_like(cy), x, lens, hx, cx, ws, False, out, reserve)
    torch.library.opcheck(BWD.default, args)


def test_forward_mode_is_a_clear_error(device):
    # No jvp rule: forward-mode AD must fail loudly rather than drop the tangents.
    x, lens, hx, cx, ws = _layer(device, True, True, True, requires_grad=False)
    with pytest.raises(RuntimeError, match="forward-mode AD.*fastmtl::lstm_layer_forward"):
        torch.func.jacfwd(lambda x: _op_layer(x, lens, hx, cx, ws, True)[0])(x)
    with pytest.raises(RuntimeError, match="forward-mode AD.*fastmtl::lstm_layer_"):
        torch.func.jacfwd(grad(lambda x: _op_layer(x, lens, hx, cx, ws, True)[0].sum()))(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            _op_layer(dual, lens, hx, cx, ws, True)
    hidden, weights, biases, targets, levels, kw, lam = _heads(device, TASKS)
    with pytest.raises(RuntimeError, match="forward-mode AD.*fastmtl::multitask_loss"):
        torch.func.jvp(lambda h: multitask_cross_entropy(h, weights, targets, levels, biases=biases, **kw)[0],
                       (hidden,), (torch.randn_like(hidden),))


# ---------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------
TASKS = [dict(C=3, level="sequence", pooling="mean", label_smoothing=0.1, class_weights=True),
         dict(C=4, level="token", label_smoothing=0.2, ignore_index=0),
         dict(C=2, level="sequence", pooling="last_first")]
TASKS_2 = [dict(C=3, level="sequence", pooling="max"), dict(C=2, level="sequence", pooling="first"),
           dict(C=3, level="token", class_weights=True), dict(C=2, level="sequence", pooling="last")]


def _heads(device, tasks, B=3, T=4, D=4, lengths=True):
    g = dict(dtype=F64, device=device)
    K = len(tasks)
    hidden = torch.randn(B, T, D, **g)
    weights = [torch.randn(t["C"], D, **g) / D ** 0.5 for t in tasks]
    biases = [torch.randn(t["C"], **g) * 0.1 for t in tasks]
    targets = []
    for t in tasks:
        y = torch.randint(0, t["C"], (B,) if t["level"] == "sequence" else (B, T), device=device)
        y = y.masked_fill(torch.rand(y.shape, device=device) < 0.2, t.get("ignore_index", -100))
        targets.append(y)
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), device=device)
        lens[0] = T
    kw = dict(lengths=lens, poolings=[t.get("pooling", "last") for t in tasks],
              ignore_index=[t.get("ignore_index", -100) for t in tasks],
              label_smoothing=[t.get("label_smoothing", 0.0) for t in tasks],
              class_weights=[torch.rand(t["C"], **g) + 0.1 if t.get("class_weights") else None for t in tasks])
    lam = torch.rand(K, **g) + 0.2
    return hidden, weights, biases, targets, [t["level"] for t in tasks], kw, lam


def _loss(fn, hidden, weights, biases, targets, levels, kw, lam, coef=0.3):
    lam_arg = list(lam) if fn is multitask_cross_entropy_reference else lam
    total, losses = fn(hidden, weights, targets, levels, biases=biases, task_weights=lam_arg, **kw)
    return total + coef * (losses * torch.arange(1, losses.numel() + 1, dtype=losses.dtype,
                                                  device=losses.device)).sum()


@pytest.mark.parametrize("tasks,lengths", [(TASKS, True), (TASKS_2, False)])
def test_heads_gradgradcheck(device, tasks, lengths):
    hidden, weights, biases, targets, levels, kw, lam = _heads(device, tasks, B=2, T=3, D=2, lengths=lengths)
    K = len(tasks)

    def fn(h, lam, *wb):
        return multitask_cross_entropy(h, list(wb[:K]), targets, levels, biases=list(wb[K:]), task_weights=lam,
                                       **kw)

    args = [t.requires_grad_(True) for t in (hidden, lam, *weights, *biases)]
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def test_heads_gradgradcheck_tied_weights(device):
    # one weight tensor used by two tasks (tied heads): the double backward sums its two partial derivatives once each
    hidden, weights, biases, targets, levels, kw, lam = _heads(device, [dict(C=3, level="token"),
                                                                        dict(C=3, level="sequence", pooling="max")],
                                                               B=2, T=3, D=2)

    def fn(h, lam, w, b0, b1):
        return multitask_cross_entropy(h, [w, w], targets, levels, biases=[b0, b1], task_weights=lam, **kw)

    args = [t.requires_grad_(True) for t in (hidden, lam, weights[0], *biases)]
    assert torch.autograd.gradgradcheck(fn, args)


def test_heads_double_backward_matches_reference(device):
    hidden, weights, biases, targets, levels, kw, lam = _heads(device, TASKS + TASKS_2[:1])
    params = [t.requires_grad_(True) for t in [hidden, lam] + weights + biases]
    results = []
    for fn in (multitask_cross_entropy, multitask_cross_entropy_reference):
        loss = _loss(fn, hidden, weights, biases, targets, levels, kw, lam)
        gs = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum((g ** 2).sum() for g in gs)
        results.append(torch.autograd.grad(penalty, params))
    _all_close(results[0], results[1])


def test_heads_gradcheck_batched_grad(device):
    hidden, weights, biases, targets, levels, kw, lam = _heads(device, TASKS)
    K = len(TASKS)

    def fn(h, lam, *wb):
        return multitask_cross_entropy(h, list(wb[:K]), targets, levels, biases=list(wb[K:]), task_weights=lam,
                                       **kw)

    args = [t.requires_grad_(True) for t in (hidden, lam, *weights, *biases)]
    assert torch.autograd.gradcheck(fn, args, check_batched_grad=True)


def test_heads_mixed_bias_list_gets_bias_gradients(device):
    # At the op level a bias list may mix tensors and None; the present biases get their gradients.
    hidden, weights, biases, targets, levels, kw, lam = _heads(device, TASKS[:2])
    biases = [biases[0].requires_grad_(True), None]
    hidden.requires_grad_(True)
    total = torch.ops.fastmtl.multitask_loss(
        hidden, kw["lengths"], weights, biases, targets, kw["class_weights"], lam, [0, 1], [2, 0],
        kw["ignore_index"], kw["label_smoothing"], True)[0]
    got = torch.autograd.grad(total, [hidden, biases[0]])
    ref, _ = multitask_cross_entropy_reference(hidden, weights, targets, levels, biases=biases,
                                               task_weights=list(lam), **kw)
    _all_close(got, torch.autograd.grad(ref, [hidden, biases[0]]))


def test_heads_vmap_matches_loop(device):
    hidden, weights, biases, targets, levels, kw, lam = _heads(device, TASKS)
    N = 3
    H = torch.randn(N, *hidden.shape, dtype=F64, device=device)
    Y = [torch.stack([y[torch.randperm(y.shape[0])] for _ in range(N)]) for y in targets]

    # per-sample (total, losses)
    got = vmap(lambda h, y: multitask_cross_entropy(h, weights, y, levels, biases=biases, task_weights=lam, **kw))(
        H, Y)
    for n in range(N):
        want = multitask_cross_entropy_reference(H[n], weights, [y[n] for y in Y], levels, biases=biases,
                                                 task_weights=list(lam), **kw)
        _all_close([got[0][n], got[1][n]], want)

    # per-sample gradients with respect to the heads' weights, biases and lambda
    def loss(p, h, y):
        w, b, lm = p
        return _loss(multitask_cross_entropy, h, w, b, y, levels, kw, lm)

    got = vmap(grad(loss), in_dims=(None, 0, 0))((weights, biases, lam), H, Y)
    for n in range(N):
        p = [t.clone().requires_grad_(True) for t in weights + biases + [lam]]
        ref = _loss(multitask_cross_entropy_reference, H[n], p[:3], p[3:6], [y[n] for y in Y], levels, kw, p[6])
        want = torch.autograd.grad(ref, p)
        _all_close([g[n] for g in got[0]] + [g[n] for g in got[1]] + [got[2][n]], want)


def test_heads_jacrev_and_hessian(device):
    hidden, weights, biases, targets, levels, kw, lam = _heads(device, TASKS, B=2, T=3, D=4)

    def losses(fn):
        lam_arg = lambda: list(lam) if fn is multitask_cross_entropy_reference else lam  # noqa: E731
        return lambda h: fn(h, weights, targets, levels, biases=biases, task_weights=lam_arg(), **kw)[1]

    _close(jacrev(losses(multitask_cross_entropy))(hidden),
           torch.autograd.functional.jacobian(losses(multitask_cross_entropy_reference), hidden))

    def scalar(fn):
        return lambda h: _loss(fn, h, weights, biases, targets, levels, kw, lam)

    _close(jacrev(jacrev(scalar(multitask_cross_entropy)))(hidden),
           torch.autograd.functional.hessian(scalar(multitask_cross_entropy_reference), hidden))


def test_heads_predict_vmap(device):
    hidden, weights, biases, targets, levels, kw, lam = _heads(device, TASKS + TASKS_2[:2])
    poolings = kw["poolings"]
    N = 3
    H = torch.randn(N, *hidden.shape, dtype=F64, device=device)
    T = hidden.shape[1]
    LENS = torch.randint(1, T + 1, (N, hidden.shape[0]), device=device)
    W = [torch.randn(N, *w.shape, dtype=F64, device=device) for w in weights]

    def check(got, n, w, lens):
        want = multitask_predict_reference(H[n], w, levels, biases=biases, lengths=lens, poolings=poolings)
        for a, b in zip(got, want):
            assert torch.equal(a[n], b)

    # one folded call: shared lengths, then per-sample lengths
    got = vmap(lambda h: multitask_predict(h, weights, levels, biases=biases, lengths=kw["lengths"],
                                           poolings=poolings))(H)
    for n in range(N):
        check(got, n, weights, kw["lengths"])
    got = vmap(lambda h, l: multitask_predict(h, weights, levels, biases=biases, lengths=l, poolings=poolings))(
        H, LENS)
    for n in range(N):
        check(got, n, weights, LENS[n])
    # per-sample weights: one call per sample
    got = vmap(lambda h, w: multitask_predict(h, w, levels, biases=biases, lengths=kw["lengths"],
                                              poolings=poolings))(H, W)
    for n in range(N):
        check(got, n, [w[n] for w in W], kw["lengths"])


def test_vjp_fn_called_after_vjp_exits(device):
    # torch.func.vjp's vjp_fn used outside the transform, with a cotangent that requires grad (the autograd
    # Function then receives dead functorch wrappers and must unwrap them as Function.apply does)
    m = fastmtl.nn.LSTM(3, 4, bidirectional=True).double().to(device)
    ref = torch.nn.LSTM(3, 4, bidirectional=True).double().to(device)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    out, vjp_fn = torch.func.vjp(lambda x: m(x)[0], x)
    out_r, vjp_r = torch.func.vjp(lambda x: ref(x)[0], x)
    torch.testing.assert_close(out, out_r)
    cot = torch.randn_like(out, requires_grad=True)
    (gx,) = vjp_fn(cot)
    (gx_r,) = vjp_r(cot)
    torch.testing.assert_close(gx, gx_r)
    w = torch.randn_like(gx)
    torch.testing.assert_close(torch.autograd.grad((gx * w).sum(), cot)[0],
                               torch.autograd.grad((gx_r * w).sum(), cot)[0])
