"""What a checkpoint holds (best.pt and last.pt; the file format itself is :mod:`fastmtl.checkpoint`):
reading it back (nothing is unpickled), the model it describes and every random generator's state."""
import dataclasses
import os
import random

import torch

from .. import data as D
from .. import metrics as M
from ..checkpoint import CheckpointError, load_checkpoint_tree
from .config import TrainConfig
from .data import is_aux

__all__ = ["model_from", "build_tasks", "decoding_schemes", "set_decoding", "config_dict", "config_from",
           "read_checkpoint", "checked", "load_checkpoint", "rng_state", "set_rng_state", "task_lists",
           "specs_from"]

# the version of what best.pt / last.pt hold (the file format itself is fastmtl.checkpoint.FORMAT_VERSION): 3: tasks
# carry their dataset, the config may hold [[datasets]]; 4: a task list may end with a CRF flag, the config has
# crf. Read back by read_checkpoint, which refuses a newer one.
CONTENT_VERSION = 4
RESUME_KEYS = ("config", "vocab", "label_vocabs", "step_module", "optimizer", "scheduler", "history", "best_score",
               "best_epoch", "bad_epochs", "epoch", "rng")


def build_tasks(specs, label_vocabs, pooling="last", label_smoothing=0.0):
    """fastmtl.nn task objects for ``specs`` (TaskSpec) with class counts from ``label_vocabs``."""
    from ..nn import SequenceTask, TokenTask

    out = []
    for s in specs:
        n = max(len(label_vocabs[s.name]), 1)
        if s.level == "sequence":
            out.append(SequenceTask(s.name, n, pooling=pooling, label_smoothing=label_smoothing))
        elif s.crf:  # a CRF scores whole tag sequences: no label smoothing
            out.append(TokenTask(s.name, n, crf=True))
        else:
            out.append(TokenTask(s.name, n, label_smoothing=label_smoothing))
    return out


def model_from(cfg, vocab, label_vocabs, specs, pretrained=None):
    from ..model import MultiTaskLSTM

    tasks = build_tasks(specs, label_vocabs, cfg.pooling, cfg.label_smoothing)
    return MultiTaskLSTM(len(vocab), cfg.embedding_dim, cfg.hidden_size, tasks, num_layers=cfg.num_layers,
                         bidirectional=cfg.bidirectional, dropout=cfg.dropout, sharing=cfg.sharing,
                         task_layers=cfg.task_layers, soft_lambda=cfg.soft_lambda, pretrained=pretrained,
                         freeze_embeddings=cfg.freeze_embeddings,
                         char_words=vocab.itos if cfg.char_dim else None, char_dim=cfg.char_dim,
                         char_filters=cfg.char_filters, char_kernel=cfg.char_kernel, token_context=cfg.token_context)


# Size limits of a configuration read from a checkpoint, checked before anything is built (far above any model this
# library trains: the BiLSTMs of the papers it follows have 1-4 layers of 100-1024 units)
MAX_LAYERS = 64
MAX_WIDTH = 1 << 16
MAX_CHAR_KERNEL = 63


def model_from_checkpoint(path, cfg, vocab, label_vocabs, specs, tensors, pretrained=None):
    """:func:`model_from` for a configuration read from the checkpoint at ``path``, whose stored tensors are
    ``tensors`` (a state dict): the configuration is validated with :meth:`TrainConfig.validate`, its sizes are
    bounded (:data:`MAX_LAYERS`, :data:`MAX_WIDTH`), and the model it describes is first built on the meta device (no
    memory) and must not need more values than the checkpoint stores; only then is it built. A checkpoint of a few
    KB can so never make the library allocate gigabytes or loop over a hundred thousand layers. Raises
    :class:`CheckpointError` naming ``path``."""
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError("fastmtl: %s: the checkpoint's configuration is invalid (%s)"
                              % (path, str(e).replace("fastmtl: ", "", 1))) from None
    for name, hi in (("num_layers", MAX_LAYERS), ("embedding_dim", MAX_WIDTH), ("hidden_size", MAX_WIDTH),
                     ("char_dim", MAX_WIDTH), ("char_filters", MAX_WIDTH), ("char_kernel", MAX_CHAR_KERNEL)):
        v = getattr(cfg, name)
        if v > hi:
            raise CheckpointError("fastmtl: %s: the checkpoint's configuration has %s = %d, more than %d"
                                  % (path, name, v, hi))
    stored = sum(t.numel() for t in tensors.values() if isinstance(t, torch.Tensor)) if isinstance(tensors, dict) \
        else 0
    with torch.device("meta"):
        probe = checked(path, model_from, cfg, vocab, label_vocabs, specs)
    need = sum(p.numel() for p in probe.parameters())
    if need > stored:
        raise CheckpointError("fastmtl: %s: the checkpoint's configuration describes a model of %d parameters, but "
                              "the checkpoint stores %d values" % (path, need, stored))
    return checked(path, model_from, cfg, vocab, label_vocabs, specs, pretrained)


def decoding_schemes(cfg, specs, train_by_dataset, label_vocabs):
    """``{task: "bio" | "iobes"}`` for the token tasks to decode under span constraints: those whose training tags
    form a span tag set that every training sequence obeys (IOB1 data, whose ``I-`` may open a span, is left to
    argmax). ``train_by_dataset``: ``{dataset name: training examples}``. Empty when ``cfg.constrained_decoding``
    is off."""
    from ..decoding import detect_scheme

    out = {}
    if not cfg.constrained_decoding:
        return out
    for s in specs:
        if s.level != "token" or is_aux(s) or not M.is_span_tagset(label_vocabs[s.name].itos):
            continue
        train_ex = train_by_dataset[s.dataset]
        scheme = detect_scheme(ex[s.source] for ex in train_ex if ex.get(s.source) is not None)
        if scheme:
            out[s.name] = scheme
    return out


def set_decoding(model, label_vocabs, schemes):
    from ..decoding import span_constraints

    model.decode_constraints = {n: span_constraints(label_vocabs[n].itos, sc) for n, sc in (schemes or {}).items()}


def config_dict(cfg):
    """``cfg`` as JSON values (task specs as ``[name, level, source, dataset]`` lists, datasets as tables)."""
    d = dataclasses.asdict(cfg)
    if d.get("tasks"):
        d["tasks"] = [t if isinstance(t, (str, dict)) else list(dataclasses.astuple(t)) if
                      dataclasses.is_dataclass(t) else list(t) for t in cfg.tasks]
    if d.get("datasets"):
        d["datasets"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in
                          (dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x).items() if v is not None}
                         for x in cfg.datasets]
    if d.get("columns") is not None:
        d["columns"] = list(d["columns"])
    return d


def config_from(d):
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in d.items() if k in known}
    # a run saved before the crf option trained every token task with cross-entropy (unset today means the data's
    # choice, a CRF for ATIS's slots): --resume must rebuild the model it saved
    kw.setdefault("crf", False)
    return TrainConfig(**kw)


def task_lists(specs):
    return [[s.name, s.level, s.source, s.dataset] + ([True] if s.crf else []) for s in specs]


def specs_from(rows):
    """TaskSpecs from a checkpoint's task lists (version 2 checkpoints have no dataset: the only one)."""
    return [D.TaskSpec(*r) for r in rows]


def read_checkpoint(path, need, what="checkpoint"):
    """The tree of the fastmtl checkpoint at ``path`` (see :mod:`fastmtl.checkpoint`; nothing is unpickled), checked
    to hold the keys ``need``; :class:`CheckpointError` naming the file otherwise."""
    ck = load_checkpoint_tree(path)
    missing = [k for k in need if k not in ck] if isinstance(ck, dict) else list(need)
    if missing:
        hint = ""
        if "model" in missing and isinstance(ck, dict) and "step_module" in ck:
            hint = " (it is a last.pt, the training state for --resume; use best.pt)"
        elif "step_module" in missing and isinstance(ck, dict) and "model" in ck:
            hint = " (it is a best.pt, the selected model; --resume reads last.pt)"
        raise CheckpointError("fastmtl: %s is not a fastmtl %s: it has no %s%s"
                              % (path, what, ", ".join(missing), hint))
    version = ck.get("format_version", CONTENT_VERSION)  # (version 2 checkpoints: the same reading)
    if isinstance(version, bool) or not isinstance(version, int) or version > CONTENT_VERSION:
        raise CheckpointError("fastmtl: %s holds a %s of content version %r; this fastmtl reads versions up to %d "
                              "(a newer fastmtl wrote it)" % (path, what, version, CONTENT_VERSION))
    return ck


def checked(path, fn, *args):
    """Runs ``fn(*args)`` on fields read from the checkpoint at ``path``, turning the errors that a malformed (but
    well-checksummed) checkpoint can cause into :class:`CheckpointError` naming the file."""
    try:
        return fn(*args)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError("fastmtl: %s: the checkpoint does not fit (%s: %s)"
                              % (path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")) from None


def load_checkpoint(path, device="cpu"):
    """Returns ``(model, vocab, label_vocabs, specs, cfg)`` from a checkpoint written by the trainer (``best.pt``);
    ``specs`` are the evaluated tasks (each with its dataset's name).

    Raises :class:`CheckpointError` (a ``ValueError``) naming ``path`` for a missing, corrupted, truncated or
    foreign file, and for pickle files, which are never unpickled."""
    path = os.fspath(path)
    ck = read_checkpoint(path, ("model", "vocab", "label_vocabs", "tasks", "config"), "model checkpoint")

    def build():
        cfg = config_from(ck["config"])
        vocab = D.Vocab.from_state_dict(ck["vocab"])
        lvs = {k: D.LabelVocab.from_state_dict(v) for k, v in ck["label_vocabs"].items()}
        all_specs = specs_from(ck["tasks"])
        model = model_from_checkpoint(path, cfg, vocab, lvs, all_specs, ck["model"])
        model.load_state_dict(ck["model"])
        set_decoding(model, lvs, ck.get("decoding"))
        return model, vocab, lvs, all_specs, cfg

    model, vocab, lvs, all_specs, cfg = checked(path, build)
    model.to(device).eval()
    return model, vocab, lvs, [s for s in all_specs if not is_aux(s)], cfg


def rng_state(device):
    """Every random number generator's state, as tensors and JSON values."""
    version, internal, gauss = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "python": {"version": version, "state": list(internal), "gauss_next": gauss}}
    try:
        import numpy as np

        name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
        st["numpy"] = {"bit_generator": str(name), "key": [int(k) for k in key], "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:  # numpy is a dependency, but the trainer does not need it
        pass
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st, device):
    torch.set_rng_state(st["torch"])
    py = st.get("python")
    if py is not None:
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]),
                         None if py["gauss_next"] is None else float(py["gauss_next"])))
    nps = st.get("numpy")
    if nps is not None:
        import numpy as np

        np.random.set_state((str(nps["bit_generator"]), np.array(nps["key"], dtype=np.uint32), int(nps["pos"]),
                             int(nps["has_gauss"]), float(nps["cached_gaussian"])))
    if device.type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(st["cuda"], device)
