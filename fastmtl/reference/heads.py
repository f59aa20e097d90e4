"""Pure-PyTorch reference of the multi-task heads: ``nn.Linear`` + pooling + ``F.cross_entropy`` per task, summed.

This is what a user writes without fastmtl: every head materialises its full logits (token heads over every
position, padding included; padded positions get ``ignore_index`` targets), one ``F.cross_entropy`` per task, and
the losses are summed in Python. It is the ground truth for the tests and the baseline of the benchmarks, and takes
the same arguments as :func:`fastmtl.functional.multitask_cross_entropy`.
"""
import torch
import torch.nn.functional as F

__all__ = ["pool_hidden_reference", "multitask_cross_entropy_reference", "multitask_predict_reference"]

_POOLINGS = ("last", "first", "mean", "max", "last_first")


def _per_task(value, K, name):
    if isinstance(value, (list, tuple)):
        if len(value) != K:
            raise ValueError("%s has %d entries, expected %d" % (name, len(value), K))
        return list(value)
    return [value] * K


def _level(level):
    return {"sequence": 0, "token": 1, 0: 0, 1: 1}[level]


def _pooling(p):
    return _POOLINGS.index(p) if isinstance(p, str) else int(p)


def pool_hidden_reference(hidden, lengths, pooling, max_ties="first"):
    """Pools (B, T, D) hidden states over each sequence's real tokens: last, first, mean, max or last_first (a name
    or its index in that order); ``lengths`` (B,) or None (all T). The one pooling of the library, in differentiable
    PyTorch ops without data-dependent control flow: the reference of the fused kernels' pooling, the recomputation
    behind their double backward and :func:`fastmtl.functional.pool_hidden`.

    ``max_ties``: where max pooling sends the gradient of a maximum that several time steps reach: ``"first"`` (all
    of it to the first of them, like the fused kernels and ``torch.max``) or ``"split"`` (shared evenly among them,
    like ``torch.amax``)."""
    if max_ties not in ("first", "split"):
        raise ValueError("max_ties must be 'first' or 'split', got %r" % (max_ties,))
    B, T, D = hidden.shape
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=hidden.device)
    lengths = lengths.to(hidden.device)
    p = _POOLINGS[_pooling(pooling)]
    if p == "first":
        return hidden[:, 0]
    if p in ("last", "last_first"):
        last = hidden[torch.arange(B, device=hidden.device), lengths - 1]
        if p == "last":
            return last
        h = D // 2  # the forward direction's last state, the backward direction's first
        return torch.cat([last[:, :h], hidden[:, 0, h:]], dim=1)
    mask = torch.arange(T, device=hidden.device)[None, :] < lengths[:, None]
    if p == "mean":
        return (hidden * mask[..., None].to(hidden.dtype)).sum(1) / lengths[:, None].to(hidden.dtype)
    masked = hidden.masked_fill(~mask[..., None], float("-inf"))
    return masked.amax(dim=1) if max_ties == "split" else masked.max(dim=1).values


def multitask_cross_entropy_reference(hidden, weights, targets, levels, *, biases=None, lengths=None,
                                      poolings="last", task_weights=1.0, ignore_index=-100, label_smoothing=0.0,
                                      class_weights=None):
    """Reference of :func:`fastmtl.functional.multitask_cross_entropy`: returns ``(total, losses)``."""
    K = len(weights)
    biases = _per_task(biases, K, "biases")
    levels = _per_task(levels, K, "levels")
    poolings = _per_task(poolings, K, "poolings")
    task_weights = _per_task(task_weights, K, "task_weights")
    ignore_index = _per_task(ignore_index, K, "ignore_index")
    label_smoothing = _per_task(label_smoothing, K, "label_smoothing")
    class_weights = _per_task(class_weights, K, "class_weights")
    B, T, D = hidden.shape
    losses = []
    total = None
    for k in range(K):
        y = targets[k]
        if _level(levels[k]) == 0:
            x = pool_hidden_reference(hidden, lengths, poolings[k])
            logits = F.linear(x, weights[k], biases[k])
        else:
            logits = F.linear(hidden, weights[k], biases[k]).reshape(B * T, -1)
            if lengths is not None:
                mask = torch.arange(T, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
                y = y.masked_fill(~mask, ignore_index[k])
            y = y.reshape(B * T)
        cw = class_weights[k]
        valid = y != ignore_index[k]
        norm = (cw[y[valid]].sum() if cw is not None else valid.sum()) if y.numel() else y.new_zeros(())
        if float(norm) == 0.0:  # every item ignored: 0, never NaN
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits, y, weight=cw, ignore_index=ignore_index[k],
                                   label_smoothing=label_smoothing[k])
        losses.append(loss)
        term = task_weights[k] * loss
        total = term if total is None else total + term
    return total, torch.stack(losses)


def multitask_predict_reference(hidden, weights, levels, *, biases=None, lengths=None, poolings="last"):
    """Reference of :func:`fastmtl.functional.multitask_predict` (labels; padded token positions are -1)."""
    K = len(weights)
    biases = _per_task(biases, K, "biases")
    levels = _per_task(levels, K, "levels")
    poolings = _per_task(poolings, K, "poolings")
    B, T, D = hidden.shape
    out = []
    for k in range(K):
        if _level(levels[k]) == 0:
            out.append(F.linear(pool_hidden_reference(hidden, lengths, poolings[k]), weights[k], biases[k]).argmax(-1))
        else:
            pred = F.linear(hidden, weights[k], biases[k]).argmax(-1)
            if lengths is not None:
                mask = torch.arange(T, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
                pred = pred.masked_fill(~mask, -1)
            out.append(pred)
    return out
