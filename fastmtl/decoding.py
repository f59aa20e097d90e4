"""Structured decoding of token tasks: the best tag sequence that is a valid BIO (IOB2) or IOBES labelling.

A softmax tagger picks each tag on its own and may output ``O I-city`` or ``B-fromloc I-toloc``; conlleval then
counts a span the model never meant. :func:`viterbi_decode` instead picks the sequence with the highest summed
log-probability among those whose transitions are allowed (exact, by dynamic programming over the tags): the
Viterbi and forward-backward kernels of the CRF ops (:func:`fastmtl.functional.crf_decode`, ``crf_marginals``) with
transitions that all score 0 and the constraints as masks. :func:`span_constraints` builds the allowed transitions of a tag set:

* ``"bio"`` (IOB2): ``I-X`` only after ``B-X`` or ``I-X``; a sentence never starts with ``I-X``.
* ``"iobes"``: ``I-X``/``E-X`` only after ``B-X``/``I-X``; after ``B-X``/``I-X`` only ``I-X``/``E-X``; a sentence
  starts with ``O``, ``B-``, ``S-`` and ends with ``O``, ``E-``, ``S-``.

Labels of another shape (neither ``O`` nor ``P-TYPE``) are left unconstrained. :func:`detect_scheme` returns the
scheme that the gold training sequences obey (``None`` when they break both, e.g. IOB1 data, whose ``I-X`` may start
a span: such tasks are decoded by argmax).
"""
import torch

from .functional.crf import crf_decode, crf_marginals

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
    lengths = _check("viterbi_decode", scores, lengths, allowed)
    B, T, C = scores.shape
    if B == 0 or T == 0:
        return torch.full((B, T), -1, dtype=torch.long, device=scores.device)
    return crf_decode(scores.float(), lengths, *_constrained_crf(C, allowed, start, end, scores.device))


def constrained_marginals(scores, lengths, allowed, start=None, end=None):
    """Per-token tag probabilities under the span constraints: ``P(tag_t = c)`` over the tag sequences that
    :func:`viterbi_decode` may return, each weighted by ``exp`` of its summed ``scores`` (forward-backward, exact).

    ``scores``: (B, T, C) per-token log-probabilities; ``lengths``, ``allowed``, ``start``, ``end`` as in
    :func:`viterbi_decode`. Returns (B, T, C) float32 probabilities that sum to 1 at every real position and are 0 at
    padded positions. With every transition allowed they are the softmax of ``scores``, i.e. the tagger's own
    per-token probabilities; with constraints they move the mass of impossible tags (``I-X`` after ``O``) onto the
    tags of valid sequences, so the tag Viterbi picks and its probability here agree in what they call a span."""
    lengths = _check("constrained_marginals", scores, lengths, allowed)
    B, T, C = scores.shape
    if B == 0 or T == 0:
        return torch.zeros(B, T, C, device=scores.device)
    # the forward-backward of a CRF whose transitions all score 0, in the native kernels (which normalise by Z)
    return crf_marginals(scores.float(), lengths, *_constrained_crf(C, allowed, start, end, scores.device))


def _check(fn, scores, lengths, allowed):
    """Checks the arguments of ``fn`` (:func:`viterbi_decode` or :func:`constrained_marginals`); returns the lengths
    as an int64 tensor on the scores' device."""
    if scores.dim() != 3:
        raise ValueError("fastmtl: %s: scores must be (B, T, C), got %s" % (fn, tuple(scores.shape)))
    B, T, C = scores.shape
    if tuple(allowed.shape) != (C, C):
        raise ValueError("fastmtl: %s: allowed must be (%d, %d), got %s" % (fn, C, C, tuple(allowed.shape)))
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = torch.as_tensor(lengths, device=scores.device).long()
    if tuple(lengths.shape) != (B,) or (B and (int(lengths.min()) < 1 or int(lengths.max()) > T)):
        raise ValueError("fastmtl: %s: lengths must be (%d,) values in [1, %d]" % (fn, B, T))
    return lengths


def _constrained_crf(C, allowed, start, end, device):
    """The CRF arguments (transitions, start, end, allowed, allowed_start, allowed_end) of a CRF whose transitions
    all score 0 under the constraints: its Viterbi path and marginals are those of the scores alone."""
    z = torch.zeros(C, device=device)
    masks = [None if m is None else m.to(device) for m in (start, end)]
    return (torch.zeros(C, C, device=device), z, z, allowed.to(device), *masks)
