"""torch.ops.fastmtl.lstm_layer_backward_multi: K output gradients against one saved forward.

Ground truth: K calls of lstm_layer_backward (itself checked against torch.nn.LSTM in test_lstm.py) on the same
saved forward, and torch.func.vjp per cotangent for the vmap-of-vjp path that uses the op.
"""
import pytest
import torch

import fastmtl
from fastmtl.ops import lstm as ops_lstm


def _layer(device, dtype, T, B, I, H, bi, bias, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = 2 if bi else 1
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    x, hx, cx = rnd(T, B, I), rnd(D, B, H), rnd(D, B, H)
    ws = []
    for _ in range(D):
        ws += [rnd(4 * H, I) * 0.4, rnd(4 * H, H) * 0.4]
        if bias:
            ws += [rnd(4 * H), rnd(4 * H)]
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.long)
    out, hy, cy, res = torch.ops.fastmtl.lstm_layer_forward(x, lens, hx, cx, ws, bi, True)
    return x, lens, hx, cx, ws, out, res


def _cotangents(K, T, B, H, D, dtype, device, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(K, T, B, D * H, generator=g, dtype=dtype)
    if lens is not None:  # the op's output is zero at padded positions; so is a real incoming gradient
        go = go * (torch.arange(T)[:, None] < lens[None, :]).to(dtype)[None, :, :, None]
    ghy = torch.randn(K, D, B, H, generator=g, dtype=dtype)
    gcy = torch.randn(K, D, B, H, generator=g, dtype=dtype)
    return go.to(device), ghy.to(device), gcy.to(device)


CASES = [
    # T, B, I, H, bi, bias, lengths, K
    (5, 4, 3, 6, True, True, [5, 5, 3, 1], 3),
    (5, 4, 3, 6, False, True, None, 2),
    (7, 3, 5, 17, True, False, [7, 2, 1], 4),
    (4, 1, 2, 3, True, True, [2], 1),
    (6, 5, 4, 33, True, True, [6, 6, 4, 4, 2], 5),
    (3, 9, 2, 40, False, False, [3, 3, 3, 2, 2, 2, 1, 1, 1], 3),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_multi_equals_k_single_backwards(case, dtype, device):
    T, B, I, H, bi, bias, lengths, K = case
    D = 2 if bi else 1
    x, lens, hx, cx, ws, out, res = _layer(device, dtype, T, B, I, H, bi, bias, lengths)
    go, ghy, gcy = _cotangents(K, T, B, H, D, dtype, device, lens)
    gi, ghx, gcx, gw = torch.ops.fastmtl.lstm_layer_backward_multi(go, ghy, gcy, x, lens, hx, cx, ws, bi, out, res)
    assert gi.shape == (K, T, B, I) and ghx.shape == (K, D, B, H) and gcx.shape == (K, D, B, H)
    assert [tuple(g.shape) for g in gw] == [(K, *w.shape) for w in ws]
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    for k in range(K):
        s_gi, s_ghx, s_gcx, s_gw = torch.ops.fastmtl.lstm_layer_backward(go[k], ghy[k], gcy[k], x, lens, hx, cx, ws,
                                                                         bi, out, res)
        torch.testing.assert_close(gi[k], s_gi, **tol)
        torch.testing.assert_close(ghx[k], s_ghx, **tol)
        torch.testing.assert_close(gcx[k], s_gcx, **tol)
        for a, b in zip(gw, s_gw):
            torch.testing.assert_close(a[k], b, **tol)


def test_multi_zero_cotangents(device):
    x, lens, hx, cx, ws, out, res = _layer(device, torch.float64, 4, 3, 2, 5, True, True, [4, 3, 1])
    go, ghy, gcy = _cotangents(0, 4, 3, 5, 2, torch.float64, device, lens)
    gi, ghx, gcx, gw = torch.ops.fastmtl.lstm_layer_backward_multi(go, ghy, gcy, x, lens, hx, cx, ws, True, out, res)
    assert gi.shape == (0, 4, 3, 2) and ghx.shape == (0, 2, 3, 5) and [g.shape[0] for g in gw] == [0] * len(ws)


@pytest.mark.parametrize("T,B,I,H", [(0, 3, 2, 4), (3, 2, 0, 4), (3, 2, 2, 0), (3, 0, 2, 4)])
def test_multi_empty_shapes_match_single(device, T, B, I, H):
    # what lstm_layer_backward returns for an empty layer, K times
    K, D = 2, 2
    x, hx, cx = torch.randn(T, B, I, dtype=torch.float64), torch.randn(D, B, H, dtype=torch.float64), \
        torch.randn(D, B, H, dtype=torch.float64)
    ws = []
    for _ in range(D):
        ws += [torch.randn(4 * H, I, dtype=torch.float64), torch.randn(4 * H, H, dtype=torch.float64)]
    x, hx, cx, ws = x.to(device), hx.to(device), cx.to(device), [w.to(device) for w in ws]
    out, hy, cy, res = torch.ops.fastmtl.lstm_layer_forward(x, None, hx, cx, ws, True, True)
    go, ghy, gcy = _cotangents(K, T, B, H, D, torch.float64, device, None)
    multi = torch.ops.fastmtl.lstm_layer_backward_multi(go, ghy, gcy, x, None, hx, cx, ws, True, out, res)
    for k in range(K):
        single = torch.ops.fastmtl.lstm_layer_backward(go[k], ghy[k], gcy[k], x, None, hx, cx, ws, True, out, res)
        for a, b in zip(multi[:3], single[:3]):
            torch.testing.assert_close(a[k], b)
        for a, b in zip(multi[3], single[3]):
            torch.testing.assert_close(a[k], b)


@pytest.mark.parametrize("bi,bias,lengths", [(True, True, [5, 4, 2]), (False, False, None)])
def test_multi_opcheck(device, bi, bias, lengths):
    x, lens, hx, cx, ws, out, res = _layer(device, torch.float64, 5, 3, 4, 6, bi, bias, lengths)
    go, ghy, gcy = _cotangents(3, 5, 3, 6, 2 if bi else 1, torch.float64, device, lens)
    torch.library.opcheck(torch.ops.fastmtl.lstm_layer_backward_multi.default,
                          (go, ghy, gcy, x, lens, hx, cx, ws, bi, out, res))


def test_multi_double_backward_gradcheck():
    # differentiable like K lstm_layer_backward calls (through the reference recomputation)
    x, lens, hx, cx, ws, out, res = _layer("cpu", torch.float64, 3, 2, 2, 3, True, True, [3, 2])
    go, ghy, gcy = _cotangents(2, 3, 2, 3, 2, torch.float64, "cpu", lens)
    wsg = [w.clone().requires_grad_() for w in ws]
    xg = x.clone().requires_grad_()

    def f(go_, ghy_, xx, w0):
        ww = [w0] + wsg[1:]
        o, _, _, r = torch.ops.fastmtl.lstm_layer_forward(xx, lens, hx, cx, ww, True, True)
        gi, ghx, gcx, gw = torch.ops.fastmtl.lstm_layer_backward_multi(go_, ghy_, gcy, xx, lens, hx, cx, ww, True,
                                                                       o, r)
        return gi, ghx, gw[0], gw[1]

    torch.autograd.gradcheck(f, (go.requires_grad_(), ghy.requires_grad_(), xg, wsg[0]), check_batched_grad=False)


def test_multi_bad_arguments():
    x, lens, hx, cx, ws, out, res = _layer("cpu", torch.float64, 4, 3, 2, 5, True, True, [4, 3, 1])
    go, ghy, gcy = _cotangents(2, 4, 3, 5, 2, torch.float64, "cpu", lens)
    op = torch.ops.fastmtl.lstm_layer_backward_multi
    with pytest.raises(ValueError, match=r"grad_output must have shape \(K, T, B, D\*H\)"):
        op(go[0], ghy, gcy, x, lens, hx, cx, ws, True, out, res)
    with pytest.raises(ValueError, match=r"grad_hy must have shape \[2, 2, 3, 5\]"):
        op(go, ghy[:1], gcy, x, lens, hx, cx, ws, True, out, res)
    with pytest.raises(ValueError, match=r"reserve must have shape"):
        op(go, ghy, gcy, x, lens, hx, cx, ws, True, out, torch.empty(0, dtype=x.dtype))
    with pytest.raises(TypeError):
        op(go.float(), ghy, gcy, x, lens, hx, cx, ws, True, out, res)


def test_vmap_of_vjp_runs_one_multi_backward_per_layer(device, monkeypatch):
    # torch.func.vmap over the vjp of a fastmtl encoder: the LSTM layers' backward is one lstm_layer_backward_multi
    # call each (K cotangents against the one saved forward), and the result is the per-cotangent vjp.
    torch.manual_seed(0)
    lstm = fastmtl.nn.LSTM(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64, device=device)
    x = torch.randn(6, 3, 5, dtype=torch.float64, device=device)
    lengths = torch.tensor([6, 4, 2])
    params = dict(lstm.named_parameters())
    out, vjp = torch.func.vjp(lambda p: torch.func.functional_call(lstm, p, (x,), {"lengths": lengths})[0], params)
    cots = torch.randn(4, *out.shape, dtype=torch.float64, device=device)
    calls = []
    real = ops_lstm._call_backward_multi

    def counting(go, *args):
        calls.append(go.shape[0])
        return real(go, *args)

    monkeypatch.setattr(ops_lstm, "_call_backward_multi", counting)
    with torch.no_grad():
        (batched,) = torch.func.vmap(vjp)(cots)
    assert calls == [4, 4]
    for k in range(4):
        (one,) = vjp(cots[k])
        for n in params:
            torch.testing.assert_close(batched[n][k], one[n], atol=1e-12, rtol=1e-10)


def test_outer_vmap_over_inputs_of_a_vmapped_vjp():
    # the multi op under an outer vmap whose forward arguments are vmapped: its rule recomputes each sample's reserve
    x, lens, hx, cx, ws, out, res = _layer("cpu", torch.float64, 4, 3, 2, 5, True, True, None)
    xs = torch.randn(2, *x.shape, dtype=torch.float64)
    cots = torch.randn(3, 4, 3, 10, dtype=torch.float64)

    def per_input(xx):
        _, vjp = torch.func.vjp(lambda w0: torch.ops.fastmtl.lstm_layer_forward(xx, None, hx, cx, [w0] + ws[1:],
                                                                                True, True)[0], ws[0])
        return torch.func.vmap(vjp)(cots)[0]

    batched = torch.func.vmap(per_input)(xs)
    for i in range(2):
        torch.testing.assert_close(batched[i], per_input(xs[i]), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("isa", fastmtl.cpu_kernels())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_equals_k_single_under_every_cpu_kernel(isa, dtype):
    with fastmtl.use_cpu_kernel(isa):
        assert fastmtl.cpu_kernel() == isa
        test_multi_equals_k_single_backwards(CASES[4], dtype, "cpu")
        test_multi_equals_k_single_backwards(CASES[5], dtype, "cpu")
