"""Drop-in modules: :class:`LSTM` (replaces ``torch.nn.LSTM``), task heads and :class:`MultiTaskHeads`."""
from .lstm import LSTM, dynamic_quant_mapping  # noqa: F401
from .heads import CRFLinear, MultiTaskHeads, SequenceTask, TokenTask, TaskOutput  # noqa: F401

__all__ = ["LSTM", "dynamic_quant_mapping", "MultiTaskHeads", "SequenceTask", "TokenTask", "TaskOutput"]
