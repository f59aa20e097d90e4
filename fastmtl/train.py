"""The trainer behind ``fastmtl train``: data -> vocabularies -> MultiTaskLSTM -> training with early stopping on
dev -> test metrics. Also: checkpoints, resume, evaluation and prediction from a checkpoint, DDP under torchrun."""
import dataclasses
import gc
import io
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from . import data as D
from . import metrics as M
from .checkpoint import CheckpointError, load_checkpoint_tree, save_checkpoint
from .fileio import atomic_write
from .weighting import make_weighting

__all__ = ["TrainConfig", "train", "evaluate_examples", "load_checkpoint", "predict_sentences", "atomic_write",
           "build_tasks", "CheckpointError", "NonFiniteLossError", "check_device"]


@dataclass
class TrainConfig:
    # data
    format: str = "atis"
    train: str = None
    dev: str = None
    test: str = None
    columns: list = None
    tasks: list = None                  # ["NAME:LEVEL:SOURCE", ...]; ATIS: intent + slots
    max_train: int = None               # use only the first N training examples (quick runs, tests)
    # vocabulary
    min_count: int = 1
    unk_alpha: float = 0.25             # training-time <unk> replacement: p = alpha / (alpha + count)
    lower: bool = True
    normalize_digits: bool = True
    pretrained: str = None              # word2vec/GloVe text file
    freeze_embeddings: bool = False
    # model
    embedding_dim: int = 128
    hidden_size: int = 256
    num_layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.5
    pooling: str = "max"                # sequence tasks: max over time ("last": last_first on a BiLSTM)
    char_dim: int = 32                  # >0: character CNN word features (char embedding size); 0: off
    char_filters: int = 64
    char_kernel: int = 3
    token_context: bool = False         # token tasks also read the max-pooled sentence vector
    sequence_aux: float = 0.0           # >0: also train each sentence label on every token (auxiliary, this weight)
    label_smoothing: float = 0.1
    constrained_decoding: bool = True   # token tasks with BIO/IOBES tags: best valid tag sequence (Viterbi)
    sharing: str = "hard"
    task_layers: dict = None
    soft_lambda: float = 1e-3
    init_encoder: str = None            # transfer: a checkpoint whose encoder (and vocabulary) to start from
    freeze_encoder: bool = False
    # weighting
    weighting: str = "static"
    task_weights: dict = None
    dwa_temperature: float = 2.0
    gradnorm_alpha: float = 1.5
    # optimisation
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: str = "linear"            # "linear" decay to 0, or "constant"
    warmup_steps: int = 100
    grad_clip: float = 5.0
    ema: float = 0.0                    # >0: evaluate/keep an exponential moving average of the weights
    batch_size: int = 32
    eval_batch_size: int = 256
    epochs: int = 35
    patience: int = 8
    max_minutes: float = None
    seed: int = 1
    device: str = "auto"
    threads: int = None
    # output
    output_dir: str = None
    resume: bool = False
    overwrite: bool = False             # reuse a non-empty output_dir: remove the previous run's files first
    progress: bool = True
    quiet: bool = False

    def validate(self):
        """Checks every field; raises ``ValueError`` with a one-line message naming the option (``--warmup-steps``)
        for the first bad one. :func:`train` calls this, so the command line and Python users get the same checks.
        Returns ``self``."""
        _validate_config(self)
        return self


_CHOICES = {"format": D.FORMATS, "pooling": ("last", "first", "mean", "max"),
            "sharing": ("hard", "soft", "hierarchical"), "weighting": ("static", "uncertainty", "dwa", "gradnorm"),
            "optimizer": ("adam", "adamw", "sgd"), "schedule": ("linear", "constant")}
_BOOLS = ("lower", "normalize_digits", "freeze_embeddings", "bidirectional", "token_context", "constrained_decoding",
          "freeze_encoder", "resume", "overwrite", "progress", "quiet")
_PATHS = ("train", "dev", "test", "pretrained", "init_encoder", "output_dir")
# name: the least value allowed (integers; the fields in _OPTIONAL may also be None)
_INTS = {"max_train": 1, "min_count": 1, "embedding_dim": 1, "hidden_size": 1, "num_layers": 1, "char_dim": 0,
         "char_filters": 1, "char_kernel": 1, "warmup_steps": 0, "batch_size": 1, "eval_batch_size": 1, "epochs": 0,
         "patience": 1, "threads": 1}
_OPTIONAL = ("max_train", "max_minutes", "threads")
# name: (low, low allowed, high or None, high allowed)
_FLOATS = {"unk_alpha": (0.0, True, None, False), "dropout": (0.0, True, 1.0, False),
           "sequence_aux": (0.0, True, None, False), "label_smoothing": (0.0, True, 1.0, False),
           "soft_lambda": (0.0, True, None, False), "dwa_temperature": (0.0, False, None, False),
           "gradnorm_alpha": (0.0, True, None, False), "lr": (0.0, False, None, False),
           "weight_decay": (0.0, True, None, False), "grad_clip": (0.0, True, None, False),
           "ema": (0.0, True, 1.0, False), "max_minutes": (0.0, False, None, False)}


def _opt(name):
    """The command-line spelling of a TrainConfig field (``eval_batch_size`` has no option: its own name)."""
    return name if name == "eval_batch_size" else "--" + name.replace("_", "-")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range_text(lo, lo_ok, hi, hi_ok):
    if hi is None:
        return "%s %g" % (">=" if lo_ok else ">", lo)
    return "in %s%g, %g%s" % ("[" if lo_ok else "(", lo, hi, "]" if hi_ok else ")")


def _validate_config(cfg):
    def bad(name, what, value):
        raise ValueError("fastmtl: %s must be %s, got %r" % (_opt(name), what, value))

    for name, choices in _CHOICES.items():
        v = getattr(cfg, name)
        if v not in choices:
            bad(name, "one of " + ", ".join(choices), v)
    for name in _BOOLS:
        v = getattr(cfg, name)
        if not isinstance(v, bool):
            bad(name, "true or false", v)
    for name in _PATHS:
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (str, os.PathLike)) and os.fspath(v)):
            bad(name, "a file or folder name", v)
    for name, lo in _INTS.items():
        v = getattr(cfg, name)
        if v is None and name in _OPTIONAL:
            continue
        if not _is_int(v) or v < lo:
            bad(name, "an integer >= %d" % lo, v)
    if cfg.char_dim and cfg.char_kernel % 2 == 0:
        bad("char_kernel", "odd", cfg.char_kernel)
    for name, (lo, lo_ok, hi, hi_ok) in _FLOATS.items():
        v = getattr(cfg, name)
        if v is None and name in _OPTIONAL:
            continue
        ok = _is_num(v) and math.isfinite(v) and (v >= lo if lo_ok else v > lo)
        if ok and hi is not None:
            ok = v <= hi if hi_ok else v < hi
        if not ok:
            bad(name, "a finite number " + _range_text(lo, lo_ok, hi, hi_ok), v)
    if not _is_int(cfg.seed):
        bad("seed", "an integer", cfg.seed)
    if cfg.task_weights is not None:
        if not isinstance(cfg.task_weights, dict):
            bad("task_weights", "NAME:WEIGHT pairs", cfg.task_weights)
        for k, v in cfg.task_weights.items():
            if not isinstance(k, str) or not _is_num(v) or not math.isfinite(v) or v < 0:
                raise ValueError("fastmtl: --task-weights: the weight of %r must be a finite number >= 0, got %r"
                                 % (k, v))
    if cfg.task_layers is not None:
        if not isinstance(cfg.task_layers, dict):
            bad("task_layers", "NAME:LAYER pairs", cfg.task_layers)
        for k, v in cfg.task_layers.items():
            if not isinstance(k, str) or not _is_int(v) or not 1 <= v <= cfg.num_layers:
                raise ValueError("fastmtl: --task-layers: the layer of %r must be an integer in 1..%d (--num-layers), "
                                 "got %r" % (k, cfg.num_layers, v))
    if cfg.columns is not None:
        D.parse_columns(cfg.columns)
    if cfg.tasks is not None and (isinstance(cfg.tasks, str) or not hasattr(cfg.tasks, "__iter__")):
        bad("task", "a list of NAME:LEVEL:SOURCE tasks", cfg.tasks)
    if not isinstance(cfg.device, str) or not cfg.device:
        bad("device", "auto, cpu, cuda or cuda:N", cfg.device)
    if cfg.device != "auto":
        check_device(cfg.device)
    if cfg.resume and cfg.overwrite:
        raise ValueError("fastmtl: --resume continues the run in --output-dir and --overwrite replaces it: give one")
    if (cfg.resume or cfg.overwrite) and not cfg.output_dir:
        raise ValueError("fastmtl: --%s needs --output-dir" % ("resume" if cfg.resume else "overwrite"))
    if cfg.freeze_encoder and not cfg.init_encoder:
        raise ValueError("fastmtl: --freeze-encoder needs --init-encoder (the checkpoint whose encoder to keep)")


def check_device(name, option="--device"):
    """The ``torch.device`` for ``name`` (cpu, cuda, cuda:N), or a one-line ``ValueError`` naming ``option`` when
    it is malformed or not usable here (a CPU-only build, no GPU visible, an index past the GPUs)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError("fastmtl: %s must be auto, cpu, cuda or cuda:N, got %r" % (option, name)) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError("fastmtl: %s %s: fastmtl runs on cpu or cuda" % (option, name))
    if not torch.backends.cuda.is_built():
        raise ValueError("fastmtl: %s %s: this PyTorch build has no CUDA support (torch %s); use --device cpu"
                         % (option, name, torch.__version__))
    if not torch.cuda.is_available():
        raise ValueError("fastmtl: %s %s: no CUDA GPU is available; use --device cpu" % (option, name))
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError("fastmtl: %s %s: only %d CUDA GPU(s) are visible" % (option, name, torch.cuda.device_count()))
    return dev


# ----------------------------------------------------------------------------------------------------------------
# small utilities

def _log(cfg, msg, rank=0):
    if rank == 0 and not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _device(cfg, local_rank):
    if cfg.device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


AUX_SUFFIX = "@token"


def _is_aux(spec):
    return spec.name.endswith(AUX_SUFFIX)


def _aux_specs(specs, cfg):
    """With ``sequence_aux``: every sentence-level task also as an auxiliary token-level task on every token (each
    token state learns the sentence label, which conditions the token tasks on it); never evaluated."""
    if not cfg.sequence_aux:
        return []
    return [D.TaskSpec(s.name + AUX_SUFFIX, "token", s.source) for s in specs if s.level == "sequence"]


def build_tasks(specs, label_vocabs, pooling="last", label_smoothing=0.0):
    """fastmtl.nn task objects for ``specs`` (TaskSpec) with class counts from ``label_vocabs``."""
    from .nn import SequenceTask, TokenTask

    out = []
    for s in specs:
        n = max(len(label_vocabs[s.name]), 1)
        if s.level == "sequence":
            out.append(SequenceTask(s.name, n, pooling=pooling, label_smoothing=label_smoothing))
        else:
            out.append(TokenTask(s.name, n, label_smoothing=label_smoothing))
    return out


# ----------------------------------------------------------------------------------------------------------------
# data

def _load_splits(cfg):
    if cfg.format == "atis" and cfg.train is None:
        splits = {s: D.load_atis(s) for s in ("train", "dev", "test")}
        paths = {s: "ATIS/%s" % s for s in splits}
    else:
        if cfg.train is None:
            raise ValueError("fastmtl: --train is required unless --format atis (the built-in ATIS data)")
        paths = {"train": cfg.train, "dev": cfg.dev, "test": cfg.test}
        splits = {s: (D.read_examples(p, cfg.format, cfg.columns) if p else None) for s, p in paths.items()}
    if cfg.max_train:
        splits["train"] = splits["train"][: cfg.max_train]
    if cfg.tasks:
        # strings from the command line; TaskSpecs from Python; [name, level, source] lists from a checkpoint
        specs = [D.parse_task(t) if isinstance(t, str) else D.TaskSpec(*t) if isinstance(t, (list, tuple)) else t
                 for t in cfg.tasks]
    elif cfg.format == "atis":
        specs = [D.TaskSpec(*t) for t in D.atis.ATIS_TASKS]
    else:
        raise ValueError("fastmtl: give the tasks with --task NAME:LEVEL:SOURCE (e.g. --task upos:token:upos)")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("fastmtl: duplicate task names in --task: %s" % names)
    for s, ex in splits.items():
        if ex is not None:
            D.check_tasks(ex, specs, paths[s])
    return splits, specs


def _batches(encoded, batch_size, shuffle, seed):
    return D.bucket_batches([len(x[0]) for x in encoded], batch_size, shuffle, seed)


# ----------------------------------------------------------------------------------------------------------------
# evaluation

def predict_examples(model, vocab, label_vocabs, specs, examples, device, batch_size=256):
    """Predicted label strings for every example: list of ``{task: label or [labels]}``."""
    model.eval()
    encoded = [(vocab.encode(ex["tokens"]), {}) for ex in examples]
    out = [None] * len(examples)
    for idx in _batches(encoded, batch_size, False, 0):
        b = D.collate(encoded, idx, [], unk_probs=None).to(device)
        chars = None
        if getattr(model, "char_cnn", None) is not None:  # the real characters, also of out-of-vocabulary words
            chars = model.char_cnn.chars_tensor([[vocab.normalize(w) for w in examples[i]["tokens"]] for i in idx])
            chars = chars.to(device)
        preds = model.predict(b.ids, b.lengths, chars=chars)
        for s in specs:
            p = preds[s.name].cpu().tolist()
            lv = label_vocabs[s.name]
            for r, i in enumerate(idx):
                if out[i] is None:
                    out[i] = {}
                if s.level == "token":
                    out[i][s.name] = [lv.decode(c) for c in p[r][: len(encoded[i][0])]]
                else:
                    out[i][s.name] = lv.decode(p[r])
    return out


def compute_metrics(specs, examples, predictions):
    """The metrics.json dict: ``{task: {"accuracy", [span "precision", "recall", "f1"]}, "frame_accuracy"}``.

    Gold labels are compared as strings, so labels never seen in training always count as errors. Examples without a
    gold label for a task are left out of that task's metrics.
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
        res["frame_accuracy"] = ok / n if n else 0.0
    return res


def dev_score(specs, m):
    """One number to select the best epoch: the mean of every task's main metric (span F1 where there is one,
    else accuracy) and the frame accuracy."""
    vals = [m[s.name].get("f1", m[s.name]["accuracy"]) for s in specs]
    if "frame_accuracy" in m:
        vals.append(m["frame_accuracy"])
    return sum(vals) / len(vals)


def evaluate_examples(model, vocab, label_vocabs, specs, examples, device, batch_size=256):
    preds = predict_examples(model, vocab, label_vocabs, specs, examples, device, batch_size)
    return compute_metrics(specs, examples, preds), preds


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def _model_from(cfg, vocab, label_vocabs, specs, pretrained=None):
    from .model import MultiTaskLSTM

    tasks = build_tasks(specs, label_vocabs, cfg.pooling, cfg.label_smoothing)
    return MultiTaskLSTM(len(vocab), cfg.embedding_dim, cfg.hidden_size, tasks, num_layers=cfg.num_layers,
                         bidirectional=cfg.bidirectional, dropout=cfg.dropout, sharing=cfg.sharing,
                         task_layers=cfg.task_layers, soft_lambda=cfg.soft_lambda, pretrained=pretrained,
                         freeze_embeddings=cfg.freeze_embeddings,
                         char_words=vocab.itos if cfg.char_dim else None, char_dim=cfg.char_dim,
                         char_filters=cfg.char_filters, char_kernel=cfg.char_kernel, token_context=cfg.token_context)


def decoding_schemes(cfg, specs, train_ex, label_vocabs):
    """``{task: "bio" | "iobes"}`` for the token tasks to decode under span constraints: those whose training tags
    form a span tag set that every training sequence obeys (IOB1 data, whose ``I-`` may open a span, is left to
    argmax). Empty when ``cfg.constrained_decoding`` is off."""
    from .decoding import detect_scheme

    out = {}
    if not cfg.constrained_decoding:
        return out
    for s in specs:
        if s.level != "token" or _is_aux(s) or not M.is_span_tagset(label_vocabs[s.name].itos):
            continue
        scheme = detect_scheme(ex[s.source] for ex in train_ex if ex.get(s.source) is not None)
        if scheme:
            out[s.name] = scheme
    return out


def _set_decoding(model, label_vocabs, schemes):
    from .decoding import span_constraints

    model.decode_constraints = {n: span_constraints(label_vocabs[n].itos, sc) for n, sc in (schemes or {}).items()}


def _config_dict(cfg):
    """``cfg`` as JSON values (task specs as ``[name, level, source]`` lists)."""
    d = dataclasses.asdict(cfg)
    if d.get("tasks"):
        d["tasks"] = [t if isinstance(t, str) else list(t) for t in d["tasks"]]
    return d


def _config_from(d):
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in known})


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
    return ck


def _checked(path, fn, *args):
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
    """Returns ``(model, vocab, label_vocabs, specs, cfg)`` from a checkpoint written by :func:`train` (``best.pt``).

    Raises :class:`CheckpointError` (a ``ValueError``) naming ``path`` for a missing, corrupted, truncated or
    foreign file, and for pickle files, which are never unpickled."""
    path = os.fspath(path)
    ck = read_checkpoint(path, ("model", "vocab", "label_vocabs", "tasks", "config"), "model checkpoint")

    def build():
        cfg = _config_from(ck["config"])
        vocab = D.Vocab.from_state_dict(ck["vocab"])
        lvs = {k: D.LabelVocab.from_state_dict(v) for k, v in ck["label_vocabs"].items()}
        all_specs = [D.TaskSpec(*s) for s in ck["tasks"]]
        model = _model_from(cfg, vocab, lvs, all_specs)
        model.load_state_dict(ck["model"])
        _set_decoding(model, lvs, ck.get("decoding"))
        return model, vocab, lvs, all_specs, cfg

    model, vocab, lvs, all_specs, cfg = _checked(path, build)
    model.to(device).eval()
    return model, vocab, lvs, [s for s in all_specs if not _is_aux(s)], cfg


def _rng_state(device):
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


def _set_rng_state(st, device):
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


def predict_sentences(checkpoint, sentences, device="cpu"):
    """Predictions for raw sentences (strings, split on whitespace, or token lists):
    list of ``{"tokens": [...], task: label or [labels]}``."""
    model, vocab, lvs, specs, _ = load_checkpoint(checkpoint, device)
    exs = [{"tokens": s.split() if isinstance(s, str) else list(s)} for s in sentences]
    keep = [i for i, e in enumerate(exs) if e["tokens"]]
    preds = predict_examples(model, vocab, lvs, specs, [exs[i] for i in keep], torch.device(device))
    out = [{"tokens": e["tokens"]} for e in exs]
    for i, p in zip(keep, preds):
        out[i].update(p)
    return out


def _plot(history, path, cfg):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log(cfg, "fastmtl: matplotlib is not installed, so no learning-curve plot (pip install fastmtl[plot])")
        return False
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], marker="o", label="train loss")
    if any("dev_loss" in h for h in history):
        ax[0].plot(ep, [h.get("dev_loss", float("nan")) for h in history], marker="o", label="dev loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    keys = [k for k in history[-1].get("dev", {}) if isinstance(history[-1]["dev"][k], dict)]
    for k in keys:
        sub = history[-1]["dev"][k]
        mk = "f1" if "f1" in sub else "accuracy"
        ax[1].plot(ep, [h["dev"][k][mk] for h in history], marker="o", label="%s %s" % (k, mk))
    if "frame_accuracy" in history[-1].get("dev", {}):
        ax[1].plot(ep, [h["dev"]["frame_accuracy"] for h in history], marker="o", label="frame accuracy")
    ax[1].set_xlabel("epoch")
    ax[1].set_title("dev")
    if ax[1].get_legend_handles_labels()[0]:
        ax[1].legend()
    else:  # no dev data
        ax[1].text(0.5, 0.5, "no dev data", ha="center", va="center", transform=ax[1].transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return True


# ----------------------------------------------------------------------------------------------------------------
# training

def _scaled_weights(weights, targets, global_counts, world, ignore_index=-100):
    """Per-rank task weights so that DDP's gradient average equals the global-batch mean of every task loss."""
    out = {}
    for name, w in weights.items():
        local = int((targets[name] != ignore_index).sum())
        g = global_counts[name]
        out[name] = w * (local * world / g) if g else w * 0.0
    return out


def _count_items(encoded, idx, specs, ignore_index=-100):
    c = {}
    for s in specs:
        if s.level == "token":
            c[s.name] = sum(sum(1 for y in encoded[i][1][s.name] if y != ignore_index) for i in idx)
        else:
            c[s.name] = sum(1 for i in idx if encoded[i][1][s.name] != ignore_index)
    return c


class _Stop(Exception):
    pass


class NonFiniteLossError(ValueError):
    """Training stopped: the loss became nan or inf (nothing of that step is saved)."""


# what a run writes into --output-dir (and atomic_write's temporaries of them): --overwrite removes these, and only these
RUN_FILES = ("best.pt", "last.pt", "log.jsonl", "metrics.json", "learning_curve.png")


def _is_run_file(name):
    if name in RUN_FILES:
        return True
    return name.endswith(".tmp") and any(name.startswith("." + f + ".") for f in RUN_FILES)


def _prepare_output_dir(cfg, rank):
    """Refuses an existing, non-empty ``output_dir`` unless ``resume`` or ``overwrite``."""
    d = cfg.output_dir
    if not os.path.lexists(d):
        return
    if not os.path.isdir(d):
        raise ValueError("fastmtl: --output-dir %s exists and is not a folder" % d)
    if cfg.resume or cfg.overwrite:
        return
    entries = sorted(os.listdir(d))
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError("fastmtl: --output-dir %s is not empty (%s): give --resume to continue its run or "
                         "--overwrite to replace it" % (d, shown))


def _remove_run_files(d):
    """--overwrite: removes the files of an earlier run (links themselves, never their targets); others stay."""
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if _is_run_file(name) and (os.path.islink(p) or not os.path.isdir(p)):
            os.unlink(p)


_RESUME_KEYS = ("config", "vocab", "label_vocabs", "step_module", "optimizer", "scheduler", "history", "best_score",
                "best_epoch", "bad_epochs", "epoch", "rng")


def train(cfg=None, **overrides):
    """Trains per ``cfg`` (a :class:`TrainConfig`; keyword overrides allowed) and returns a dict with
    ``test`` (metrics.json content, or None without test data), ``dev`` (best dev metrics), ``best_epoch``,
    ``train_time_s``, ``tokens_per_s`` and ``history``."""
    cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
    cfg.validate()
    world, rank, local = _dist_env()
    if cfg.output_dir:
        _prepare_output_dir(cfg, rank)
    distributed = world > 1
    device = _device(cfg, local)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if distributed:
        import torch.distributed as dist

        own_pg = not dist.is_initialized()
        if own_pg:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    out_dir = cfg.output_dir
    if out_dir and rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    last_path = os.path.join(out_dir, "last.pt") if out_dir else None
    resume_ck = None
    if cfg.resume:
        if not out_dir:
            raise ValueError("fastmtl: --resume needs --output-dir (where the interrupted run saved last.pt)")
        if os.path.lexists(last_path):
            resume_ck = read_checkpoint(last_path, _RESUME_KEYS, "training state (last.pt)")
            saved = _checked(last_path, dict, resume_ck["config"])
            for k in ("epochs", "patience", "max_minutes", "progress", "quiet", "resume", "overwrite", "device",
                      "threads"):
                saved[k] = getattr(cfg, k)
            cfg = _checked(last_path, lambda: _config_from(saved).validate())
            _log(cfg, "fastmtl: resuming from %s (epoch %s done)" % (last_path, resume_ck["epoch"]), rank)
        else:
            _log(cfg, "fastmtl: --resume: no %s yet, starting fresh" % last_path, rank)

    splits, specs = _load_splits(cfg)
    all_specs = specs + _aux_specs(specs, cfg)
    train_ex, dev_ex, test_ex = splits["train"], splits["dev"], splits["test"]

    # vocabularies (transfer: the encoder's vocabulary comes with it)
    init_ck = None
    if resume_ck is not None:
        vocab, lvs = _checked(last_path, lambda: (
            D.Vocab.from_state_dict(resume_ck["vocab"]),
            {k: D.LabelVocab.from_state_dict(v) for k, v in resume_ck["label_vocabs"].items()}))
    else:
        if cfg.init_encoder:
            init_ck = read_checkpoint(cfg.init_encoder, ("model", "vocab", "config"), "model checkpoint")
            vocab = _checked(cfg.init_encoder, D.Vocab.from_state_dict, init_ck["vocab"])
            enc_cfg = _checked(cfg.init_encoder, dict, init_ck["config"])
            for k in ("embedding_dim", "hidden_size", "num_layers", "bidirectional", "char_dim", "char_filters",
                      "char_kernel"):
                if k in enc_cfg:
                    setattr(cfg, k, enc_cfg[k])
            _checked(cfg.init_encoder, cfg.validate)
        else:
            vocab = D.Vocab.build([ex["tokens"] for ex in train_ex], cfg.min_count, cfg.lower, cfg.normalize_digits)
        lvs = D.build_label_vocabs(train_ex, all_specs)
    enc_train = D.encode_examples(train_ex, vocab, lvs, all_specs)

    pretrained = None
    if cfg.pretrained and resume_ck is None and init_ck is None:
        from .embeddings import embedding_matrix

        pretrained, found = embedding_matrix(vocab, cfg.pretrained, cfg.embedding_dim)
        bad_rows = (~torch.isfinite(pretrained).all(dim=1)).nonzero().flatten().tolist()
        if bad_rows:
            raise ValueError("fastmtl: --pretrained %s: the vector of %r (and %d more) holds nan or inf values"
                             % (cfg.pretrained, vocab.itos[bad_rows[0]], len(bad_rows) - 1))
        _log(cfg, "fastmtl: %d of %d words have pretrained vectors" % (found, len(vocab)), rank)
    source = last_path if resume_ck is not None else cfg.init_encoder if init_ck is not None else None
    if source:  # a configuration read from a checkpoint: errors name it
        model = _checked(source, _model_from, cfg, vocab, lvs, all_specs, pretrained)
    else:
        model = _model_from(cfg, vocab, lvs, all_specs, pretrained)
    if resume_ck is not None:
        schemes = resume_ck.get("decoding") or {}
    else:
        schemes = decoding_schemes(cfg, all_specs, train_ex, lvs)
    if resume_ck is not None:
        _checked(last_path, _set_decoding, model, lvs, schemes)
    else:
        _set_decoding(model, lvs, schemes)
    for n, sc in schemes.items():
        _log(cfg, "fastmtl: %s: constrained %s decoding" % (n, sc.upper()), rank)
    if init_ck is not None:
        _checked(cfg.init_encoder, model.load_encoder, init_ck["model"], cfg.freeze_encoder)
    model.to(device)
    base_weights = dict(cfg.task_weights or {})
    unknown = sorted(set(base_weights) - {s.name for s in specs})
    if unknown:
        raise ValueError("fastmtl: --task-weights names unknown task%s %s (the tasks are %s)"
                         % ("s" if len(unknown) > 1 else "", ", ".join(map(repr, unknown)),
                            ", ".join(s.name for s in specs)))
    base_weights.update({s.name: cfg.sequence_aux for s in all_specs if _is_aux(s)})
    weighting = make_weighting(cfg.weighting, [s.name for s in all_specs], base_weights,
                               **({"temperature": cfg.dwa_temperature} if cfg.weighting == "dwa" else
                                  {"alpha": cfg.gradnorm_alpha} if cfg.weighting == "gradnorm" else {}))
    weighting.to(device)

    class _Step(torch.nn.Module):  # what DDP wraps: the model plus learned task weights
        def __init__(self):
            super().__init__()
            self.model, self.weighting = model, weighting

        def forward(self, ids, lengths, targets, scale=None, chars=None):
            w = self.weighting.weights()
            if scale is not None:
                w = scale(w)
            out = self.model(ids, lengths, targets, w, chars=chars)
            reg = self.weighting.regularizer()
            return out, (out.loss if reg is None else out.loss + reg)

    step_mod = _Step()
    wrapped = step_mod
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(step_mod, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=False)

    params = [p for n, p in step_mod.named_parameters() if p.requires_grad and not n.startswith("weighting.w")]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        raise ValueError("fastmtl: unknown optimizer %r (adam, adamw or sgd)" % cfg.optimizer)
    global_bs = cfg.batch_size
    steps_per_epoch = len(_batches(enc_train, global_bs, True, 0))
    total_steps = max(1, steps_per_epoch * cfg.epochs)

    def lr_lambda(step):
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "constant":
            return warm
        return warm * max(0.0, 1.0 - step / total_steps)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    unk_probs = torch.tensor(vocab.unk_probabilities(cfg.unk_alpha)) if cfg.unk_alpha > 0 else None

    ema = None
    if cfg.ema:
        ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    history, best_score, best_epoch, bad_epochs, start_epoch = [], -math.inf, 0, 0, 0
    best_state, train_time = None, 0.0
    if resume_ck is not None:
        def restore():
            step_mod.load_state_dict(resume_ck["step_module"])
            opt.load_state_dict(resume_ck["optimizer"])
            sched.load_state_dict(resume_ck["scheduler"])
            weighting.load_extra_state(resume_ck.get("weighting_extra") or {})
            best_state = resume_ck.get("best_model")
            ema_state = ema
            if ema is not None and resume_ck.get("ema") is not None:
                ema_state = {k: v.to(device) for k, v in resume_ck["ema"].items()}
            _set_rng_state(resume_ck["rng"], device)
            return (list(resume_ck["history"]), float(resume_ck["best_score"]), int(resume_ck["best_epoch"]),
                    int(resume_ck["bad_epochs"]), int(resume_ck["epoch"]), float(resume_ck.get("train_time_s", 0.0)),
                    best_state, ema_state)

        (history, best_score, best_epoch, bad_epochs, start_epoch, train_time, best_state,
         ema) = _checked(last_path, restore)

    def checkpoint_common():
        return {"format_version": 2, "config": _config_dict(cfg), "vocab": vocab.state_dict(),
                "label_vocabs": {k: v.state_dict() for k, v in lvs.items()},
                "tasks": [[s.name, s.level, s.source] for s in all_specs], "decoding": schemes}

    def save_last(epoch_done):
        if not out_dir or rank != 0:
            return
        ck = checkpoint_common()
        ck.update({"step_module": step_mod.state_dict(), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict(), "weighting_extra": weighting.extra_state(), "history": history,
                   "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                   "epoch": epoch_done, "train_time_s": train_time, "rng": _rng_state(device),
                   "best_model": best_state, "ema": ema})
        save_checkpoint(ck, last_path)

    def write_log():
        if out_dir and rank == 0:
            atomic_write(os.path.join(out_dir, "log.jsonl"), "".join(json.dumps(h) + "\n" for h in history))

    try:
        from tqdm import tqdm
    except ImportError:  # optional
        tqdm = None

    ddp_reduce = None
    if distributed:
        import torch.distributed as dist

        def ddp_reduce(t):
            dist.all_reduce(t)
            t.div_(world)

    if out_dir and rank == 0 and cfg.overwrite:
        # as late as possible (bad data or checkpoints leave the earlier run alone), and after the process group is up
        # (no other rank still looks at the old files)
        _remove_run_files(out_dir)
    t_start = time.perf_counter() - train_time
    interrupted = False
    epoch = start_epoch
    total_tokens = 0
    tok_time = 0.0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            step_mod.train()
            gbatches = _batches(enc_train, global_bs, True, cfg.seed * 100003 + epoch)
            if distributed:
                gbatches = [b for b in gbatches if len(b) >= world]
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            bar = None
            if tqdm is not None and cfg.progress and rank == 0 and not cfg.quiet:
                bar = tqdm(total=len(gbatches), desc="epoch %d/%d" % (epoch + 1, cfg.epochs), leave=False,
                           file=sys.stderr, dynamic_ncols=True)
            loss_sum, task_sums, nb, ep_tokens = 0.0, {s.name: 0.0 for s in all_specs}, 0, 0
            t_ep = time.perf_counter()
            for gidx in gbatches:
                if distributed:
                    k = len(gidx)
                    lo, hi = rank * k // world, (rank + 1) * k // world
                    idx = gidx[lo:hi]
                    counts = _count_items(enc_train, gidx, all_specs)
                else:
                    idx = gidx
                # draw the <unk> replacements for the whole global batch so ranks agree with one process
                gb = D.collate(enc_train, gidx, all_specs, unk_probs=unk_probs, generator=gen)
                if distributed:
                    b = D.Batch(gb.ids[lo:hi, : max(len(enc_train[i][0]) for i in idx)], gb.lengths[lo:hi],
                                {n: (t[lo:hi, : max(len(enc_train[i][0]) for i in idx)] if t.dim() == 2
                                     else t[lo:hi]) for n, t in gb.targets.items()}, idx,
                                gb.raw_ids[lo:hi, : max(len(enc_train[i][0]) for i in idx)])
                else:
                    b = gb
                b = b.to(device)
                scale = (lambda w: _scaled_weights(w, b.targets, counts, world)) if distributed else None
                # character features of the words as written, also where the word id became <unk>
                chars = model.char_cnn.char_ids[b.raw_ids] if model.char_cnn is not None else None
                out, loss = wrapped(b.ids, b.lengths, b.targets, scale, chars)
                opt.zero_grad(set_to_none=True)
                if cfg.weighting == "gradnorm":
                    loss.backward(retain_graph=True)
                    weighting.after_backward(out.losses, model.shared_parameters(), ddp_reduce)
                else:
                    loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                if ema is not None:
                    with torch.no_grad():
                        n = sched.last_epoch  # optimizer steps so far
                        decay = min(cfg.ema, (1.0 + n) / (10.0 + n))
                        sd = model.state_dict()
                        for k, v in ema.items():
                            v.lerp_(sd[k], 1.0 - decay)
                lv = float(loss.detach())
                finite = math.isfinite(lv)
                if distributed:  # every rank stops at the same step
                    flag = torch.tensor([0.0 if finite else 1.0], device=device)
                    dist.all_reduce(flag)
                    finite = not float(flag)
                if not finite:
                    raise NonFiniteLossError(
                        "fastmtl: the training loss is %s at epoch %d, step %d (task losses: %s); stopped without "
                        "writing metrics%s. Check --task-weights, --pretrained and --lr"
                        % (lv, epoch + 1, nb + 1,
                           ", ".join("%s %.4g" % (n, float(l.detach())) for n, l in out.losses.items()),
                           ("; the checkpoints of completed epochs in %s are kept" % out_dir) if out_dir else ""))
                loss_sum += lv
                for n, l in out.losses.items():
                    task_sums[n] += float(l.detach())
                nb += 1
                ep_tokens += gb.num_tokens
                if bar is not None:
                    el = time.perf_counter() - t_ep
                    bar.set_postfix(loss="%.4f" % (loss_sum / nb), tok_s="%.0f" % (ep_tokens / max(el, 1e-9)))
                    bar.update(1)
                if cfg.max_minutes and time.perf_counter() - t_start > cfg.max_minutes * 60:
                    break
            if bar is not None:
                bar.close()
            ep_time = time.perf_counter() - t_ep
            total_tokens += ep_tokens
            tok_time += ep_time
            mean_losses = {n: v / max(nb, 1) for n, v in task_sums.items()}
            weighting.epoch_end(mean_losses)
            rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(nb, 1), "train_losses": mean_losses,
                   "lr": opt.param_groups[0]["lr"], "tokens_per_s": ep_tokens / max(ep_time, 1e-9),
                   "epoch_time_s": ep_time, "task_weights": weighting.describe()}
            improved = True
            live = None
            if ema is not None:  # evaluate (and keep) the averaged weights
                live = {k: v.detach().clone() for k, v in model.state_dict().items()}
                model.load_state_dict({**live, **ema})
            if dev_ex:
                dm, _ = evaluate_examples(model, vocab, lvs, specs, dev_ex, device, cfg.eval_batch_size)
                score = dev_score(specs, dm)
                rec["dev"], rec["dev_score"] = dm, score
                improved = score > best_score
            if improved:
                best_score = rec.get("dev_score", 0.0)
                best_epoch, bad_epochs = epoch + 1, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                if out_dir and rank == 0:
                    ck = checkpoint_common()
                    ck.update({"model": best_state, "epoch": epoch + 1, "dev": rec.get("dev")})
                    save_checkpoint(ck, os.path.join(out_dir, "best.pt"))
            else:
                bad_epochs += 1
            if live is not None:
                model.load_state_dict(live)
            train_time = time.perf_counter() - t_start
            rec["elapsed_s"] = train_time
            history.append(rec)
            write_log()
            save_last(epoch + 1)
            msg = "epoch %d: loss %.4f, %.0f tokens/s" % (epoch + 1, rec["train_loss"], rec["tokens_per_s"])
            if dev_ex:
                msg += ", dev " + _fmt(rec["dev"]) + (" *" if improved else "")
            _log(cfg, msg, rank)
            if dev_ex and bad_epochs >= cfg.patience:
                _log(cfg, "fastmtl: early stop (no dev improvement in %d epochs)" % cfg.patience, rank)
                break
            if cfg.max_minutes and time.perf_counter() - t_start > cfg.max_minutes * 60:
                _log(cfg, "fastmtl: time budget of %g minutes reached" % cfg.max_minutes, rank)
                break
    except KeyboardInterrupt:
        interrupted = True
        # Roll back, do not save: last.pt already holds the state at the end of the last completed epoch (written
        # after every epoch), so --resume replays the interrupted epoch from exactly that state and ends bitwise where
        # the uninterrupted run ends. (Saving the mid-epoch weights here would replay the epoch on top of them.)
        if out_dir and rank == 0:
            if os.path.exists(last_path):
                _log(cfg, "\nfastmtl: interrupted; %s holds the last completed epoch (continue with --resume)"
                     % last_path, rank)
            else:
                _log(cfg, "\nfastmtl: interrupted during the first epoch; nothing to resume", rank)
        raise
    finally:
        if interrupted:
            write_log()

    train_time = time.perf_counter() - t_start
    if best_state is not None:
        model.load_state_dict(best_state)
    result = {"best_epoch": best_epoch, "train_time_s": train_time, "history": history,
              "tokens_per_s": total_tokens / max(tok_time, 1e-9),
              "dev": history[best_epoch - 1].get("dev") if best_epoch and history else None, "test": None}
    if test_ex:
        tm, preds = evaluate_examples(model, vocab, lvs, specs, test_ex, device, cfg.eval_batch_size)
        result["test"] = tm
        _log(cfg, "test (best epoch %d, %.0f s training): %s" % (best_epoch, train_time, _fmt(tm)), rank)
    if out_dir and rank == 0:
        if result["test"] is not None:
            atomic_write(os.path.join(out_dir, "metrics.json"), json.dumps(result["test"], indent=2) + "\n")
        if history:
            _plot(history, os.path.join(out_dir, "learning_curve.png"), cfg)
    if distributed:
        # Every rank is done with collectives, and the DDP reducer (which holds the process group and its gloo/nccl
        # work objects) is gone before the group is destroyed: tearing them down in the other order can abort the
        # process at exit.
        dist.barrier()
        del wrapped
        gc.collect()
    if distributed and own_pg:
        dist.destroy_process_group()
    result["model"] = model
    result["vocab"], result["label_vocabs"], result["specs"] = vocab, lvs, specs
    return result


def _fmt(m):
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
