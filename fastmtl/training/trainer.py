"""The Trainer: a run in stages that can be read and changed one at a time.

1. setup and resume: :meth:`Trainer.setup` (process, data, model, optimiser; the state of ``last.pt`` on
   ``--resume``);
2. step: :meth:`Trainer.step` (one batch: forward, backward, weighting, clipping, optimiser, EMA) and
   :meth:`Trainer.run_epoch` (the batches of an epoch, from the :class:`~fastmtl.training.data.EpochPlanner`);
3. evaluate and select: :meth:`Trainer.evaluate`, :meth:`Trainer.select`;
4. checkpoint: :meth:`Trainer.save_best`, :meth:`Trainer.save_last`;
5. log: :meth:`Trainer.log_epoch`, :meth:`Trainer.write_log`.

:meth:`Trainer.fit` runs them; :func:`train` is ``Trainer(cfg).fit()``. A subclass can replace one stage (another
step rule, another selection criterion) and keep the rest.
"""
import dataclasses
import gc
import json
import math
import os
import random
import time

import torch

from .. import data as D
from ..checkpoint import save_checkpoint
from ..fileio import atomic_write
from ..weighting import make_weighting, registry
from .checkpoint_content import (CONTENT_VERSION, RESUME_KEYS, checked, config_dict, config_from, decoding_schemes,
                          model_from, model_from_checkpoint, read_checkpoint, rng_state, set_decoding, set_rng_state,
                          task_lists)
from .config import TrainConfig, option_name
from .data import EpochPlanner, aux_specs, expected_share, is_aux, load_datasets
from .evaluation import check_select, dev_score, evaluate_datasets, format_metrics
from .output import (Logger, OutputDirLock, plot_history, prepare_output_dir, remove_run_files,
                     remove_stale_temporaries)

__all__ = ["Trainer", "train", "NonFiniteLossError"]


# the options that steer one session of a run, not the run: --resume takes them from the command line
SESSION_OPTIONS = ("epochs", "patience", "max_minutes", "progress", "quiet", "resume", "overwrite", "device", "threads")


def _shown(v):
    if isinstance(v, (list, tuple)):
        return ",".join(":".join(map(str, x)) if isinstance(x, (list, tuple)) else str(x) for x in v)
    return str(v)


class NonFiniteLossError(ValueError):
    """Training stopped: the loss, the update or a method's coefficients became nan or inf (nothing of that step is
    saved)."""


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


def scaled_weights(weights, targets, global_counts, world, ignore_index=-100):
    """Per-rank task weights so that DDP's gradient average equals the global-batch mean of every task loss."""
    out = {}
    for name, w in weights.items():
        if name not in targets:
            continue
        local = int((targets[name] != ignore_index).sum())
        g = global_counts.get(name, 0)
        out[name] = w * (local * world / g) if g else w * 0.0
    return out


def count_items(encoded, idx, specs, ignore_index=-100):
    c = {}
    for s in specs:
        if s.level == "token":
            c[s.name] = sum(sum(1 for y in encoded[i][1][s.name] if y != ignore_index) for i in idx)
        else:
            c[s.name] = sum(1 for i in idx if encoded[i][1][s.name] != ignore_index)
    return c


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
        self.world = trainer.world
        self.ddp_reduce = trainer.ddp_reduce

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
        return self.trainer._global_losses(losses, self.scale)

    def stop(self, error):
        """The error that stops the run before the update (raise it): ``error`` is a FloatingPointError of a
        non-finite quantity."""
        return NonFiniteLossError("%s; stopped before the update%s" % (error, self.trainer._kept()))


class Trainer:
    """One training run per ``cfg`` (a :class:`TrainConfig`; keyword overrides allowed)."""

    def __init__(self, cfg=None, **overrides):
        cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
        self.cfg = cfg.validate()
        self.world, self.rank, self.local = _dist_env()
        self.distributed = self.world > 1
        self.log = Logger(cfg, self.rank)
        self.own_pg = False
        self.dir_lock = None

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
        return self

    def setup_process(self):
        cfg = self.cfg
        if cfg.output_dir:
            prepare_output_dir(cfg)
        self.device = _device(cfg, self.local)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.distributed:
            import torch.distributed as dist

            self.own_pg = not dist.is_initialized()
            if self.own_pg:
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.out_dir = cfg.output_dir
        if self.out_dir and self.rank == 0:
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
        full = self.distributed or registry.method(cfg.weighting).cls.every_task_every_step
        self.step_specs = [self.all_specs if full else specs for specs in self.dataset_specs]
        self.dataset_tasks = [[s.name for s in specs] for specs in self.dataset_specs]
        self.planner = EpochPlanner([len(x) for x in train_sets], cfg.batch_size, cfg.sampling,
                                    cfg.sampling_temperature, cfg.seed,
                                    lengths=[[len(e["tokens"]) for e in x] for x in train_sets],
                                    min_batch=self.world if self.distributed else 1)
        for d, ds in enumerate(self.datasets):
            if not self.planner.batches_of(d):  # under DDP a batch must give every rank an example
                raise ValueError("fastmtl: dataset %r has %d training example(s), fewer than the %d DDP ranks: it "
                                 "would never be trained" % (ds.name, len(train_sets[d]), self.world))
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
        self.wrapped = self.step_module
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.wrapped = DDP(self.step_module, device_ids=[self.device.index] if self.device.type == "cuda"
                               else None, find_unused_parameters=False)
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
        self.ddp_reduce = None
        if self.distributed:
            import torch.distributed as dist

            def ddp_reduce(t):
                dist.all_reduce(t)
                t.div_(self.world)

            self.ddp_reduce = ddp_reduce

    def restore(self):
        """The run's state: fresh, or (``--resume``) the end of the last completed epoch from last.pt."""
        self.history, self.best_score, self.best_epoch, self.bad_epochs = [], -math.inf, 0, 0
        self.start_epoch, self.train_time, self.best_state = 0, 0.0, None
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
            return (list(ck["history"]), float(ck["best_score"]), int(ck["best_epoch"]), int(ck["bad_epochs"]),
                    int(ck["epoch"]), float(ck.get("train_time_s", 0.0)), ck.get("best_model"), ema_state)

        (self.history, self.best_score, self.best_epoch, self.bad_epochs, self.start_epoch, self.train_time,
         self.best_state, self.ema) = checked(self.last_path, restore)

    # ------------------------------------------------------------------------------------------------------------
    # 2. step

    def batch(self, d, idx, gen):
        """The (device) batch of dataset ``d``'s training examples ``idx`` (local indices), with its tasks'
        targets and the random ``<unk>`` replacements; under DDP this rank's share and the global item counts."""
        gidx = [self.offsets[d] + i for i in idx]
        specs = self.step_specs[d]
        # draw the <unk> replacements for the whole global batch so ranks agree with one process
        gb = D.collate(self.encoded, gidx, specs, unk_probs=self.unk_probs, generator=gen)
        counts = None
        if self.distributed:
            k = len(gidx)
            lo, hi = self.rank * k // self.world, (self.rank + 1) * k // self.world
            mine = gidx[lo:hi]
            tmax = max(len(self.encoded[i][0]) for i in mine)
            counts = count_items(self.encoded, gidx, specs)
            gb = D.Batch(gb.ids[lo:hi, :tmax], gb.lengths[lo:hi],
                         {n: (t[lo:hi, :tmax] if t.dim() == 2 else t[lo:hi]) for n, t in gb.targets.items()}, mine,
                         gb.raw_ids[lo:hi, :tmax])
        return gb.to(self.device), counts

    def step(self, b, counts, tasks=None):
        """One optimisation step on batch ``b`` (``tasks``: the tasks with labels in it, None: all); returns the
        model output and the loss value."""
        model = self.model
        scale = (lambda w: scaled_weights(w, b.targets, counts, self.world)) if self.distributed else None
        # character features of the words as written, also where the word id became <unk>
        chars = model.char_cnn.char_ids[b.raw_ids] if model.char_cnn is not None else None
        return self.weighting.train_step(StepContext(self, b, scale, chars, tasks))

    def _global_losses(self, losses, scale):
        """``{task: L_k}`` detached; under DDP the global batch's (the ranks' losses weighted by their item counts:
        the mean over the ranks of ``scale``'s factor times the local loss)."""
        losses = {n: l.detach().float().reshape(()) for n, l in losses.items()}
        if self.distributed and losses:
            names = sorted(losses)
            f = scale({n: 1.0 for n in names})
            t = torch.stack([losses[n] * f.get(n, 0.0) for n in names])
            self.ddp_reduce(t)
            losses = dict(zip(names, t.unbind(0)))
        return losses

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
        finite = math.isfinite(lv)
        if self.distributed:  # every rank stops at the same step
            import torch.distributed as dist

            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            dist.all_reduce(flag)
            finite = not float(flag)
        if not finite:
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
        cfg = self.cfg
        self.step_module.train()
        plan = self.planner.plan(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        bar = self.log.bar(len(plan), "epoch %d/%d" % (epoch + 1, cfg.epochs))
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
            for n in (s.name for s in self.dataset_specs[d]):
                if n in out.losses:
                    task_sums[n] += float(out.losses[n].detach())
                    task_steps[n] += 1
            nb += 1
            tokens += sum(len(self.encoded[self.offsets[d] + i][0]) for i in idx)
            if bar is not None:
                el = time.perf_counter() - t0
                bar.set_postfix(loss="%.4f" % (loss_sum / nb), tok_s="%.0f" % (tokens / max(el, 1e-9)),
                                refresh=False)
                bar.update(1)
            if self.out_of_time():
                break
        if bar is not None:
            bar.close()
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
        """Metrics of every dataset's ``split`` (None where no dataset has it) and the predictions."""
        return evaluate_datasets(self.model, self.vocab, self.label_vocabs, self.datasets, split, self.device,
                                 self.cfg.eval_batch_size)

    def select(self, rec):
        """Evaluates on dev (the EMA weights with ``--ema``), records the dev metrics and the selection score in
        ``rec``, keeps the best weights; returns whether this epoch is the best so far (without dev data every
        epoch is)."""
        live = None
        if self.ema is not None:  # evaluate (and keep) the averaged weights
            live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict({**live, **self.ema})
        improved = True
        dm, _ = self.evaluate("dev")
        if dm is not None:
            score = dev_score(self.specs, dm, self.cfg.select)
            rec["dev"], rec["dev_score"] = dm, score
            improved = score > self.best_score
        if improved:
            self.best_score = rec.get("dev_score", 0.0)
            self.best_epoch, self.bad_epochs = rec["epoch"], 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.save_best(rec)
        else:
            self.bad_epochs += 1
        if live is not None:
            self.model.load_state_dict(live)
        return improved

    @property
    def has_dev(self):
        return any(ds.splits.get("dev") for ds in self.datasets)

    # ------------------------------------------------------------------------------------------------------------
    # 4. checkpoint

    def checkpoint_common(self):
        return {"format_version": CONTENT_VERSION, "config": config_dict(self.cfg), "vocab": self.vocab.state_dict(),
                "label_vocabs": {k: v.state_dict() for k, v in self.label_vocabs.items()},
                "tasks": task_lists(self.all_specs), "decoding": self.schemes}

    def save_best(self, rec):
        if self.out_dir and self.rank == 0:
            ck = self.checkpoint_common()
            ck.update({"model": self.best_state, "epoch": rec["epoch"], "dev": rec.get("dev")})
            save_checkpoint(ck, os.path.join(self.out_dir, "best.pt"))

    def save_last(self, epoch_done):
        """last.pt: everything --resume needs to continue after ``epoch_done`` epochs, bitwise."""
        if not self.out_dir or self.rank != 0:
            return
        ck = self.checkpoint_common()
        ck.update({"step_module": self.step_module.state_dict(), "optimizer": self.opt.state_dict(),
                   "scheduler": self.sched.state_dict(), "weighting_extra": self.weighting.extra_state(),
                   "history": self.history, "best_score": self.best_score, "best_epoch": self.best_epoch,
                   "bad_epochs": self.bad_epochs, "epoch": epoch_done, "train_time_s": self.train_time,
                   "rng": rng_state(self.device), "best_model": self.best_state, "ema": self.ema})
        save_checkpoint(ck, self.last_path)

    # ------------------------------------------------------------------------------------------------------------
    # 5. log

    def write_log(self):
        if self.out_dir and self.rank == 0:
            atomic_write(os.path.join(self.out_dir, "log.jsonl"),
                         "".join(json.dumps(h) + "\n" for h in self.history))

    def log_epoch(self, rec, improved):
        msg = "epoch %d: loss %.4f, %.0f tokens/s" % (rec["epoch"], rec["train_loss"], rec["tokens_per_s"])
        if "dev" in rec:
            msg += ", dev " + format_metrics(rec["dev"]) + (" *" if improved else "")
        self.log(msg)

    # ------------------------------------------------------------------------------------------------------------
    # the run

    def fit(self):
        """Sets up (unless done), trains with early stopping on dev, evaluates the selected model on test and
        writes the output folder; returns the result dict of :func:`train`. The output folder is locked from the
        setup to the end (:class:`OutputDirLock`)."""
        try:
            return self._fit()
        finally:
            self.release_output_dir()

    def _fit(self):
        if not hasattr(self, "model"):
            self.setup()
        cfg = self.cfg
        if self.out_dir and self.rank == 0 and cfg.overwrite:
            # as late as possible (bad data or checkpoints leave the earlier run alone), and after the process group
            # is up (no other rank still looks at the old files)
            remove_run_files(self.out_dir)
        self.t_start = time.perf_counter() - self.train_time
        self.total_tokens, self.tok_time = 0, 0.0
        interrupted = False
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                rec = self.run_epoch(epoch)
                improved = self.select(rec)
                self.train_time = time.perf_counter() - self.t_start
                rec["elapsed_s"] = self.train_time
                self.history.append(rec)
                self.write_log()
                self.save_last(epoch + 1)
                self.log_epoch(rec, improved)
                if self.has_dev and self.bad_epochs >= cfg.patience:
                    self.log("fastmtl: early stop (no dev improvement in %d epochs)" % cfg.patience)
                    break
                if self.out_of_time():
                    self.log("fastmtl: time budget of %g minutes reached" % cfg.max_minutes)
                    break
        except KeyboardInterrupt:
            interrupted = True
            # Roll back, do not save: last.pt already holds the state at the end of the last completed epoch
            # (written after every epoch), so --resume replays the interrupted epoch from exactly that state and
            # ends bitwise where the uninterrupted run ends.
            if self.out_dir and self.rank == 0:
                if os.path.exists(self.last_path):
                    self.log("\nfastmtl: interrupted; %s holds the last completed epoch (continue with --resume)"
                             % self.last_path)
                else:
                    self.log("\nfastmtl: interrupted during the first epoch; nothing to resume")
            raise
        finally:
            if interrupted:
                self.write_log()
        return self.finish()

    def finish(self):
        """The selected model on test, metrics.json and the plot; tears the process group down."""
        self.train_time = time.perf_counter() - self.t_start
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        h = self.history
        result = {"best_epoch": self.best_epoch, "train_time_s": self.train_time, "history": h,
                  "tokens_per_s": self.total_tokens / max(self.tok_time, 1e-9),
                  "dev": h[self.best_epoch - 1].get("dev") if self.best_epoch and h else None, "test": None}
        tm, preds = self.evaluate("test")
        if tm is not None:
            result["test"] = tm
            self.log("test (best epoch %d, %.0f s training): %s" % (self.best_epoch, self.train_time,
                                                                     format_metrics(tm)))
        if self.out_dir and self.rank == 0:
            if tm is not None:
                atomic_write(os.path.join(self.out_dir, "metrics.json"), json.dumps(tm, indent=2) + "\n")
            if h:
                plot_history(h, os.path.join(self.out_dir, "learning_curve.png"), self.log)
        if self.distributed:
            import torch.distributed as dist

            # Every rank is done with collectives, and the DDP reducer (which holds the process group and its
            # gloo/nccl work objects) is gone before the group is destroyed: the other order can abort at exit.
            dist.barrier()
            self.wrapped = None
            gc.collect()
            if self.own_pg:
                dist.destroy_process_group()
        result["model"] = self.model
        result["vocab"], result["label_vocabs"], result["specs"] = self.vocab, self.label_vocabs, self.specs
        result["datasets"] = [ds.name for ds in self.datasets]
        return result


def train(cfg=None, **overrides):
    """Trains per ``cfg`` (a :class:`TrainConfig`; keyword overrides allowed) and returns a dict with
    ``test`` (metrics.json content, or None without test data), ``dev`` (best dev metrics), ``best_epoch``,
    ``train_time_s``, ``tokens_per_s``, ``history``, and the trained ``model``, ``vocab``, ``label_vocabs``,
    ``specs``."""
    return Trainer(cfg, **overrides).fit()
