"""Evaluation metrics: accuracy, per-class and micro/macro precision/recall/F1, conlleval span F1, frame accuracy.

All values are fractions in [0, 1].
"""
import collections

__all__ = ["accuracy", "classification_report", "get_spans", "span_f1", "frame_accuracy", "is_span_tagset"]


def _check_same_length(gold, pred, what="gold and pred"):
    if len(gold) != len(pred):
        raise ValueError("fastmtl: %s have different lengths (%d vs %d)" % (what, len(gold), len(pred)))


def flatten_pairs(gold, pred):
    """``(gold, pred)`` as flat label lists: lists of labels as they are, lists of label lists flattened (each pair
    of sequences checked to have the same length)."""
    _check_same_length(gold, pred)
    if gold and isinstance(gold[0], (list, tuple)):
        g2, p2 = [], []
        for i, (g, p) in enumerate(zip(gold, pred)):
            _check_same_length(g, p, "gold and pred sequence %d" % i)
            g2 += list(g)
            p2 += list(p)
        gold, pred = g2, p2
    return gold, pred


def accuracy(gold, pred):
    """Fraction of positions where ``pred == gold``. Lists of labels, or lists of label lists (flattened)."""
    gold, pred = flatten_pairs(gold, pred)
    if not gold:
        return 0.0
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def _prf(tp, n_pred, n_gold):
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def classification_report(gold, pred):
    """Per-class, micro and macro precision/recall/F1 of single-label classification.

    Returns ``{"per_class": {label: {"precision", "recall", "f1", "support"}}, "micro": {...}, "macro": {...},
    "accuracy": float}``. Classes are all labels seen in gold or pred; macro averages over them.
    """
    _check_same_length(gold, pred)
    tp = collections.Counter(g for g, p in zip(gold, pred) if g == p)
    ng = collections.Counter(gold)
    npred = collections.Counter(pred)
    per = {}
    for c in sorted(set(ng) | set(npred), key=str):
        p, r, f = _prf(tp[c], npred[c], ng[c])
        per[c] = {"precision": p, "recall": r, "f1": f, "support": ng[c]}
    p, r, f = _prf(sum(tp.values()), len(pred), len(gold))
    n = max(len(per), 1)
    macro = {k: sum(v[k] for v in per.values()) / n for k in ("precision", "recall", "f1")}
    return {"per_class": per, "micro": {"precision": p, "recall": r, "f1": f}, "macro": macro,
            "accuracy": accuracy(gold, pred)}


def _split(tag):
    if tag in ("O", "."):  # conlleval treats "." as outside too
        return tag, ""
    prefix = tag[0]
    rest = tag[1:]
    if rest.startswith("-") or rest.startswith("_"):
        rest = rest[1:]
    return prefix, rest


def _end_of_chunk(prev_tag, tag, prev_type, type_):
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _start_of_chunk(prev_tag, tag, prev_type, type_):
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def get_spans(tags):
    """Chunks of one tag sequence as ``(type, start, end)`` (end inclusive), with conlleval's rules.

    Tags are ``O`` or ``<P>-<TYPE>`` with P in B, I, E, S (BIO, IOB1, IOB2, IOBES); an ``I`` after ``O`` or after a
    different type starts a chunk, as in conlleval.
    """
    spans = []
    prev_tag, prev_type, start = "O", "", None
    for i, t in enumerate(list(tags) + ["O"]):
        tag, type_ = _split(t)
        if _end_of_chunk(prev_tag, tag, prev_type, type_) and start is not None:
            spans.append((prev_type, start, i - 1))
            start = None
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            start = i
        prev_tag, prev_type = tag, type_
    return spans


def span_f1(gold, pred):
    """Span-level (micro) precision, recall and F1 over lists of tag lists, with conlleval's semantics.

    A predicted chunk counts only if its type, start and end all match a gold chunk. Returns
    ``{"precision", "recall", "f1"}`` as fractions (0 when there is nothing to divide by).
    """
    _check_same_length(gold, pred)
    tp = n_gold = n_pred = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        _check_same_length(g, p, "gold and pred sequence %d" % i)
        gs, ps = set(get_spans(g)), set(get_spans(p))
        tp += len(gs & ps)
        n_gold += len(gs)
        n_pred += len(ps)
    p, r, f = _prf(tp, n_pred, n_gold)
    return {"precision": p, "recall": r, "f1": f}


def is_span_tagset(labels):
    """True when every label is ``O`` or ``B-/I-/E-/S-<TYPE>`` and at least one is not ``O``."""
    labels = list(labels)
    ok = all(l == "O" or (len(l) > 2 and l[0] in "BIES" and l[1] == "-") for l in labels)
    return ok and any(l != "O" for l in labels)


def frame_accuracy(gold_seq, pred_seq, gold_tokens, pred_tokens):
    """Fraction of sentences whose sentence label is right *and* every token label is right."""
    _check_same_length(gold_seq, pred_seq)
    _check_same_length(gold_seq, gold_tokens, "sentence and token labels")
    _check_same_length(gold_tokens, pred_tokens)
    if not gold_seq:
        return 0.0
    ok = sum(gs == ps and list(gt) == list(pt)
             for gs, ps, gt, pt in zip(gold_seq, pred_seq, gold_tokens, pred_tokens))
    return ok / len(gold_seq)
