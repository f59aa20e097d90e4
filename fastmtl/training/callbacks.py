"""Training callbacks: what a run does around its steps, as objects the :class:`~fastmtl.training.Trainer` calls.

A callback is an object with some of these methods (:class:`Callback` has them all, doing nothing); the trainer
calls each one on every callback, in the order of its list, with itself (``trainer``: its configuration ``cfg``,
``model``, ``opt``, ``weighting``, ``specs``, ``rank``, ``out_dir`` and the run's state ``trainer.state``, a
:class:`RunState`) and the event's data:

==========================================  =========================================================================
``on_fit_start(trainer)``                   after the setup (and ``--resume``'s restore), before the first epoch
``on_epoch_start(trainer, epoch)``          ``epoch`` counts from 0; ``trainer.state.epoch_steps`` is its batches
``on_step_end(trainer, step)``              after each optimisation step; ``step``: a :class:`StepInfo`
``on_evaluate(trainer, split, metrics)``    after dev (each epoch) and test (at the end) are evaluated
``on_epoch_end(trainer, record)``           ``record``: the epoch's line of log.jsonl (losses, dev metrics, ...)
``on_save(trainer, path, kind)``            after ``best.pt`` (``kind`` ``"best"``) or ``last.pt`` (``"last"``)
``on_fit_end(trainer, result)``             after the test evaluation; ``result``: what :func:`train` returns
==========================================  =========================================================================

A callback stops the run after the current epoch with ``trainer.state.should_stop = True`` (and may set
``trainer.state.stop_reason``; under ``torchrun`` the run stops where any rank asks). A callback's ``close()``, if it
has one, is called when :meth:`~fastmtl.training.Trainer.fit` ends, also by an error or an interrupt. Every rank of a ``torchrun`` run calls its callbacks; ``trainer.is_main`` is true on
the one that writes files.

The run's files, messages and progress bar are built-in callbacks (:func:`default_callbacks`): :class:`ProgressBar`,
:class:`JsonLog` (log.jsonl, metrics.json), :class:`Checkpoints` (best.pt, last.pt), :class:`ConsoleLog`,
:class:`EarlyStopping` and :class:`LearningCurve` (learning_curve.png). Yours come after them: from Python,
``Trainer(cfg, callbacks=[...])``; from the command line ``--callback module:Class`` (repeatable; a class made with
no arguments) or ``--callback tensorboard`` (:class:`TensorBoard`), in a TOML file ``callbacks = [...]``.
"""
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import time

from ..fileio import atomic_write
from .evaluation import format_metrics
from .output import plot_history

__all__ = ["Callback", "RunState", "StepInfo", "CallbackList", "ProgressBar", "JsonLog", "Checkpoints", "ConsoleLog",
           "EarlyStopping", "LearningCurve", "TensorBoard", "default_callbacks", "load_callback", "BUILTIN", "HOOKS"]

HOOKS = ("on_fit_start", "on_epoch_start", "on_step_end", "on_evaluate", "on_epoch_end", "on_save", "on_fit_end")


@dataclasses.dataclass
class RunState:
    """Where the run stands. ``epoch``: epochs completed; ``global_step``: optimisation steps taken (over every
    session of a resumed run); ``epoch_steps``: the current epoch's batches; ``history``: the records of the completed
    epochs; ``best_score``, ``best_epoch`` (0: none yet), ``bad_epochs`` (since the best), ``best_state`` (the
    selected weights, on the CPU), ``improved`` (the last epoch is the best so far); ``train_time`` (seconds, over
    every session); ``should_stop`` / ``stop_reason``: set by a callback to end the run after this epoch."""

    epoch: int = 0
    global_step: int = 0
    epoch_steps: int = 0
    history: list = dataclasses.field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict = None
    improved: bool = False
    train_time: float = 0.0
    should_stop: bool = False
    stop_reason: str = None


@dataclasses.dataclass
class StepInfo:
    """One optimisation step: ``epoch`` (from 0), ``step`` (in the epoch, from 0), ``global_step`` (from 1),
    ``loss`` (the weighted training loss), ``losses`` (``{task: loss}`` of the tasks in the batch), ``dataset``
    (its index), ``examples`` and ``tokens`` (of the global batch)."""

    epoch: int
    step: int
    global_step: int
    loss: float
    losses: dict
    dataset: int
    examples: int
    tokens: int


class Callback:
    """The base class: every hook does nothing (override the ones you need)."""

    def on_fit_start(self, trainer):
        pass

    def on_epoch_start(self, trainer, epoch):
        pass

    def on_step_end(self, trainer, step):
        pass

    def on_evaluate(self, trainer, split, metrics):
        pass

    def on_epoch_end(self, trainer, record):
        pass

    def on_save(self, trainer, path, kind):
        pass

    def on_fit_end(self, trainer, result):
        pass


def check_callback(cb, where="callback", error=TypeError):
    """``error`` for an object that is not a callback: no hook at all, a hook that is not callable, or a method
    named like a hook that is none (``on_epoch_ends``: a typo would never be called)."""
    if isinstance(cb, type):
        raise error("fastmtl: %s %s is a class; give an instance (%s())" % (where, cb.__name__, cb.__name__))
    names = [n for n in dir(cb) if n.startswith("on_") and not n.startswith("on__")]
    unknown = [n for n in names if n not in HOOKS and callable(getattr(cb, n, None))]
    if unknown:
        raise error("fastmtl: %s %s has %s, which %s no hook (the hooks: %s)"
                        % (where, type(cb).__name__, ", ".join(unknown), "is" if len(unknown) == 1 else "are",
                           ", ".join(HOOKS)))
    hooks = [n for n in names if n in HOOKS]
    if not hooks:
        raise error("fastmtl: %s %s has none of the hooks %s" % (where, type(cb).__name__, ", ".join(HOOKS)))
    for n in hooks:
        if not callable(getattr(cb, n)):
            raise error("fastmtl: %s %s: %s is not a method" % (where, type(cb).__name__, n))
    return cb


class CallbackList:
    """Calls a hook on every callback in order (those without it are skipped)."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self):
        return len(self.callbacks)

    def call(self, hook, trainer, *args):
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(trainer, *args)


# ------------------------------------------------------------------------------------------------------------------
# the built-in callbacks: the run's messages, files and progress


class ProgressBar(Callback):
    """The per-epoch tqdm bar (loss and tokens/s), only where stderr is a terminal (``--progress``, not quiet)."""

    def __init__(self):
        self.bar = None

    def on_epoch_start(self, trainer, epoch):
        self.bar = trainer.log.bar(trainer.state.epoch_steps, "epoch %d/%d" % (epoch + 1, trainer.cfg.epochs))
        self.loss_sum, self.steps, self.tokens = 0.0, 0, 0
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer, step):
        if self.bar is None:
            return
        self.loss_sum += step.loss
        self.steps += 1
        self.tokens += step.tokens
        el = time.perf_counter() - self.t0
        self.bar.set_postfix(loss="%.4f" % (self.loss_sum / self.steps), tok_s="%.0f" % (self.tokens / max(el, 1e-9)),
                             refresh=False)
        self.bar.update(1)

    def on_evaluate(self, trainer, split, metrics):
        self.close()

    def on_epoch_end(self, trainer, record):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleLog(Callback):
    """One line per epoch on stderr: loss, tokens/s and the dev metrics (``*``: the best so far), and the test
    metrics of the selected model at the end."""

    def on_epoch_end(self, trainer, record):
        msg = "epoch %d: loss %.4f, %.0f tokens/s" % (record["epoch"], record["train_loss"], record["tokens_per_s"])
        if "dev" in record:
            msg += ", dev " + format_metrics(record["dev"]) + (" *" if trainer.state.improved else "")
        trainer.log(msg)

    def on_evaluate(self, trainer, split, metrics):
        if split == "test" and metrics is not None:
            st = trainer.state
            trainer.log("test (best epoch %d, %.0f s training): %s" % (st.best_epoch, st.train_time,
                                                                     format_metrics(metrics)))


class JsonLog(Callback):
    """``log.jsonl`` (one record per completed epoch, rewritten whole after each) and ``metrics.json`` (the test
    metrics of the selected model) in ``--output-dir``."""

    def on_epoch_end(self, trainer, record):
        if trainer.out_dir and trainer.is_main:
            atomic_write(os.path.join(trainer.out_dir, "log.jsonl"),
                         "".join(json.dumps(h) + "\n" for h in trainer.state.history))

    def on_fit_end(self, trainer, result):
        if trainer.out_dir and trainer.is_main and result.get("test") is not None:
            atomic_write(os.path.join(trainer.out_dir, "metrics.json"), json.dumps(result["test"], indent=2) + "\n")


class Checkpoints(Callback):
    """``best.pt`` when an epoch is the best so far and ``last.pt`` (what ``--resume`` continues from) after every
    epoch, in ``--output-dir``."""

    def on_epoch_end(self, trainer, record):
        if trainer.state.improved:
            trainer.save_best(record)
        trainer.save_last()


class EarlyStopping(Callback):
    """Stops the run after ``--patience`` epochs without a dev improvement (only where there is dev data)."""

    def on_epoch_end(self, trainer, record):
        patience = trainer.cfg.patience
        if trainer.has_dev and trainer.state.bad_epochs >= patience:
            trainer.state.should_stop = True
            trainer.state.stop_reason = "early stop (no dev improvement in %d epochs)" % patience
            trainer.log("fastmtl: " + trainer.state.stop_reason)


class LearningCurve(Callback):
    """``learning_curve.png`` (training loss and dev metrics per epoch) in ``--output-dir``, with matplotlib (the
    ``plot`` extra; a one-line note without it)."""

    def on_fit_end(self, trainer, result):
        h = trainer.state.history
        if trainer.out_dir and trainer.is_main and h:
            plot_history(h, os.path.join(trainer.out_dir, "learning_curve.png"), trainer.log)


def _scalars(prefix, value, out):
    """The numbers of a (nested) metrics dict as ``prefix/key/...`` tags."""
    if isinstance(value, dict):
        for k, v in value.items():
            _scalars("%s/%s" % (prefix, k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[prefix] = float(value)
    return out


class TensorBoard(Callback):
    """Writes the run to TensorBoard event files (``torch.utils.tensorboard``; the ``tensorboard`` extra:
    ``pip install fastmtl[tensorboard]``), in ``log_dir`` (default: ``<--output-dir>/tensorboard``), on the main
    rank: per step ``train/loss`` and ``train/loss/<task>`` (every ``every`` steps), per epoch ``epoch/...`` (loss,
    task losses and weights, learning rate, tokens/s), ``dev/<task>/<metric>`` and, at the end, ``test/...``.
    A resumed run continues the same files: the steps after the checkpoint it resumes are dropped first."""

    def __init__(self, log_dir=None, every=1):
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError("fastmtl: TensorBoard: every must be an integer >= 1, got %r" % (every,))
        try:
            import tensorboard  # noqa: F401  (what torch.utils.tensorboard needs)
        except ImportError as e:
            raise ModuleNotFoundError("fastmtl: the tensorboard callback needs the tensorboard package (pip install "
                                      "fastmtl[tensorboard]): %s" % e) from None
        self.log_dir, self.every, self.writer = log_dir, every, None

    def on_fit_start(self, trainer):
        log_dir = self.log_dir or (os.path.join(trainer.out_dir, "tensorboard") if trainer.out_dir else None)
        if log_dir is None:  # (on every rank: the trainer calls on_fit_start before it touches the folder)
            raise ValueError("fastmtl: the tensorboard callback writes under --output-dir; give --output-dir (or "
                             "TensorBoard(log_dir=...))")
        if not trainer.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        st = trainer.state
        if not st.global_step and trainer.cfg.overwrite and os.path.isdir(log_dir):
            # --overwrite: the earlier run's event files go with its other files (links themselves, not targets)
            for name in os.listdir(log_dir):
                p = os.path.join(log_dir, name)
                if name.startswith("events.out.tfevents.") and (os.path.islink(p) or os.path.isfile(p)):
                    os.unlink(p)
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=st.global_step + 1 if st.global_step else None)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_step_end(self, trainer, step):
        if self.writer is None or step.global_step % self.every:
            return
        self.writer.add_scalar("train/loss", step.loss, step.global_step)
        for n, v in step.losses.items():
            self.writer.add_scalar("train/loss/" + n, v, step.global_step)

    def on_epoch_end(self, trainer, record):
        if self.writer is None:
            return
        ep = record["epoch"]
        tags = {}
        for k in ("train_loss", "lr", "tokens_per_s", "epoch_time_s"):
            _scalars("epoch/" + k, record.get(k), tags)
        _scalars("epoch/train_losses", record.get("train_losses"), tags)
        _scalars("epoch/task_weights", record.get("task_weights"), tags)
        _scalars("dev", record.get("dev"), tags)
        _scalars("dev/score", record.get("dev_score"), tags)
        for tag, v in tags.items():
            self.writer.add_scalar(tag, v, ep)
        self.writer.flush()

    def on_evaluate(self, trainer, split, metrics):
        if self.writer is None or split != "test" or metrics is None:
            return
        for tag, v in _scalars("test", metrics, {}).items():
            self.writer.add_scalar(tag, v, trainer.state.best_epoch)

    def on_fit_end(self, trainer, result):
        self.close()


BUILTIN = {"tensorboard": TensorBoard}
"""The callbacks ``--callback`` knows by name."""

_SPEC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def check_spec(spec):
    """A ``ValueError`` for a ``--callback`` value that is neither a built-in name nor ``module:Class``."""
    if not isinstance(spec, str) or not (spec in BUILTIN or _SPEC.fullmatch(spec)):
        raise ValueError("fastmtl: --callback must be %s or module:Class (a class importable from Python), got %r"
                         % (" or ".join(sorted(BUILTIN)), spec))
    return spec


def _import(name):
    """``importlib.import_module(name)``, also from the current folder (as ``python -m`` would find it)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != name.partition(".")[0] or cwd in sys.path or "" in sys.path:
            raise
    sys.path.append(cwd)  # last: the installed modules come first; only for this import
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(cwd)


def load_callback(spec):
    """The callback that ``--callback spec`` names: a built-in name (``tensorboard``) or ``module:Class``, imported
    and made with no arguments. A ``ValueError`` naming the value for anything else."""
    check_spec(spec)
    if spec in BUILTIN:
        return check_callback(BUILTIN[spec](), "--callback %s:" % spec, ValueError)
    mod_name, _, attr = spec.partition(":")
    try:
        obj = _import(mod_name)
    except ImportError as e:
        raise ValueError("fastmtl: --callback %s: cannot import %s (%s)" % (spec, mod_name, e)) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError("fastmtl: --callback %s: %s has no %s" % (spec, mod_name, attr))
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError("fastmtl: --callback %s: %s is not a class (give a class made with no arguments)"
                        % (spec, attr))
    try:
        cb = obj()
    except TypeError as e:
        raise ValueError("fastmtl: --callback %s: the class must be made with no arguments (%s)" % (spec, e)) from None
    return check_callback(cb, "--callback %s:" % spec, ValueError)


def default_callbacks():
    """The built-in callbacks every run has, in their order: progress bar, log.jsonl/metrics.json, checkpoints, the
    epoch line, early stopping, the learning curve."""
    return [ProgressBar(), JsonLog(), Checkpoints(), ConsoleLog(), EarlyStopping(), LearningCurve()]
