"""LSTM ops: fake (meta) kernels and autograd over ``torch.ops.fastmtl.lstm_layer_forward/backward``.

The schema and tensor layouts are documented in ``csrc/fastmtl.cpp``. ``lstm_layer_forward`` is differentiable
(``torch.library.register_autograd``) with respect to ``input``, ``hx``, ``cx`` and every weight; its backward is
``lstm_layer_backward`` (one call per layer, not differentiable again). Both ops have fake kernels, so
``torch.compile(fullgraph=True)`` traces through them.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["lstm_layer"]

_FWD = "fastmtl::lstm_layer_forward"
_BWD = "fastmtl::lstm_layer_backward"


@torch.library.register_fake(_FWD)
def _lstm_layer_forward_fake(input, lengths, hx, cx, weights, bidirectional, need_reserve):
    T, B, _ = input.shape
    D = 2 if bidirectional else 1
    H = hx.shape[-1]
    output = input.new_empty((T, B, D * H))
    hy = hx.new_empty((D, B, H))
    cy = cx.new_empty((D, B, H))
    reserve = input.new_empty((D, T, B, 5 * H)) if need_reserve else input.new_empty((0,))
    return output, hy, cy, reserve


@torch.library.register_fake(_BWD)
def _lstm_layer_backward_fake(grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights, bidirectional,
                              output, reserve):
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(cx),
            [torch.empty_like(w) for w in weights])


def _setup_context(ctx, inputs, output):
    input, lengths, hx, cx, weights, bidirectional, need_reserve = inputs
    out, _, _, reserve = output
    ctx.bidirectional = bidirectional
    ctx.need_reserve = need_reserve
    ctx.num_weights = len(weights)
    ctx.save_for_backward(input, lengths, hx, cx, out, reserve, *weights)


def _backward(ctx, grad_output, grad_hy, grad_cy, grad_reserve):
    input, lengths, hx, cx, out, reserve, *weights = ctx.saved_tensors
    if not ctx.need_reserve:
        raise RuntimeError(
            "fastmtl: lstm_layer_forward ran with need_reserve=False, so it cannot be differentiated; "
            "call it with need_reserve=True when gradients are needed")
    if grad_output is None:
        grad_output = torch.zeros_like(out)
    if grad_hy is None:
        grad_hy = torch.zeros_like(hx)
    if grad_cy is None:
        grad_cy = torch.zeros_like(cx)
    gi, ghx, gcx, gw = torch.ops.fastmtl.lstm_layer_backward(
        grad_output.contiguous(), grad_hy.contiguous(), grad_cy.contiguous(), input, lengths, hx, cx, weights,
        ctx.bidirectional, out, reserve)
    return gi, None, ghx, gcx, list(gw), None, None


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def lstm_layer(input: Tensor, lengths: Optional[Tensor], hx: Tensor, cx: Tensor, weights: Sequence[Tensor],
               bidirectional: bool, need_reserve: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer (both directions when ``bidirectional``) on time-major ``input`` (T, B, I).

    ``lengths`` (int64, CPU, non-increasing, in [1, T]) or None. Returns ``(output, hy, cy)``.
    ``need_reserve`` defaults to whether autograd will need the saved activations.
    """
    weights = list(weights)
    if need_reserve is None:
        need_reserve = torch.is_grad_enabled() and (
            input.requires_grad or hx.requires_grad or cx.requires_grad or any(w.requires_grad for w in weights))
    out, hy, cy, _ = torch.ops.fastmtl.lstm_layer_forward(input.contiguous(), lengths, hx.contiguous(),
                                                          cx.contiguous(), weights, bidirectional, need_reserve)
    return out, hy, cy
