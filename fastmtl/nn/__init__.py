"""Drop-in modules: :class:`LSTM` (replaces ``torch.nn.LSTM``), task heads and :class:`MultiTaskHeads`."""
from .lstm import LSTM  # noqa: F401
from .heads import MultiTaskHeads, SequenceTask, TokenTask, TaskOutput  # noqa: F401

__all__ = ["LSTM", "MultiTaskHeads", "SequenceTask", "TokenTask", "TaskOutput"]
