"""fastmtl.nn.LSTM as a drop-in for torch.nn.LSTM wherever a user can observe it.

Each test compares with torch.nn.LSTM holding the same weights, in the same process: torch.func.functional_call
and parametrizations (the forward uses the current parameter tensors), errors (same exception type, torch's wording
first), bfloat16/float16 on the CPU and CPU autocast (error against a float64 reference no more than twice torch's
own), TorchScript (script, save/load, trace), torch.fx, ONNX export (run with onnxruntime), dynamic quantization,
torch.export, and why the class is not a torch.nn.LSTM subclass (torch._dynamo refuses those).
"""
import io
import warnings
from typing import Tuple

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastmtl
from fastmtl.functional import lstm as f_lstm
from fastmtl.nn import LSTM
from fastmtl.reference.lstm import torch_lstm_padded


def _pair(E=5, H=7, L=2, bi=True, bf=False, bias=True, dtype=torch.float32):
    ours = LSTM(E, H, L, bias=bias, batch_first=bf, bidirectional=bi, dtype=dtype)
    ref = torch.nn.LSTM(E, H, L, bias=bias, batch_first=bf, bidirectional=bi, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _close(a, b, **kw):
    torch.testing.assert_close(a, b, **kw)


# ---------------------------------------------------------------------------------------------------------------
# The forward uses the current parameter tensors.
# ---------------------------------------------------------------------------------------------------------------
def test_functional_call_uses_the_substituted_parameters():
    ours, ref = _pair(dtype=torch.float64)
    x = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 4, 7, dtype=torch.float64)
    c0 = torch.randn(4, 4, 7, dtype=torch.float64)
    own = ours(x, (h0, c0))[0].detach()
    for _ in range(2):  # two parameter sets, as an ensemble or a MAML inner loop would pass
        params = {k: (torch.randn_like(v) * 0.5).requires_grad_(True) for k, v in ours.named_parameters()}
        out, (h, c) = functional_call(ours, params, (x, (h0, c0)))
        out_t, (h_t, c_t) = functional_call(ref, params, (x, (h0, c0)))
        _close(out, out_t)
        _close(h, h_t)
        _close(c, c_t)
        assert not torch.allclose(out, own)  # really not the module's own weights
        g = torch.randn_like(out)
        grads = torch.autograd.grad((out * g).sum(), [x] + list(params.values()))
        grads_t = torch.autograd.grad((out_t * g).sum(), [x] + list(params.values()))
        for a, b, name in zip(grads, grads_t, ["input"] + list(params)):
            _close(a, b, msg=name)
    # afterwards the module runs with its own weights again, and they did not move
    _close(ours(x, (h0, c0))[0], own)
    _close(ours(x, (h0, c0))[0], ref(x, (h0, c0))[0])


def test_maml_step_through_functional_call():
    # torch.func.grad of a loss of functional_call, and a second-order MAML outer gradient (through one inner SGD
    # step taken with create_graph=True), both against torch.nn.LSTM with the same weights
    ours, ref = _pair(E=3, H=4, L=1, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    y = torch.randn(4, 2, 8, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in ours.named_parameters()}

    def loss(module, p):
        return (functional_call(module, p, (x,))[0] - y).square().mean()

    g = torch.func.grad(lambda p: loss(ours, p))(params)
    g_t = torch.func.grad(lambda p: loss(ref, p))(params)
    for k in params:
        _close(g[k], g_t[k], msg=k)

    def outer(module):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        inner = torch.autograd.grad(loss(module, p), list(p.values()), create_graph=True)
        adapted = {k: v - 0.1 * gk for (k, v), gk in zip(p.items(), inner)}
        return torch.autograd.grad(loss(module, adapted), list(p.values()))

    for a, b, k in zip(outer(ours), outer(ref), params):
        _close(a, b, msg=k)


def test_functional_call_with_lengths_and_packed_input():
    ours, ref = _pair(bf=True, dtype=torch.float64)
    x = torch.randn(5, 6, 5, dtype=torch.float64)
    lens = torch.randint(1, 7, (5,))
    lens[0] = 6
    params = {k: torch.randn_like(v) for k, v in ours.named_parameters()}
    out, (h, _) = functional_call(ours, params, (x,), {"lengths": lens})
    with torch.no_grad():
        for k, v in params.items():
            getattr(ref, k).copy_(v)
    out_t, (h_t, _) = torch_lstm_padded(ref, x, lens)
    _close(out, out_t)
    _close(h, h_t)
    packed = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
    out_p, (h_p, _) = functional_call(ours, params, (packed,))
    _close(pad_packed_sequence(out_p, batch_first=True, total_length=6)[0], out_t)
    _close(h_p, h_t)


class _Scale(torch.nn.Module):
    def forward(self, w):
        return 1.5 * w


class _Symmetric(torch.nn.Module):  # (4H, H) -> each H x H gate block symmetric
    def forward(self, w):
        blocks = w.view(4, w.shape[1], w.shape[1])
        return (blocks + blocks.transpose(1, 2)).reshape_as(w) / 2


@pytest.mark.parametrize("kind", ["parametrize", "weight_norm", "spectral_norm"])
def test_parametrizations(kind):
    ours, ref = _pair(E=6, H=6, dtype=torch.float64)
    for m in (ours, ref):
        if kind == "parametrize":
            parametrize.register_parametrization(m, "weight_hh_l0", _Symmetric())
            parametrize.register_parametrization(m, "weight_ih_l1_reverse", _Scale())
        elif kind == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(m, "weight_ih_l0")
        else:
            torch.nn.utils.parametrizations.spectral_norm(m, "weight_hh_l0")
            m.eval()  # no power iteration while running
    ref.load_state_dict(ours.state_dict())  # the same originals (and spectral norm's u, v)
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    out, (h, c) = ours(x)
    out_t, (h_t, c_t) = ref(x)
    _close(out, out_t)
    _close(c, c_t)
    names = [n for n, _ in ours.named_parameters()]
    assert any("original" in n for n in names)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), list(ours.parameters()))
    grads_t = torch.autograd.grad((out_t * g).sum(), [dict(ref.named_parameters())[n] for n in names])
    for a, b, n in zip(grads, grads_t, names):
        _close(a, b, msg=n)
    if kind == "parametrize":
        # what runs is the parametrized weight, not the stored original (a stale _flat_weights would hold that)
        plain = LSTM(6, 6, 2, bidirectional=True, dtype=torch.float64)
        plain.load_state_dict({k.replace("parametrizations.", "").replace(".original", ""): v
                               for k, v in ours.state_dict().items()})
        assert not torch.allclose(plain(x)[0], out)


# ---------------------------------------------------------------------------------------------------------------
# Errors: torch.nn.LSTM's exception type and wording, fastmtl's detail appended.
# ---------------------------------------------------------------------------------------------------------------
def _h(*shape, **kw):
    return torch.randn(*shape, **kw)


# (name, input builder, hx builder, compare torch's wording as a prefix of ours)
ERRORS = [
    ("1-D input", lambda: _h(4), None, True),
    ("4-D input", lambda: _h(2, 3, 4, 5), None, True),
    ("feature size", lambda: _h(5, 3, 6), None, True),
    ("input dtype", lambda: _h(5, 3, 4, dtype=torch.float64), None, True),
    ("integer input", lambda: torch.randint(0, 3, (5, 3, 4)), None, True),
    ("bfloat16 input, float32 weights", lambda: _h(5, 3, 4, dtype=torch.bfloat16), None, True),
    ("empty sequence", lambda: _h(0, 3, 4), None, True),
    ("empty unbatched sequence", lambda: _h(0, 4), None, True),
    ("h_0 size", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 7), _h(2, 3, 8)), True),
    ("c_0 batch", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 8), _h(2, 4, 8)), True),
    ("h_0 layers", lambda: _h(5, 3, 4), lambda: (_h(1, 3, 8), _h(1, 3, 8)), True),
    ("2-D hx for batched input", lambda: _h(5, 3, 4), lambda: (_h(2, 8), _h(2, 8)), True),
    ("3-D hx for unbatched input", lambda: _h(5, 4), lambda: (_h(2, 1, 8), _h(2, 1, 8)), True),
    ("unbatched h_0 size", lambda: _h(5, 4), lambda: (_h(2, 7), _h(2, 8)), True),
    ("three states", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 8),) * 3, True),
    ("input on another device", lambda: _h(5, 3, 4, device="meta"), None, True),
    ("hx on another device", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 8, device="meta"), _h(2, 3, 8)), True),
    ("h_0 dtype", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 8, dtype=torch.float64), _h(2, 3, 8)), False),
    ("hx a single tensor", lambda: _h(5, 3, 4), lambda: _h(2, 3, 8), False),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_match_torch(case):
    _, build_x, build_hx, same_wording = case
    ours, ref = _pair(E=4, H=8, bi=False)
    x = build_x()
    hx = build_hx() if build_hx is not None else None
    with pytest.raises(Exception) as theirs:
        ref(x, hx)
    with pytest.raises(Exception) as mine:
        ours(x, hx)
    assert type(mine.value) is type(theirs.value), (mine.value, theirs.value)
    assert "fastmtl" in str(mine.value)
    if same_wording:
        assert str(mine.value).startswith(str(theirs.value)), (str(mine.value), str(theirs.value))


FUNCTIONAL_ERRORS = [
    # (name, input, hx): the same mistakes through fastmtl.functional.lstm raise the module's types
    ("4-D input", lambda: _h(2, 3, 4, 5), None),
    ("feature size", lambda: _h(5, 3, 6), None),
    ("input dtype", lambda: _h(5, 3, 4, dtype=torch.float64), None),
    ("empty sequence", lambda: _h(0, 3, 4), None),
    ("h_0 size", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 7), _h(2, 3, 8))),
    ("c_0 batch", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 8), _h(2, 4, 8))),
    ("three states", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 8),) * 3),
    ("input on another device", lambda: _h(5, 3, 4, device="meta"), None),
    ("h_0 dtype", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 8, dtype=torch.float64), _h(2, 3, 8))),
]


@pytest.mark.parametrize("case", FUNCTIONAL_ERRORS, ids=[c[0] for c in FUNCTIONAL_ERRORS])
def test_functional_errors_match_module(case):
    _, build_x, build_hx = case
    ours, ref = _pair(E=4, H=8, bi=False)
    x = build_x()
    hx = build_hx() if build_hx is not None else None
    with pytest.raises(Exception) as theirs:
        ref(x, hx)
    with pytest.raises(Exception) as mine:
        f_lstm(x, hx, ours._flat_weights, 2, False)
    assert type(mine.value) is type(theirs.value), (mine.value, theirs.value)
    assert "fastmtl" in str(mine.value)


def test_empty_batch_like_torch():
    ours, ref = _pair(E=4, H=8)
    x = torch.randn(5, 0, 4)
    out, (h, c) = ours(x)
    out_t, (h_t, c_t) = ref(x)
    assert out.shape == out_t.shape and h.shape == h_t.shape and c.shape == c_t.shape


# ---------------------------------------------------------------------------------------------------------------
# bfloat16 / float16 on the CPU, and CPU autocast.
# ---------------------------------------------------------------------------------------------------------------
def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_rule(ours, torchs, ref, what):
    """fastmtl's error against the float64 reference is at most twice torch's own error in the same dtype."""
    e, e_t = _max_err(ours, ref), _max_err(torchs, ref)
    assert e <= 2 * e_t, "%s: fastmtl error %.3g > 2 x torch.nn.LSTM's %.3g" % (what, e, e_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu_accuracy(dtype):
    E, H, L, T, B = 16, 24, 2, 12, 6
    ours, ref = _pair(E, H, L, dtype=dtype)
    ref64 = torch.nn.LSTM(E, H, L, bidirectional=True, dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(T, B, E).to(dtype).requires_grad_(True)
    h0 = torch.randn(2 * L, B, H).to(dtype).requires_grad_(True)
    c0 = torch.randn(2 * L, B, H).to(dtype).requires_grad_(True)
    x64, h64, c64 = (t.detach().double().requires_grad_(True) for t in (x, h0, c0))
    out, (h, c) = ours(x, (h0, c0))
    out_t, (h_t, c_t) = ref(x, (h0, c0))
    out64, (hr, cr) = ref64(x64, (h64, c64))
    assert out.dtype == h.dtype == c.dtype == dtype
    for a, b, r, what in ((out, out_t, out64, "output"), (h, h_t, hr, "h_n"), (c, c_t, cr, "c_n")):
        _assert_rule(a, b, r, what)
    g = torch.randn_like(out64)
    names = [n for n, _ in ours.named_parameters()]
    grads = torch.autograd.grad((out * g.to(dtype)).sum(), [x, h0, c0] + list(ours.parameters()))
    grads_t = torch.autograd.grad((out_t * g.to(dtype)).sum(), [x, h0, c0] + list(ref.parameters()))
    grads64 = torch.autograd.grad((out64 * g).sum(), [x64, h64, c64] + list(ref64.parameters()))
    for a, b, r, what in zip(grads, grads_t, grads64, ["input", "h_0", "c_0"] + names):
        assert a.dtype == dtype
        _assert_rule(a, b, r, "grad of " + what)


def test_low_precision_with_lengths():
    ours, ref = _pair(8, 12, 1, dtype=torch.bfloat16)
    ref64 = torch.nn.LSTM(8, 12, 1, bidirectional=True, dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(9, 5, 8).bfloat16()
    lens = torch.randint(1, 10, (5,))
    lens[1] = 9
    out, (h, _) = ours(x, lengths=lens)
    out_t, (h_t, _) = torch_lstm_padded(ref, x, lens)
    out64, (h64, _) = torch_lstm_padded(ref64, x.double(), lens)
    _assert_rule(out, out_t, out64, "output")
    _assert_rule(h, h_t, h64, "h_n")


def test_cpu_autocast_bfloat16_like_torch():
    E, H, L, T, B = 12, 16, 2, 10, 4
    ours, ref = _pair(E, H, L, bf=True)
    x = torch.randn(B, T, E)
    hx = (torch.randn(2 * L, B, H), torch.randn(2 * L, B, H))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = ours(x, hx)
        out_t, (h_t, c_t) = ref(x, hx)
    assert (out.dtype, h.dtype, c.dtype) == (out_t.dtype, h_t.dtype, c_t.dtype) == (torch.bfloat16,) * 3
    # autocast computes with the weights, input and states rounded to bfloat16: the float64 reference does too
    ref64 = torch.nn.LSTM(E, H, L, bidirectional=True, batch_first=True, dtype=torch.float64)
    ref64.load_state_dict({k: v.bfloat16().double() for k, v in ours.state_dict().items()})
    out64, (h64, c64) = ref64(x.bfloat16().double(), tuple(t.bfloat16().double() for t in hx))
    for a, b, r, what in ((out, out_t, out64, "output"), (h, h_t, h64, "h_n"), (c, c_t, c64, "c_n")):
        _assert_rule(a, b, r, what)
    # gradients reach the float32 parameters in float32, as with torch
    out.float().sum().backward()
    out_t.float().sum().backward()
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.dtype == q.grad.dtype == torch.float32, n
    # outside autocast: float32 again
    assert ours(x)[0].dtype == torch.float32


def test_cpu_autocast_float16():
    # torch.nn.LSTM under CPU float16 autocast fails inside oneDNN on some builds; fastmtl runs it (float32 math
    # inside, float16 out). Yardstick: torch.nn.LSTM in float16 on the same rounded weights.
    E, H, T, B = 8, 12, 7, 3
    ours, _ = _pair(E, H, 1)
    x = torch.randn(T, B, E)
    with torch.autocast("cpu", dtype=torch.float16):
        out, (h, _) = ours(x)
    assert out.dtype == h.dtype == torch.float16
    half = torch.nn.LSTM(E, H, 1, bidirectional=True, dtype=torch.float16)
    half.load_state_dict({k: v.half() for k, v in ours.state_dict().items()})
    ref64 = torch.nn.LSTM(E, H, 1, bidirectional=True, dtype=torch.float64)
    ref64.load_state_dict({k: v.half().double() for k, v in ours.state_dict().items()})
    _assert_rule(out, half(x.half())[0], ref64(x.half().double())[0], "output")


# ---------------------------------------------------------------------------------------------------------------
# TorchScript, torch.fx, ONNX.
# ---------------------------------------------------------------------------------------------------------------
class _Tagger(torch.nn.Module):
    """A typical parent: LSTM -> Linear, returning the logits and the last hidden state."""

    def __init__(self, lstm_cls=LSTM):
        super().__init__()
        self.lstm = lstm_cls(6, 8, 2, batch_first=True, bidirectional=True)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        return self.out(y), h


class _TaggerWithState(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = LSTM(6, 8, 2, batch_first=True, bidirectional=True)

    def forward(self, x, h0, c0, lengths):
        y, (h, c) = self.lstm(x, (h0, c0), lengths=lengths)
        return y, h, c


def _jit_round_trip(scripted):
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def test_jit_script_matches_eager_and_round_trips():
    model = _Tagger()
    scripted = torch.jit.script(model)
    assert scripted.lstm.original_name == "LSTM"
    loaded = _jit_round_trip(scripted)
    x = torch.randn(4, 7, 6)
    want = model(x)
    for m in (scripted, loaded):
        got = m(x)
        _close(got[0], want[0])
        _close(got[1], want[1])
    # training through the scripted module: the same gradients as eager
    g = torch.randn_like(want[0])
    grads_e = torch.autograd.grad((model(x)[0] * g).sum(), list(model.parameters()))
    grads_s = torch.autograd.grad((loaded(x)[0] * g).sum(), list(loaded.parameters()))
    for a, b in zip(grads_s, grads_e):
        _close(a, b)
    # hx and lengths (a tensor) through TorchScript
    model2 = _TaggerWithState()
    scripted2 = _jit_round_trip(torch.jit.script(model2))
    h0, c0 = torch.randn(4, 4, 8), torch.randn(4, 4, 8)
    lens = torch.randint(1, 8, (4,))
    lens[2] = 7
    for a, b in zip(scripted2(x, h0, c0, lens), model2(x, h0, c0, lens)):
        _close(a, b)


class _WithState(torch.nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
        return self.lstm(x, (h0, c0))


class _Packed(torch.nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, p: PackedSequence) -> Tuple[PackedSequence, Tuple[torch.Tensor, torch.Tensor]]:
        return self.lstm(p)


def test_jit_script_unbatched_packed_low_precision():
    # (like torch.nn.LSTM, whose forward is overloaded, the LSTM is scripted inside a module that calls it)
    m = LSTM(5, 6, 2, bidirectional=True)
    s = torch.jit.script(_WithState(m))
    x = torch.randn(7, 5)
    h0, c0 = torch.randn(4, 6), torch.randn(4, 6)
    (o_s, (h_s, c_s)), (o_e, (h_e, c_e)) = s(x, h0, c0), m(x, (h0, c0))
    _close(o_s, o_e)
    _close(h_s, h_e)
    _close(c_s, c_e)
    xb = torch.randn(7, 3, 5)
    with pytest.raises(Exception, match="Expected hidden\\[0\\] size \\(4, 3, 6\\)"):
        s(xb, torch.randn(4, 3, 5), torch.randn(4, 3, 6))
    lens = torch.tensor([7, 2, 5])
    packed = pack_padded_sequence(xb, lens, enforce_sorted=False)
    sp = torch.jit.script(_Packed(m))
    (p_s, (h_s, c_s)), (p_e, (h_e, c_e)) = sp(packed), m(packed)
    _close(p_s.data, p_e.data)
    _close(h_s, h_e)
    _close(c_s, c_e)
    mb = LSTM(5, 6).to(torch.bfloat16)
    sb = torch.jit.script(_WithState(mb))
    hb = (torch.randn(1, 3, 6).bfloat16(), torch.randn(1, 3, 6).bfloat16())
    (o_s, _), (o_e, _) = sb(xb.bfloat16(), *hb), mb(xb.bfloat16(), hb)
    assert o_s.dtype == torch.bfloat16
    _close(o_s, o_e)


class _WithLengths(torch.nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, lengths: torch.Tensor):
        return self.lstm(x, (h0, c0), lengths=lengths)


# (name, input, hx, lengths): mistakes a scripted module can be given (typed arguments, dtypes alike)
SCRIPT_ERRORS = [
    ("feature size", lambda: _h(5, 3, 6), None, [5, 3, 2]),
    ("empty sequence", lambda: _h(0, 3, 4), None, [1, 1, 1]),
    ("h_0 size", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 7), _h(2, 3, 8)), [5, 3, 2]),
    ("c_0 batch", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 8), _h(2, 4, 8)), [5, 3, 2]),
    ("2-D hx for batched input", lambda: _h(5, 3, 4), lambda: (_h(2, 8), _h(2, 8)), [5, 3, 2]),
    ("hx on another device", lambda: _h(5, 3, 4), lambda: (_h(2, 3, 8, device="meta"), _h(2, 3, 8)), [5, 3, 2]),
    ("lengths count", lambda: _h(5, 3, 4), None, [5, 3]),
    ("zero length", lambda: _h(5, 3, 4), None, [5, 0, 2]),
    ("length past T", lambda: _h(5, 3, 4), None, [5, 6, 2]),
    ("float lengths", lambda: _h(5, 3, 4), None, [5.0, 3.0, 2.0]),
    ("2-D lengths", lambda: _h(5, 3, 4), None, [[5], [3], [2]]),
    ("unbatched length past T", lambda: _h(5, 4), lambda: (_h(2, 8), _h(2, 8)), [9]),
]


@pytest.mark.parametrize("case", SCRIPT_ERRORS, ids=[c[0] for c in SCRIPT_ERRORS])
def test_jit_script_raises_what_eager_raises(case):
    # TorchScript runs the eager checks (one driver): the scripted error carries eager's exception type and message
    _, build_x, build_hx, lengths = case
    m = LSTM(4, 8, 2)
    x = build_x()
    h0, c0 = build_hx() if build_hx is not None else (_h(2, x.shape[1], 8), _h(2, x.shape[1], 8))
    lens = torch.tensor(lengths)
    with pytest.raises(Exception) as eager:
        m(x, (h0, c0), lengths=lens)
    with pytest.raises(torch.jit.Error) as scripted:
        torch.jit.script(_WithLengths(m))(x, h0, c0, lens)
    want = "builtins.%s: %s" % (type(eager.value).__name__, eager.value)
    got = str(scripted.value).strip().splitlines()[-1]
    if " dtype " in want:  # TorchScript writes dtypes as numbers
        want, got = want.split(" dtype ")[0], got.split(" dtype ")[0]
    assert "fastmtl" in want and got == want


def test_jit_trace_passes_its_check_and_matches_eager():
    model = _Tagger()
    x = torch.randn(4, 7, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape checks, as torch.nn.LSTM gives
        traced = torch.jit.trace(model, x)  # check_trace=True by default
    x2 = torch.randn(4, 7, 6)
    for a, b in zip(traced(x2), model(x2)):
        _close(a, b)
    loss = traced(x2)[0].sum()
    grads = torch.autograd.grad(loss, list(traced.parameters()))
    grads_e = torch.autograd.grad(model(x2)[0].sum(), list(model.parameters()))
    for a, b in zip(grads, grads_e):
        _close(a, b)


def test_fx_symbolic_trace_keeps_it_a_leaf():
    model = _Tagger()
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["lstm", "out"]  # exactly as with torch.nn.LSTM
    assert isinstance(gm.get_submodule("lstm"), LSTM)
    ref_gm = torch.fx.symbolic_trace(_Tagger(torch.nn.LSTM))
    assert [n.op for n in gm.graph.nodes] == [n.op for n in ref_gm.graph.nodes]
    x = torch.randn(3, 5, 6)
    for a, b in zip(gm(x), model(x)):
        _close(a, b)
    # hx and lengths= are recorded as the call's arguments
    model2 = _TaggerWithState()
    gm2 = torch.fx.symbolic_trace(model2)
    (node,) = [n for n in gm2.graph.nodes if n.op == "call_module"]
    assert len(node.args) == 2 and "lengths" in node.kwargs
    h0, c0 = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    lens = torch.tensor([5, 1, 3])
    for a, b in zip(gm2(x, h0, c0, lens), model2(x, h0, c0, lens)):
        _close(a, b)


def _onnx_run(model, args):
    import onnxruntime as ort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, args, dynamo=True, verbose=False)
    proto = prog.model_proto
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return proto, [torch.from_numpy(o) for o in sess.run(None, feeds)]


def test_onnx_export_runs_in_onnxruntime():
    model = _Tagger().eval()
    x = torch.randn(3, 5, 6)
    proto, got = _onnx_run(model, (x,))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("LSTM") == 2  # one standard ONNX LSTM per layer, as torch.nn.LSTM exports
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), {n.domain for n in proto.graph.node}
    want = model(x)
    _close(got[0], want[0].detach(), atol=1e-5, rtol=1e-4)
    _close(got[1], want[1].detach(), atol=1e-5, rtol=1e-4)
    # with lengths= (the masked reference loop over the example's T)
    model2 = _TaggerWithState().eval()
    h0, c0 = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    lens = torch.tensor([5, 2, 4])
    _, got2 = _onnx_run(model2, (x, h0, c0, lens))
    for a, b in zip(got2, model2(x, h0, c0, lens)):
        _close(a, b.detach(), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Not a torch.nn.LSTM subclass (torch._dynamo), quantization, torch.export.
# ---------------------------------------------------------------------------------------------------------------
def test_not_a_torch_lstm_subclass_because_dynamo_refuses_those():
    m = LSTM(4, 6)
    assert not isinstance(m, torch.nn.LSTM) and isinstance(m, torch.nn.RNNBase) and m.mode == "LSTM"

    class Subclass(torch.nn.LSTM):  # what subclassing torch.nn.LSTM would give
        def forward(self, x):
            return f_lstm(x, None, self._flat_weights, self.num_layers, self.bidirectional)

    x = torch.randn(5, 2, 4)
    sub = Subclass(4, 6)
    torch.compiler.reset()
    with pytest.raises(Exception, match="RNN, GRU, or LSTM|allow_rnn"):
        torch.compile(lambda x: sub(x)[0], fullgraph=True, backend="eager")(x)
    torch.compiler.reset()
    out = torch.compile(lambda x: m(x)[0], fullgraph=True, backend="eager")(x)
    _close(out, m(x)[0])


def test_to_torch_and_from_torch():
    ours = LSTM(5, 7, 2, bidirectional=True, batch_first=True, dtype=torch.float64).eval()
    parametrize.register_parametrization(ours, "weight_hh_l0", _Scale())
    t = ours.to_torch()
    assert type(t) is torch.nn.LSTM and not t.training and t.weight_ih_l0.dtype == torch.float64
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    _close(t(x)[0], ours(x)[0])
    back = LSTM.from_torch(t)
    assert type(back) is LSTM and back.batch_first and back.bidirectional and back.num_layers == 2
    _close(back(x)[0], ours(x)[0])
    with pytest.raises(NotImplementedError, match="proj_size"):
        LSTM.from_torch(torch.nn.LSTM(5, 7, proj_size=3))


def test_quantize_dynamic():
    quantize_dynamic = torch.ao.quantization.quantize_dynamic

    class Model(torch.nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm
            self.out = torch.nn.Linear(12, 3)

        def forward(self, x):
            return self.out(self.lstm(x)[0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = Model(LSTM(5, 6, 2, bidirectional=True)).eval()
        twin = Model(model.lstm.to_torch())
        twin.out.load_state_dict(model.out.state_dict())
        q = quantize_dynamic(model, {LSTM, torch.nn.Linear}, mapping=fastmtl.nn.dynamic_quant_mapping())
        q_twin = quantize_dynamic(twin, {torch.nn.LSTM, torch.nn.Linear})
        assert type(q.lstm) is type(q_twin.lstm) is torch.ao.nn.quantized.dynamic.LSTM
        x = torch.randn(6, 3, 5)
        _close(q(x), q_twin(x))  # exactly what quantizing the equivalent torch.nn.LSTM gives
        assert isinstance(model.lstm, LSTM)  # not in place
        # without the mapping torch.ao.quantization leaves it float: it says so when it runs
        skipped = quantize_dynamic(model, {LSTM, torch.nn.Linear})
        assert type(skipped.lstm) is LSTM
        with pytest.warns(UserWarning, match="dynamic_quant_mapping"):
            skipped(x)
        # the usual spelling, {torch.nn.LSTM}, cannot reach it either: a warning at quantization time, not silence
        with pytest.warns(UserWarning, match="stays float"):
            q_usual = quantize_dynamic(model, {torch.nn.LSTM, torch.nn.Linear})
        assert type(q_usual.lstm) is LSTM
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # the original model was never given a qconfig: no warning


def test_torch_export_sees_parameters():
    model = _Tagger()
    x = torch.randn(3, 5, 6)
    ep = torch.export.export(model, (x,))
    kinds = {s.target: s.kind.name for s in ep.graph_signature.input_specs if s.target}
    for name, _ in model.named_parameters():
        assert kinds.get(name) == "PARAMETER", (name, kinds.get(name))
    for a, b in zip(ep.module()(x), model(x)):
        _close(a, b)


def test_compile_fullgraph_with_functional_call():
    torch.compiler.reset()
    m = LSTM(4, 6, 2, bidirectional=True)
    params = {k: torch.randn_like(v) for k, v in m.named_parameters()}
    x = torch.randn(5, 3, 4)
    lens = torch.tensor([5, 2, 4])

    def f(params, x, lens):
        return functional_call(m, params, (x,), {"lengths": lens})[0]

    got = torch.compile(f, fullgraph=True, backend="eager")(params, x, lens)
    _close(got, f(params, x, lens))
    # through AOTAutograd too (fake kernels, the traced backward): values and gradients of the substituted params
    p2 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    got2 = torch.compile(f, fullgraph=True, backend="aot_eager")(p2, x, lens)
    _close(got2, got)
    g = torch.autograd.grad(got2.sum(), list(p2.values()))
    p3 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    g_ref = torch.autograd.grad(f(p3, x, lens).sum(), list(p3.values()))
    for a, b in zip(g, g_ref):
        _close(a, b)
    assert not torch.allclose(got, m(x, lengths=lens)[0])
