"""``fastmtl.export``: a trained model out of Python, as a self-contained bundle.

``fastmtl export CHECKPOINT DIR`` (or ``fastmtl.export(CHECKPOINT, DIR)``; ``fastmtl.export.export`` is the same
function) writes the folder ``DIR``:

* ``--format onnx`` (default): ``model.onnx`` (standard ONNX operators only, the LSTM as ONNX ``LSTM`` nodes with
  ``sequence_lens``; dynamic batch and sequence length; opset ``--opset``, 17 by default; see
  :mod:`fastmtl.export.onnx_graph`), ``meta.json`` (everything that turns text into the model's inputs and its
  outputs into labels) and ``runtime.py`` (NumPy + ONNX Runtime only: ``runtime.load(DIR).predict(sentences)``
  returns what ``fastmtl.load(CHECKPOINT).predict`` returns; see :mod:`fastmtl.export.runtime`);
* ``--format torchscript``: ``model.pt`` (``torch.jit.load``; ``forward(ids, lengths, chars)`` gives the scores,
  the method ``predict`` the decoded labels and probabilities), ``meta.json`` and ``runtime.py``. ``--lstm torch``
  (default) runs the LSTM as ``torch.nn.LSTM`` (standard torch: any libtorch loads it); ``--lstm fastmtl`` through
  fastmtl's fused op (the process must load the extension: ``import fastmtl`` in Python, or link ``libfastmtl`` /
  load ``_C`` in C++);
* ``--format pt2``: ``model.pt2`` (a ``torch.export`` program of the ``predict`` method, with fastmtl's ops: load it
  with ``torch.export.load`` after ``import fastmtl``), ``meta.json`` and ``runtime.py``.

The bundle is written into a fresh temporary folder beside ``DIR`` and renamed to ``DIR`` when complete, so a failed
export leaves nothing behind; ``DIR`` must not exist, or be an empty folder (``overwrite=True`` also replaces an
earlier bundle, and nothing else); a symbolic link is refused. Before the rename the bundle is run on a few
sentences and its scores compared with the model's (``verify=False`` skips this; ONNX bundles are checked when
onnxruntime is installed). The checkpoint is read as ``fastmtl predict`` reads it (safetensors and JSON; pickle files
are refused, never unpickled).

``meta.json`` (``format`` ``"fastmtl-bundle"``, ``format_version`` 1): ``model_format``, ``model_file``,
``opset``, ``inputs``; ``vocab`` (``itos``, ``pad``, ``unk``, ``lower``, ``digits``: how words are normalised before
the lookup); ``chars`` (the character CNN's ``itos``, ``pad``, ``unk``, ``max_word_len``, or null); ``tasks``: per
task ``name``, ``level``, ``labels``, ``output`` (the model output it reads), ``scores`` (``log_probs`` or
``emissions``), ``decoding`` (``argmax``, ``viterbi``: constrained to valid BIO/IOBES sequences, or ``crf``),
``scheme``, ``constraints`` (``allowed`` [from][to], ``start``, ``end`` as 0/1), ``crf`` (``transitions`` [from][to],
``start_transitions``, ``end_transitions``), ``spans`` (whether results carry spans), ``pooling``; ``model``: the
training configuration of the model.
"""
import json
import os
import random
import shutil
import stat
import sys
import tempfile
import types
import warnings

__all__ = ["export", "export_model", "bundle_meta", "ExportError", "FORMATS", "BUNDLE_FORMAT", "BUNDLE_VERSION"]

FORMATS = ("onnx", "torchscript", "pt2")
BUNDLE_FORMAT = "fastmtl-bundle"
BUNDLE_VERSION = 1
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "pt2": "model.pt2"}
_BUNDLE_FILES = {"meta.json", "runtime.py"} | set(MODEL_FILES.values())


class ExportError(ValueError):
    """An export that cannot be done: a bad argument, checkpoint or destination (the message names it)."""


def export(checkpoint, directory, format="onnx", opset=None, lstm=None, overwrite=False, verify=True):
    """Exports the fastmtl checkpoint ``checkpoint`` (a ``best.pt``) to the bundle folder ``directory`` (see the
    module docstring); returns ``directory``.

    ``format``: ``"onnx"``, ``"torchscript"`` or ``"pt2"``; ``opset``: the ONNX opset (default 17); ``lstm``:
    ``"torch"`` or ``"fastmtl"`` (TorchScript only); ``overwrite``: replace an earlier bundle in ``directory``;
    ``verify``: compare the written bundle's scores with the model's before it is put in place.

    Raises :class:`ExportError` (a ``ValueError``) naming the argument for a bad one, and
    ``fastmtl.checkpoint.CheckpointError`` (a ``ValueError``) naming the file for a checkpoint that cannot be read
    (missing, corrupted, not fastmtl's, a pickle)."""
    _check_options(format, opset, lstm)
    target = _check_target(directory, overwrite)  # before the checkpoint is read: a bad destination fails at once
    from ..checkpoint import CheckpointError
    from ..training.checkpoint_content import load_checkpoint, read_checkpoint

    if checkpoint is None or not isinstance(checkpoint, (str, bytes, os.PathLike)):
        raise ExportError("fastmtl export: checkpoint must be a path, got %s" % type(checkpoint).__name__)
    path = os.fsdecode(checkpoint)
    if os.path.isdir(path):
        raise CheckpointError("fastmtl export: checkpoint %s is a folder; give the checkpoint file in it (a run "
                              "folder holds best.pt)" % path)
    model, vocab, label_vocabs, specs, cfg = load_checkpoint(path)
    schemes = read_checkpoint(path, ("model",), "model checkpoint").get("decoding") or {}
    if not isinstance(schemes, dict):
        raise CheckpointError("fastmtl export: %s: the checkpoint's decoding entry is not a table" % path)
    return export_model(model, vocab, label_vocabs, specs, target, format=format, opset=opset, lstm=lstm,
                        overwrite=overwrite, verify=verify, schemes=schemes,
                        config=_config_json(cfg), _checked=True)


def export_model(model, vocab, label_vocabs, specs, directory, format="onnx", opset=None, lstm=None,
                 overwrite=False, verify=True, schemes=None, config=None, _checked=False):
    """:func:`export` for a model in memory: the parts that ``fastmtl.train.load_checkpoint`` returns
    (``model`` a :class:`fastmtl.MultiTaskLSTM`, ``vocab``, ``label_vocabs``, ``specs``: the tasks to export).
    ``schemes``: ``{task: "bio" | "iobes"}`` (for meta.json; the constraints themselves are the model's
    ``decode_constraints``); ``config``: a JSON-able description of the model stored in meta.json."""
    if not _checked:
        _check_options(format, opset, lstm)
        directory = _check_target(directory, overwrite)
    from .module import from_model

    specs = list(specs)
    if "tokens" in [s.name for s in specs]:
        raise ExportError("fastmtl export: a task may not be named 'tokens' (the key of the words in results)")
    opset = _default_opset(opset)
    lstm = lstm or ("fastmtl" if format == "pt2" else "torch")
    module = from_model(model, [s.name for s in specs], lstm)
    meta = bundle_meta(model, vocab, label_vocabs, specs, format, opset, lstm, schemes, config)
    files = {"meta.json": (json.dumps(meta, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"),
             "runtime.py": _runtime_source()}
    with _Bundle(directory, overwrite) as bundle:
        model_path = os.path.join(bundle.tmp, MODEL_FILES[format])
        if format == "onnx":
            from .onnx_graph import build_onnx

            onx = build_onnx(module, opset, doc="fastmtl model (see meta.json)",
                             metadata={"fastmtl.meta": files["meta.json"].decode("utf-8")})
            bundle.write(MODEL_FILES[format], onx.SerializeToString())
        elif format == "torchscript":
            import torch

            with warnings.catch_warnings():  # (torch 2.13 deprecates TorchScript in favour of torch.export: pt2)
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.script(module)
                torch.jit.save(scripted, model_path)
            bundle.written(MODEL_FILES[format])
        else:
            _save_pt2(module, model_path, meta, vocab)
            bundle.written(MODEL_FILES[format])
        for name, data in files.items():
            bundle.write(name, data)
        if verify:
            _verify(bundle.tmp, module, vocab, format)
        bundle.commit()
    return directory


# -- meta.json -----------------------------------------------------------------------------------------------------

def bundle_meta(model, vocab, label_vocabs, specs, format="onnx", opset=None, lstm="torch", schemes=None,
                config=None):
    """The content of meta.json (see the module docstring) for a model and its vocabularies."""
    from .. import __version__
    from ..metrics import is_span_tagset

    schemes = dict(schemes or {})
    inputs = {"ids": "int64 (batch, time): word ids (vocab.itos), 0 = padding",
              "lengths": "int64 (batch,): real lengths, each in [1, time]"}
    chars = None
    if model.char_cnn is not None:
        cc = model.char_cnn
        chars = {"itos": list(cc.char_itos), "pad": 0, "unk": 1, "max_word_len": int(cc.max_word_len)}
        inputs["chars"] = ("int64 (batch, time, word_length): character ids (chars.itos) of the normalised words, "
                           "at most max_word_len each, 0 = padding")
    tasks = []
    for s in specs:
        labels = list(label_vocabs[s.name].itos)
        key = next(k for k, names in model.groups if s.name in names)
        heads = model.heads[key]
        spec = heads.task_specs[s.name]
        crf = heads.is_crf(s.name)
        cons = model.decode_constraints.get(s.name)
        entry = {"name": s.name, "level": s.level, "labels": labels,
                 "output": s.name + (".emissions" if crf else ".log_probs"),
                 "scores": "emissions" if crf else "log_probs",
                 "decoding": "crf" if crf else ("viterbi" if cons is not None else "argmax"),
                 "scheme": schemes.get(s.name) if cons is not None else None,
                 "constraints": None, "crf": None,
                 "spans": bool(s.level == "token" and is_span_tagset(labels)),
                 "pooling": (spec.pooling or "last") if s.level == "sequence" else None}
        if cons is not None:
            allowed, start, end = cons
            entry["constraints"] = {"allowed": allowed.to(int).tolist(), "start": start.to(int).tolist(),
                                    "end": end.to(int).tolist()}
        if crf:
            t, st, en = (p.detach().float().cpu() for p in heads[s.name].crf_params())
            entry["crf"] = {"transitions": t.tolist(), "start_transitions": st.tolist(),
                            "end_transitions": en.tolist()}
        tasks.append(entry)
    meta = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "fastmtl_version": __version__,
            "model_format": format, "model_file": MODEL_FILES[format],
            "opset": opset if format == "onnx" else None,
            "lstm": None if format == "onnx" else lstm,
            "inputs": inputs,
            "vocab": {"itos": list(vocab.itos), "pad": 0, "unk": 1, "lower": bool(vocab.lower),
                      "digits": bool(vocab.digits),
                      "normalisation": "lower: Python's str.lower(); digits: every character 0-9 becomes 0; then "
                                       "look up itos (unknown words: unk)"},
            "chars": chars, "tasks": tasks,
            "model": config if config is not None else dict(model.config)}
    return meta


def _config_json(cfg):
    from ..training.checkpoint_content import config_dict

    d = config_dict(cfg)
    return json.loads(json.dumps(d, default=str))


# -- checks ------------------------------------------------------------------------------------------------------------

def _default_opset(opset):
    from .onnx_graph import DEFAULT_OPSET

    return DEFAULT_OPSET if opset is None else opset


def _check_options(format, opset, lstm):
    if format not in FORMATS:
        raise ExportError("fastmtl export: format must be one of %s, got %r" % (", ".join(FORMATS), format))
    if opset is not None:
        from .onnx_graph import MIN_OPSET

        if format != "onnx":
            raise ExportError("fastmtl export: opset is an option of the onnx format, not of %s" % format)
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise ExportError("fastmtl export: opset must be an integer >= %d, got %r" % (MIN_OPSET, opset))
        try:
            import onnx

            newest = onnx.defs.onnx_opset_version()
        except ImportError:
            newest = None
        if newest is not None and opset > newest:
            raise ExportError("fastmtl export: opset %d is newer than the installed onnx knows (%d)" % (opset, newest))
    if lstm is not None:
        from .module import LSTM_BACKENDS

        if lstm not in LSTM_BACKENDS:
            raise ExportError("fastmtl export: lstm must be one of %s, got %r" % (", ".join(LSTM_BACKENDS), lstm))
        if format == "onnx":
            raise ExportError("fastmtl export: lstm is an option of the torchscript format (ONNX has its own LSTM "
                              "operator)")
        if format == "pt2" and lstm != "fastmtl":
            raise ExportError("fastmtl export: the pt2 format runs the LSTM through fastmtl's op (torch.export "
                              "cannot export torch.nn.LSTM over packed sequences of dynamic lengths); lstm must be "
                              "'fastmtl' or unset")
    if format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise ModuleNotFoundError("fastmtl export: the onnx format needs the onnx package: pip install onnx "
                                      "onnxruntime (or fastmtl[export])") from None


def _check_target(directory, overwrite):
    """The absolute path of the bundle folder, checked: not a link, not a file, empty unless ``overwrite`` and it
    holds an earlier bundle."""
    if directory is None or not isinstance(directory, (str, bytes, os.PathLike)):
        raise ExportError("fastmtl export: directory must be a path, got %s" % type(directory).__name__)
    raw = os.fsdecode(directory)
    if not raw:
        raise ExportError("fastmtl export: directory must not be empty")
    path = os.path.abspath(raw)
    if os.path.islink(path):
        raise ExportError("fastmtl export: directory %s is a symbolic link; the bundle is never written through a "
                          "link: give the real folder" % raw)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ExportError("fastmtl export: directory %s exists and is not a folder" % raw)
        entries = os.listdir(path)
        if entries:
            if not overwrite:
                raise ExportError("fastmtl export: directory %s is not empty; give a new or empty folder (overwrite "
                                  "/ --overwrite replaces an earlier bundle)" % raw)
            if not _is_bundle(path, entries):
                raise ExportError("fastmtl export: directory %s holds files that are not a fastmtl bundle's (%s); "
                                  "overwrite replaces an earlier bundle only" % (raw, ", ".join(sorted(
                                      set(entries) - _BUNDLE_FILES)[:5]) or "no meta.json"))
    return path


def _is_bundle(path, entries):
    if "meta.json" not in entries or not set(entries) <= _BUNDLE_FILES:
        return False
    for e in entries:
        st = os.lstat(os.path.join(path, e))
        if not stat.S_ISREG(st.st_mode):
            return False
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# -- writing -----------------------------------------------------------------------------------------------------------

class _Bundle:
    """A fresh private folder beside the destination; :meth:`commit` renames it into place, leaving the context
    without a commit removes it."""

    def __init__(self, path, overwrite):
        self.path, self.overwrite = path, overwrite
        self.tmp = None
        self.done = False

    def __enter__(self):
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=parent)
        except OSError as e:
            raise ExportError("fastmtl export: cannot write the bundle %s: %s (%s)"
                              % (self.path, e.strerror or e, e.filename or parent)) from None
        return self

    def write(self, name, data):
        fd = os.open(os.path.join(self.tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def written(self, name):
        """A file that a library wrote in the folder: synced like the others."""
        fd = os.open(os.path.join(self.tmp, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self):
        from ..fileio import _fsync_dir, _umask

        mask = _umask()
        for name in os.listdir(self.tmp):
            os.chmod(os.path.join(self.tmp, name), 0o666 & ~mask)
        os.chmod(self.tmp, 0o777 & ~mask)
        _fsync_dir(self.tmp)
        old = None
        try:
            if os.path.lexists(self.path) and os.listdir(self.path):
                if not self.overwrite:  # filled since the check
                    raise ExportError("fastmtl export: directory %s is not empty" % self.path)
                old = tempfile.mkdtemp(prefix="." + os.path.basename(self.path) + ".", suffix=".old",
                                       dir=os.path.dirname(self.path))
                os.rename(self.path, os.path.join(old, "bundle"))
            # rename onto a missing name or an empty folder; a link or a non-empty folder planted since the check
            # makes it fail (never written through)
            os.rename(self.tmp, self.path)
        except OSError as e:
            if old is not None and not os.path.lexists(self.path):
                os.rename(os.path.join(old, "bundle"), self.path)  # put the earlier bundle back
            raise ExportError("fastmtl export: cannot put the bundle in place at %s: %s"
                              % (self.path, e.strerror or e)) from None
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(os.path.dirname(self.path))
        self.done = True

    def __exit__(self, *exc):
        if not self.done and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _runtime_source():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime.py"), "rb") as f:
        return f.read()


def _example_inputs(vocab, n=12, seed=0):
    """Token lists of vocabulary words (some with an unknown word) of lengths 1 to 11."""
    rng = random.Random(seed)
    words = list(vocab.itos[2:]) or ["x"]
    out = []
    for i in range(n):
        toks = [rng.choice(words) for _ in range(1 + (i * 7) % 11)]
        if i % 3 == 0:
            toks[rng.randrange(len(toks))] = "Zq%d" % i
        out.append(toks)
    return out


def _save_pt2(module, path, meta, vocab):
    import torch

    from . import runtime as rt
    from .module import PredictModule

    feeds = rt.Encoder(meta["vocab"], meta["chars"]).encode(_example_inputs(vocab, n=5))
    args = tuple(torch.from_numpy(feeds[k]) for k in ("ids", "lengths", "chars") if k in feeds)
    B, T = torch.export.Dim("batch"), torch.export.Dim("time")
    shapes = [{0: B, 1: T}, {0: B}]
    if module.has_chars:
        shapes.append({0: B, 1: T, 2: torch.export.Dim("word_length")})
    try:
        prog = torch.export.export(PredictModule(module), args, dynamic_shapes=tuple(shapes), strict=False)
    except Exception as e:  # torch.export's own errors: not the user's input
        raise RuntimeError("fastmtl export: torch.export failed on this model: %s" % str(e).splitlines()[0]) from e
    torch.export.save(prog, path)


def _verify(tmp, module, vocab, format):
    """Runs the bundle in ``tmp`` on example sentences and compares its scores with ``module``'s (eager)."""
    import numpy as np
    import torch

    from . import runtime as rt

    if format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print("fastmtl export: onnxruntime is not installed: the bundle was not run before it was put in place",
                  file=sys.stderr)
            return
    model = rt.load(tmp)
    sents = _example_inputs(vocab)
    feeds = model.encode(sents)
    got = model._engine.run(feeds)
    args = [torch.from_numpy(feeds["ids"]), torch.from_numpy(feeds["lengths"])]
    if "chars" in feeds:
        args.append(torch.from_numpy(feeds["chars"]))
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in module(*args).items()}
    valid = np.arange(feeds["ids"].shape[1])[None, :] < feeds["lengths"][:, None]
    for name, r in ref.items():
        g = got.get(name)
        if g is None or g.shape != r.shape:
            raise RuntimeError("fastmtl export: the written %s bundle gives no output %r of shape %s"
                               % (format, name, r.shape))
        d = np.abs(g - r)[valid] if r.ndim == 3 else np.abs(g - r)
        err = float(d.max()) if d.size else 0.0
        if not err <= 1e-3:
            raise RuntimeError("fastmtl export: the written %s bundle differs from the model on %r by %.3g (more "
                               "than 1e-3); nothing was written" % (format, name, err))


# ``fastmtl.export(...)`` calls :func:`export`: the package is a callable module.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
