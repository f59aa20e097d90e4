"""The run configuration: :class:`TrainConfig`, one declaration per option.

Every field carries its command-line help, group and spelling in its metadata; ``fastmtl train``'s options are
generated from it (:func:`fastmtl.cli.build_parser`), and a TOML file (``fastmtl train --config run.toml``) uses the
field names as top-level keys. A run on several datasets lists them as ``[[datasets]]`` tables, its tasks as
``[[tasks]]`` tables and the batch sampler in a ``[sampling]`` table (:func:`read_toml`).
"""
import inspect
import math
import os
from dataclasses import dataclass, field, fields

import torch

from .. import data as D
from .. import weighting as _weighting
from ..fileio import open_regular
from .callbacks import check_spec

__all__ = ["TrainConfig", "check_device", "read_toml", "option_name", "SAMPLING", "DatasetSpec"]

SAMPLING = ("proportional", "uniform", "temperature", "round_robin")
WEIGHTINGS = _weighting.STRATEGIES  # declared in fastmtl.weighting's registry, like their options


def _opt(default, help, group, **meta):
    """A TrainConfig field: its default and what ``fastmtl train --help`` shows for it.

    ``meta``: ``choices``; ``flag`` (the option's spelling when it is not ``--field-name``, None: no option);
    ``action`` (``"flag"``: ``--name`` / ``--no-name``, so the command line can also undo a file's value;
    ``"append"``: repeatable);
    ``parse`` (a function from the option's text to the value; ``"bool"``, ``"kv_float"``, ``"kv_int"``,
    ``"columns"`` name the parsers of :mod:`fastmtl.cli`); ``metavar``."""
    meta.update(help=help, group=group)
    return field(default=default, metadata=meta)


def _with_options(after, options):
    """The class decorator that adds the weighting methods' options as fields (annotation and default, in the
    registry's order) after the field ``after``, before ``dataclass`` sees the class."""

    def add(cls):
        # (inspect.get_annotations: the class's own annotations also where Python evaluates them lazily, 3.14+)
        ann = dict(inspect.get_annotations(cls))
        if after not in ann:
            raise TypeError("fastmtl: TrainConfig has no field %r to put the weighting options after" % after)
        out = {}
        for name, typ in ann.items():
            out[name] = typ
            if name == after:
                for o in options:
                    out[o.key] = o.type
                    setattr(cls, o.key, _opt(o.default, o.help, "task weighting"))
        cls.__annotations__ = out
        return cls

    return add


@dataclass
@_with_options("task_weights", _weighting.registry.config_options())
class TrainConfig:
    """Everything a training run reads. ``fastmtl train`` builds it from its options (and ``--config`` file);
    from Python, ``fastmtl.train.train(TrainConfig(...))`` or ``train(epochs=3, ...)``."""

    # data: one dataset from the options below, or several from ``datasets``
    format: str = _opt(None, "data format of --train/--dev/--test: atis, conllu, conll or jsonl (default: from the "
                       "file extension, .conllu/.jsonl/.json; other files are CoNLL columns; without --train the "
                       "built-in ATIS data)", "data", choices=D.FORMATS)
    train: str = _opt(None, "training file", "data")
    dev: str = _opt(None, "development file (early stopping and model selection)", "data")
    test: str = _opt(None, "test file (metrics.json)", "data")
    columns: list = _opt(None, "column names of a CoNLL column file, the first is the word, e.g. word,pos,chunk,ner",
                         "data", parse="columns")
    tasks: list = _opt(None, "a task: LEVEL is token or sequence, SOURCE the field/column (repeatable), e.g. --task "
                       "upos:token:upos --task intent:sequence:intent (default for ATIS: intent and slots); a token "
                       "task with a CRF: NAME:token:SOURCE:crf", "data",
                       flag="--task", action="append", metavar="NAME:LEVEL:SOURCE")
    datasets: list = _opt(None, "several datasets in one model: [[datasets]] tables of a --config file (name, format, "
                          "train, dev, test, columns, builtin)", "data", flag=None)
    max_train: int = _opt(None, "use only the first N training examples (of each dataset)", "data")
    sampling: str = _opt("proportional", "several datasets: which dataset each batch comes from: proportional "
                         "(every training batch once per epoch), uniform, temperature (p ~ size^(1/T)) or "
                         "round_robin", "data", choices=SAMPLING)
    sampling_temperature: float = _opt(2.0, "T of --sampling temperature", "data")
    # vocabulary
    min_count: int = _opt(1, "words seen fewer times in training become <unk>", "vocabulary")
    unk_alpha: float = _opt(0.25, "replace a training word by <unk> with probability alpha/(alpha+count) (0: never)",
                            "vocabulary")
    lower: bool = _opt(True, "lower-case words", "vocabulary", parse="bool")
    normalize_digits: bool = _opt(True, "map every digit to 0", "vocabulary", parse="bool")
    pretrained: str = _opt(None, "word2vec/GloVe text file of word vectors", "vocabulary")
    freeze_embeddings: bool = _opt(False, "keep the word embeddings fixed", "vocabulary", action="flag")
    # model
    embedding_dim: int = _opt(128, "word embedding size", "model")
    hidden_size: int = _opt(256, "LSTM hidden size (per direction)", "model")
    num_layers: int = _opt(1, "LSTM layers", "model")
    bidirectional: bool = _opt(True, "bidirectional LSTM", "model", parse="bool")
    dropout: float = _opt(0.5, "dropout on embeddings and LSTM outputs", "model")
    pooling: str = _opt("max", "how sequence tasks read the encoder: max over time, mean, first, or last (each "
                        "direction's final state on a BiLSTM)", "model", choices=("last", "first", "mean", "max"))
    char_dim: int = _opt(32, "character CNN word features with this character embedding size (0: off)", "model")
    char_filters: int = _opt(64, "character CNN output size", "model")
    char_kernel: int = _opt(3, "character CNN kernel width (odd)", "model")
    token_context: bool = _opt(False, "token tasks also read the max-pooled sentence vector (intent-conditioned "
                               "slots)", "model", parse="bool")
    sequence_aux: float = _opt(0.0, "also train every sentence label on every token as an auxiliary task with this "
                               "weight (0: off)", "model")
    label_smoothing: float = _opt(0.1, "label smoothing of every task's cross-entropy", "model")
    crf: object = _opt(None, "token tasks with a linear-chain CRF (learned tag transitions; loss: the CRF's negative "
                       "log-likelihood per token; decoding: Viterbi): true for every token task, false for none, by "
                       "default the data's choice (the built-in ATIS slots use one; one task: --task "
                       "NAME:token:SOURCE:crf)", "model", parse="bool", metavar="{true,false}")
    constrained_decoding: bool = _opt(True, "token tasks with BIO/IOBES tags: predict the best valid tag sequence "
                                      "(Viterbi), not the per-token argmax", "model", parse="bool")
    sharing: str = _opt("hard", "parameter sharing between tasks", "model", choices=("hard", "soft", "hierarchical"))
    task_layers: dict = _opt(None, "hierarchical sharing: the layer each task reads, e.g. slots:1,intent:2", "model",
                             parse="kv_int", metavar="NAME:LAYER,...")
    soft_lambda: float = _opt(1e-3, "soft sharing: weight of the L2 penalty between the task encoders", "model")
    init_encoder: str = _opt(None, "transfer: start the encoder (and vocabulary) from this checkpoint (a best.pt of "
                             "an earlier run)", "model")
    freeze_encoder: bool = _opt(False, "with --init-encoder: train only the new heads", "model", action="flag")
    # weighting
    weighting: str = _opt("static", "task weighting: a loss weighting (%s) or a gradient method on the shared encoder "
                          "(%s; per-task gradients from one encoder forward)"
                          % (", ".join(n for n, m in _weighting.METHODS.items() if m.level == "loss"),
                             ", ".join(_weighting.GRADIENT_METHODS)
                             + "; with the [torchjd] extra: torchjd:NAME, NAME one of "
                             + ", ".join(n[len("torchjd:"):] for n, m in _weighting.METHODS.items()
                                         if m.extra == "torchjd")), "task weighting", choices=WEIGHTINGS)
    task_weights: dict = _opt(None, "static weights (default 1 each), e.g. intent:2,slots:1", "task weighting",
                              parse="kv_float", metavar="NAME:WEIGHT,...")
    # (here follow the options of the weighting methods, declared in fastmtl.weighting's registry: _with_options)
    task_backward: str = _opt("loop", "gradient methods: how the K per-task gradients go through the encoder: loop "
                              "(K backward passes over the one saved forward) or vmap (torch.func.vjp + vmap over the "
                              "K cotangents); the same numbers", "task weighting", choices=("loop", "vmap"))
    # optimisation
    optimizer: str = _opt("adam", "optimizer", "optimisation", choices=("adam", "adamw", "sgd"))
    lr: float = _opt(2e-3, "peak learning rate", "optimisation")
    weight_decay: float = _opt(0.0, "weight decay", "optimisation")
    schedule: str = _opt("linear", "learning-rate schedule after warm-up: linear decay to 0, or constant",
                         "optimisation", choices=("linear", "constant"))
    warmup_steps: int = _opt(100, "linear learning-rate warm-up steps", "optimisation")
    grad_clip: float = _opt(5.0, "clip the gradient norm to this (0: off)", "optimisation")
    ema: float = _opt(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999) and "
                      "evaluate it (0: off)", "optimisation")
    batch_size: int = _opt(32, "global batch size (split over DDP ranks)", "optimisation")
    eval_batch_size: int = _opt(256, "batch size of evaluation and prediction", "optimisation")
    epochs: int = _opt(35, "training epochs (one epoch: as many batches as the training data holds)", "optimisation")
    patience: int = _opt(8, "early stopping: epochs without dev improvement", "optimisation")
    select: str = _opt("mean", "model selection on dev: mean (of every task's main metric, span F1 where there is "
                       "one, else accuracy, and each dataset's frame accuracy) or a comma-separated list of the "
                       "tasks (or frame_accuracy entries) to average", "optimisation")
    max_minutes: float = _opt(None, "stop training after this many minutes", "optimisation")
    seed: int = _opt(1, "random seed (data order, initialisation, dropout)", "optimisation")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 ...", "optimisation")
    threads: int = _opt(None, "torch CPU threads (default: torch's choice)", "optimisation")
    # output
    output_dir: str = _opt(None, "where the run writes best.pt, last.pt, log.jsonl, metrics.json and "
                           "learning_curve.png (fastmtl train's default: a new folder runs/<date>-<time>, or under "
                           "$FASTMTL_RUNS_DIR; from Python: none, nothing is written)", "output")
    resume: bool = _opt(False, "continue the run saved in --output-dir", "output", action="flag")
    overwrite: bool = _opt(False, "reuse a non-empty --output-dir: remove the earlier run's files (best.pt, last.pt, "
                           "log.jsonl, metrics.json, learning_curve.png) before training; other files stay", "output",
                           action="flag")
    progress: bool = _opt(True, "progress bar (only when stderr is a terminal)", "output", action="flag")
    quiet: bool = _opt(False, "print nothing but the test metrics", "output", action="flag")
    callbacks: list = _opt(None, "add a training callback (repeatable): tensorboard (TensorBoard event files in "
                           "--output-dir/tensorboard; the tensorboard extra) or module:Class (a class of yours, made "
                           "with no arguments, with some of the hooks of fastmtl.training.Callback; the module is "
                           "looked up on the Python path and in the current folder)", "output", flag="--callback",
                           action="append", metavar="tensorboard|MODULE:CLASS")

    def validate(self):
        """Checks every field; raises ``ValueError`` with a one-line message naming the option (``--warmup-steps``)
        for the first bad one. :func:`fastmtl.train.train` calls this, so the command line, config files and Python
        users get the same checks. Returns ``self``."""
        _validate_config(self)
        return self


def option_name(name):
    """The command-line spelling of a TrainConfig field (``--warmup-steps``; fields without an option: the key)."""
    f = _FIELDS.get(name)
    if f is not None and "flag" in f.metadata:
        return f.metadata["flag"] or name
    return "--" + name.replace("_", "-")


_FIELDS = {f.name: f for f in fields(TrainConfig)}

_BOOLS = tuple(n for n, f in _FIELDS.items() if f.type is bool)
_PATHS = ("train", "dev", "test", "pretrained", "init_encoder", "output_dir")
# name: the least value allowed (integers; the fields in _OPTIONAL may also be None)
_INTS = {"max_train": 1, "min_count": 1, "embedding_dim": 1, "hidden_size": 1, "num_layers": 1, "char_dim": 0,
         "char_filters": 1, "char_kernel": 1, "warmup_steps": 0, "batch_size": 1, "eval_batch_size": 1, "epochs": 0,
         "patience": 1, "threads": 1}
_INTS.update({o.key: o.low for o in _weighting.registry.config_options() if o.type is int})
_OPTIONAL = ("format", "max_train", "max_minutes", "threads")
MAX_LR = 1e3  # far above any learning rate that trains; a larger one overflows the optimisers' float32 steps
MAX_SEED = 2**32 - 1
# names a task cannot have: keys of predict's records and of metrics.json
RESERVED_TASK_NAMES = ("tokens", "frame_accuracy", "dataset")
# name: (low, low allowed, high or None, high allowed)
_FLOATS = {"unk_alpha": (0.0, True, None, False), "dropout": (0.0, True, 1.0, False),
           "sequence_aux": (0.0, True, None, False), "label_smoothing": (0.0, True, 1.0, False),
           "soft_lambda": (0.0, True, None, False), "lr": (0.0, False, MAX_LR, True),
           "weight_decay": (0.0, True, None, False), "grad_clip": (0.0, True, None, False),
           "ema": (0.0, True, 1.0, False), "max_minutes": (0.0, False, None, False),
           "sampling_temperature": (0.0, False, None, False)}
_FLOATS.update({o.key: (o.low, o.low_ok, o.high, o.high_ok) for o in _weighting.registry.config_options()
                if o.type is float})


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range_text(lo, lo_ok, hi, hi_ok):
    if hi is None:
        return "%s %g" % (">=" if lo_ok else ">", lo)
    return "in %s%g, %g%s" % ("[" if lo_ok else "(", lo, hi, "]" if hi_ok else ")")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a run: ``name``; ``builtin`` (a dataset a package ships, see :mod:`fastmtl.data.builtin`) or
    ``train`` (+ ``dev``, ``test``) files in ``format`` with CoNLL ``columns``."""

    name: str
    format: str = None
    train: str = None
    dev: str = None
    test: str = None
    columns: tuple = None
    builtin: str = None


_DATASET_KEYS = {f.name for f in fields(DatasetSpec)}


def _columns_ok(cols):
    return isinstance(cols, str) or (isinstance(cols, (list, tuple)) and all(isinstance(c, str) for c in cols))


def columns_tuple(cols):
    """CoNLL column names as a tuple: from ``"word,pos"`` (the command line's form) or a list."""
    if cols is None:
        return None
    return tuple(D.parse_columns(cols if isinstance(cols, str) else ",".join(cols)))


def dataset_specs(cfg):
    """The datasets of ``cfg``: its ``datasets`` entries, or one dataset from ``format``/``train``/``dev``/``test``
    (named after the built-in data, else ``data``)."""
    if cfg.datasets:
        return [d if isinstance(d, DatasetSpec) else DatasetSpec(**{**d, "columns": columns_tuple(d.get("columns"))})
                for d in cfg.datasets]
    if cfg.train is None and cfg.format in (None, "atis"):
        return [DatasetSpec("atis", "atis", builtin="atis")]
    return [DatasetSpec("data", cfg.format, cfg.train, cfg.dev, cfg.test, columns_tuple(cfg.columns))]


def _validate_datasets(cfg):
    if not isinstance(cfg.datasets, (list, tuple)) or not cfg.datasets:
        raise ValueError("fastmtl: datasets must be a non-empty list of [[datasets]] tables")
    if any(getattr(cfg, k) is not None for k in ("train", "dev", "test", "columns")):
        raise ValueError("fastmtl: give the data either as [[datasets]] or with --train/--dev/--test/--columns, "
                         "not both")
    names = []
    for i, d in enumerate(cfg.datasets):
        where = "[[datasets]] entry %d" % (i + 1)
        if isinstance(d, DatasetSpec):
            d = d.__dict__
        if not isinstance(d, dict):
            raise ValueError("fastmtl: %s must be a table, got %r" % (where, d))
        unknown = sorted(set(d) - _DATASET_KEYS)
        if unknown:
            raise ValueError("fastmtl: %s: unknown key%s %s (known: %s)" % (
                where, "s" if len(unknown) > 1 else "", ", ".join(unknown), ", ".join(sorted(_DATASET_KEYS))))
        name = d.get("name")
        if not isinstance(name, str) or not name or ":" in name or "/" in name:
            raise ValueError("fastmtl: %s: name must be a non-empty string without ':' or '/', got %r" % (where, name))
        where = "dataset %r" % name
        names.append(name)
        for k in ("train", "dev", "test", "builtin", "format"):
            v = d.get(k)
            if v is not None and not (isinstance(v, (str, os.PathLike)) and os.fspath(v)):
                raise ValueError("fastmtl: %s: %s must be a non-empty string, got %r" % (where, k, v))
        if d.get("format") is not None and d["format"] not in D.FORMATS:
            raise ValueError("fastmtl: %s: format must be one of %s, got %r" % (where, ", ".join(D.FORMATS),
                                                                                  d["format"]))
        if d.get("builtin") is not None:
            if any(d.get(k) is not None for k in ("train", "dev", "test", "columns")):
                raise ValueError("fastmtl: %s: a builtin dataset takes no train/dev/test/columns" % where)
        elif d.get("train") is None:
            raise ValueError("fastmtl: %s needs train (a file) or builtin (a dataset a package ships)" % where)
        if d.get("columns") is not None:
            if not _columns_ok(d["columns"]):
                raise ValueError("fastmtl: %s: columns must be a comma-separated string or a list of names, got %r"
                                 % (where, d["columns"]))
            columns_tuple(d["columns"])
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError("fastmtl: duplicate dataset name%s %s" % ("s" if len(dup) > 1 else "", ", ".join(dup)))


def _validate_config(cfg):
    def bad(name, what, value):
        raise ValueError("fastmtl: %s must be %s, got %r" % (option_name(name), what, value))

    for name, f in _FIELDS.items():
        choices = f.metadata.get("choices")
        v = getattr(cfg, name)
        if choices and v not in choices and not (v is None and name in _OPTIONAL):
            bad(name, "one of " + ", ".join(choices), v)
    for name in _BOOLS:
        v = getattr(cfg, name)
        if not isinstance(v, bool):
            bad(name, "true or false", v)
    if cfg.crf is not None and not isinstance(cfg.crf, bool):
        bad("crf", "true, false or unset (the data's choice)", cfg.crf)
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
    if not _is_int(cfg.seed) or not 0 <= cfg.seed <= MAX_SEED:
        bad("seed", "an integer in 0..%d" % MAX_SEED, cfg.seed)
    if not isinstance(cfg.select, str) or not cfg.select.strip():
        bad("select", "mean or a comma-separated list of task names", cfg.select)
    if cfg.callbacks is not None:
        if not isinstance(cfg.callbacks, (list, tuple)):
            bad("callbacks", "a list of callback names (tensorboard or module:Class)", cfg.callbacks)
        for spec in cfg.callbacks:
            check_spec(spec)
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
        if not _columns_ok(cfg.columns):
            bad("columns", "a comma-separated string or a list of names", cfg.columns)
        columns_tuple(cfg.columns)
    if cfg.tasks is not None and (isinstance(cfg.tasks, str) or not hasattr(cfg.tasks, "__iter__")):
        bad("tasks", "a list of NAME:LEVEL:SOURCE tasks", cfg.tasks)
    if cfg.datasets is not None:
        _validate_datasets(cfg)
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
# TOML run files

_TASK_KEYS = ("name", "level", "dataset", "source", "crf")
_SAMPLING_KEYS = {"strategy": "sampling", "temperature": "sampling_temperature"}
_FILE_PATHS = ("train", "dev", "test", "pretrained", "init_encoder", "output_dir")


def _toml_loads(text):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


MAX_CONFIG_BYTES = 16 << 20  # a run file is a few KB: a bigger --config is refused before it is read


def read_toml(path):
    """The TrainConfig fields set by the TOML file ``path``, as a dict.

    Top-level keys are TrainConfig fields (the command-line options with underscores: ``epochs = 10``,
    ``hidden_size = 256``, ``task_weights = {intent = 2.0}``); ``[[datasets]]`` tables (``name``, ``format``,
    ``train``, ``dev``, ``test``, ``columns``, or ``builtin``); ``[[tasks]]`` tables (``name``, ``level``,
    ``dataset``, ``source``; ``source`` defaults to the name, ``dataset`` to the only dataset) or
    ``tasks = ["NAME:LEVEL:SOURCE", ...]``; ``[sampling]`` (``strategy``, ``temperature``). Relative file names
    in the file are relative to the file's folder. Raises ``ValueError`` naming the file and the key."""
    path = os.fspath(path)
    with open_regular(path, "--config", max_bytes=MAX_CONFIG_BYTES) as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError("fastmtl: --config %s: not UTF-8 text (byte %d)" % (path, e.start)) from None
    try:
        doc = _toml_loads(text)
    except ValueError as e:  # tomllib.TOMLDecodeError
        raise ValueError("fastmtl: --config %s: %s" % (path, str(e).splitlines()[0])) from None
    except RecursionError:
        raise ValueError("fastmtl: --config %s: arrays or tables nested too deeply" % path) from None
    base = os.path.dirname(os.path.abspath(path))

    def rel(p):
        if isinstance(p, str) and p and not os.path.isabs(p):
            return os.path.normpath(os.path.join(base, p))
        return p

    out = {}
    for key, value in doc.items():
        if key == "sampling":
            if not isinstance(value, dict):
                raise ValueError("fastmtl: --config %s: sampling must be a [sampling] table" % path)
            for k, v in value.items():
                if k not in _SAMPLING_KEYS:
                    raise ValueError("fastmtl: --config %s: [sampling] has no key %r (known: strategy, temperature)"
                                     % (path, k))
                out[_SAMPLING_KEYS[k]] = v
            continue
        if key not in _FIELDS:
            raise ValueError("fastmtl: --config %s: unknown key %r (the keys are the options of fastmtl train with "
                             "underscores, plus [[datasets]], [[tasks]] and [sampling])" % (path, key))
        if key in ("resume", "overwrite"):
            raise ValueError("fastmtl: --config %s: %s is a command-line choice of one run, not a configuration key; "
                             "give %s" % (path, key, option_name(key)))
        if key == "datasets":
            if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):
                raise ValueError("fastmtl: --config %s: datasets must be [[datasets]] tables" % path)
            value = [{k: (rel(v) if k in ("train", "dev", "test") else v) for k, v in d.items()} for d in value]
        elif key == "tasks":
            value = _toml_tasks(path, value)
        elif key in _FILE_PATHS:
            value = rel(value)
        out[key] = value
    return out


def _toml_tasks(path, value):
    if not isinstance(value, list):
        raise ValueError("fastmtl: --config %s: tasks must be [[tasks]] tables or a list of NAME:LEVEL:SOURCE" % path)
    out = []
    for i, t in enumerate(value):
        if isinstance(t, str):
            out.append(t)
            continue
        if not isinstance(t, dict):
            raise ValueError("fastmtl: --config %s: [[tasks]] entry %d must be a table, got %r" % (path, i + 1, t))
        unknown = sorted(set(t) - set(_TASK_KEYS))
        if unknown:
            raise ValueError("fastmtl: --config %s: [[tasks]] entry %d: unknown key %s (known: %s)"
                             % (path, i + 1, ", ".join(unknown), ", ".join(_TASK_KEYS)))
        for k in ("name", "level"):
            if not isinstance(t.get(k), str) or not t.get(k):
                raise ValueError("fastmtl: --config %s: [[tasks]] entry %d needs %s (a string)" % (path, i + 1, k))
        out.append(dict(t))
    return out


def check_task_name(name):
    """A task name is letters, digits, ``_``, ``.`` and ``-`` (it names metrics, checkpoint entries and predict's
    fields) and none of :data:`RESERVED_TASK_NAMES`; ValueError otherwise."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name):
        raise ValueError("fastmtl: task name %r: use letters, digits, '_', '.' and '-' (not first)" % (name,))
    if name in RESERVED_TASK_NAMES or name.startswith("frame_accuracy"):
        raise ValueError("fastmtl: task name %r is reserved (%s name fields of predict's and evaluate's output); "
                         "rename the task" % (name, ", ".join(RESERVED_TASK_NAMES)))


def task_specs(cfg, datasets):
    """The TaskSpecs of ``cfg`` (strings ``NAME:LEVEL:SOURCE``, ``[[tasks]]`` dicts, lists from a checkpoint or
    TaskSpecs), each tied to its dataset; default tasks for a built-in dataset that has them."""
    names = [d.name for d in datasets]
    specs = []
    if cfg.tasks:
        for t in cfg.tasks:
            if isinstance(t, D.TaskSpec):
                s = t
            elif isinstance(t, str):
                s = D.parse_task(t)
            elif isinstance(t, dict):
                s = D.TaskSpec(t["name"], t["level"], t.get("source") or t["name"], t.get("dataset"),
                               t.get("crf", False))
            elif isinstance(t, (list, tuple)):
                s = D.TaskSpec(*t)
            else:
                raise ValueError("fastmtl: --task must be NAME:LEVEL:SOURCE, got %r" % (t,))
            if s.dataset is None:
                if len(datasets) > 1:
                    raise ValueError("fastmtl: task %r: name its dataset (dataset = one of %s)"
                                     % (s.name, ", ".join(names)))
                s = D.TaskSpec(s.name, s.level, s.source, names[0], s.crf)
            elif s.dataset not in names:
                raise ValueError("fastmtl: task %r reads dataset %r, which is not among the datasets (%s)"
                                 % (s.name, s.dataset, ", ".join(names)))
            check_task_name(s.name)
            specs.append(s)
    else:
        from ..data import builtin

        for d in datasets:
            if d.builtin is None and d.format == "atis":  # files in ATIS's format have ATIS's two fields
                specs += [D.TaskSpec(n, lv, src, d.name, n in builtin.builtin_crf("atis"))
                          for n, lv, src in builtin.builtin_tasks("atis")]
                continue
            if d.builtin is None:
                raise ValueError("fastmtl: give the tasks with --task NAME:LEVEL:SOURCE (e.g. --task "
                                 "upos:token:upos)" + (" or [[tasks]] for dataset %r" % d.name
                                                       if len(datasets) > 1 else ""))
            specs += [D.TaskSpec(n, lv, src, d.name, n in builtin.builtin_crf(d.builtin))
                      for n, lv, src in builtin.builtin_tasks(d.builtin)]
    if cfg.crf is not None:  # true or false: every token task (the sentence labels' auxiliary token tasks aside)
        specs = [D.TaskSpec(s.name, s.level, s.source, s.dataset, cfg.crf) if s.level == "token" else s
                 for s in specs]
    tn = [s.name for s in specs]
    dup = sorted({n for n in tn if tn.count(n) > 1})
    if dup:
        raise ValueError("fastmtl: duplicate task names %s (every task needs its own name)" % ", ".join(dup))
    unused = [n for n in names if not any(s.dataset == n for s in specs)]
    if unused:
        raise ValueError("fastmtl: dataset %s has no task" % ", ".join(map(repr, unused)))
    return specs
