"""Task heads for multi-task models: :class:`SequenceTask`, :class:`TokenTask` and :class:`MultiTaskHeads`.

:class:`MultiTaskHeads` is an ``nn.ModuleDict`` of ``nn.Linear`` heads keyed by task name, so its parameters are
``<name>.weight`` / ``<name>.bias`` (``heads.<name>.weight`` inside a model that calls it ``heads``) and load from a
plain PyTorch model built with ``nn.ModuleDict({name: nn.Linear(hidden_size, num_classes)})``. Its forward computes
every head and loss in one fused call (:func:`fastmtl.functional.multitask_cross_entropy`).

A token task with ``crf=True`` is scored by a linear-chain CRF: its head is a :class:`CRFLinear` (an ``nn.Linear``
giving the emission scores, plus the CRF's ``transitions`` (C, C) [from, to], ``start_transitions`` and
``end_transitions`` (C,), named as in pytorch-crf), and its loss is the CRF's negative log-likelihood of the gold tag
sequences (:func:`fastmtl.functional.crf_nll`, forward-backward in native kernels) divided by the number of labelled
tokens, so that it weighs like a per-token cross-entropy in the weighted sum. Its predictions are Viterbi paths.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.crf import crf_decode, crf_marginals, crf_nll
from ..functional.heads import POOLINGS, multitask_cross_entropy, multitask_predict

__all__ = ["SequenceTask", "TokenTask", "MultiTaskHeads", "TaskOutput", "CRFLinear"]


class _Task:
    level = None

    def __init__(self, name, num_classes, weight=1.0, ignore_index=-100, label_smoothing=0.0, class_weights=None,
                 bias=True, pooling=None):
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError("fastmtl: a task name must be a non-empty string without '.', got %r" % (name,))
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError("fastmtl: task %r: num_classes must be a positive int, got %r" % (name, num_classes))
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError("fastmtl: task %r: label_smoothing must be in [0, 1], got %r" % (name, label_smoothing))
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone()
            if class_weights.shape != (num_classes,):
                raise ValueError("fastmtl: task %r: class_weights must have shape (%d,), got %s"
                                 % (name, num_classes, tuple(class_weights.shape)))
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError("fastmtl: task %r: pooling must be one of %s, got %r"
                             % (name, ", ".join(POOLINGS), pooling))
        self.name = name
        self.num_classes = num_classes
        self.weight = weight
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.class_weights = class_weights
        self.bias = bool(bias)
        self.pooling = pooling

    def __repr__(self):
        extra = ", pooling=%r" % self.pooling if self.level == "sequence" else ""
        return "%s(%r, num_classes=%d%s, weight=%r)" % (type(self).__name__, self.name, self.num_classes, extra,
                                                        self.weight)


class SequenceTask(_Task):
    """A sequence-level task (one label per sequence) on pooled hidden states.

    pooling: ``"last"`` (each sequence's last real token), ``"first"``, ``"mean"``, ``"max"`` or ``"last_first"``
    (first half of the features from the last token, second half from the first: a bidirectional encoder's two
    directions). weight: the task's loss weight lambda (a number or a 0-d tensor). ignore_index, label_smoothing,
    class_weights: as ``F.cross_entropy``. bias: whether the head has a bias.
    """
    level = "sequence"

    def __init__(self, name, num_classes, pooling="last", weight=1.0, ignore_index=-100, label_smoothing=0.0,
                 class_weights=None, bias=True):
        super().__init__(name, num_classes, weight, ignore_index, label_smoothing, class_weights, bias, pooling)


class TokenTask(_Task):
    """A token-level task (one label per token, e.g. slots, NER, POS, next word). Arguments as :class:`SequenceTask`.

    ``crf=True``: the task is a linear-chain CRF over its tags (see the module docstring). A sequence counts as
    unlabelled (no loss, no gradient) when every real tag is ``ignore_index``; ``ignore_index`` at some of its
    tokens only is a ``ValueError`` (a CRF scores whole tag sequences). Label smoothing and class weights are
    cross-entropy options and are refused with a CRF."""
    level = "token"

    def __init__(self, name, num_classes, weight=1.0, ignore_index=-100, label_smoothing=0.0, class_weights=None,
                 bias=True, crf=False):
        super().__init__(name, num_classes, weight, ignore_index, label_smoothing, class_weights, bias, None)
        if not isinstance(crf, bool):
            raise TypeError("fastmtl: task %r: crf must be a bool, got %r" % (name, crf))
        if crf and (self.label_smoothing or self.class_weights is not None):
            raise ValueError("fastmtl: task %r: label_smoothing and class_weights are cross-entropy options; a CRF "
                             "task (crf=True) takes neither" % name)
        self.crf = crf

    def __repr__(self):
        r = super().__repr__()
        return r[:-1] + ", crf=True)" if self.crf else r


class CRFLinear(nn.Linear):
    """The head of a CRF token task: ``nn.Linear(in_features, num_tags)`` for the emission scores plus the CRF's
    parameters ``transitions`` (num_tags, num_tags) indexed [from, to], ``start_transitions`` and
    ``end_transitions`` (num_tags,), initialised uniform in [-0.1, 0.1] as pytorch-crf does."""

    def __init__(self, in_features, num_tags, bias=True, device=None, dtype=None):
        super().__init__(in_features, num_tags, bias=bias, device=device, dtype=dtype)
        kw = {"device": device, "dtype": dtype}
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags, **kw))
        self.start_transitions = nn.Parameter(torch.empty(num_tags, **kw))
        self.end_transitions = nn.Parameter(torch.empty(num_tags, **kw))
        self.reset_crf_parameters()

    def reset_crf_parameters(self):
        for p in (self.transitions, self.start_transitions, self.end_transitions):
            nn.init.uniform_(p, -0.1, 0.1)

    def crf_params(self):
        return self.transitions, self.start_transitions, self.end_transitions

    def extra_repr(self):
        return super().extra_repr() + ", crf=True"


@dataclass
class TaskOutput:
    """Result of :class:`MultiTaskHeads`: ``loss`` = sum_k lambda_k * L_k and ``losses`` = {name: L_k}."""
    loss: torch.Tensor
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    weights: Optional[Dict[str, object]] = None


class MultiTaskHeads(nn.ModuleDict):
    """Linear heads of several tasks on a shared encoder, with all losses in one fused call.

    ``heads = MultiTaskHeads(512, [SequenceTask("intent", 26), TokenTask("slots", 130)])``;
    ``out = heads(hidden, lengths=lengths, targets={"intent": y_int, "slots": y_slots})`` gives ``out.loss`` and
    ``out.losses["intent"]``. Tasks missing from ``targets`` are skipped (so calling the heads on a subset of tasks
    is just passing fewer targets); ``weights={name: lambda}`` overrides the tasks' loss weights for one call
    (numbers or 0-d tensors, e.g. from a weighting strategy). ``heads.predict(hidden, lengths)`` returns
    {name: labels}.
    """

    def __init__(self, hidden_size, tasks):
        super().__init__()
        tasks = list(tasks)
        if not tasks:
            raise ValueError("fastmtl: MultiTaskHeads needs at least one task")
        self.hidden_size = int(hidden_size)
        self.task_specs = {}
        for t in tasks:
            if not isinstance(t, _Task):
                raise TypeError("fastmtl: tasks must be SequenceTask or TokenTask, got %s" % type(t).__name__)
            if t.name in self.task_specs:
                raise ValueError("fastmtl: duplicate task name %r" % t.name)
            if hasattr(self, t.name):
                raise ValueError("fastmtl: task name %r clashes with an attribute of MultiTaskHeads; rename the task"
                                 % t.name)
            self.task_specs[t.name] = t
            if getattr(t, "crf", False):
                self[t.name] = CRFLinear(self.hidden_size, t.num_classes, bias=t.bias)
            else:
                self[t.name] = nn.Linear(self.hidden_size, t.num_classes, bias=t.bias)
            if t.class_weights is not None:
                self.register_buffer("_class_weights_" + t.name, t.class_weights.clone(), persistent=False)

    @property
    def tasks(self):
        return list(self.task_specs.values())

    def _class_weights(self, name, dtype):
        cw = getattr(self, "_class_weights_" + name, None)
        return None if cw is None else cw.to(dtype)

    def _select(self, names, what):
        unknown = [n for n in names if n not in self.task_specs]
        if unknown:
            raise ValueError("fastmtl: unknown task name(s) %s in %s; the tasks are %s"
                             % (", ".join(map(repr, unknown)), what, ", ".join(map(repr, self.task_specs))))

    def forward(self, hidden, lengths=None, targets=None, weights=None):
        """Losses of the tasks named in ``targets`` ({name: int64 (B,) or (B, T)}); returns a :class:`TaskOutput`."""
        if not targets:
            raise ValueError("fastmtl: MultiTaskHeads needs targets={task name: tensor} (use predict() for "
                             "inference)")
        if not isinstance(targets, dict):
            raise TypeError("fastmtl: targets must be a dict {task name: tensor}, got %s" % type(targets).__name__)
        self._select(targets, "targets")
        weights = dict(weights or {})
        self._select(weights, "weights")
        names = [n for n in self.task_specs if n in targets]
        lam = {n: weights.get(n, self.task_specs[n].weight) for n in names}
        fused = [n for n in names if not self.is_crf(n)]
        out = {}
        total = None
        if fused:
            specs = [self.task_specs[n] for n in fused]
            total, losses = multitask_cross_entropy(
                hidden, [self[n].weight for n in fused], [targets[n] for n in fused], [s.level for s in specs],
                biases=[self[n].bias for n in fused], lengths=lengths,
                poolings=[s.pooling or "last" for s in specs], task_weights=[lam[n] for n in fused],
                ignore_index=[s.ignore_index for s in specs], label_smoothing=[s.label_smoothing for s in specs],
                class_weights=[self._class_weights(n, hidden.dtype) for n in fused])
            out.update((n, losses[i]) for i, n in enumerate(fused))
        for n in names:
            if n in out:
                continue
            loss = self._crf_loss(n, hidden, lengths, targets[n])
            out[n] = loss
            term = loss * _weight_tensor(lam[n], loss)
            total = term if total is None else total + term
        return TaskOutput(loss=total, losses={n: out[n] for n in names}, weights=lam)

    def is_crf(self, name):
        """Whether task ``name`` is a CRF task (its head a :class:`CRFLinear`)."""
        return isinstance(self[name], CRFLinear)

    def _crf_loss(self, name, hidden, lengths, tags):
        """The CRF's negative log-likelihood of the labelled sequences, summed and divided by their real tokens."""
        if hidden.dim() != 3:
            raise ValueError("fastmtl: hidden must be (B, T, D), got shape %s" % (tuple(hidden.shape),))
        B, T = hidden.shape[0], hidden.shape[1]
        if not isinstance(tags, torch.Tensor) or tuple(tags.shape) != (B, T):
            raise ValueError("fastmtl: targets[%r] of a CRF task must be an int64 tensor of shape (%d, %d), got %s"
                             % (name, B, T, tuple(tags.shape) if isinstance(tags, torch.Tensor) else type(tags)))
        head = self[name]
        emissions = F.linear(hidden, head.weight, head.bias)
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=hidden.device)
        lengths = torch.as_tensor(lengths).to(device=hidden.device, dtype=torch.long)
        tags = tags.to(device=hidden.device)
        ignore = self.task_specs[name].ignore_index
        valid = torch.arange(T, device=hidden.device)[None, :] < lengths[:, None]
        ignored = (tags == ignore) & valid
        n_ignored = ignored.sum(dim=1)
        labelled = n_ignored == 0  # an unlabelled sequence (every real tag ignore_index) counts for nothing
        partial = (n_ignored > 0) & (n_ignored < lengths)
        if bool(partial.any()):  # (one host sync per CRF task and step)
            b = int(partial.nonzero()[0, 0])
            raise ValueError("fastmtl: CRF task %r: sequence %d has ignore_index (%d) tags at some of its tokens but "
                             "not all; a CRF scores whole tag sequences (label every token, or none; a label "
                             "unknown to the task's vocabulary also becomes ignore_index)" % (name, b, ignore))
        eff = torch.where(labelled, lengths, torch.zeros_like(lengths))
        tags = torch.where(labelled.unsqueeze(1), tags, torch.zeros_like(tags))
        nll = crf_nll(emissions, tags, eff, *head.crf_params(), reduction="sum")
        return nll / eff.sum().clamp_min(1).to(nll.dtype)

    def predict(self, hidden, lengths=None, tasks=None, output="labels"):
        """{name: predictions} for ``tasks`` (default all): labels (padded token positions -1), or
        ``output="logits"`` / ``"log_probs"``."""
        names = list(self.task_specs) if tasks is None else list(tasks)
        self._select(names, "tasks")
        crf = [n for n in names if self.is_crf(n)] if output != "logits" else []
        res = {}
        for group, kind in (([n for n in names if n not in crf], output), (crf, "logits")):
            if group:
                specs = [self.task_specs[n] for n in group]
                out = multitask_predict(hidden, [self[n].weight for n in group], [s.level for s in specs],
                                        biases=[self[n].bias for n in group], lengths=lengths,
                                        poolings=[s.pooling or "last" for s in specs], output=kind)
                res.update(zip(group, out))
        for n in crf:  # the emission scores of CRF tasks, decoded
            res[n] = self.crf_predict(n, res[n], lengths, output)
        return {n: res[n] for n in names}

    def crf_predict(self, name, emissions, lengths, output="labels", constraints=None):
        """Viterbi paths (``"labels"``: (B, T) int64, -1 at padding), per-token marginals (``"probs"``, 0 at padding)
        or their logs (``"log_probs"``, -inf at padding) of CRF task ``name`` from its emission scores;
        ``constraints``: ``(allowed, start, end)`` bool masks of the tag transitions that may be used (None: all)."""
        B, T = emissions.shape[0], emissions.shape[1]
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=emissions.device)
        masks = tuple(constraints) if constraints is not None else (None, None, None)
        params = [p.detach() for p in self[name].crf_params()]
        if output == "labels":
            return crf_decode(emissions, lengths, *params, *masks)
        if output in ("probs", "log_probs"):
            p = crf_marginals(emissions, lengths, *params, *masks)
            return p if output == "probs" else p.log()
        raise ValueError("fastmtl: output must be 'labels', 'logits', 'probs' or 'log_probs', got %r" % (output,))

    def extra_repr(self):
        return "hidden_size=%d, tasks=%r" % (self.hidden_size, self.tasks)


def _weight_tensor(w, like):
    if isinstance(w, torch.Tensor):
        return w.reshape(()).to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(w), device=like.device, dtype=like.dtype)

