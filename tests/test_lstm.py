"""fastmtl.nn.LSTM / fastmtl.functional.lstm / torch.ops.fastmtl.lstm_layer_* against torch.nn.LSTM.

Ground truth: torch.nn.LSTM in float64 on the same device (through pack_padded_sequence when lengths vary),
compared with fastmtl in the tested dtype: outputs, h_n, c_n and every gradient (input, h_0, c_0, all parameters).
"""
import math
import re

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastmtl
from fastmtl.functional import lstm as f_lstm
from fastmtl.nn import LSTM
from fastmtl.reference.lstm import lstm_reference, torch_lstm_padded

# (atol, rtol) per (device type, dtype) for outputs/states and for gradients, against a float64 torch.nn.LSTM.
# cuda float32 allows TF32 (cuDNN's default for RNN math).
TOL = {
    ("cpu", torch.float32): {"out": (2e-5, 1e-4), "grad": (1e-4, 1e-3)},
    ("cpu", torch.float64): {"out": (1e-10, 1e-9), "grad": (1e-9, 1e-8)},
    ("cuda", torch.float32): {"out": (5e-3, 5e-3), "grad": (2e-2, 1e-2)},
    ("cuda", torch.float64): {"out": (1e-10, 1e-9), "grad": (1e-9, 1e-8)},
}


def _pair(E, H, L, bias, bf, bi, dtype, device, dropout=0.0):
    ours = LSTM(E, H, L, bias=bias, batch_first=bf, bidirectional=bi, dropout=dropout, device=device, dtype=dtype)
    ref = torch.nn.LSTM(E, H, L, bias=bias, batch_first=bf, bidirectional=bi, dropout=dropout, device=device,
                        dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


def _lengths(mode, B, T):
    if mode == "none":
        return None
    if mode == "full":
        return torch.full((B,), T, dtype=torch.long)
    if mode == "short":  # every sequence shorter than T (the kernel only runs up to the longest)
        return torch.randint(1, max(T - 1, 1) + 1, (B,))
    lens = torch.randint(1, T + 1, (B,))
    lens[torch.randint(0, B, (1,))] = T
    return lens


def _forward(module, x, hx, lengths, how, bf):
    T = x.shape[1] if bf else x.shape[0]
    if how == "kw":
        return module(x, hx, lengths=lengths)
    if how == "packed":
        p = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
        out, state = module(p, hx)
        assert isinstance(out, PackedSequence)
        out, _ = pad_packed_sequence(out, batch_first=bf, total_length=T)
        return out, state
    return module(x, hx)


def _check_close(a, b, tol, what):
    atol, rtol = tol
    b = b.to(a.dtype)
    err = (a - b).abs()
    bad = err > atol + rtol * b.abs()
    assert not bool(bad.any()), "%s: max abs err %.3g (atol %.1g, rtol %.1g)" % (what, err.max().item(), atol, rtol)


# A sampled grid: layers 1-3, uni/bi, batch_first, bias off, odd sizes, lengths by keyword and PackedSequence,
# given/absent initial states.
GRID = [
    # L, bi,   bf,    bias,  E,  H,  B,  T,  lengths, how,     init
    (1, False, False, True, 7, 33, 5, 6, "none", "plain", False),
    (1, True, False, True, 1, 7, 1, 1, "none", "plain", True),
    (1, True, True, False, 33, 1, 7, 9, "var", "kw", True),
    (2, False, True, True, 8, 16, 9, 7, "var", "packed", False),
    (2, True, False, True, 7, 33, 6, 11, "var", "kw", True),
    (2, True, True, True, 5, 9, 33, 5, "short", "kw", False),
    (3, False, False, False, 4, 7, 4, 8, "var", "packed", True),
    (3, True, True, True, 6, 5, 7, 6, "var", "packed", True),
    (1, False, True, True, 16, 20, 12, 10, "full", "kw", True),
    (2, True, False, False, 3, 7, 1, 4, "var", "kw", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", GRID, ids=lambda c: "L%d-%s-%s-%s-E%dH%dB%dT%d-%s-%s-%s" % (
    c[0], "bi" if c[1] else "uni", "bf" if c[2] else "tm", "bias" if c[3] else "nobias", *c[4:8], c[8], c[9],
    "h0" if c[10] else "noh0"))
def test_parity_with_torch(case, dtype, device):
    L, bi, bf, bias, E, H, B, T, lmode, how, init = case
    D = 2 if bi else 1
    ours, ref = _pair(E, H, L, bias, bf, bi, dtype, device)
    lengths = _lengths(lmode, B, T)
    if lengths is None:
        how = "plain"
    x64 = torch.randn((B, T, E) if bf else (T, B, E), dtype=torch.float64, device=device)
    if lengths is not None:  # padding holds garbage: it must not leak anywhere
        tt = torch.arange(T).unsqueeze(1)
        pad = (tt >= lengths.unsqueeze(0)).to(device)
        if bf:
            pad = pad.t()
        x64 = x64 + 100.0 * pad.unsqueeze(-1)
    x64.requires_grad_(True)
    x = x64.detach().to(dtype).requires_grad_(True)
    if init:
        h64 = torch.randn(L * D, B, H, dtype=torch.float64, device=device, requires_grad=True)
        c64 = torch.randn(L * D, B, H, dtype=torch.float64, device=device, requires_grad=True)
        h = h64.detach().to(dtype).requires_grad_(True)
        c = c64.detach().to(dtype).requires_grad_(True)
        hx, hx64 = (h, c), (h64, c64)
    else:
        hx = hx64 = None
    out, (hn, cn) = _forward(ours, x, hx, lengths, how, bf)
    ref_how = "packed" if lengths is not None else "plain"
    out64, (hn64, cn64) = _forward(ref, x64, hx64, lengths, ref_how, bf)
    tol = TOL[(torch.device(device).type, dtype)]
    assert out.shape == out64.shape and hn.shape == hn64.shape and cn.shape == cn64.shape
    assert out.dtype == dtype
    _check_close(out, out64, tol["out"], "output")
    _check_close(hn, hn64, tol["out"], "h_n")
    _check_close(cn, cn64, tol["out"], "c_n")
    if lengths is not None:  # padded positions are exactly zero
        tt = torch.arange(T).unsqueeze(1)
        pad = (tt >= lengths.unsqueeze(0)).to(device)
        if bf:
            pad = pad.t()
        assert bool((out[pad] == 0).all())

    g_out = torch.randn_like(out64)
    g_h = torch.randn_like(hn64)
    g_c = torch.randn_like(cn64)
    loss = (out * g_out.to(dtype)).sum() + (hn * g_h.to(dtype)).sum() + (cn * g_c.to(dtype)).sum()
    loss64 = (out64 * g_out).sum() + (hn64 * g_h).sum() + (cn64 * g_c).sum()
    names = [n for n, _ in ours.named_parameters()]
    wrt = [x] + (list(hx) if init else []) + [p for _, p in ours.named_parameters()]
    wrt64 = [x64] + (list(hx64) if init else []) + [dict(ref.named_parameters())[n] for n in names]
    grads = torch.autograd.grad(loss, wrt)
    grads64 = torch.autograd.grad(loss64, wrt64)
    labels = ["input"] + (["h_0", "c_0"] if init else []) + names
    for g, g64, name in zip(grads, grads64, labels):
        assert g is not None, name
        _check_close(g, g64, tol["grad"], "grad of " + name)


def test_reference_loop_matches_torch():
    E, H, L, B, T = 5, 6, 2, 4, 7
    ref = torch.nn.LSTM(E, H, L, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, E, dtype=torch.float64)
    lens = torch.tensor([7, 3, 5, 1])
    out, (h, c) = lstm_reference(x, None, ref._flat_weights, L, True, False, lens)
    out2, (h2, c2) = torch_lstm_padded(ref, x, lens)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(c, c2)


def test_gradcheck_float64(device):
    T, B, E, H, L = 4, 3, 2, 3, 2
    m = LSTM(E, H, L, bidirectional=True, dtype=torch.float64, device=device)
    weights = [w.detach().clone().requires_grad_(True) for w in m._flat_weights]
    x = torch.randn(T, B, E, dtype=torch.float64, device=device, requires_grad=True)
    h0 = torch.randn(2 * L, B, H, dtype=torch.float64, device=device, requires_grad=True)
    c0 = torch.randn(2 * L, B, H, dtype=torch.float64, device=device, requires_grad=True)
    lengths = torch.tensor([2, 4, 1])  # unsorted: exercises the sort/unsort

    def fn(x, h0, c0, *w):
        out, (h, c) = f_lstm(x, (h0, c0), list(w), L, True, False, 0.0, False, lengths)
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *weights), eps=1e-6, atol=1e-6)


def _op_args(device, dtype=torch.float64, bi=True, bias=True, lengths=True, T=5, B=4, I=3, H=4, grad=True):
    D = 2 if bi else 1
    x = torch.randn(T, B, I, dtype=dtype, device=device, requires_grad=grad)
    hx = torch.randn(D, B, H, dtype=dtype, device=device, requires_grad=grad)
    cx = torch.randn(D, B, H, dtype=dtype, device=device, requires_grad=grad)
    ws = []
    for _ in range(D):
        ws += [torch.randn(4 * H, I, dtype=dtype, device=device), torch.randn(4 * H, H, dtype=dtype, device=device)]
        if bias:
            ws += [torch.randn(4 * H, dtype=dtype, device=device), torch.randn(4 * H, dtype=dtype, device=device)]
    ws = [w.mul_(0.5).requires_grad_(grad) for w in ws]
    lens = torch.sort(torch.randint(1, T + 1, (B,)), descending=True).values if lengths else None
    if lengths:
        lens[0] = T
    return x, lens, hx, cx, ws


@pytest.mark.parametrize("bi,bias,lengths", [(True, True, True), (False, False, False), (False, True, True)])
def test_opcheck(device, bi, bias, lengths):
    x, lens, hx, cx, ws = _op_args(device, bi=bi, bias=bias, lengths=lengths)
    torch.library.opcheck(torch.ops.fastmtl.lstm_layer_forward.default, (x, lens, hx, cx, ws, bi, True))
    with torch.no_grad():
        out, hy, cy, reserve = torch.ops.fastmtl.lstm_layer_forward(x, lens, hx, cx, ws, bi, True)
    args = (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy), x.detach(), lens, hx.detach(),
            cx.detach(), [w.detach() for w in ws], bi, out, reserve)
    torch.library.opcheck(torch.ops.fastmtl.lstm_layer_backward.default, args)


def test_op_layer_matches_reference(device):
    x, lens, hx, cx, ws = _op_args(device, grad=False, T=6, B=5)
    out, hy, cy, reserve = torch.ops.fastmtl.lstm_layer_forward(x, lens, hx, cx, ws, True, False)
    assert reserve.shape == (0,)
    ref_out, (ref_h, ref_c) = lstm_reference(x, (hx, cx), ws, 1, True, False, lens)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(hy, ref_h)
    torch.testing.assert_close(cy, ref_c)


def test_compile_fullgraph(device):
    torch.compiler.reset()
    E, H, B, T = 6, 8, 5, 7
    m = LSTM(E, H, 2, bidirectional=True, batch_first=True, device=device)
    x = torch.randn(B, T, E, device=device, requires_grad=True)
    lens = torch.tensor([7, 2, 5, 7, 1])

    def f(x, lens):
        out, (h, c) = m(x, lengths=lens)
        return out.sum() + h.square().sum() + c.mean()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = cf(x, lens)
    g = torch.autograd.grad(loss, [x] + list(m.parameters()))
    loss_e = f(x, lens)
    g_e = torch.autograd.grad(loss_e, [x] + list(m.parameters()))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(g, g_e):
        torch.testing.assert_close(a, b)


def test_dropout_train_vs_eval(device):
    E, H, T, B = 6, 10, 5, 4
    ours, ref = _pair(E, H, 3, True, False, False, torch.float64, device, dropout=0.5)
    x = torch.randn(T, B, E, dtype=torch.float64, device=device)
    ours.eval()
    ref.eval()
    out_eval, _ = ours(x)
    torch.testing.assert_close(out_eval, ref(x)[0])
    ours.train()
    torch.manual_seed(1)
    a, (ha, _) = ours(x)
    torch.manual_seed(1)
    b, _ = ours(x)
    torch.manual_seed(2)
    c, _ = ours(x)
    torch.testing.assert_close(a, b)  # deterministic under a seed
    assert not torch.allclose(a, out_eval)  # dropout is active in training
    assert not torch.allclose(a, c)
    # the first layer's final state does not see dropout (it is applied between layers only)
    torch.testing.assert_close(ha[0], ref(x)[1][0][0])
    # a single layer ignores dropout, like torch
    with pytest.warns(UserWarning):
        one = LSTM(E, H, 1, dropout=0.5, dtype=torch.float64, device=device)
    one.train()
    ref1 = torch.nn.LSTM(E, H, 1, dtype=torch.float64, device=device)
    ref1.load_state_dict(one.state_dict())
    torch.testing.assert_close(one(x)[0], ref1(x)[0])


def test_state_dict_round_trip(device):
    for kw in ({"num_layers": 2, "bidirectional": True}, {"num_layers": 1, "bias": False}):
        t = torch.nn.LSTM(5, 7, **kw, device=device)
        ours = LSTM(5, 7, **kw, device=device)
        assert list(ours.state_dict().keys()) == list(t.state_dict().keys())
        for (k, a), (_, b) in zip(ours.state_dict().items(), t.state_dict().items()):
            assert a.shape == b.shape, k
        ours.load_state_dict(t.state_dict())
        x = torch.randn(4, 3, 5, device=device)
        torch.testing.assert_close(ours(x)[0], t(x)[0], atol=1e-5, rtol=1e-4)
        t2 = torch.nn.LSTM(5, 7, **kw, device=device)
        t2.load_state_dict(LSTM(5, 7, **kw, device=device).state_dict())
        ours2 = LSTM(5, 7, **kw, device=device)
        t2.load_state_dict(ours2.state_dict())
        torch.testing.assert_close(ours2(x)[0], t2(x)[0], atol=1e-5, rtol=1e-4)


def test_init_matches_torch():
    torch.manual_seed(3)
    t = torch.nn.LSTM(5, 7, 2, bidirectional=True)
    torch.manual_seed(3)
    ours = LSTM(5, 7, 2, bidirectional=True)
    for (k, a), (_, b) in zip(ours.state_dict().items(), t.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_non_contiguous_inputs(device):
    E, H, B, T = 6, 9, 5, 7
    ours, ref = _pair(E, H, 2, True, False, True, torch.float64, device)
    big = torch.randn(T, 2 * B, 2 * E, dtype=torch.float64, device=device)
    x = big[:, ::2, ::2]  # non-contiguous in two dimensions
    assert not x.is_contiguous()
    h0 = torch.randn(B, 4, H, dtype=torch.float64, device=device).transpose(0, 1)
    c0 = torch.randn(B, 4, H, dtype=torch.float64, device=device).transpose(0, 1)
    lens = torch.randint(1, T + 1, (2 * B,))[::2]
    out, (h, c) = ours(x, (h0, c0), lengths=lens)
    out2, (h2, c2) = torch_lstm_padded(ref, x, lens, (h0, c0))
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(c, c2)


def test_unbatched_input(device):
    E, H, T = 4, 6, 5
    for bf in (False, True):
        ours, ref = _pair(E, H, 2, True, bf, True, torch.float64, device)
        x = torch.randn(T, E, dtype=torch.float64, device=device)
        out, (h, c) = ours(x)
        out2, (h2, c2) = ref(x)
        assert out.shape == out2.shape == (T, 2 * H) and h.shape == h2.shape == (4, H)
        torch.testing.assert_close(out, out2)
        hx = (torch.randn(4, H, dtype=torch.float64, device=device), torch.randn(4, H, dtype=torch.float64,
                                                                                 device=device))
        out, (h, c) = ours(x, hx)
        out2, (h2, c2) = ref(x, hx)
        torch.testing.assert_close(out, out2)
        torch.testing.assert_close(c, c2)
        with pytest.raises(RuntimeError, match="For unbatched 2-D input, hx and cx should also be 2-D"):
            ours(x, (hx[0].unsqueeze(1), hx[1].unsqueeze(1)))


def test_packed_sorted_and_lengths_list(device):
    E, H, B, T = 5, 6, 4, 6
    ours, ref = _pair(E, H, 1, True, False, True, torch.float64, device)
    x = torch.randn(T, B, E, dtype=torch.float64, device=device)
    lens = [6, 5, 3, 2]
    p = pack_padded_sequence(x, torch.tensor(lens), enforce_sorted=True)
    o1, (h1, c1) = ours(p)
    o2, (h2, c2) = ref(p)
    assert o1.sorted_indices is None and torch.equal(o1.batch_sizes, o2.batch_sizes)
    torch.testing.assert_close(o1.data, o2.data)
    torch.testing.assert_close(h1, h2)
    o3, (h3, _) = ours(x, lengths=lens)  # a plain list of ints works too
    torch.testing.assert_close(h3, h2)


def test_proj_size_not_implemented():
    with pytest.raises(NotImplementedError, match="proj_size"):
        LSTM(4, 8, proj_size=3)


def test_bfloat16_runs_on_cpu():
    # float32 math inside, bfloat16 in and out, as torch.nn.LSTM on the CPU (accuracy: tests/test_lstm_dropin.py)
    m = LSTM(4, 5).to(torch.bfloat16)
    out, (h, c) = m(torch.randn(3, 2, 4, dtype=torch.bfloat16))
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16 and out.shape == (3, 2, 5)


BAD = [
    # (description, kwargs builder, exception, message regex)
    # (the types and leading wording are torch.nn.LSTM's; tests/test_lstm_dropin.py compares them with torch's; the
    # dtype wording is torch 2.8's or that of later releases, whichever torch is installed)
    ("4-D input", lambda d: dict(x=torch.randn(2, 3, 4, 5, device=d)), ValueError,
     r"Expected input to be 2D or 3D, got 4D instead .*\(T, input_size\) unbatched"),
    ("1-D input", lambda d: dict(x=torch.randn(4, device=d)), ValueError, r"Expected input to be 2D or 3D, got 1D"),
    ("feature size", lambda d: dict(x=torch.randn(5, 3, 6, device=d)), RuntimeError,
     r"input.size\(-1\) must be equal to input_size. Expected 4, got 6"),
    ("dtype mismatch", lambda d: dict(x=torch.randn(5, 3, 4, dtype=torch.float64, device=d)), ValueError,
     r"(RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)|input must have the type "
     r"torch.float32, got type torch.float64).*float64 .*weights\[0\] has dtype torch.float32"),
    ("integer input", lambda d: dict(x=torch.ones(5, 3, 4, dtype=torch.long, device=d)), ValueError,
     r"(RNN input dtype \(torch.int64\) does not match weight dtype|input must have the type torch.float32, got "
     r"type torch.int64)"),
    ("empty sequence", lambda d: dict(x=torch.randn(0, 3, 4, device=d)), RuntimeError,
     r"Expected sequence length to be larger than 0 in RNN"),
    ("length > T", lambda d: dict(lengths=torch.tensor([5, 6, 2])), ValueError, r"must not exceed .*T = 5"),
    ("zero length", lambda d: dict(lengths=torch.tensor([5, 0, 2])), ValueError, r">= 1"),
    ("negative length", lambda d: dict(lengths=torch.tensor([5, -1, 2])), ValueError, r">= 1"),
    ("wrong count", lambda d: dict(lengths=torch.tensor([5, 2])), ValueError, r"2 entries .*B = 3"),
    ("2-D lengths", lambda d: dict(lengths=torch.tensor([[5, 2, 1]])), ValueError, r"lengths must be 1-D"),
    ("float lengths", lambda d: dict(lengths=torch.tensor([5.0, 2.0, 1.0])), TypeError, r"lengths must be an integer"),
    ("float list lengths", lambda d: dict(lengths=[5, 2.5, 1]), TypeError, r"lengths must hold integers"),
    ("h0 shape", lambda d: dict(hx=(torch.randn(2, 3, 7, device=d), torch.randn(2, 3, 8, device=d))), RuntimeError,
     r"Expected hidden\[0\] size \(2, 3, 8\), got \[2, 3, 7\] .*h_0 must have shape"),
    ("c0 batch", lambda d: dict(hx=(torch.randn(2, 3, 8, device=d), torch.randn(2, 4, 8, device=d))), RuntimeError,
     r"Expected hidden\[1\] size \(2, 3, 8\), got \[2, 4, 8\] .*c_0 must have shape"),
    ("h0 dtype", lambda d: dict(hx=(torch.randn(2, 3, 8, dtype=torch.float64, device=d),
                                    torch.randn(2, 3, 8, device=d))), RuntimeError, r"h_0 has dtype torch.float64"),
    ("h0 2-D for batched", lambda d: dict(hx=(torch.randn(2, 8, device=d), torch.randn(2, 8, device=d))),
     RuntimeError, r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 2-D\) tensors"),
    ("device mismatch", lambda d: dict(x=torch.randn(5, 3, 4, device="meta")), RuntimeError,
     r"Input and parameter tensors are not at the same device, found input tensor at meta"),
    ("hx not a pair", lambda d: dict(hx=torch.randn(2, 3, 8, device=d)), RuntimeError,
     r"lstm expects two hidden states .*hx must be a tuple"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case, device):
    _, build, exc, pattern = case
    m = LSTM(4, 8, 2, device=device)
    kw = dict(x=torch.randn(5, 3, 4, device=device), hx=None, lengths=None)
    kw.update(build(device))
    with pytest.raises(exc, match=pattern) as info:
        m(kw["x"], kw["hx"], lengths=kw["lengths"])
    assert "fastmtl" in str(info.value)


def test_bad_op_arguments():
    x, lens, hx, cx, ws = _op_args("cpu", grad=False, T=5, B=4)
    op = torch.ops.fastmtl.lstm_layer_forward
    with pytest.raises(ValueError, match=r"sorted in non-increasing order"):
        op(x, torch.tensor([1, 5, 5, 2]), hx, cx, ws, True, False)
    with pytest.raises(TypeError, match=r"lengths must be int64"):
        op(x, lens.int(), hx, cx, ws, True, False)
    with pytest.raises(ValueError, match=r"outside \[1, T\]"):
        op(x, torch.tensor([6, 5, 5, 2]), hx, cx, ws, True, False)
    with pytest.raises(ValueError, match=r"weights must hold 4 \(no bias\) or 8"):
        op(x, lens, hx, cx, ws[:3], True, False)
    with pytest.raises(ValueError, match=r"w_hh_reverse\) must have shape"):
        op(x, lens, hx, cx, ws[:5] + [ws[5][:, :3]] + ws[6:], True, False)
    with pytest.raises(ValueError, match=r"hx must have shape \(D, B, H\)"):
        op(x, lens, hx[:1], cx, ws, True, False)
    with pytest.raises(TypeError, match=r"float32 or float64"):
        op(x.half(), lens, hx.half(), cx.half(), [w.half() for w in ws], True, False)
    with pytest.raises(ValueError, match=r"reserve must have shape"):
        out, hy, cy, _ = op(x, lens, hx, cx, ws, True, False)
        torch.ops.fastmtl.lstm_layer_backward(out, hy, cy, x, lens, hx, cx, ws, True, out, torch.empty(0,
                                                                                                      dtype=x.dtype))


def test_backward_without_reserve_is_a_clear_error():
    x, lens, hx, cx, ws = _op_args("cpu", T=4, B=3)
    out, _, _, _ = torch.ops.fastmtl.lstm_layer_forward(x, lens, hx, cx, ws, True, False)
    with pytest.raises(RuntimeError, match="need_reserve"):
        out.sum().backward()


def test_no_grad_skips_reserve_and_matches():
    m = LSTM(5, 6, 2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        a = m(x, lengths=[4, 2, 3])[0]
    b = m(x, lengths=[4, 2, 3])[0]
    torch.testing.assert_close(a, b.detach())


def test_build_info_reports_cpu_kernels():
    info = fastmtl.build_info()
    assert info["torch_version"] == torch.__version__
    assert torch.ops.fastmtl.lstm_layer_forward.default.name() == "fastmtl::lstm_layer_forward"


@pytest.mark.parametrize("B,H", [(1, 5), (3, 1), (4, 6)])
def test_ops_do_not_mutate_inputs(device, B, H):
    x, lens, hx, cx, ws = _op_args(device, grad=False, T=3, B=B, H=H, lengths=False)
    saved = [t.clone() for t in (x, hx, cx, *ws)]
    out, hy, cy, reserve = torch.ops.fastmtl.lstm_layer_forward(x, lens, hx, cx, ws, True, True)
    go, gh, gc = torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy)
    grads_in = [go.clone(), gh.clone(), gc.clone()]
    res = torch.ops.fastmtl.lstm_layer_backward(go, gh, gc, x, lens, hx, cx, ws, True, out, reserve)
    for a, b in zip(saved, (x, hx, cx, *ws)):
        assert torch.equal(a, b)
    for a, b in zip(grads_in, (go, gh, gc)):
        assert torch.equal(a, b)
    # outputs are fresh tensors, not views of the inputs
    for r in (hy, cy, res[1], res[2]):
        assert r.data_ptr() not in (hx.data_ptr(), cx.data_ptr(), gh.data_ptr(), gc.data_ptr())
