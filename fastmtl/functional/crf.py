"""Linear-chain CRF: negative log-likelihood (with exact forward-backward gradients), Viterbi decoding and
per-token marginals in fused native kernels.

Semantics are those of pytorch-crf (``torchcrf.CRF(C, batch_first=True)``): the score of a tag path y of a sequence
of length L is ``start[y_0] + sum_t emissions[t, y_t] + sum_{t>=1} transitions[y_{t-1}, y_t] + end[y_{L-1}]``, with
``transitions`` indexed [from, to]. Variable lengths are native: ``lengths[b]`` real positions per sequence, the
tags and emissions at t >= lengths[b] are never read (padding tags need not be valid). A length of 0 is allowed: the
sequence has NLL 0, no gradient, an all -1 path and zero marginals (pytorch-crf requires mask[:, 0] on, i.e.
lengths >= 1; every length >= 1 gives pytorch-crf's numbers).

Hard constraints: ``allowed`` (C, C) [from, to], ``allowed_start`` (C,) and ``allowed_end`` (C,) are optional bool
masks (None: everything allowed). A forbidden entry scores -inf in every op: decoded paths never use it, marginals
of paths through it are 0, its parameter gets a zero gradient, and the NLL of a gold path that uses it is +inf (that
sequence then contributes no gradient: fix the data or the mask). When no path at all is allowed, log Z is -inf, the
decoded path is arbitrary and the marginals are 0.

Precision: the NLL and its gradients are as accurate as PyTorch's own recursion in the compute dtype. The float32
marginals are formed as exp(alpha + beta - log Z) from float32 log-scores, so their absolute error grows with the
magnitude of the scores: a few float32 ulps of |log Z| (about 1e-6 for log-probability emissions over a sentence,
up to ~5e-4 when |log Z| reaches 1e3); pass float64 inputs where that matters.

Dtypes: the floating inputs (emissions, transitions, start, end) are promoted to one dtype (e.g. bfloat16 emissions
with float32 parameters run in float32); the math is float32 for float32/bfloat16/float16 and float64 for float64,
and the NLL comes back in that compute dtype. Gradients have the dtype of each input.
"""
import torch

from .. import ops  # noqa: F401  registers fake kernels and autograd
from ..reference.crf import reduce_nll

__all__ = ["crf_nll", "crf_decode", "crf_marginals", "REDUCTIONS"]

REDUCTIONS = ("none", "sum", "mean", "token_mean")


def _check_tensor(x, name, shape_doc):
    if not isinstance(x, torch.Tensor):
        raise TypeError("fastmtl: %s must be a tensor of shape %s, got %s" % (name, shape_doc, type(x).__name__))


def _mask_arg(m, name, emissions):
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        m = torch.as_tensor(m)
    if m.dtype != torch.bool:
        raise TypeError("fastmtl: %s must be a bool mask (True = allowed), got dtype %s" % (name, m.dtype))
    return m.to(emissions.device)


def _normalise(emissions, lengths, transitions, start, end, allowed, allowed_start, allowed_end):
    _check_tensor(emissions, "emissions", "(B, T, C)")
    if emissions.dim() != 3:
        raise ValueError("fastmtl: emissions must have shape (B, T, C) (batch first), got shape %s"
                         % (tuple(emissions.shape),))
    B, T, C = emissions.shape
    params = []
    for x, name, doc in ((transitions, "transitions", "(C, C) [from, to]"), (start, "start", "(C,)"),
                         (end, "end", "(C,)")):
        _check_tensor(x, name, doc)
        if not x.is_floating_point():
            raise TypeError("fastmtl: %s must be a floating tensor, got dtype %s" % (name, x.dtype))
        params.append(x)
    if not emissions.is_floating_point():
        raise TypeError("fastmtl: emissions must be a floating tensor, got dtype %s" % emissions.dtype)
    dt = emissions.dtype
    for x in params:
        dt = torch.promote_types(dt, x.dtype)
    emissions = emissions.to(dt)
    transitions, start, end = (x.to(device=emissions.device, dtype=dt) for x in params)
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=emissions.device)
    else:
        if not isinstance(lengths, torch.Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise TypeError("fastmtl: lengths must hold integers, got dtype %s" % lengths.dtype)
        lengths = lengths.to(device=emissions.device, dtype=torch.long)
    masks = [_mask_arg(m, n, emissions) for m, n in zip((allowed, allowed_start, allowed_end),
                                                         ("allowed", "allowed_start", "allowed_end"))]
    return emissions, lengths, transitions, start, end, masks


def crf_nll(emissions, tags, lengths, transitions, start, end, reduction="sum", allowed=None, allowed_start=None,
            allowed_end=None):
    """Negative log-likelihood of the gold ``tags`` under a linear-chain CRF.

    emissions (B, T, C), tags (B, T) int64, lengths (B,) integers in [0, T] (None: all T), transitions (C, C)
    [from, to], start (C,), end (C,); reduction ``"sum"`` (default), ``"mean"`` (over the batch, as pytorch-crf),
    ``"token_mean"`` (divided by the number of real tokens, as pytorch-crf) or ``"none"`` (per sequence, (B,)).
    Equals ``-torchcrf.CRF(C, batch_first=True)(emissions, tags, mask, reduction)`` with the CRF's parameters set to
    (transitions, start, end) and ``mask = arange(T) < lengths[:, None]``. Differentiable (exactly, by
    forward-backward) in emissions, transitions, start and end, to any order.
    """
    if reduction not in REDUCTIONS:
        raise ValueError("fastmtl: reduction must be one of %s, got %r" % (", ".join(REDUCTIONS), reduction))
    emissions, lengths, transitions, start, end, masks = _normalise(emissions, lengths, transitions, start, end,
                                                                    allowed, allowed_start, allowed_end)
    _check_tensor(tags, "tags", "(B, T)")
    if tags.dtype.is_floating_point or tags.dtype == torch.bool or tags.is_complex():
        raise TypeError("fastmtl: tags must hold integers (int64), got dtype %s" % tags.dtype)
    tags = tags.to(device=emissions.device, dtype=torch.long)
    nll = torch.ops.fastmtl.crf_nll_fwd(emissions, tags, lengths, transitions, start, end, *masks)[0]
    return reduce_nll(nll, lengths, emissions.shape[1], reduction)


def crf_decode(emissions, lengths, transitions, start, end, allowed=None, allowed_start=None, allowed_end=None):
    """Viterbi decoding: the best tag path per sequence, (B, T) int64 with -1 at padding (t >= lengths[b]). The same
    paths as pytorch-crf's ``decode`` (ties go to the first maximal index). Never uses a forbidden entry when an
    allowed path exists. Not differentiable."""
    emissions, lengths, transitions, start, end, masks = _normalise(emissions, lengths, transitions, start, end,
                                                                    allowed, allowed_start, allowed_end)
    return torch.ops.fastmtl.crf_decode(emissions.detach(), lengths, transitions.detach(), start.detach(),
                                        end.detach(), *masks)


def crf_marginals(emissions, lengths, transitions, start, end, allowed=None, allowed_start=None, allowed_end=None):
    """Per-token marginal probabilities P(y_t = c | x), (B, T, C) in the compute dtype (float32 for
    bfloat16/float16 inputs), 0 at padding; each real position sums to 1. Not differentiable."""
    emissions, lengths, transitions, start, end, masks = _normalise(emissions, lengths, transitions, start, end,
                                                                    allowed, allowed_start, allowed_end)
    return torch.ops.fastmtl.crf_marginals(emissions.detach(), lengths, transitions.detach(), start.detach(),
                                           end.detach(), *masks)
