"""The training layer behind ``fastmtl train``, in stages:

- :mod:`.config`: :class:`TrainConfig` (one declaration per option; the CLI and TOML files come from it);
- :mod:`.data`: datasets, tasks, the epoch planner (which dataset each batch comes from);
- :mod:`.trainer`: :class:`Trainer` (setup and resume, step, evaluate and select, checkpoint) and :func:`train`;
- :mod:`.callbacks`: what a run does around its steps (:class:`Callback`; the built-in progress bar, log files,
  checkpoints, early stopping, plot, and :class:`TensorBoard`);
- :mod:`.distributed`: data-parallel runs (torchrun), in one place;
- :mod:`.evaluation`: predictions, metrics.json, the dev selection score;
- :mod:`.checkpoint_content`: best.pt / last.pt contents, loading a model back (nothing is unpickled);
- :mod:`.output`: the output folder and its lock, messages, the learning-curve plot.
"""
import torch

from ..checkpoint import CheckpointError
from ..fileio import atomic_write
from .callbacks import Callback, RunState, StepInfo, TensorBoard
from .checkpoint_content import build_tasks, load_checkpoint, read_checkpoint
from .config import TrainConfig, check_device, read_toml
from .data import EpochPlanner, load_datasets
from .evaluation import compute_metrics, dev_score, evaluate_examples, predict_examples
from .trainer import NonFiniteLossError, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train", "Callback", "RunState", "StepInfo", "TensorBoard", "evaluate_examples", "predict_examples", "compute_metrics",
           "dev_score", "load_checkpoint", "read_checkpoint", "predict_sentences", "atomic_write", "build_tasks",
           "CheckpointError", "NonFiniteLossError", "check_device", "read_toml", "EpochPlanner", "load_datasets"]


def predict_sentences(checkpoint, sentences, device="cpu"):
    """Predictions for raw sentences (strings, split on whitespace, or token lists):
    list of ``{"tokens": [...], task: label or [labels]}`` (:meth:`fastmtl.Predictor.predict_labels`)."""
    from ..predictor import load

    return load(checkpoint, device).predict_labels(list(sentences))
