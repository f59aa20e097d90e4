"""Task heads for multi-task models: :class:`SequenceTask`, :class:`TokenTask` and :class:`MultiTaskHeads`.

:class:`MultiTaskHeads` is an ``nn.ModuleDict`` of ``nn.Linear`` heads keyed by task name, so its parameters are
``<name>.weight`` / ``<name>.bias`` (``heads.<name>.weight`` inside a model that calls it ``heads``) and load from a
plain PyTorch model built with ``nn.ModuleDict({name: nn.Linear(hidden_size, num_classes)})``. Its forward computes
every head and loss in one fused call (:func:`fastmtl.functional.multitask_cross_entropy`).
"""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from ..functional.heads import POOLINGS, multitask_cross_entropy, multitask_predict

__all__ = ["SequenceTask", "TokenTask", "MultiTaskHeads", "TaskOutput"]


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
    """A token-level task (one label per token, e.g. slots, NER, POS, next word). Arguments as :class:`SequenceTask`."""
    level = "token"

    def __init__(self, name, num_classes, weight=1.0, ignore_index=-100, label_smoothing=0.0, class_weights=None,
                 bias=True):
        super().__init__(name, num_classes, weight, ignore_index, label_smoothing, class_weights, bias, None)


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
        specs = [self.task_specs[n] for n in names]
        lam = [weights.get(n, s.weight) for n, s in zip(names, specs)]
        total, losses = multitask_cross_entropy(
            hidden, [self[n].weight for n in names], [targets[n] for n in names], [s.level for s in specs],
            biases=[self[n].bias for n in names], lengths=lengths,
            poolings=[s.pooling or "last" for s in specs], task_weights=lam,
            ignore_index=[s.ignore_index for s in specs], label_smoothing=[s.label_smoothing for s in specs],
            class_weights=[self._class_weights(n, hidden.dtype) for n in names])
        return TaskOutput(loss=total, losses={n: losses[i] for i, n in enumerate(names)},
                          weights=dict(zip(names, lam)))

    def predict(self, hidden, lengths=None, tasks=None, output="labels"):
        """{name: predictions} for ``tasks`` (default all): labels (padded token positions -1), or
        ``output="logits"`` / ``"log_probs"``."""
        names = list(self.task_specs) if tasks is None else list(tasks)
        self._select(names, "tasks")
        specs = [self.task_specs[n] for n in names]
        out = multitask_predict(hidden, [self[n].weight for n in names], [s.level for s in specs],
                                biases=[self[n].bias for n in names], lengths=lengths,
                                poolings=[s.pooling or "last" for s in specs], output=output)
        return dict(zip(names, out))

    def extra_repr(self):
        return "hidden_size=%d, tasks=%r" % (self.hidden_size, self.tasks)
