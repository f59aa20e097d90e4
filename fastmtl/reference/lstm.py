"""Pure-PyTorch LSTM references: the ground truth for tests and the baselines of the benchmarks.

* :func:`lstm_reference` - a plain per-step loop (``torch.lstm_cell``-free, just matmuls and activations) with
  lengths handled by masking; differentiable, any dtype/device.
* :func:`torch_lstm_padded` - ``torch.nn.LSTM`` over ``pack_padded_sequence`` returning padded output (zeros at
  padding): what a user writes without fastmtl.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["lstm_reference", "lstm_cell_reference", "torch_lstm_padded"]


def lstm_cell_reference(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                        b_hh: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """One LSTM cell step (gate order i, f, g, o, as torch.nn.LSTM)."""
    gates = x @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    return o * torch.tanh(c_new), c_new


def lstm_reference(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: Sequence[Tensor],
                   num_layers: int = 1, bidirectional: bool = False, batch_first: bool = False,
                   lengths: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Multi-layer (bi)LSTM by an explicit loop; same arguments and results as ``fastmtl.functional.lstm``
    (without dropout). Sequences stop at their lengths: padded outputs are zero, the final states are taken at
    the last real token, and the reverse direction starts there."""
    D = 2 if bidirectional else 1
    x = input.transpose(0, 1) if batch_first else input
    T, B = x.shape[0], x.shape[1]
    weights = list(weights)
    per_layer = len(weights) // num_layers
    bias = per_layer == 4 * D
    H = weights[1].shape[1]
    if hx is None:
        h0 = c0 = x.new_zeros(num_layers * D, B, H)
    else:
        h0, c0 = hx
    lens = torch.full((B,), T, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long().cpu()
    # mask[t, b] = 1 where t < length_b
    mask = (torch.arange(T).unsqueeze(1) < lens.unsqueeze(0)).to(x.dtype).to(x.device).unsqueeze(-1)
    h_n, c_n = [], []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = (layer * D + d) * (4 if bias else 2)
            w_ih, w_hh = weights[k], weights[k + 1]
            b_ih, b_hh = (weights[k + 2], weights[k + 3]) if bias else (None, None)
            h, c = h0[layer * D + d], c0[layer * D + d]
            ys = [None] * T
            steps = range(T) if d == 0 else range(T - 1, -1, -1)
            for t in steps:
                h_new, c_new = lstm_cell_reference(layer_in[t], h, c, w_ih, w_hh, b_ih, b_hh)
                m = mask[t]
                h = m * h_new + (1 - m) * h
                c = m * c_new + (1 - m) * c
                ys[t] = h * m
            outs.append(torch.stack(ys, 0))
            h_n.append(h)
            c_n.append(c)
        layer_in = torch.cat(outs, -1) if D == 2 else outs[0]
    out = layer_in.transpose(0, 1) if batch_first else layer_in
    return out, (torch.stack(h_n, 0), torch.stack(c_n, 0))


def torch_lstm_padded(module: torch.nn.LSTM, input: Tensor, lengths: Optional[Sequence[int]] = None,
                      hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """``torch.nn.LSTM`` on padded input, through ``pack_padded_sequence`` when ``lengths`` are given; returns the
    padded output (zeros at padding, same length as the input) and ``(h_n, c_n)``."""
    if lengths is None:
        return module(input, hx)
    T = input.shape[1] if module.batch_first else input.shape[0]
    lengths_cpu = torch.as_tensor(lengths).cpu()
    packed = pack_padded_sequence(input, lengths_cpu, batch_first=module.batch_first, enforce_sorted=False)
    out, state = module(packed, hx)
    out, _ = pad_packed_sequence(out, batch_first=module.batch_first, total_length=T)
    return out, state
