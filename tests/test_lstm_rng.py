"""fastmtl.nn.LSTM consumes torch's global generator exactly as torch.nn.LSTM does (CPU): with the same seed, a
training forward gives the same dropout masks (so the same outputs and gradients) and leaves the generator in the
same state, for padded and packed input, one or two directions, batch_first, any number of layers; eval mode, p = 0
and one layer draw nothing. ``lengths=`` draws as torch.nn.LSTM over ``pack_padded_sequence(enforce_sorted=False)``."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastmtl.nn import LSTM

E, H = 5, 6


def _pair(L, bi, bf, p, dtype=torch.float64):
    ref = torch.nn.LSTM(E, H, L, batch_first=bf, bidirectional=bi, dropout=p, dtype=dtype)
    ours = LSTM.from_torch(ref)
    return ours.train(), ref.train()


def _run(m, x, seed, lengths=None, packed=False, enforce_sorted=False, bf=False, ours=False):
    """Output (padded), final states and the generator state after m's training forward under ``seed``."""
    torch.manual_seed(seed)
    if packed:
        out, (h, c) = m(pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=enforce_sorted))
        out = pad_packed_sequence(out, batch_first=bf, total_length=x.shape[1 if bf else 0])[0]
    elif lengths is not None and ours:
        out, (h, c) = m(x, lengths=lengths)
    else:
        out, (h, c) = m(x)
    return out, h, c, torch.get_rng_state()


def _grads(m, out, h, c, g):
    loss = (out * g).sum() + h.sum() + c.square().sum()
    return torch.autograd.grad(loss, list(m.parameters()))


def _check(ours, ref, x, lengths, mode, bf, seed):
    x = x.requires_grad_()
    kw = dict(lengths=lengths, bf=bf)
    if mode == "padded":
        a = _run(ours, x, seed, **kw, ours=False)
        b = _run(ref, x, seed, **kw)
    elif mode == "lengths":  # fastmtl's lengths= against torch over pack_padded_sequence(enforce_sorted=False)
        a = _run(ours, x, seed, **kw, ours=True)
        b = _run(ref, x, seed, packed=True, **kw)
        mask = (torch.arange(x.shape[1 if bf else 0]).unsqueeze(0) < lengths.unsqueeze(1))
        mask = (mask if bf else mask.t()).unsqueeze(-1)
        a = (a[0] * mask,) + a[1:]
    else:  # packed, either order
        a = _run(ours, x, seed, packed=True, enforce_sorted=mode == "packed_sorted", **kw)
        b = _run(ref, x, seed, packed=True, enforce_sorted=mode == "packed_sorted", **kw)
    assert torch.equal(a[3], b[3]), "generator state differs after the forward"
    for u, v in zip(a[:3], b[:3]):
        torch.testing.assert_close(u, v)
    g = torch.randn_like(a[0])
    for u, v in zip(_grads(ours, *a[:3], g), _grads(ref, *b[:3], g)):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("bi", [False, True])
@pytest.mark.parametrize("bf", [False, True])
@pytest.mark.parametrize("mode", ["padded", "packed", "packed_sorted", "lengths"])
def test_training_forward_matches_torch_rng(L, bi, bf, mode):
    seed = int(torch.randint(0, 2 ** 31, ()))
    torch.manual_seed(seed)
    ours, ref = _pair(L, bi, bf, 0.4)
    T, B = 7, 6
    x = torch.randn(B, T, E, dtype=torch.float64) if bf else torch.randn(T, B, E, dtype=torch.float64)
    lengths = torch.tensor([3, 7, 3, 1, 5, 3])  # ties: the packing's sort order matters
    if mode == "packed_sorted":
        lengths = torch.tensor([7, 5, 3, 3, 3, 1])
    _check(ours, ref, x, lengths, mode, bf, seed + 1)


@pytest.mark.parametrize("mode", ["packed", "lengths"])
def test_full_lengths_with_ties_and_unbatched(mode):
    # every sequence full length: the packed order still is the sort's (all ties)
    ours, ref = _pair(2, True, False, 0.5)
    x = torch.randn(4, 5, E, dtype=torch.float64)
    _check(ours, ref, x, torch.full((5,), 4), mode, False, 11)
    # unbatched input
    torch.manual_seed(2)
    a = ours(torch.randn(4, E, dtype=torch.float64))
    sa = torch.get_rng_state()
    torch.manual_seed(2)
    b = ref(torch.randn(4, E, dtype=torch.float64))
    assert torch.equal(sa, torch.get_rng_state())
    torch.testing.assert_close(a[0], b[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_masks_match(dtype):
    torch.manual_seed(5)
    ours, ref = _pair(2, True, False, 0.3, dtype=dtype)
    x = torch.randn(6, 4, E, dtype=dtype)
    lengths = torch.tensor([6, 2, 4, 4])
    for packed in (False, True):
        a = _run(ours, x, 9, lengths=lengths if packed else None, packed=packed)
        b = _run(ref, x, 9, lengths=lengths if packed else None, packed=packed)
        assert torch.equal(a[3], b[3])
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(a[0], b[0], **tol)


def test_no_draws_in_eval_p0_one_layer_and_no_grad_matches():
    x = torch.randn(5, 3, E, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    cases = [(_pair(3, True, False, 0.5)[0].eval(), True), (_pair(3, False, False, 0.0)[0], True)]
    with pytest.warns(UserWarning):
        cases.append((_pair(1, True, False, 0.5)[0], True))
    for m, _ in cases:
        for kw in ({}, {"lengths": lengths}):
            torch.manual_seed(4)
            before = torch.get_rng_state()
            m(x, **kw)
            m(pack_padded_sequence(x, lengths, enforce_sorted=False))
            assert torch.equal(before, torch.get_rng_state())
    # no_grad training forward draws as torch does
    ours, ref = _pair(2, True, False, 0.5)
    with torch.no_grad():
        a = _run(ours, x, 6, lengths=lengths, packed=True)
        b = _run(ref, x, 6, lengths=lengths, packed=True)
    assert torch.equal(a[3], b[3])
    torch.testing.assert_close(a[0], b[0])


class _Wrap(torch.nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, lengths: torch.Tensor):
        y, (h, c) = self.lstm(x, lengths=lengths)
        return y, h


def test_scripted_module_draws_as_eager():
    ours, _ = _pair(2, True, False, 0.5)
    scripted = torch.jit.script(_Wrap(ours))
    x = torch.randn(6, 4, E, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 3, 5])
    torch.manual_seed(8)
    a = ours(x, lengths=lengths)[0]
    sa = torch.get_rng_state()
    torch.manual_seed(8)
    b = scripted(x, lengths)[0]
    assert torch.equal(sa, torch.get_rng_state())
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["padded", "packed", "lengths"])
def test_dropout_one_draws_nothing_and_zeroes(mode):
    ours, ref = _pair(2, True, True, 1.0)
    x = torch.randn(4, 6, E, dtype=torch.float64)
    _check(ours, ref, x, torch.tensor([2, 6, 6, 1]), mode, True, 12)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    ours(x) if mode == "padded" else ours(x, lengths=torch.tensor([2, 6, 6, 1]))
    assert torch.equal(before, torch.get_rng_state())
