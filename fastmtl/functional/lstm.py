"""``fastmtl.functional.lstm``: a multi-layer (bi)LSTM over padded input with optional per-sequence lengths.

The batch is normalised once (batch-first -> time-major), sorted once by length (when lengths are given and not
already non-increasing) and unsorted at the end; each layer is one call of the fused op
``torch.ops.fastmtl.lstm_layer_forward`` (both directions at once), with dropout between layers in training.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.lstm import lstm_layer

__all__ = ["lstm"]

_SUPPORTED = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return False


def _check_lengths(lengths, B: int, T: int) -> Tensor:
    """Validated lengths as an int64 CPU tensor (B,)."""
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError("fastmtl.lstm: lengths must be an integer tensor, got dtype %s" % lengths.dtype)
        if lengths.dim() != 1:
            raise ValueError("fastmtl.lstm: lengths must be 1-D with one entry per sequence (B = %d), got shape %s"
                             % (B, tuple(lengths.shape)))
        lengths = lengths.to(device="cpu", dtype=torch.int64)
    else:
        try:
            vals = list(lengths)
        except TypeError:
            raise TypeError("fastmtl.lstm: lengths must be a 1-D integer tensor or a sequence of ints, got %s"
                            % type(lengths).__name__) from None
        if not all(isinstance(v, int) or (isinstance(v, Tensor) and v.dim() == 0 and not v.is_floating_point())
                   for v in vals):
            raise TypeError("fastmtl.lstm: lengths must hold integers, got %r" % (vals[:8],))
        lengths = torch.tensor([int(v) for v in vals], dtype=torch.int64)
    if _compiling():
        return lengths
    if lengths.numel() != B:
        raise ValueError("fastmtl.lstm: lengths has %d entries but the batch has B = %d sequences"
                         % (lengths.numel(), B))
    if B > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1:
            raise ValueError("fastmtl.lstm: every length must be >= 1, got a length of %d (lengths = %s)"
                             % (lo, lengths.tolist()[:16]))
        if hi > T:
            raise ValueError("fastmtl.lstm: lengths must not exceed the sequence length T = %d of the input, got %d"
                             % (T, hi))
    return lengths


def _autocast(input, hx, weights):
    """Under CUDA autocast, run in the autocast dtype as torch.nn.LSTM (cuDNN) does; the casts are differentiable,
    so float32 parameters get float32 gradients. (CPU autocast keeps float32: the CPU kernel has no bfloat16.)"""
    if input.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return input, hx, weights
    dt = torch.get_autocast_dtype("cuda")
    cast = lambda t: t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
    if hx is not None and isinstance(hx, (tuple, list)):
        hx = tuple(cast(h) for h in hx)
    return cast(input), hx, [cast(w) for w in weights]


def lstm(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: Sequence[Tensor], num_layers: int = 1,
         bidirectional: bool = False, batch_first: bool = False, dropout: float = 0.0, training: bool = False,
         lengths: Optional[Union[Tensor, Sequence[int]]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Multi-layer LSTM with torch.nn.LSTM semantics on padded input.

    Args:
        input: (T, B, input_size), or (B, T, input_size) when ``batch_first``.
        hx: ``(h_0, c_0)``, each (num_layers * D, B, hidden_size), or None for zeros.
        weights: the flat weights in torch.nn.LSTM order (``module._flat_weights``): per layer and direction
            ``w_ih (4H, in), w_hh (4H, H)[, b_ih (4H), b_hh (4H)]``.
        lengths: optional per-sequence lengths (B,) in [1, T], any order; positions t >= lengths[b] are padding:
            their output is zero and the final states are those at each sequence's last real token (the reverse
            direction starts there), as torch.nn.LSTM with ``pack_padded_sequence`` gives.

    Returns ``(output, (h_n, c_n))`` as torch.nn.LSTM (output is (T, B, D*H), or (B, T, D*H) when batch_first).
    """
    D = 2 if bidirectional else 1
    if not isinstance(input, Tensor):
        raise TypeError("fastmtl.lstm: input must be a Tensor, got %s" % type(input).__name__)
    input, hx, weights = _autocast(input, hx, weights)
    if input.dim() != 3:
        raise ValueError("fastmtl.lstm: input must be 3-D (%s, input_size), got shape %s"
                         % ("B, T" if batch_first else "T, B", tuple(input.shape)))
    dev = input.device.type
    if input.dtype not in _SUPPORTED.get(dev, (torch.float32, torch.float64)):
        raise TypeError("fastmtl.lstm: input dtype %s is not supported on %s (supported: %s)"
                        % (input.dtype, dev, ", ".join(str(d) for d in _SUPPORTED.get(dev, ()))))
    weights = list(weights)
    num_layers = int(num_layers)
    if num_layers < 1:
        raise ValueError("fastmtl.lstm: num_layers must be >= 1, got %d" % num_layers)
    per_layer = len(weights) // num_layers if num_layers else 0
    if per_layer * num_layers != len(weights) or per_layer not in (2 * D, 4 * D):
        raise ValueError("fastmtl.lstm: expected %d (no bias) or %d (bias) weight tensors for num_layers=%d, "
                         "bidirectional=%s; got %d" % (2 * D * num_layers, 4 * D * num_layers, num_layers,
                                                       bidirectional, len(weights)))
    per_dir = per_layer // D
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError("fastmtl.lstm: weights[%d] must be a Tensor, got %s" % (i, type(w).__name__))
        if w.dtype != input.dtype:
            raise TypeError("fastmtl.lstm: input has dtype %s but weights[%d] has dtype %s; they must match"
                            % (input.dtype, i, w.dtype))
        if w.device != input.device:
            raise ValueError("fastmtl.lstm: input is on %s but weights[%d] is on %s; they must be on the same device"
                             % (input.device, i, w.device))
    if weights[1].dim() != 2:
        raise ValueError("fastmtl.lstm: weights[1] (weight_hh_l0) must be 2-D, got shape %s"
                         % (tuple(weights[1].shape),))
    H = weights[1].shape[1]
    E = weights[0].shape[1] if weights[0].dim() == 2 else -1
    if input.shape[-1] != E:
        raise ValueError("fastmtl.lstm: input.size(-1) must be equal to input_size. Expected %d, got %d"
                         % (E, input.shape[-1]))

    x = input.transpose(0, 1) if batch_first else input
    T, B = x.shape[0], x.shape[1]

    # Initial states.
    if hx is None:
        h0 = c0 = x.new_zeros((num_layers * D, B, H))
    else:
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("fastmtl.lstm: hx must be a tuple (h_0, c_0), got %s" % type(hx).__name__)
        h0, c0 = hx
        for name, t in (("h_0", h0), ("c_0", c0)):
            if not isinstance(t, Tensor):
                raise TypeError("fastmtl.lstm: %s must be a Tensor, got %s" % (name, type(t).__name__))
            if tuple(t.shape) != (num_layers * D, B, H):
                raise ValueError("fastmtl.lstm: %s must have shape (num_layers * num_directions, batch, hidden_size)"
                                 " = %s, got %s" % (name, (num_layers * D, B, H), tuple(t.shape)))
            if t.dtype != input.dtype:
                raise TypeError("fastmtl.lstm: %s has dtype %s but input has dtype %s; they must match"
                                % (name, t.dtype, input.dtype))
            if t.device != input.device:
                raise ValueError("fastmtl.lstm: %s is on %s but input is on %s; they must be on the same device"
                                 % (name, t.device, input.device))

    # Lengths: sort once (non-increasing) so the running sequences are a prefix at every step.
    perm = inv = None
    T_run = T
    if lengths is not None:
        lengths = _check_lengths(lengths, B, T)
        if _compiling():
            perm = torch.argsort(lengths, descending=True, stable=True)
            inv = torch.argsort(perm)
            lengths = lengths.index_select(0, perm)
        elif B > 0:
            if bool((lengths[:-1] < lengths[1:]).any()):
                perm = torch.argsort(lengths, descending=True, stable=True)
                inv = torch.argsort(perm)
                lengths = lengths.index_select(0, perm)
            T_run = int(lengths[0])
            if T_run == T and int(lengths[-1]) == T:
                lengths = None  # every sequence is full length: the plain path
    if perm is not None:
        dperm, dinv = perm.to(x.device), inv.to(x.device)
        x = x.index_select(1, dperm)
        h0 = h0.index_select(1, dperm)
        c0 = c0.index_select(1, dperm)
    if T_run < T:
        x = x[:T_run]  # nothing runs past the longest sequence
    x = x.contiguous()

    hys, cys = [], []
    layer_in = x
    for layer in range(num_layers):
        w = weights[layer * per_layer:(layer + 1) * per_layer]
        out, hy, cy = lstm_layer(layer_in, lengths, h0[layer * D:(layer + 1) * D], c0[layer * D:(layer + 1) * D],
                                 w, bidirectional)
        hys.append(hy)
        cys.append(cy)
        if layer + 1 < num_layers and dropout > 0 and training:
            out = F.dropout(out, p=dropout, training=True)
        layer_in = out
    output = layer_in
    h_n = torch.cat(hys, 0) if num_layers > 1 else hys[0]
    c_n = torch.cat(cys, 0) if num_layers > 1 else cys[0]
    if perm is not None:
        output = output.index_select(1, dinv)
        h_n = h_n.index_select(1, dinv)
        c_n = c_n.index_select(1, dinv)
    if T_run < T:
        output = F.pad(output, (0, 0, 0, 0, 0, T - T_run))
    if batch_first:
        output = output.transpose(0, 1)
    return output, (h_n, c_n)
