"""Multi-task heads and their summed cross-entropy losses in one fused call.

Every per-task argument takes either one value for all K tasks or a list/tuple of K values (one per task).
Levels are ``"sequence"`` (one label per sequence, from pooled hidden states) or ``"token"`` (one label per
token); poolings (sequence tasks) are ``"last"``, ``"first"``, ``"mean"``, ``"max"`` or ``"last_first"`` (the first
half of the features from the last real token, the other half from the first: the two directions of a
bidirectional encoder).
"""
import numbers

import torch

from .. import ops  # noqa: F401  registers fake kernels and autograd
from ..reference.heads import pool_hidden_reference

__all__ = ["multitask_cross_entropy", "multitask_predict", "pool_hidden", "LEVELS", "POOLINGS"]

LEVELS = ("sequence", "token")
POOLINGS = ("last", "first", "mean", "max", "last_first")


def _per_task(value, K, name):
    if isinstance(value, (list, tuple)):
        if len(value) != K:
            raise ValueError("fastmtl: %s has %d entries but there are %d tasks (len(weights)); give one value "
                             "for all tasks or one per task" % (name, len(value), K))
        return list(value)
    return [value] * K


def _code(value, names, what, k):
    if isinstance(value, str):
        if value not in names:
            raise ValueError("fastmtl: %s of task %d is %r; expected one of %s" % (what, k, value, ", ".join(names)))
        return names.index(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < len(names):
        raise ValueError("fastmtl: %s of task %d is %r; expected one of %s" % (what, k, value, ", ".join(names)))
    return int(value)


def _check_hidden(hidden):
    if not isinstance(hidden, torch.Tensor):
        raise TypeError("fastmtl: hidden must be a tensor of shape (B, T, D), got %s" % type(hidden).__name__)
    if hidden.dim() != 3:
        raise ValueError("fastmtl: hidden must have shape (B, T, D) (batch first), got shape %s"
                         % (tuple(hidden.shape),))


def _lengths(lengths, hidden):
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError("fastmtl: lengths must hold integers, got dtype %s" % lengths.dtype)
    return lengths.to(device=hidden.device, dtype=torch.long)


def _common(hidden, weights, levels, biases, poolings, lengths):
    _check_hidden(hidden)
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError("fastmtl: weights must be a list of (num_classes, D) tensors, one per task")
    K = len(weights)
    if K == 0:
        raise ValueError("fastmtl: at least one task is required (weights is empty)")
    biases = _per_task(biases, K, "biases")
    if any(b is not None for b in biases) and any(b is None for b in biases):
        # torch.library autograd only sees gradients of a tensor list without None: fill the gaps with zeros.
        biases = [b if b is not None else weights[k].new_zeros(weights[k].shape[:1]) for k, b in enumerate(biases)]
    level_codes = [_code(v, LEVELS, "level", k) for k, v in enumerate(_per_task(levels, K, "levels"))]
    pool_codes = [_code(v, POOLINGS, "pooling", k) if lv == 0 else 0
                  for k, (v, lv) in enumerate(zip(_per_task(poolings, K, "poolings"), level_codes))]
    return K, list(weights), biases, level_codes, pool_codes, _lengths(lengths, hidden)


def _autocast(hidden, weights, biases):
    """Under autocast, the head projections run in the autocast dtype (as nn.Linear does) with float32 accumulation
    and float32 losses inside the op; the casts are differentiable, so float32 parameters get float32 gradients."""
    dev = hidden.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return hidden, weights, biases
    dt = torch.get_autocast_dtype(dev)
    if dt not in (torch.bfloat16, torch.float16) or hidden.dtype == torch.float64:
        return hidden, weights, biases
    return (hidden.to(dt), [w.to(dt) for w in weights], [b.to(dt) if b is not None else None for b in biases])


def _task_weights(task_weights, K, hidden):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if isinstance(task_weights, torch.Tensor) and task_weights.dim() == 1:
        if task_weights.shape[0] != K:
            raise ValueError("fastmtl: task_weights has shape %s, expected (%d,)" % (tuple(task_weights.shape), K))
        return task_weights.to(device=hidden.device, dtype=dtype)
    vals = _per_task(task_weights, K, "task_weights")
    if all(isinstance(v, numbers.Real) and not isinstance(v, torch.Tensor) for v in vals):
        return torch.tensor([float(v) for v in vals], dtype=dtype, device=hidden.device)
    out = []
    for k, v in enumerate(vals):
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError("fastmtl: the weight of task %d must be a number or a 0-d tensor, got shape %s"
                                 % (k, tuple(v.shape)))
            out.append(v.reshape(()).to(device=hidden.device, dtype=dtype))
        elif isinstance(v, numbers.Real):
            out.append(torch.tensor(float(v), dtype=dtype, device=hidden.device))
        else:
            raise TypeError("fastmtl: the weight of task %d must be a number or a 0-d tensor, got %s"
                            % (k, type(v).__name__))
    return torch.stack(out)


def multitask_cross_entropy(hidden, weights, targets, levels, *, biases=None, lengths=None, poolings="last",
                            task_weights=1.0, ignore_index=-100, label_smoothing=0.0, class_weights=None):
    """Linear heads + cross-entropy for K tasks on shared hidden states, in one fused call.

    Args:
        hidden: (B, T, D) hidden states, batch first (any strides; float32, float64, bfloat16 or float16).
        weights: list of K head weights, each (C_k, D) like ``nn.Linear.weight``.
        targets: list of K int64 target tensors: (B,) for a sequence task, (B, T) for a token task. On CUDA the
            values of targets and lengths are validated on the device without a synchronisation: a bad one is
            reported by :func:`check_input_errors` (or at once with ``FASTMTL_SYNC_CHECKS=1``).
        levels: ``"sequence"`` / ``"token"`` per task (or one for all).
        biases: list of K biases (C_k,) or None (per task or for all).
        lengths: (B,) real lengths (each in [1, T]); positions t >= lengths[b] never count. None: all T.
        poolings: pooling of each sequence task (``"last"``, ``"first"``, ``"mean"``, ``"max"``, ``"last_first"``).
        task_weights: lambda_k per task: numbers or 0-d tensors (learnable weights get gradients), or a (K,) tensor.
        ignore_index, label_smoothing, class_weights: as ``F.cross_entropy``, per task or for all.

    Returns:
        ``(total, losses)``: total = sum_k lambda_k * L_k (0-d) and the per-task losses L_k (K,), where L_k is
        ``F.cross_entropy`` (mean over non-ignored items) of task k, and 0 for a task whose items are all ignored.
        Both are differentiable (see :mod:`fastmtl.ops.heads`).
    """
    K, weights, biases, level_codes, pool_codes, lengths = _common(hidden, weights, levels, biases, poolings,
                                                                   lengths)
    hidden, weights, biases = _autocast(hidden, weights, biases)
    if not isinstance(targets, (list, tuple)) or len(targets) != K:
        raise ValueError("fastmtl: targets must be a list of %d target tensors (one per task)" % K)
    targets = list(targets)
    for k, y in enumerate(targets):
        if not isinstance(y, torch.Tensor):
            raise TypeError("fastmtl: targets[%d] must be an int64 tensor, got %s" % (k, type(y).__name__))
    ignore_index = [int(v) for v in _per_task(ignore_index, K, "ignore_index")]
    label_smoothing = [float(v) for v in _per_task(label_smoothing, K, "label_smoothing")]
    class_weights = _per_task(class_weights, K, "class_weights")
    tw = _task_weights(task_weights, K, hidden)
    compute_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(w.requires_grad for w in weights)
        or any(b is not None and b.requires_grad for b in biases))
    total, losses, _, _, _ = torch.ops.fastmtl.multitask_loss(
        hidden, lengths, weights, biases, targets, class_weights, tw, level_codes, pool_codes, ignore_index,
        label_smoothing, compute_grad)
    return total, losses


def pool_hidden(hidden, lengths, pooling):
    """Pools (B, T, D) hidden states over each sequence's real tokens (plain PyTorch ops, differentiable; the
    gradient of a maximum that several time steps reach is shared evenly among them, as ``torch.amax``)."""
    return pool_hidden_reference(hidden, lengths, _code(pooling, POOLINGS, "pooling", 0), max_ties="split")


def multitask_predict(hidden, weights, levels, *, biases=None, lengths=None, poolings="last", output="labels"):
    """Predictions of K heads in one call.

    ``output="labels"`` (the fused fast path): a list of K int64 tensors, (B,) for sequence tasks and (B, T) for
    token tasks with -1 at padded positions. ``output="logits"`` or ``"log_probs"``: a list of K float tensors,
    (B, C_k) or (B, T, C_k) (padded positions are computed too; mask them with ``lengths``); these materialise the
    full logits and are computed with plain PyTorch ops.
    """
    K, weights, biases, level_codes, pool_codes, lengths = _common(hidden, weights, levels, biases, poolings,
                                                                   lengths)
    if output == "labels":
        with torch.no_grad():  # labels are not differentiable
            return list(torch.ops.fastmtl.multitask_predict(hidden, lengths, weights, biases, level_codes, pool_codes))
    if output not in ("logits", "log_probs"):
        raise ValueError("fastmtl: output must be 'labels', 'logits' or 'log_probs', got %r" % (output,))
    # The plain-PyTorch path gets the fused op's checks (an out-of-range length would index silently).
    B, T = hidden.shape[0], hidden.shape[1]
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise ValueError("fastmtl: lengths must have shape (B,) = (%d,), got %s" % (B, tuple(lengths.shape)))
        if B > 0 and not torch.compiler.is_compiling():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 1 or hi > T:
                bad = lo if lo < 1 else hi
                b = int((lengths == bad).nonzero()[0, 0])
                raise ValueError("fastmtl: lengths[%d] = %d is out of range: every length must be in [1, T] with T = "
                                 "hidden.size(1) = %d" % (b, bad, T))
    for k in range(K):
        if weights[k].dim() != 2 or weights[k].shape[1] != hidden.shape[-1]:
            raise ValueError("fastmtl: weights[%d] must have shape (num_classes, D) with D = %d, got %s"
                             % (k, hidden.shape[-1], tuple(weights[k].shape)))
    out = []
    pooled = {}
    for k in range(K):
        if level_codes[k] == 0:
            if pool_codes[k] not in pooled:
                pooled[pool_codes[k]] = pool_hidden(hidden, lengths, pool_codes[k])
            x = pooled[pool_codes[k]]
        else:
            x = hidden
        z = torch.nn.functional.linear(x, weights[k], biases[k])
        out.append(z.log_softmax(-1) if output == "log_probs" else z)
    return out


def check_input_errors(device=None):
    """Raise the first bad length or target value the CUDA heads kernels have met since the last check.

    On CUDA, ``multitask_cross_entropy`` / ``multitask_predict`` (and ``torch.ops.fastmtl.multitask_loss`` /
    ``multitask_predict``) check shapes, dtypes and devices at once, but not the *values* of ``lengths`` and
    ``targets``, which live on the device: reading them back would synchronise every call (and forbid CUDA graphs).
    The kernels treat a bad value safely (a length clamped to [1, T], a target outside [0, C) that is not
    ``ignore_index`` counted as ignored) and record the first one per device. This function synchronises, raises
    the ``ValueError`` the CPU op would have raised and clears the record; call it where a synchronisation costs
    nothing (after an epoch, in tests). ``FASTMTL_SYNC_CHECKS=1`` makes every call check itself instead (debugging).
    No-op without CUDA or in a CPU-only build (the CPU op raises at once). ``device``: a CUDA device (default: every
    device that ran the ops).
    """
    if not torch.cuda.is_available():
        return
    try:
        op = torch.ops.fastmtl.check_input_errors
    except (AttributeError, RuntimeError):  # CPU-only build
        return
    if device is None:
        devices = range(torch.cuda.device_count())
    else:
        devices = [torch.device(device).index if torch.device(device).index is not None
                   else torch.cuda.current_device()]
    for d in devices:
        op(int(d))
