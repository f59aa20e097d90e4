"""The evaluate-and-select stage: predictions of a model on examples, the metrics of metrics.json, and the one dev
number that selects the best epoch."""
from .. import data as D
from .. import metrics as M
from ..predictor import label_rows, predict_batches

__all__ = ["predict_examples", "compute_metrics", "evaluate_examples", "evaluate_datasets", "dev_score",
           "main_metric", "format_metrics"]


def predict_examples(model, vocab, label_vocabs, specs, examples, device, batch_size=256):
    """Predicted label strings for every example: list of ``{task: label or [labels]}`` (the prediction loop of
    :class:`fastmtl.Predictor`, so both give the same labels). Leaves the model in eval mode."""
    model.eval()
    sentences = [ex["tokens"] for ex in examples]
    out = [None] * len(examples)
    for idx, sents, preds in predict_batches(model, vocab, sentences, device, batch_size):
        for i, row in zip(idx, label_rows([{} for _ in idx], specs, label_vocabs, sents, preds)):
            out[i] = row
    return out


def compute_metrics(specs, examples, predictions, frame_key="frame_accuracy"):
    """The metrics.json dict: ``{task: {"accuracy", [span "precision", "recall", "f1"]}, frame_key}``.

    Gold labels are compared as strings, so labels never seen in training always count as errors. Examples without a
    gold label for a task are left out of that task's metrics. The frame accuracy (every task right) is there when the
    tasks have both levels.
    """
    res = {}
    for s in specs:
        pairs = [(ex[s.source], p[s.name]) for ex, p in zip(examples, predictions) if ex.get(s.source) is not None]
        gold = [g for g, _ in pairs]
        pred = [p for _, p in pairs]
        m = {"accuracy": M.accuracy(gold, pred)}
        if s.level == "token" and M.is_span_tagset({l for g in gold for l in g}):
            m.update(M.span_f1(gold, pred))
        res[s.name] = m
    seq = [s for s in specs if s.level == "sequence"]
    tok = [s for s in specs if s.level == "token"]
    if seq and tok:
        ok = n = 0
        for ex, p in zip(examples, predictions):
            if any(ex.get(s.source) is None for s in specs):
                continue
            n += 1
            ok += all((list(ex[s.source]) == list(p[s.name])) if s.level == "token" else ex[s.source] == p[s.name]
                      for s in specs)
        res[frame_key] = ok / n if n else 0.0
    return res


def evaluate_examples(model, vocab, label_vocabs, specs, examples, device, batch_size=256, frame_key="frame_accuracy"):
    preds = predict_examples(model, vocab, label_vocabs, specs, examples, device, batch_size)
    return compute_metrics(specs, examples, preds, frame_key), preds


def frame_key(dataset_name, several):
    """metrics.json's key of a dataset's frame accuracy: ``frame_accuracy`` (one dataset) or
    ``frame_accuracy:NAME``."""
    return "frame_accuracy:%s" % dataset_name if several else "frame_accuracy"


def evaluate_datasets(model, vocab, label_vocabs, datasets, split, device, batch_size=256):
    """Metrics of every dataset's ``split`` with its own tasks, merged into one dict keyed by task name (and frame
    accuracy keys); None when no dataset has that split. Also returns ``{dataset name: predictions}``."""
    res, preds = {}, {}
    several = len(datasets) > 1
    for ds in datasets:
        ex = ds.splits.get(split)
        if not ex:
            continue
        m, p = evaluate_examples(model, vocab, label_vocabs, ds.tasks, ex, device, batch_size,
                                 frame_key(ds.name, several))
        res.update(m)
        preds[ds.name] = p
    return (res or None), preds


def main_metric(m):
    """A task's main metric: span F1 where there is one, else accuracy (a float entry is its own)."""
    if isinstance(m, dict):
        return m.get("f1", m["accuracy"])
    return m


def dev_score(specs, m, select="mean"):
    """One number to select the best epoch. ``select="mean"``: the mean of every task's main metric (span F1 where
    there is one, else accuracy) and each frame accuracy; else a comma-separated list of the entries of ``m`` to
    average (task names, ``frame_accuracy[:DATASET]``). Entries without dev data are left out."""
    if select == "mean":
        keys = [s.name for s in specs if s.name in m] + [k for k in m if k.startswith("frame_accuracy")]
    else:
        keys = [k.strip() for k in select.split(",") if k.strip() in m]
    vals = [main_metric(m[k]) for k in keys]
    return sum(vals) / len(vals) if vals else 0.0


def check_select(select, specs, datasets):
    """A one-line error for a ``select`` that names no task or frame accuracy of the run."""
    if select == "mean":
        return
    several = len(datasets) > 1
    known = [s.name for s in specs]
    for ds in datasets:
        levels = {s.level for s in ds.tasks}
        if len(levels) == 2:
            known.append(frame_key(ds.name, several))
    dev = {ds.name: bool(ds.splits.get("dev")) for ds in datasets}
    of = {s.name: s.dataset for s in specs}
    of.update({frame_key(ds.name, several): ds.name for ds in datasets})
    for k in select.split(","):
        if k.strip() not in known:
            raise ValueError("fastmtl: --select: %r is not a task or frame accuracy of this run (known: mean, %s)"
                             % (k.strip(), ", ".join(known)))
        if not dev[of[k.strip()]]:
            raise ValueError("fastmtl: --select: %r has no dev data (dataset %r has no dev split)"
                             % (k.strip(), of[k.strip()]))


def format_metrics(m):
    parts = []
    for k, v in m.items():
        if isinstance(v, dict):
            if "f1" in v:
                parts.append("%s acc %.2f f1 %.2f" % (k, 100 * v["accuracy"], 100 * v["f1"]))
            else:
                parts.append("%s acc %.2f" % (k, 100 * v["accuracy"]))
        else:
            parts.append("%s %.2f" % (k, 100 * v))
    return ", ".join(parts)


def evaluation_sets(cfg, specs, file=None, format=None, columns=None, dataset=None, stored_paths=False):
    """What ``fastmtl evaluate`` scores: a list of ``(dataset name, tasks, examples, path)``.

    With ``file``: that file, scored on the tasks of ``dataset`` (a dataset name of the run), or on every task when
    the run had one dataset, or else on the tasks whose label field the file has. Without: every dataset's test
    split from the run's configuration: the built-in test sets, and the files the run named only with
    ``stored_paths`` (the user's confirmation: a checkpoint someone hands you can name any file of this machine);
    without it, a ValueError names them."""
    from .config import dataset_specs

    dss = dataset_specs(cfg)
    names = [d.name for d in dss]
    if dataset is not None and dataset not in names:
        raise ValueError("fastmtl evaluate: --dataset %r is not a dataset of this model (%s)"
                         % (dataset, ", ".join(names)))

    def tasks_of(name):
        return [s for s in specs if s.dataset in (name, None)]

    if file is not None:
        ds = next((d for d in dss if d.name == dataset), dss[0] if len(dss) == 1 else None)
        fmt = format or (ds.format if ds is not None else None)
        cols = columns or (",".join(ds.columns) if ds is not None and ds.columns else None)
        examples = D.read_examples(file, fmt, cols)
        if ds is not None:
            return [(ds.name, tasks_of(ds.name), examples, file)]
        fields = {k for ex in examples[:1000] for k in ex}
        tasks = [s for s in specs if s.source in fields]
        if not tasks:
            raise ValueError("fastmtl evaluate: %s has none of the label fields of this model's tasks (%s); name "
                             "the dataset with --dataset" % (file, ", ".join(s.source for s in specs)))
        found = {s.dataset for s in tasks}
        return [(found.pop() if len(found) == 1 else None, tasks, examples, file)]
    from .data import read_split

    chosen = [ds for ds in dss if dataset in (None, ds.name)]
    named = [ds.test for ds in chosen if ds.builtin is None and ds.test]
    if named and not stored_paths:
        raise ValueError("fastmtl evaluate: the checkpoint names its test file%s %s; give the data file (fastmtl "
                         "evaluate CHECKPOINT FILE) or --stored-test to read %s"
                         % ("s" if len(named) > 1 else "", ", ".join(named), "them" if len(named) > 1 else "it"))
    out = []
    for ds in chosen:
        examples, path = read_split(ds, "test")
        if examples is not None:
            out.append((ds.name, tasks_of(ds.name), examples, path))
    if not out:
        raise ValueError("fastmtl evaluate: give a data file (%s no test set)"
                         % ("dataset %r has" % dataset if dataset else "the model's run named"))
    return out
