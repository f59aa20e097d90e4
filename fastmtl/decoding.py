"""Structured decoding of token tasks: the best tag sequence that is a valid BIO (IOB2) or IOBES labelling.

A softmax tagger picks each tag on its own and may output ``O I-city`` or ``B-fromloc I-toloc``; conlleval then
counts a span the model never meant. :func:`viterbi_decode` instead picks the sequence with the highest summed
log-probability among those whose transitions are allowed (exact, by dynamic programming over the tags), which
costs one (B, C, C) max per time step. :func:`span_constraints` builds the allowed transitions of a tag set:

* ``"bio"`` (IOB2): ``I-X`` only after ``B-X`` or ``I-X``; a sentence never starts with ``I-X``.
* ``"iobes"``: ``I-X``/``E-X`` only after ``B-X``/``I-X``; after ``B-X``/``I-X`` only ``I-X``/``E-X``; a sentence
  starts with ``O``, ``B-``, ``S-`` and ends with ``O``, ``E-``, ``S-``.

Labels of another shape (neither ``O`` nor ``P-TYPE``) are left unconstrained. :func:`detect_scheme` returns the
scheme that the gold training sequences obey (``None`` when they break both, e.g. IOB1 data, whose ``I-X`` may start
a span: such tasks are decoded by argmax).
"""
import torch

__all__ = ["span_constraints", "detect_scheme", "viterbi_decode", "constrained_marginals"]

SCHEMES = ("bio", "iobes")


def _parts(label):
    if len(label) > 2 and label[1] == "-" and label[0] in "BIES":
        return label[0], label[2:]
    return ("O", "") if label == "O" else (None, None)


def span_constraints(labels, scheme="bio"):
    """``(allowed (C, C) bool, start (C,) bool, end (C,) bool)`` for the tag list ``labels`` (index -> string):
    ``allowed[i, j]`` says tag ``j`` may follow tag ``i``; ``start``/``end`` which tags may open/close a sentence."""
    if scheme not in SCHEMES:
        raise ValueError("fastmtl: span_constraints: scheme must be one of %s, got %r" % (", ".join(SCHEMES), scheme))
    parts = [_parts(l) for l in labels]
    C = len(parts)
    allowed = torch.ones(C, C, dtype=torch.bool)
    start = torch.ones(C, dtype=torch.bool)
    end = torch.ones(C, dtype=torch.bool)
    inside = ("I",) if scheme == "bio" else ("I", "E")  # tags that continue a span
    opened = ("B", "I")                                 # tags after which a span is still open
    for j, (pj, tj) in enumerate(parts):
        if pj is None:
            continue
        if pj in inside:
            start[j] = False
        if scheme == "iobes" and pj in ("B", "I"):
            end[j] = False
        for i, (pi, ti) in enumerate(parts):
            if pi is None:
                continue
            if pj in inside:
                allowed[i, j] = pi in opened and ti == tj
            elif scheme == "iobes" and pi in opened:
                allowed[i, j] = False          # an open span must continue with I-/E- of its type
    return allowed, start, end


def _valid(seq, scheme):
    prev = ("O", "")
    for label in seq:
        p, t = _parts(label)
        if p is None:
            prev = ("O", "")
            continue
        open_ = prev[0] in ("B", "I")
        if scheme == "bio":
            if p == "I" and not (open_ and prev[1] == t):
                return False
            if p in ("E", "S"):
                return False
        else:
            if p in ("I", "E") and not (open_ and prev[1] == t):
                return False
            if p in ("O", "B", "S") and open_:
                return False
        prev = (p, t)
    return not (scheme == "iobes" and prev[0] in ("B", "I"))


def detect_scheme(sequences):
    """``"bio"`` or ``"iobes"`` when every sequence of gold tags (lists of strings) is valid under it (BIO preferred
    when no ``E-``/``S-`` tag occurs), else ``None``."""
    sequences = [list(s) for s in sequences]
    for scheme in SCHEMES:
        if all(_valid(s, scheme) for s in sequences):
            return scheme
    return None


def viterbi_decode(scores, lengths, allowed, start=None, end=None):
    """Best allowed tag sequences. ``scores``: (B, T, C) per-token log-probabilities (or any additive scores);
    ``lengths``: (B,) real lengths (>= 1; None: all T); ``allowed``: (C, C) bool; ``start``/``end``: (C,) bool or None.
    Returns (B, T) int64 tags, -1 at padded positions. Ties go to the lowest tag index."""
    if scores.dim() != 3:
        raise ValueError("fastmtl: viterbi_decode: scores must be (B, T, C), got %s" % (tuple(scores.shape),))
    B, T, C = scores.shape
    if tuple(allowed.shape) != (C, C):
        raise ValueError("fastmtl: viterbi_decode: allowed must be (%d, %d), got %s" % (C, C, tuple(allowed.shape)))
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = torch.as_tensor(lengths, device=scores.device).long()
    if tuple(lengths.shape) != (B,) or (B and (int(lengths.min()) < 1 or int(lengths.max()) > T)):
        raise ValueError("fastmtl: viterbi_decode: lengths must be (%d,) values in [1, %d]" % (B, T))
    out = torch.full((B, T), -1, dtype=torch.long, device=scores.device)
    if B == 0 or T == 0:
        return out
    s = scores.float()
    neg = torch.tensor(-1e30, device=s.device)
    trans = torch.where(allowed.to(s.device), torch.zeros((), device=s.device), neg)  # (C, C)
    score = s[:, 0]
    if start is not None:
        score = score + torch.where(start.to(s.device), torch.zeros((), device=s.device), neg)
    back = torch.zeros(B, max(T - 1, 0), C, dtype=torch.long, device=s.device)
    for t in range(1, T):
        best, arg = (score.unsqueeze(2) + trans).max(dim=1)          # (B, C): best previous tag for each tag
        live = (t < lengths).unsqueeze(1)
        score = torch.where(live, best + s[:, t], score)
        back[:, t - 1] = arg
    if end is not None:
        score = score + torch.where(end.to(s.device), torch.zeros((), device=s.device), neg)
    tag = score.argmax(dim=1)                                          # (B,) tag at position length-1
    ar = torch.arange(B, device=s.device)
    for t in range(T - 1, -1, -1):
        at_end = lengths - 1 == t
        inside = lengths - 1 > t
        if t < T - 1:
            prev = back[ar, t, tag]                                    # tag at t, given the tag at t + 1
            tag = torch.where(inside, prev, tag)
        out[:, t] = torch.where(at_end | inside, tag, out[:, t])
    return out


def constrained_marginals(scores, lengths, allowed, start=None, end=None):
    """Per-token tag probabilities under the span constraints: ``P(tag_t = c)`` over the tag sequences that
    :func:`viterbi_decode` may return, each weighted by ``exp`` of its summed ``scores`` (forward-backward, exact).

    ``scores``: (B, T, C) per-token log-probabilities; ``lengths``, ``allowed``, ``start``, ``end`` as in
    :func:`viterbi_decode`. Returns (B, T, C) float32 probabilities that sum to 1 at every real position and are 0 at
    padded positions. With every transition allowed they are the softmax of ``scores``, i.e. the tagger's own
    per-token probabilities; with constraints they move the mass of impossible tags (``I-X`` after ``O``) onto the
    tags of valid sequences, so the tag Viterbi picks and its probability here agree in what they call a span."""
    if scores.dim() != 3:
        raise ValueError("fastmtl: constrained_marginals: scores must be (B, T, C), got %s" % (tuple(scores.shape),))
    B, T, C = scores.shape
    if tuple(allowed.shape) != (C, C):
        raise ValueError("fastmtl: constrained_marginals: allowed must be (%d, %d), got %s"
                         % (C, C, tuple(allowed.shape)))
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = torch.as_tensor(lengths, device=scores.device).long()
    if tuple(lengths.shape) != (B,) or (B and (int(lengths.min()) < 1 or int(lengths.max()) > T)):
        raise ValueError("fastmtl: constrained_marginals: lengths must be (%d,) values in [1, %d]" % (B, T))
    if B == 0 or T == 0:
        return torch.zeros(B, T, C, device=scores.device)
    # forward-backward in the scaled probability domain: each step is a (B, C) x (C, C) product with the 0/1
    # matrix of allowed transitions, after subtracting the row maximum (float64: a path underflows only when it is
    # e^-700 times less likely than the best one), instead of a log-sum-exp over a (B, C, C) tensor
    s = scores.double()
    dev = s.device
    A = allowed.to(dev).double()                                                   # (C, C) from -> to
    ninf = torch.tensor(float("-inf"), dtype=s.dtype, device=dev)
    zero = torch.zeros((), dtype=s.dtype, device=dev)
    first = torch.where(start.to(dev), zero, ninf) if start is not None else torch.zeros(C, dtype=s.dtype, device=dev)
    last = torch.where(end.to(dev), zero, ninf) if end is not None else torch.zeros(C, dtype=s.dtype, device=dev)

    def step(x, M):  # log(exp(x) @ M), row-scaled
        m = x.amax(dim=1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, zero)
        return torch.log(torch.exp(x - m) @ M) + m

    alpha = torch.empty(B, T, C, dtype=s.dtype, device=dev)
    alpha[:, 0] = s[:, 0] + first
    for t in range(1, T):
        alpha[:, t] = step(alpha[:, t - 1], A) + s[:, t]
    beta = torch.empty(B, T, C, dtype=s.dtype, device=dev)
    beta[:, T - 1] = last
    At = A.t()
    for t in range(T - 2, -1, -1):
        nxt = step(s[:, t + 1] + beta[:, t + 1], At)                              # (B, C)
        beta[:, t] = torch.where((t < lengths - 1).unsqueeze(1), nxt, last)
    ar = torch.arange(B, device=dev)
    logz = torch.logsumexp(alpha[ar, lengths - 1] + last, dim=1)                   # (B,)
    p = torch.exp(alpha + beta - logz.view(B, 1, 1))
    valid = torch.arange(T, device=dev).unsqueeze(0) < lengths.unsqueeze(1)
    p = torch.where(valid.unsqueeze(2) & torch.isfinite(p), p, zero)
    return (p / p.sum(dim=2, keepdim=True).clamp_min(1e-300)).float()                  # exact up to rounding
