"""Pure-PyTorch reference of the linear-chain CRF ops (pytorch-crf semantics, variable lengths, optional hard
constraints): a vectorised log-sum-exp / max-product recursion over a (B, C, C) tensor per time step, as a careful
user writes it without fastmtl (the AllenNLP style). It is the ground truth of the tests, the baseline of the
benchmarks and the differentiable recomputation behind the double backward of :func:`fastmtl.functional.crf_nll`.

Conventions (those of :mod:`fastmtl.functional.crf`): emissions (B, T, C) batch first; tags (B, T) int64; lengths
(B,) with positions t >= lengths[b] ignored (a length-0 sequence has NLL 0); transitions (C, C) indexed
[from, to]; start, end (C,); allowed (C, C) / allowed_start / allowed_end (C,) bool masks or None, a forbidden
entry scoring -inf.
"""
import torch

__all__ = ["crf_effective_reference", "crf_log_partition_reference", "crf_score_reference", "crf_nll_reference",
           "crf_decode_reference", "crf_marginals_reference"]


def crf_effective_reference(transitions, start, end, allowed=None, allowed_start=None, allowed_end=None):
    """(transitions, start, end) with the forbidden entries (mask False) at -inf."""
    ninf = float("-inf")
    if allowed is not None:
        transitions = transitions.masked_fill(~allowed, ninf)
    if allowed_start is not None:
        start = start.masked_fill(~allowed_start, ninf)
    if allowed_end is not None:
        end = end.masked_fill(~allowed_end, ninf)
    return transitions, start, end


def _logsumexp(x, dim):
    """torch.logsumexp whose gradient stays finite (0) where every term is -inf (unreachable states under
    constraints), to any order."""
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (x - m).exp().sum(dim)
    pos = s > 0
    out = torch.log(torch.where(pos, s, torch.ones_like(s))) + m.squeeze(dim)
    return torch.where(pos, out, torch.full_like(out, float("-inf")))


def _mask(lengths, B, T, device):
    if lengths is None:
        return torch.ones(B, T, dtype=torch.bool, device=device), torch.full((B,), T, device=device)
    lengths = lengths.to(device=device, dtype=torch.long)
    return torch.arange(T, device=device)[None, :] < lengths[:, None], lengths


def crf_log_partition_reference(emissions, lengths, transitions, start, end, allowed=None, allowed_start=None,
                                allowed_end=None):
    """log Z per sequence (B,): the forward algorithm in log space (0 for a sequence of length 0)."""
    B, T, C = emissions.shape
    transitions, start, end = crf_effective_reference(transitions, start, end, allowed, allowed_start, allowed_end)
    mask, lengths = _mask(lengths, B, T, emissions.device)
    if T == 0:
        return emissions.new_zeros((B,))
    alpha = start + emissions[:, 0]
    for t in range(1, T):
        nxt = _logsumexp(alpha.unsqueeze(2) + transitions + emissions[:, t].unsqueeze(1), 1)
        alpha = torch.where(mask[:, t, None], nxt, alpha)
    lz = _logsumexp(alpha + end, 1)
    return torch.where(lengths > 0, lz, torch.zeros_like(lz))


def crf_score_reference(emissions, tags, lengths, transitions, start, end, allowed=None, allowed_start=None,
                        allowed_end=None):
    """Score of the gold path per sequence (B,) (-inf when it uses a forbidden entry; 0 for length 0). Tags at
    padding positions are never read."""
    B, T, C = emissions.shape
    transitions, start, end = crf_effective_reference(transitions, start, end, allowed, allowed_start, allowed_end)
    mask, lengths = _mask(lengths, B, T, emissions.device)
    if T == 0:
        return emissions.new_zeros((B,))
    y = tags.masked_fill(~mask, 0)
    e = emissions.gather(2, y.unsqueeze(2)).squeeze(2)
    zero = emissions.new_zeros(())
    score = start[y[:, 0]] + torch.where(mask, e, zero).sum(1)
    if T > 1:
        tr = transitions[y[:, :-1], y[:, 1:]]
        score = score + torch.where(mask[:, 1:], tr, zero).sum(1)
    last = y.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    score = score + end[last]
    return torch.where(lengths > 0, score, torch.zeros_like(score))


def crf_nll_reference(emissions, tags, lengths, transitions, start, end, reduction="none", allowed=None,
                      allowed_start=None, allowed_end=None):
    """Negative log-likelihood log Z - score per sequence, reduced as :func:`fastmtl.functional.crf_nll`
    (+inf for a gold path through a forbidden entry)."""
    lz = crf_log_partition_reference(emissions, lengths, transitions, start, end, allowed, allowed_start, allowed_end)
    sc = crf_score_reference(emissions, tags, lengths, transitions, start, end, allowed, allowed_start, allowed_end)
    nll = torch.where(torch.isinf(sc) & (sc < 0), torch.full_like(lz, float("inf")), lz - sc)
    return reduce_nll(nll, lengths, emissions.shape[1], reduction)


def reduce_nll(nll, lengths, T, reduction):
    """The per-sequence NLLs (B,) reduced as pytorch-crf does (``"token_mean"``: divided by the real tokens; lengths
    None: all T); :func:`fastmtl.functional.crf_nll` reduces its kernel's NLLs with it too."""
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.mean()
    if reduction == "token_mean":
        n = lengths.sum() if lengths is not None else torch.tensor(nll.shape[0] * T)
        return nll.sum() / n.to(nll.dtype)
    raise ValueError("reduction must be 'none', 'sum', 'mean' or 'token_mean', got %r" % (reduction,))


def crf_decode_reference(emissions, lengths, transitions, start, end, allowed=None, allowed_start=None,
                         allowed_end=None):
    """Viterbi paths (B, T) int64, -1 at padding; ties as pytorch-crf (the first maximal index)."""
    B, T, C = emissions.shape
    transitions, start, end = crf_effective_reference(transitions, start, end, allowed, allowed_start, allowed_end)
    mask, lengths = _mask(lengths, B, T, emissions.device)
    out = torch.full((B, T), -1, dtype=torch.long, device=emissions.device)
    if T == 0:
        return out
    score = start + emissions[:, 0]
    history = []
    for t in range(1, T):
        nxt, idx = (score.unsqueeze(2) + transitions + emissions[:, t].unsqueeze(1)).max(dim=1)
        score = torch.where(mask[:, t, None], nxt, score)
        history.append(idx)
    score = score + end
    for b in range(B):
        L = int(lengths[b])
        if L == 0:
            continue
        best = int(score[b].max(dim=0)[1])
        out[b, L - 1] = best
        for t in range(L - 1, 0, -1):
            best = int(history[t - 1][b, best])
            out[b, t - 1] = best
    return out


def crf_marginals_reference(emissions, lengths, transitions, start, end, allowed=None, allowed_start=None,
                            allowed_end=None):
    """Per-token marginals (B, T, C): d log Z / d emissions (0 at padding)."""
    with torch.enable_grad():
        e = emissions.detach().requires_grad_(True)
        lz = crf_log_partition_reference(e, lengths, transitions.detach(), start.detach(), end.detach(), allowed,
                                         allowed_start, allowed_end)
        (g,) = torch.autograd.grad(lz.sum(), e)
    return g
