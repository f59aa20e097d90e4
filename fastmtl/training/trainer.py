"""The Trainer: a run in stages that can be read and changed one at a time.

1. setup and resume: :meth:`Trainer.setup` (process, data, model, optimiser, callbacks; the state of ``last.pt``
   on ``--resume``);
2. step: :meth:`Trainer.step` (one batch: the weighting method's step: forward, backward, clipping, optimiser, EMA)
   and :meth:`Trainer.run_epoch` (the batches of an epoch, from the :class:`~fastmtl.training.data.EpochPlanner`);
3. evaluate and select: :meth:`Trainer.evaluate`, :meth:`Trainer.select`;
4. checkpoint: :meth:`Trainer.save_best`, :meth:`Trainer.save_last`.

:meth:`Trainer.fit` runs them and calls the callbacks (:mod:`fastmtl.training.callbacks`) around them: the run's
messages, progress bar, files (log.jsonl, checkpoints, metrics.json, the plot) and early stopping are built-in
callbacks, and a user's come after them. :func:`train` is ``Trainer(cfg).fit()``. A subclass can replace one stage
(another step rule, another selection criterion) and keep the rest. Data-parallel runs: :mod:`.distributed`.
"""
import dataclasses
import math
import os
import random
import time

import torch

from .. import data as D
from ..checkpoint import save_checkpoint
from ..weighting import make_weighting, registry
from .checkpoint_content import (CONTENT_VERSION, RESUME_KEYS, checked, config_dict, config_from, decoding_schemes,
                          model_from, model_from_checkpoint, read_checkpoint, rng_state, set_decoding, set_rng_state,
                          task_lists)
from .callbacks import CallbackList, RunState, StepInfo, check_callback, default_callbacks, load_callback
from .config import TrainConfig, option_name
from .data import EpochPlanner, aux_specs, expected_share, is_aux, load_datasets
from .distributed import Distributed
from .evaluation import check_select, dev_score, evaluate_datasets
from .output import Logger, OutputDirLock, prepare_output_dir, remove_run_files, remove_stale_temporaries

__all__ = ["Trainer", "train", "NonFiniteLossError"]


# the options that steer one session of a run, not the run: --resume takes them from the command line
SESSION_OPTIONS = ("epochs", "patience", "max_minutes", "progress", "quiet", "resume", "overwrite", "device", "threads",
                   "callbacks")


def _shown(v):
    if isinstance(v, (list, tuple)):
        return ",".join(":".join(map(str, x)) if isinstance(x, (list, tuple)) else str(x) for x in v)
    return str(v)


class NonFiniteLossError(ValueError):
    """Training stopped: the loss, the update or a method's coefficients became nan or inf (nothing of that step is
    saved)."""


def _device(cfg, local_rank):
    if cfg.device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


class _Step(torch.nn.Module):
    """What DDP wraps: the model plus learned task weights."""

    def __init__(self, model, weighting):
        super().__init__()
        self.model, self.weighting = model, weighting

    def forward(self, ids, lengths, targets, scale=None, chars=None, tasks=None):
        w = self.weighting.weights()
        if scale is not None:
            w = scale(w)
        out = self.model(ids, lengths, targets, w, chars=chars)
        reg = self.weighting.regularizer(tasks)  # tasks: those with labels in this batch
        return out, (out.loss if reg is None else out.loss + reg)


class StepContext:
    """What a weighting method's :meth:`~fastmtl.weighting.TaskWeighting.train_step` gets for one batch: the batch
    (``batch``: ids, lengths, targets), ``chars`` (its character ids, or None), ``tasks`` (those with labels in it,
    None: all), ``scale`` (DDP: the function that scales task weights by this rank's share of each task's items;
    None in one process), ``model``, ``task_backward``, ``world`` and ``ddp_reduce`` (None in one process), and the
    steps: :meth:`forward`, :meth:`zero_grad`, :meth:`finish` (clipping, optimiser and scheduler step, EMA, the
    finiteness check), :meth:`global_losses` and :meth:`stop`."""

    def __init__(self, trainer, batch, scale, chars, tasks):
        self.trainer, self.batch, self.scale, self.chars, self.tasks = trainer, batch, scale, chars, tasks
        self.model = trainer.model
        self.task_backward = trainer.cfg.task_backward
        self.world = trainer.dist.world
        self.ddp_reduce = trainer.dist.reduce

    def forward(self, wrapped=True):
        """``(model output, loss)``: the loss weighted by the method's weights, plus its regularizer; through the
        DDP wrapper unless ``wrapped=False`` (a forward whose gradients are not reduced)."""
        b = self.batch
        module = self.trainer.wrapped if wrapped else self.trainer.step_module
        return module(b.ids, b.lengths, b.targets, self.scale, self.chars, self.tasks)

    def zero_grad(self):
        self.trainer.opt.zero_grad(set_to_none=True)

    def finish(self):
        self.trainer._finish_step()

    def global_losses(self, losses):
        """``{task: L_k}`` detached; under DDP those of the global batch."""
        return self.trainer.dist.global_losses(losses, self.scale)

    def stop(self, error):
        """The error that stops the run before the update (raise it): ``error`` is a FloatingPointError of a
        non-finite quantity."""
        return NonFiniteLossError("%s; stopped before the update%s" % (error, self.trainer._kept()))


class Trainer:
    """One training run per ``cfg`` (a :class:`TrainConfig`; keyword overrides allowed). ``callbacks``: objects
    with some of the hooks of :class:`~fastmtl.training.callbacks.Callback` (or names as ``--callback`` takes them),
    called after the built-in ones and those of ``cfg.callbacks``. ``is_setup``: whether :meth:`setup` has run (:meth:`fit` runs it if not);
    ``state``: where the run stands (:class:`~fastmtl.training.callbacks.RunState`)."""

    def __init__(self, cfg=None, callbacks=None, **overrides):
        cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
        self.cfg = cfg.validate()
        self.dist = Distributed()
        self.log = Logger(cfg, self.dist.rank)
        self.dir_lock = None
        self.is_setup = False
        self.state = RunState()
        self.user_callbacks = [load_callback(c) if isinstance(c, str) else check_callback(c) for c in (callbacks or ())]
        self.callbacks = CallbackList([])

    @property
    def rank(self):
        return self.dist.rank

    @property
    def is_main(self):
        """Whether this process writes the run's files (rank 0)."""
        return self.dist.is_main

    def release_output_dir(self):
        """Releases the lock on ``--output-dir`` (at the end of :meth:`fit`, also when it fails)."""
        if self.dir_lock is not None:
            self.dir_lock.release()
            self.dir_lock = None

    # ------------------------------------------------------------------------------------------------------------
    # 1. setup and resume

    def setup(self):
        self.setup_process()
        self.read_resume()
        self.setup_data()
        self.setup_model()
        self.setup_optimisation()
        self.restore()
        self.setup_callbacks()
        self.is_setup = True
        return self

    def setup_callbacks(self):
        """The built-in callbacks, then those ``cfg.callbacks`` names (``--callback``), then the constructor's."""
        named = [load_callback(spec) for spec in (self.cfg.callbacks or ())]
        self.callbacks = CallbackList(default_callbacks() + named + self.user_callbacks)

    def setup_process(self):
        cfg = self.cfg
        if cfg.output_dir:
            prepare_output_dir(cfg)
        self.device = _device(cfg, self.dist.local)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist.start(self.device)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.out_dir = cfg.output_dir
        if self.out_dir and self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            # one run per folder: a second one stops here, before it reads or removes anything of the first
            self.release_output_dir()
            self.dir_lock = OutputDirLock(self.out_dir).acquire()
            prepare_output_dir(cfg)  # again, under the lock: another run may have written since the first check
            if os.path.isdir(self.out_dir):  # a save cut short by a kill leaves its temporary: no run writes it now
                stale = remove_stale_temporaries(self.out_dir)
                if stale:
                    self.log("fastmtl: removed %d temporary file%s of an interrupted save in %s: %s"
                             % (len(stale), "" if len(stale) == 1 else "s", self.out_dir, ", ".join(stale)))
        self.last_path = os.path.join(self.out_dir, "last.pt") if self.out_dir else None

    def read_resume(self):
        """``--resume``: reads last.pt and continues with its configuration (the options that only steer this
        session, like ``--epochs`` and ``--device``, are taken from the command line)."""
        cfg = self.cfg
        self.resume_ck = None
        if not cfg.resume:
            return
        if os.path.lexists(self.last_path):
            ck = read_checkpoint(self.last_path, RESUME_KEYS, "training state (last.pt)")
            saved = checked(self.last_path, dict, ck["config"])
            self.check_resume_options(saved)
            for k in SESSION_OPTIONS:
                saved[k] = getattr(cfg, k)
            self.cfg = checked(self.last_path, lambda: config_from(saved).validate())
            self.log.cfg = self.cfg
            self.resume_ck = ck
            self.log("fastmtl: resuming from %s (epoch %s done)" % (self.last_path, ck["epoch"]))
        else:
            self.log("fastmtl: --resume: no %s yet, starting fresh" % self.last_path)

    def check_resume_options(self, saved):
        """--resume continues the saved run: an option set to something else than its default and than the saved
        run's value (``--hidden-size``, ``--lr``, ``--train``, ``--task``, ...) is refused, naming each, instead of
        being ignored. Only the options of the session (:data:`SESSION_OPTIONS`) may change."""
        mine, default = config_dict(self.cfg), config_dict(TrainConfig())

        def norm(k, v):
            if k in ("train", "dev", "test", "pretrained", "init_encoder") and isinstance(v, str):
                return os.path.abspath(v)
            return v

        clash = [k for k in mine if k not in SESSION_OPTIONS and k != "output_dir" and mine[k] != default.get(k)
                 and norm(k, mine[k]) != norm(k, saved.get(k, default.get(k)))]
        if clash:
            raise ValueError(
                "fastmtl: --resume continues the run saved in %s, and %s differ%s from it: %s; leave %s out, or "
                "start a new run in another --output-dir" % (
                    self.last_path, "these options" if len(clash) > 1 else "this option", "" if len(clash) > 1
                    else "s", "; ".join("%s %s (the run: %s)" % (option_name(k), _shown(mine[k]),
                                                                 _shown(saved.get(k, default.get(k))))
                                        for k in clash), "them" if len(clash) > 1 else "it"))

    def setup_data(self):
        """Datasets, tasks, vocabularies (transfer: the encoder's vocabulary comes with it), encoded training data
        (every dataset's examples in one list; a task of another dataset is ignore_index there) and the planner."""
        cfg, ck = self.cfg, self.resume_ck
        self.datasets, self.specs = load_datasets(cfg)
        check_select(cfg.select, self.specs, self.datasets)
        self.all_specs = self.specs + aux_specs(self.specs, cfg.sequence_aux)
        self.dataset_specs = [[s for s in self.all_specs if s.dataset == ds.name] for ds in self.datasets]
        train_sets = [ds.splits["train"] for ds in self.datasets]
        self.init_ck = None
        if ck is not None:
            self.vocab, self.label_vocabs = checked(self.last_path, lambda: (
                D.Vocab.from_state_dict(ck["vocab"]),
                {k: D.LabelVocab.from_state_dict(v) for k, v in ck["label_vocabs"].items()}))
        else:
            if cfg.init_encoder:
                self.init_ck = read_checkpoint(cfg.init_encoder, ("model", "vocab", "config"), "model checkpoint")
                self.vocab = checked(cfg.init_encoder, D.Vocab.from_state_dict, self.init_ck["vocab"])
                enc_cfg = checked(cfg.init_encoder, dict, self.init_ck["config"])
                for k in ("embedding_dim", "hidden_size", "num_layers", "bidirectional", "char_dim", "char_filters",
                          "char_kernel"):
                    if k in enc_cfg:
                        if enc_cfg[k] != getattr(cfg, k):
                            self.log("fastmtl: --init-encoder: %s %s as in %s (not %s)"
                                     % (k, enc_cfg[k], cfg.init_encoder, getattr(cfg, k)))
                        setattr(cfg, k, enc_cfg[k])
                checked(cfg.init_encoder, cfg.validate)
            else:
                self.vocab = D.Vocab.build([ex["tokens"] for ex in sum(train_sets, [])], cfg.min_count, cfg.lower,
                                           cfg.normalize_digits)
            self.label_vocabs = {}
            for ex, specs in zip(train_sets, self.dataset_specs):
                self.label_vocabs.update(D.build_label_vocabs(ex, specs))
        self.encoded, self.offsets = [], []
        for ex, specs in zip(train_sets, self.dataset_specs):
            self.offsets.append(len(self.encoded))
            enc = D.encode_examples(ex, self.vocab, self.label_vocabs, specs)
            if len(self.datasets) > 1:
                others = [s for s in self.all_specs if s not in specs]
                for ids, tg in enc:
                    for s in others:
                        tg[s.name] = [-100] * len(ids) if s.level == "token" else -100
            self.encoded += enc
        # the tasks a step computes: its dataset's (the others have no labels there), or all of them where every
        # parameter must take part in every step (DDP's reducer, GradNorm's per-task gradient norms)
        full = self.dist.enabled or registry.method(cfg.weighting).cls.every_task_every_step
        self.step_specs = [self.all_specs if full else specs for specs in self.dataset_specs]
        self.dataset_tasks = [[s.name for s in specs] for specs in self.dataset_specs]
        self.planner = EpochPlanner([len(x) for x in train_sets], cfg.batch_size, cfg.sampling,
                                    cfg.sampling_temperature, cfg.seed,
                                    lengths=[[len(e["tokens"]) for e in x] for x in train_sets],
                                    min_batch=self.dist.min_batch)
        for d, ds in enumerate(self.datasets):
            if not self.planner.batches_of(d):  # under DDP a batch must give every rank an example
                raise ValueError("fastmtl: dataset %r has %d training example(s), fewer than the %d DDP ranks: it "
                                 "would never be trained" % (ds.name, len(train_sets[d]), self.dist.world))
        if len(self.datasets) > 1:
            share = expected_share([len(x) for x in train_sets], cfg.sampling, cfg.sampling_temperature)
            self.log("fastmtl: %d datasets, %s sampling: %s" % (len(self.datasets), cfg.sampling, ", ".join(
                "%s %d examples (%.0f%% of batches)" % (ds.name, len(x), 100 * p)
                for ds, x, p in zip(self.datasets, train_sets, share))))

    def setup_model(self):
        cfg = self.cfg
        pretrained = None
        if cfg.pretrained and self.resume_ck is None and self.init_ck is None:
            from ..embeddings import embedding_matrix

            pretrained, found = embedding_matrix(self.vocab, cfg.pretrained, cfg.embedding_dim)
            bad_rows = (~torch.isfinite(pretrained).all(dim=1)).nonzero().flatten().tolist()
            if bad_rows:
                raise ValueError("fastmtl: --pretrained %s: the vector of %r (and %d more) holds nan or inf values"
                                 % (cfg.pretrained, self.vocab.itos[bad_rows[0]], len(bad_rows) - 1))
            self.log("fastmtl: %d of %d words have pretrained vectors" % (found, len(self.vocab)))
        source = (self.last_path if self.resume_ck is not None else
                  cfg.init_encoder if self.init_ck is not None else None)
        if self.resume_ck is not None:  # a configuration read from last.pt: validated and bounded by its tensors
            model = model_from_checkpoint(self.last_path, cfg, self.vocab, self.label_vocabs, self.all_specs,
                                          self.resume_ck["step_module"], pretrained)
        elif source:  # a configuration read from a checkpoint: errors name it
            model = checked(source, model_from, cfg, self.vocab, self.label_vocabs, self.all_specs, pretrained)
        else:
            model = model_from(cfg, self.vocab, self.label_vocabs, self.all_specs, pretrained)
        if self.resume_ck is not None:
            self.schemes = self.resume_ck.get("decoding") or {}
            checked(self.last_path, set_decoding, model, self.label_vocabs, self.schemes)
        else:
            train_by = {ds.name: ds.splits["train"] for ds in self.datasets}
            self.schemes = decoding_schemes(cfg, self.all_specs, train_by, self.label_vocabs)
            set_decoding(model, self.label_vocabs, self.schemes)
        for n, sc in self.schemes.items():
            self.log("fastmtl: %s: constrained %s decoding" % (n, sc.upper()))
        if self.init_ck is not None:
            checked(cfg.init_encoder, model.load_encoder, self.init_ck["model"], cfg.freeze_encoder)
        self.model = model.to(self.device)

    def setup_optimisation(self):
        cfg, specs = self.cfg, self.specs
        base_weights = dict(cfg.task_weights or {})
        unknown = sorted(set(base_weights) - {s.name for s in specs})
        if unknown:
            raise ValueError("fastmtl: --task-weights names unknown task%s %s (the tasks are %s)"
                             % ("s" if len(unknown) > 1 else "", ", ".join(map(repr, unknown)),
                                ", ".join(s.name for s in specs)))
        base_weights.update({s.name: cfg.sequence_aux for s in self.all_specs if is_aux(s)})
        self.weighting = make_weighting(cfg.weighting, [s.name for s in self.all_specs], base_weights,
                                        **registry.method_kwargs(cfg.weighting, cfg))
        self.weighting.check_model(self.model)
        self.weighting.to(self.device)
        self.step_module = _Step(self.model, self.weighting)
        self.wrapped = self.dist.wrap(self.step_module, self.device)
        self.params = [p for n, p in self.step_module.named_parameters()
                       if p.requires_grad and not n.startswith("weighting.w")]
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(self.params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        total_steps = max(1, self.planner.steps() * cfg.epochs)

        def lr_lambda(step):
            warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
            if cfg.schedule == "constant":
                return warm
            return warm * max(0.0, 1.0 - step / total_steps)

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
        self.unk_probs = (torch.tensor(self.vocab.unk_probabilities(cfg.unk_alpha)) if cfg.unk_alpha > 0 else None)
        self.ema = None
        if cfg.ema:
            self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def restore(self):
        """The run's state: fresh, or (``--resume``) the end of the last completed epoch from last.pt."""
        self.state = RunState()
        ck = self.resume_ck
        if ck is None:
            return

        def restore():
            self.step_module.load_state_dict(ck["step_module"])
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            self.weighting.load_extra_state(ck.get("weighting_extra") or {})
            ema_state = self.ema
            if self.ema is not None and ck.get("ema") is not None:
                ema_state = {k: v.to(self.device) for k, v in ck["ema"].items()}
            set_rng_state(ck["rng"], self.device)
            # (a last.pt without global_step: the steps of its epochs as planned)
            steps = ck.get("global_step")
            if steps is None:
                steps = sum(len(self.planner.plan(e)) for e in range(int(ck["epoch"])))
            state = RunState(epoch=int(ck["epoch"]), global_step=int(steps),
                             history=list(ck["history"]), best_score=float(ck["best_score"]),
                             best_epoch=int(ck["best_epoch"]), bad_epochs=int(ck["bad_epochs"]),
                             best_state=ck.get("best_model"), train_time=float(ck.get("train_time_s", 0.0)))
            return state, ema_state

        self.state, self.ema = checked(self.last_path, restore)

    # ------------------------------------------------------------------------------------------------------------
    # 2. step

    def batch(self, d, idx, gen):
        """The (device) batch of dataset ``d``'s training examples ``idx`` (local indices), with its tasks'
        targets and the random ``<unk>`` replacements; under DDP this rank's share and the global item counts."""
        gidx = [self.offsets[d] + i for i in idx]
        specs = self.step_specs[d]
        # draw the <unk> replacements for the whole global batch so ranks agree with one process
        gb = D.collate(self.encoded, gidx, specs, unk_probs=self.unk_probs, generator=gen)
        gb, counts = self.dist.share(gb, gidx, self.encoded, specs)
        return gb.to(self.device), counts

    def step(self, b, counts, tasks=None):
        """One optimisation step on batch ``b`` (``tasks``: the tasks with labels in it, None: all): the weighting
        method's :meth:`~fastmtl.weighting.TaskWeighting.train_step`; returns the model output and the loss value."""
        model = self.model
        # character features of the words as written, also where the word id became <unk>
        chars = model.char_cnn.char_ids[b.raw_ids] if model.char_cnn is not None else None
        return self.weighting.train_step(StepContext(self, b, self.dist.scale(b.targets, counts), chars, tasks))

    def _finish_step(self):
        """Clipping, the optimiser and scheduler steps and the EMA, after the gradients are in ``.grad``."""
        cfg, model = self.cfg, self.model
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            with torch.no_grad():
                n = self.sched.last_epoch  # optimizer steps so far
                decay = min(cfg.ema, (1.0 + n) / (10.0 + n))
                sd = model.state_dict()
                for k, v in self.ema.items():
                    v.lerp_(sd[k], 1.0 - decay)

    def _kept(self):
        return ("; the checkpoints of completed epochs in %s are kept" % self.out_dir) if self.out_dir else ""

    def check_parameters(self, epoch, step):
        """Stops the run when the step left a parameter (of the model or of the weighting) nan or inf: the loss of
        the step was computed before the update, so a finite loss does not mean a finite model."""
        named = list(self.step_module.named_parameters())
        named += [("weighting buffer " + n, t) for n, t in self.weighting.named_buffers() if t.is_floating_point()]
        with torch.no_grad():  # one flag per tensor on its device, one host sync per step
            finite = torch.stack([torch.isfinite(t).all() for _, t in named])
        if not bool(finite.all()):
            bad = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
            raise NonFiniteLossError(
                "fastmtl: the optimiser step at epoch %d, step %d left nan or inf values in %s; stopped without "
                "writing metrics%s. Check --lr, --task-weights and --weighting"
                % (epoch + 1, step + 1, ", ".join(bad[:5]) + (" and %d more" % (len(bad) - 5) if len(bad) > 5 else ""),
                   self._kept()))

    def check_finite(self, lv, out, epoch, step):
        if self.dist.any(not math.isfinite(lv), self.device):  # every rank stops at the same step
            raise NonFiniteLossError(
                "fastmtl: the training loss is %s at epoch %d, step %d (task losses: %s); stopped without "
                "writing metrics%s. Check --task-weights, --pretrained and --lr"
                % (lv, epoch + 1, step + 1,
                   ", ".join("%s %.4g" % (n, float(l.detach())) for n, l in out.losses.items()), self._kept()))

    def out_of_time(self):
        cfg = self.cfg
        return bool(cfg.max_minutes) and time.perf_counter() - self.t_start > cfg.max_minutes * 60

    def run_epoch(self, epoch):
        """The batches of ``epoch``; returns its log record (losses, learning rate, throughput)."""
        cfg, st = self.cfg, self.state
        self.step_module.train()
        plan = self.planner.plan(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        st.epoch_steps = len(plan)
        self.callbacks.call("on_epoch_start", self, epoch)
        loss_sum, nb, tokens = 0.0, 0, 0
        task_sums = {s.name: 0.0 for s in self.all_specs}
        task_steps = {s.name: 0 for s in self.all_specs}
        t0 = time.perf_counter()
        for d, idx in plan:
            b, counts = self.batch(d, idx, gen)
            out, lv = self.step(b, counts, self.dataset_tasks[d])
            self.check_finite(lv, out, epoch, nb)
            self.check_parameters(epoch, nb)
            loss_sum += lv
            losses = {}
            for n in (s.name for s in self.dataset_specs[d]):
                if n in out.losses:
                    losses[n] = float(out.losses[n].detach())
                    task_sums[n] += losses[n]
                    task_steps[n] += 1
            step_tokens = sum(len(self.encoded[self.offsets[d] + i][0]) for i in idx)
            tokens += step_tokens
            st.global_step += 1
            self.callbacks.call("on_step_end", self, StepInfo(epoch, nb, st.global_step, lv, losses, d, len(idx),
                                                             step_tokens))
            nb += 1
            if self.out_of_time():
                break
        ep_time = time.perf_counter() - t0
        self.total_tokens += tokens
        self.tok_time += ep_time
        mean_losses = {n: v / task_steps[n] for n, v in task_sums.items() if task_steps[n]}
        self.weighting.epoch_end(mean_losses)
        return {"epoch": epoch + 1, "train_loss": loss_sum / max(nb, 1), "train_losses": mean_losses,
                "lr": self.opt.param_groups[0]["lr"], "tokens_per_s": tokens / max(ep_time, 1e-9),
                "epoch_time_s": ep_time, "task_weights": self.weighting.describe()}

    # ------------------------------------------------------------------------------------------------------------
    # 3. evaluate and select

    def evaluate(self, split):
        """Metrics of every dataset's ``split`` (None where no dataset has it) and the predictions; the callbacks'
        ``on_evaluate`` where there are metrics."""
        metrics, preds = evaluate_datasets(self.model, self.vocab, self.label_vocabs, self.datasets, split,
                                           self.device, self.cfg.eval_batch_size)
        if metrics is not None:
            self.callbacks.call("on_evaluate", self, split, metrics)
        return metrics, preds

    def select(self, rec):
        """Evaluates on dev (the EMA weights with ``--ema``), records the dev metrics and the selection score in
        ``rec``, keeps the best weights; returns whether this epoch is the best so far (without dev data every
        epoch is), also in ``state.improved``."""
        st = self.state
        live = None
        if self.ema is not None:  # evaluate (and keep) the averaged weights
            live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict({**live, **self.ema})
        improved = True
        dm, _ = self.evaluate("dev")
        if dm is not None:
            score = dev_score(self.specs, dm, self.cfg.select)
            rec["dev"], rec["dev_score"] = dm, score
            improved = score > st.best_score
        if improved:
            st.best_score = rec.get("dev_score", 0.0)
            st.best_epoch, st.bad_epochs = rec["epoch"], 0
            st.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            st.bad_epochs += 1
        if live is not None:
            self.model.load_state_dict(live)
        st.improved = improved
        return improved

    @property
    def has_dev(self):
        return any(ds.splits.get("dev") for ds in self.datasets)

    # ------------------------------------------------------------------------------------------------------------
    # 4. checkpoint (called by the Checkpoints callback)

    def checkpoint_common(self):
        return {"format_version": CONTENT_VERSION, "config": config_dict(self.cfg), "vocab": self.vocab.state_dict(),
                "label_vocabs": {k: v.state_dict() for k, v in self.label_vocabs.items()},
                "tasks": task_lists(self.all_specs), "decoding": self.schemes}

    def save_best(self, rec):
        """best.pt: the selected weights of epoch ``rec["epoch"]`` (main rank, with ``--output-dir``)."""
        if self.out_dir and self.is_main:
            ck = self.checkpoint_common()
            ck.update({"model": self.state.best_state, "epoch": rec["epoch"], "dev": rec.get("dev")})
            path = os.path.join(self.out_dir, "best.pt")
            save_checkpoint(ck, path)
            self.callbacks.call("on_save", self, path, "best")

    def save_last(self):
        """last.pt: everything --resume needs to continue after the completed epochs, bitwise."""
        if not self.out_dir or not self.is_main:
            return
        st = self.state
        ck = self.checkpoint_common()
        ck.update({"step_module": self.step_module.state_dict(), "optimizer": self.opt.state_dict(),
                   "scheduler": self.sched.state_dict(), "weighting_extra": self.weighting.extra_state(),
                   "history": st.history, "best_score": st.best_score, "best_epoch": st.best_epoch,
                   "bad_epochs": st.bad_epochs, "epoch": st.epoch, "global_step": st.global_step,
                   "train_time_s": st.train_time, "rng": rng_state(self.device), "best_model": st.best_state,
                   "ema": self.ema})
        save_checkpoint(ck, self.last_path)
        self.callbacks.call("on_save", self, self.last_path, "last")

    # ------------------------------------------------------------------------------------------------------------
    # the run

    def fit(self):
        """Sets up (unless done), trains (the callbacks stop it early: :class:`~.callbacks.EarlyStopping` on dev),
        evaluates the selected model on test and returns the result dict of :func:`train`. The output folder is
        locked from the setup to the end (:class:`OutputDirLock`)."""
        try:
            return self._fit()
        finally:
            for cb in self.callbacks:  # (the progress bar, TensorBoard's writer: also after an error)
                close = getattr(cb, "close", None)
                if callable(close):
                    close()
            self.release_output_dir()

    def _fit(self):
        if not self.is_setup:
            self.setup()
        cfg, st = self.cfg, self.state
        self.callbacks.call("on_fit_start", self)  # (a callback that cannot start stops the run here)
        if self.out_dir and self.is_main and cfg.overwrite:
            # as late as possible (bad data or checkpoints leave the earlier run alone), and after the process group
            # is up (no other rank still looks at the old files)
            remove_run_files(self.out_dir)
        self.t_start = time.perf_counter() - st.train_time
        self.total_tokens, self.tok_time = 0, 0.0
        try:
            for epoch in range(st.epoch, cfg.epochs):
                rec = self.run_epoch(epoch)
                self.select(rec)
                st.train_time = time.perf_counter() - self.t_start
                rec["elapsed_s"] = st.train_time
                st.history.append(rec)
                st.epoch = epoch + 1
                self.callbacks.call("on_epoch_end", self, rec)
                if self.dist.any(st.should_stop, self.device):  # every rank stops where any asks
                    break
                if self.out_of_time():
                    self.log("fastmtl: time budget of %g minutes reached" % cfg.max_minutes)
                    break
        except KeyboardInterrupt:
            # Roll back, do not save: last.pt already holds the state at the end of the last completed epoch
            # (written after every epoch), so --resume replays the interrupted epoch from exactly that state and
            # ends bitwise where the uninterrupted run ends.
            if self.out_dir and self.is_main:
                if os.path.exists(self.last_path):
                    self.log("\nfastmtl: interrupted; %s holds the last completed epoch (continue with --resume)"
                             % self.last_path)
                else:
                    self.log("\nfastmtl: interrupted during the first epoch; nothing to resume")
            raise
        return self.finish()

    def finish(self):
        """The selected model on test, the callbacks' ``on_fit_end`` (metrics.json, the plot); tears the process
        group down."""
        st = self.state
        st.train_time = time.perf_counter() - self.t_start
        if st.best_state is not None:
            self.model.load_state_dict(st.best_state)
        h = st.history
        result = {"best_epoch": st.best_epoch, "train_time_s": st.train_time, "history": h,
                  "tokens_per_s": self.total_tokens / max(self.tok_time, 1e-9),
                  "dev": h[st.best_epoch - 1].get("dev") if st.best_epoch and h else None, "test": None}
        result["test"], _ = self.evaluate("test")
        result["model"] = self.model
        result["vocab"], result["label_vocabs"], result["specs"] = self.vocab, self.label_vocabs, self.specs
        result["datasets"] = [ds.name for ds in self.datasets]
        self.callbacks.call("on_fit_end", self, result)
        self.dist.end(self)
        return result


def train(cfg=None, callbacks=None, **overrides):
    """Trains per ``cfg`` (a :class:`TrainConfig`; keyword overrides allowed; ``callbacks`` as :class:`Trainer`
    takes them) and returns a dict with
    ``test`` (metrics.json content, or None without test data), ``dev`` (best dev metrics), ``best_epoch``,
    ``train_time_s``, ``tokens_per_s``, ``history``, and the trained ``model``, ``vocab``, ``label_vocabs``,
    ``specs``."""
    return Trainer(cfg, callbacks, **overrides).fit()
