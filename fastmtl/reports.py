"""Per-class evaluation reports (``fastmtl evaluate --report``) and prediction files (``--predictions``).

:func:`task_reports` gives, for every task, per-class precision, recall, F1 and support with micro, macro and
weighted averages:

* token tasks with a span tag set (BIO/IOB2/IOBES, :func:`fastmtl.metrics.is_span_tagset`): per **span type**, a
  span counting only when its type, start and end match (conlleval's chunks, as ``span_f1``; the figures equal
  seqeval's ``classification_report`` in its default mode);
* sequence tasks: per **label**, over sentences;
* other token tasks (POS, ...): per **label**, over tokens.

Classes are every type/label found in the gold or the predicted labels (sorted); ``support`` is the number of gold
spans, sentences or tokens of the class. ``micro`` pools the counts of all classes, ``macro`` is the unweighted mean
of the per-class figures and ``weighted`` their mean weighted by support (as scikit-learn and seqeval define them).
For label reports micro precision = recall = F1 = accuracy. All values are fractions in [0, 1].
"""
import collections
import json

from .metrics import _check_same_length, _prf, flatten_pairs, get_spans, is_span_tagset

__all__ = ["classification_counts_report", "label_report", "span_report", "task_reports", "format_report",
           "prediction_records", "dumps_records"]

_AVGS = ("micro", "macro", "weighted")


def classification_counts_report(tp, n_pred, n_gold):
    """The report of per-class counts (three ``{class: count}`` mappings): ``{"per_class": {class: {"precision",
    "recall", "f1", "support"}}, "micro", "macro", "weighted"}``; classes are those with a gold or predicted item."""
    classes = sorted(set(n_gold) | set(n_pred), key=str)
    per = {}
    for c in classes:
        p, r, f = _prf(tp.get(c, 0), n_pred.get(c, 0), n_gold.get(c, 0))
        per[c] = {"precision": p, "recall": r, "f1": f, "support": n_gold.get(c, 0)}
    total = sum(n_gold.get(c, 0) for c in classes)
    p, r, f = _prf(sum(tp.get(c, 0) for c in classes), sum(n_pred.get(c, 0) for c in classes), total)
    out = {"per_class": per, "micro": {"precision": p, "recall": r, "f1": f, "support": total}}
    n = len(per)
    keys = ("precision", "recall", "f1")
    out["macro"] = dict({k: (sum(v[k] for v in per.values()) / n if n else 0.0) for k in keys}, support=total)
    out["weighted"] = dict({k: (sum(v[k] * v["support"] for v in per.values()) / total if total else 0.0)
                            for k in keys}, support=total)
    return out


def span_report(gold, pred):
    """Per span type report of lists of tag lists (conlleval chunks; see the module docstring)."""
    _check_same_length(gold, pred)
    tp, n_pred, n_gold = collections.Counter(), collections.Counter(), collections.Counter()
    for i, (g, p) in enumerate(zip(gold, pred)):
        _check_same_length(g, p, "gold and pred sequence %d" % i)
        gs, ps = set(get_spans(g)), set(get_spans(p))
        n_gold.update(t for t, _, _ in gs)
        n_pred.update(t for t, _, _ in ps)
        tp.update(t for t, _, _ in gs & ps)
    return classification_counts_report(tp, n_pred, n_gold)


def label_report(gold, pred):
    """Per label report of single labels (lists of labels), with ``"accuracy"``. Lists of label lists (token tasks)
    are flattened (sequence by sequence lengths must match)."""
    gold, pred = flatten_pairs(gold, pred)
    tp = collections.Counter(g for g, p in zip(gold, pred) if g == p)
    out = classification_counts_report(tp, collections.Counter(pred), collections.Counter(gold))
    out["accuracy"] = (sum(tp.values()) / len(gold)) if gold else 0.0
    return out


def task_reports(specs, examples, predictions):
    """``{task: report}`` for ``specs`` (``TaskSpec``) over ``examples`` (with gold labels in each spec's source)
    and ``predictions`` (``{task: label or [labels]}`` per example, as ``fastmtl.train.predict_examples`` gives).

    Each report is one of :func:`span_report` or :func:`label_report` plus ``"level"`` (``"sequence"`` or
    ``"token"``), ``"unit"`` (``"span"``, ``"sentence"`` or ``"token"``: what is counted) and ``"examples"`` (the
    examples with a gold label for the task; the others are left out, as in ``metrics.json``)."""
    _check_same_length(examples, predictions, "examples and predictions")
    out = {}
    for s in specs:
        pairs = [(ex[s.source], p[s.name]) for ex, p in zip(examples, predictions) if ex.get(s.source) is not None]
        gold = [g for g, _ in pairs]
        pred = [p for _, p in pairs]
        if s.level == "token" and is_span_tagset({l for g in gold for l in g}):
            rep, unit = span_report(gold, pred), "span"
        else:
            rep, unit = label_report(gold, pred), ("sentence" if s.level == "sequence" else "token")
        out[s.name] = dict({"level": s.level, "unit": unit, "examples": len(pairs)}, **rep)
    return out


def format_report(reports, digits=4):
    """The reports of :func:`task_reports` as text tables, one per task (the layout of scikit-learn's and seqeval's
    ``classification_report``)."""
    blocks = []
    for task, rep in reports.items():
        names = [str(c) for c in rep["per_class"]] + ["%s avg" % a for a in _AVGS]
        w = max([len(n) for n in names] + [len("weighted avg"), digits])
        head = "%s (%s task, counted per %s, %d examples)" % (task, rep["level"], rep["unit"], rep["examples"])
        lines = [head, "", "%*s  %9s  %9s  %9s  %9s" % (w, "", "precision", "recall", "f1-score", "support")]
        row = "%*s  %9.*f  %9.*f  %9.*f  %9d"
        for c, v in rep["per_class"].items():
            lines.append(row % (w, c, digits, v["precision"], digits, v["recall"], digits, v["f1"], v["support"]))
        lines.append("")
        for a in _AVGS:
            v = rep[a]
            lines.append(row % (w, "%s avg" % a, digits, v["precision"], digits, v["recall"], digits, v["f1"],
                                v["support"]))
        if "accuracy" in rep:
            lines.append("%*s  %9s  %9s  %9.*f  %9d" % (w, "accuracy", "", "", digits, rep["accuracy"],
                                                        rep["micro"]["support"]))
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def prediction_records(specs, examples, predictions):
    """One JSON-ready dict per example: ``{"tokens": [...], "gold": {task: label, [labels] or None},
    "predicted": {task: label or [labels]}}`` (``None``: the example has no gold label for the task)."""
    _check_same_length(examples, predictions, "examples and predictions")
    return [{"tokens": list(ex["tokens"]),
             "gold": {s.name: _plain(ex.get(s.source)) for s in specs},
             "predicted": {s.name: _plain(p[s.name]) for s in specs}} for ex, p in zip(examples, predictions)]


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def dumps_records(records):
    """JSON lines of :func:`prediction_records` (one line per record, UTF-8 text, non-ASCII kept)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
