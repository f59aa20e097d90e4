"""The whole-model inference op (torch.ops.fastmtl.tagger_forward) behind MultiTaskLSTM.scores / predict on the CPU:
the same scores and predictions as the modules (its reference), under every CPU kernel set, and the cases where the
model must not take it."""
import pytest
import torch

import fastmtl
import fastmtl.model as model_mod
from fastmtl.decoding import span_constraints
from fastmtl.nn import SequenceTask, TokenTask

ISAS = fastmtl.cpu_kernels()
V = 30
WORDS = ["<pad>", "<unk>"] + ["w%dx%s" % (i, "abcdefgh"[: 1 + i % 7]) for i in range(V - 2)]


def _tasks(crf=True):
    return [SequenceTask("s_last", 3, pooling="last"), SequenceTask("s_first", 4, pooling="first"),
            SequenceTask("s_mean", 5, pooling="mean"), SequenceTask("s_max", 2, pooling="max", bias=False),
            TokenTask("tags", 5), TokenTask("crf", 5, crf=crf)]


def _model(sharing="hard", layers=1, bidir=True, chars=True, dtype=torch.float32, hidden=12, task_layers=None,
           **kw):
    torch.manual_seed(0)
    m = fastmtl.MultiTaskLSTM(V, 10, hidden, _tasks(), num_layers=layers, bidirectional=bidir, sharing=sharing,
                              task_layers=task_layers, char_words=WORDS if chars else None, char_dim=6 if chars else 0,
                              char_filters=7, char_kernel=3, **kw)
    return m.to(dtype).eval()


def _batch(B, T=8):
    g = torch.Generator().manual_seed(B * 31 + T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[B // 2] = T
    ids = torch.randint(1, V, (B, T), generator=g)
    ids = ids.masked_fill(torch.arange(T)[None] >= lengths[:, None], 0)
    return ids, lengths


class _Count:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = model_mod.tagger_forward

        def counted(*a):
            self.calls += 1
            return real(*a)
        monkeypatch.setattr(model_mod, "tagger_forward", counted)


def _modules_path(m, fn):
    """fn() with the fused op disabled on this model (the modules' own path, the reference)."""
    m._fused_args = lambda ids: None
    try:
        return fn()
    finally:
        del m._fused_args


def _close(a, b, dtype):
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a, b, **tol)


CONFIGS = [dict(), dict(layers=2), dict(bidir=False), dict(chars=False), dict(dtype=torch.float64),
           dict(sharing="hierarchical", layers=2, task_layers={"tags": 1, "s_mean": 1}),
           dict(layers=2, hidden=40)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join("%s=%s" % kv for kv in c.items()) or "default")
@pytest.mark.parametrize("B", [1, 5])
def test_scores_match_the_modules(cfg, B, monkeypatch):
    m = _model(**cfg)
    ids, lengths = _batch(B)
    count = _Count(monkeypatch)
    got = m.scores(ids, lengths)
    assert count.calls == 1
    ref = _modules_path(m, lambda: m.scores(ids, lengths))
    assert count.calls == 1 and list(got) == list(ref) == m.task_names
    for n in ref:
        assert got[n].dtype == ref[n].dtype and got[n].shape == ref[n].shape, n
        _close(got[n], ref[n], cfg.get("dtype", torch.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("H", [5, 16, 33])
def test_scores_every_cpu_kernel_set(isa, H, monkeypatch):
    m = _model(hidden=H)
    ids, lengths = _batch(4, T=11)
    chars = m.char_cnn.chars_tensor([[WORDS[i] if i > 1 else "zq?" for i in row[:n]]
                                     for row, n in zip(ids.tolist(), lengths.tolist())])
    with fastmtl.use_cpu_kernel(isa):
        count = _Count(monkeypatch)
        got = m.scores(ids, lengths, chars)
        assert count.calls == 1
        ref = _modules_path(m, lambda: m.scores(ids, lengths, chars))
    for n in ref:
        _close(got[n], ref[n], torch.float32)


def test_predict_matches_the_modules(monkeypatch):
    m = _model()
    m.decode_constraints = {"tags": span_constraints(["O", "B-a", "I-a", "B-b", "I-b"], "bio"),
                            "crf": span_constraints(["O", "B-a", "I-a", "B-b", "I-b"], "bio")}
    ids, lengths = _batch(6, T=9)
    count = _Count(monkeypatch)
    for tasks in (None, ["crf", "s_max"]):
        preds, probs = m.predict(ids, lengths, return_probs=True, tasks=tasks)
        rp, rpr = _modules_path(m, lambda: m.predict(ids, lengths, return_probs=True, tasks=tasks))
        assert list(preds) == list(rp) and list(probs) == list(rpr)
        for n in rp:
            assert torch.equal(preds[n], rp[n]), n
            _close(probs[n], rpr[n], torch.float32)
        plain = m.predict(ids, lengths, tasks=tasks)
        assert list(plain) == list(preds) and all(torch.equal(preds[n], plain[n]) for n in plain)
    assert count.calls == 4


def test_predict_in_training_mode_restores_it(monkeypatch):
    m = _model().train()
    ids, lengths = _batch(3)
    count = _Count(monkeypatch)
    a = m.predict(ids, lengths)
    assert m.training and all(mod.training for mod in m.modules()) and count.calls == 1
    b = m.eval().predict(ids, lengths)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_where_the_fused_op_does_not_apply(monkeypatch):
    ids, lengths = _batch(3)
    count = _Count(monkeypatch)
    # a hook on a module the op stands in for must run: the modules' path
    m = _model()
    seen = []
    h = m.encoder.lstm.register_forward_hook(lambda mod, args, out: seen.append(1))
    m.scores(ids, lengths)
    assert seen and count.calls == 0
    h.remove()
    m.scores(ids, lengths)
    assert count.calls == 1
    # a global hook, or a forward replaced on an instance: the modules too
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append(2))
    m.scores(ids, lengths)
    h.remove()
    assert 2 in seen and count.calls == 1
    orig = m.char_cnn.forward
    m.char_cnn.forward = lambda ids, chars=None: seen.append(3) or orig(ids, chars)
    m.scores(ids, lengths)
    del m.char_cnn.forward
    assert 3 in seen and count.calls == 1
    m.scores(ids, lengths)
    assert count.calls == 2
    # soft sharing, token context, autocast, a gradient: the modules
    for other in (_model(sharing="soft"), _model(token_context=True)):
        other.scores(ids, lengths)
        other.predict(ids, lengths)
    assert count.calls == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.scores(ids, lengths)
    assert count.calls == 2
    with torch.enable_grad():
        assert m._fused_args(ids) is None  # parameters that need a gradient
        out = m.encode(ids, lengths)["top"]
        assert out.requires_grad
    # a replaced module is seen (the cached plan is keyed on the modules)
    m.encoder.lstm = fastmtl.nn.LSTM(m.encoder.lstm.input_size, 12, batch_first=True, bidirectional=True).eval()
    got = m.scores(ids, lengths)
    assert count.calls == 3
    ref = _modules_path(m, lambda: m.scores(ids, lengths))
    for n in ref:
        _close(got[n], ref[n], torch.float32)


def _op_args(B=2, T=4, L=3, E=5, C=4, F=3, H=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    ids = torch.randint(0, 9, (B, T), generator=g)
    lengths = torch.tensor([T] + [max(1, T - 1 - b) for b in range(1, B)])
    chars = torch.randint(0, 6, (B, T, L), generator=g)
    lstm = [r(4 * H, E + F), r(4 * H, H), r(4 * H), r(4 * H)] * 2
    heads = [r(3, 2 * H), r(5, 2 * H)]
    return [ids, lengths, chars, r(9, E), r(6, C), r(F, C, 3), r(F), lstm, 1, True, heads, [r(3), r(5)], [0, 0],
            [0, 1], [3, 0], [1, 0]]


def test_op_opcheck():
    torch.library.opcheck(torch.ops.fastmtl.tagger_forward, _op_args())
    torch.library.opcheck(torch.ops.fastmtl.tagger_forward, _op_args(B=3, dtype=torch.float64))


def test_op_has_no_gradient():
    args = _op_args()
    args[3] = args[3].requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference op and has no gradient"):
        torch.ops.fastmtl.tagger_forward(*args)
    with torch.no_grad():
        out = torch.ops.fastmtl.tagger_forward(*args)
    assert not out[0].requires_grad
    args[3] = args[3].detach()
    torch.ops.fastmtl.tagger_forward(*args)


def test_op_errors():
    op = torch.ops.fastmtl.tagger_forward

    def call(i, v):
        a = _op_args()
        a[i] = v
        return op(*a)

    with pytest.raises(IndexError, match="ids holds 9"):
        call(0, torch.full((2, 4), 9))
    with pytest.raises(IndexError, match="chars holds -1"):
        call(2, torch.full((2, 4, 3), -1))
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0 is out of range"):
        call(1, torch.tensor([4, 0]))
    with pytest.raises(ValueError, match=r"lengths\[0\] = 5 is out of range"):
        call(1, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="given together"):
        call(2, None)
    with pytest.raises(ValueError, match="must be \\(C, 12\\)"):
        a = _op_args()
        a[10] = [torch.randn(3, 11), a[10][1]]
        op(*a)
    with pytest.raises(ValueError, match="E \\+ F = 8 columns"):
        a = _op_args()
        a[7] = [torch.randn(24, 7), *a[7][1:]]
        op(*a)
    with pytest.raises(ValueError, match="odd k"):
        call(5, torch.randn(3, 4, 2))
    with pytest.raises(TypeError, match="float32 or float64"):
        a = _op_args()
        op(*[x.half() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in a])
    with pytest.raises(TypeError, match="dtype"):
        call(4, torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="head_layers\\[0\\] = 1"):
        call(12, [1, 0])


def test_plan_follows_the_modules(monkeypatch):
    ids, lengths = _batch(4)
    count = _Count(monkeypatch)
    m = _model()
    # a parametrized head: the modules' path (its weight is no longer a parameter of the head)
    torch.nn.utils.parametrize.register_parametrization(m.heads["top"]["tags"], "weight", _Double())
    got = m.scores(ids, lengths)
    assert count.calls == 0
    torch.nn.utils.parametrize.remove_parametrizations(m.heads["top"]["tags"], "weight")
    assert count.calls == 0 and torch.equal(got["tags"], _modules_path(m, lambda: m.scores(ids, lengths))["tags"])
    m.scores(ids, lengths)
    assert count.calls == 1
    # two replacements in a row (a freed module's address may be reused): the new weights are read
    for _ in range(2):
        m.encoder.lstm = fastmtl.nn.LSTM(m.encoder.lstm.input_size, 12, batch_first=True, bidirectional=True).eval()
    got = m.scores(ids, lengths)
    ref = _modules_path(m, lambda: m.scores(ids, lengths))
    for n in ref:
        _close(got[n], ref[n], torch.float32)
    # list lengths, as the modules take them
    a = m.predict(ids, lengths.tolist())
    b = m.predict(ids, lengths)
    assert all(torch.equal(a[n], b[n]) for n in b)


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


class _OwnEncoding(fastmtl.MultiTaskLSTM):
    def _embed(self, ids, chars=None):
        return super()._embed(ids, chars) * 0.5


def test_a_subclass_with_its_own_encoding_runs_its_modules(monkeypatch):
    torch.manual_seed(0)
    m = _OwnEncoding(V, 10, 12, _tasks(), char_words=WORDS, char_dim=6, char_filters=7).eval()
    ids, lengths = _batch(3)
    count = _Count(monkeypatch)
    m.scores(ids, lengths)
    assert count.calls == 0
