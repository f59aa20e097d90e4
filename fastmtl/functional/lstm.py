"""``fastmtl.functional.lstm``: a multi-layer (bi)LSTM over padded input with optional per-sequence lengths.

The batch is normalised once (batch-first -> time-major), sorted once by length (when lengths are given and not
already non-increasing) and unsorted at the end; each layer is one call of the fused op
``torch.ops.fastmtl.lstm_layer_forward`` (both directions at once), with dropout between layers in training. The
same code serves eager calls, ``torch.jit.script`` of ``fastmtl.nn.LSTM`` and the exporters.

Dropout between layers consumes torch's global generator exactly as torch.nn.LSTM does on the CPU, so a seed gives
the same masks (values and generator state) in every mode. torch's CPU LSTM (aten/src/ATen/native/RNN.cpp, and the
oneDNN path for padded input) calls ``at::dropout(layer_output, p, train=true)`` between layers: on the CPU that is
``empty_like(x).bernoulli_(1 - p).div_(1 - p)`` times ``x`` (nothing drawn for p = 1). Padded input: the mask is
drawn over the (T, B, D*H) layer output, as here. PackedSequence input: torch draws it over the packed data
(sum(lengths), D*H) (time-major rows, the running sequences of each step in the packed order), so the mask is drawn
as ``at::dropout`` draws it over a tensor of exactly that shape and dtype and then scattered to the padded layout
the fused op uses (rows from the lengths and the packed order; zero at padding, where the output is zero).
``lengths=`` (fastmtl's own argument) draws as torch.nn.LSTM over ``pack_padded_sequence(x, lengths,
enforce_sorted=False)`` does (the packed order is ``torch.sort(lengths, descending=True)``'s, ties included), so
the fast path and its torch equivalent agree too. Nothing is drawn in eval mode, for p = 0 or for one layer.
Under ``torch.compile`` with lengths the mask is drawn over the padded layout (a graph cannot depend on the lengths'
values): the same distribution, another stream. CUDA (unverified here): torch's cuDNN path draws its masks inside
cuDNN from a dropout state seeded once per device from the CPU generator, which no other implementation can
reproduce; fastmtl draws with ``torch.dropout`` on the CUDA generator over the same shapes as on the CPU.

Errors follow ``torch.nn.LSTM``: the same exception types and the same leading wording for the same mistakes
(wrong hidden size, input/weight dtype mismatch, empty sequence, wrong feature size, tensors on different devices),
with fastmtl's detail appended. bfloat16/float16 on the CPU run the fused kernel in float32 (differentiable casts in
and out) and are rounded back to the input's dtype; autocast (CPU and CUDA) casts as it does for torch.nn.LSTM. Under
``torch.onnx.export`` each layer is written with standard ops (``aten::lstm``, or the reference loop with lengths)
so the exporter can translate it.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._support import parse_version
from ..ops import lstm as _ops_lstm  # noqa: F401  (the autograd, fake and vmap rules of lstm_layer_forward)

__all__ = ["lstm"]

_DTYPE_MESSAGES = {}
_TORCH = parse_version(torch.__version__)


def _torch_dtype_message(input_dtype: torch.dtype, weight_dtype: torch.dtype) -> str:
    """torch.nn.LSTM's own message for an input whose dtype differs from the weights' (its wording changed between
    torch releases: "input must have the type ..." up to 2.10, "RNN input dtype ... does not match weight dtype ..."
    from 2.11), asked of the public ``torch.nn.RNNBase.check_input`` on a meta-device LSTM and kept per dtype pair."""
    if not torch.jit.is_scripting():
        key = (input_dtype, weight_dtype)
        if key not in _DTYPE_MESSAGES:
            _probe_dtype_message(key)
        if key in _DTYPE_MESSAGES:
            return _DTYPE_MESSAGES[key]
        # (check_input does not raise under autocast: the wording of the installed release, written out)
        if _TORCH < (2, 11):
            return "input must have the type %s, got type %s" % (weight_dtype, input_dtype)
    return ("RNN input dtype (%s) does not match weight dtype (%s). Convert input: input.to(%s), or convert model: "
            "model.to(%s)" % (input_dtype, weight_dtype, weight_dtype, input_dtype))


def _probe_dtype_message(key) -> None:
    """Asks torch.nn.LSTM for its message and keeps it in _DTYPE_MESSAGES."""
    input_dtype, weight_dtype = key
    try:
        probe = torch.nn.LSTM(1, 1, device="meta", dtype=weight_dtype)
        probe.check_input(torch.empty((1, 1, 1), dtype=input_dtype, device="meta"), None)
    except ValueError as e:
        _DTYPE_MESSAGES[key] = str(e)
    except Exception:  # pragma: no cover - a weight dtype torch.nn.LSTM cannot have
        pass


_SUPPORTED = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}


def _shape(shape: List[int]) -> str:
    """A shape written as Python writes a tuple of it ("(5, 3, 4)", "(4,)"), in eager and TorchScript alike."""
    if len(shape) == 1:
        return "(%d,)" % shape[0]
    return "(" + ", ".join([str(d) for d in shape]) + ")"


def _check_lengths(lengths: Tensor, B: int, T: int, compiling: bool) -> Tensor:
    """Validated lengths as an int64 CPU tensor (B,); while compiling, their values are not looked at."""
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError("fastmtl.lstm: lengths must be an integer tensor, got dtype %s" % lengths.dtype)
        if lengths.dim() != 1:
            raise ValueError("fastmtl.lstm: lengths must be 1-D with one entry per sequence (B = %d), got shape %s"
                             % (B, _shape(lengths.shape)))
        lengths = lengths.to(device="cpu", dtype=torch.int64)
    else:  # a sequence of ints
        lengths = _lengths_from_sequence(lengths)
    if compiling:
        return lengths
    if lengths.numel() != B:
        raise ValueError("fastmtl.lstm: lengths has %d entries but the batch has B = %d sequences"
                         % (lengths.numel(), B))
    if B > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1:
            raise ValueError("fastmtl.lstm: every length must be >= 1, got a length of %d (lengths = %s)"
                             % (lo, torch.jit.annotate(List[int], lengths[:16].tolist())))
        if hi > T:
            raise ValueError("fastmtl.lstm: lengths must not exceed the sequence length T = %d of the input, got %d"
                             % (T, hi))
    return lengths


def _lengths_from_sequence(lengths) -> Tensor:
    """Lengths given as a sequence of ints, as an int64 CPU tensor."""
    try:
        vals = list(lengths)
    except TypeError:
        raise TypeError("fastmtl.lstm: lengths must be a 1-D integer tensor or a sequence of ints, got %s"
                        % type(lengths).__name__) from None
    if not all(isinstance(v, int) or (isinstance(v, Tensor) and v.dim() == 0 and not v.is_floating_point())
               for v in vals):
        raise TypeError("fastmtl.lstm: lengths must hold integers, got %r" % (vals[:8],))
    return torch.tensor([int(v) for v in vals], dtype=torch.int64)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device_type`` (cpu or cuda), or None."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(input, hx, weights, dt: torch.dtype):
    """Autocast's casts for an op on its lower-precision list, as torch.nn.LSTM gets them: every floating tensor
    except float64 goes to ``dt``. The casts are differentiable, so float32 parameters get float32 gradients."""
    def cast(t):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dt)
        return t
    if hx is not None and isinstance(hx, (tuple, list)):
        hx = tuple(cast(h) for h in hx)
    return cast(input), hx, [cast(w) for w in weights]


def _check_hidden(name: str, index: int, t: Tensor, input: Tensor, expected: List[int]) -> None:
    if not torch.jit.is_scripting():
        if not isinstance(t, Tensor):
            raise TypeError("fastmtl.lstm: %s must be a Tensor, got %s" % (name, type(t).__name__))
    if list(t.shape) != expected:
        raise RuntimeError("Expected hidden[%d] size %s, got %s (fastmtl.lstm: %s must have shape (num_layers * "
                           "num_directions, batch, hidden_size) = %s)"
                           % (index, _shape(expected), list(t.shape), name, _shape(expected)))
    if t.device != input.device:
        raise RuntimeError("Input and hidden tensors are not at the same device, found input tensor at %s and "
                           "hidden tensor at %s (fastmtl.lstm: %s)" % (input.device, t.device, name))
    if t.dtype != input.dtype:
        raise RuntimeError("Expected hidden[%d] dtype %s, got %s (fastmtl.lstm: %s has dtype %s but input has "
                           "dtype %s; they must match)" % (index, input.dtype, t.dtype, name, t.dtype, input.dtype))


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

    Returns ``(output, (h_n, c_n))`` as torch.nn.LSTM (output is (T, B, D*H), or (B, T, D*H) when batch_first),
    in the input's dtype.

    Raises what torch.nn.LSTM raises for the same mistake: ValueError for an input that is not 3-D and for an
    input dtype that differs from the weights' ("RNN input dtype ... does not match weight dtype ..."),
    RuntimeError for a wrong feature size ("input.size(-1) must be equal to input_size ..."), an empty sequence
    ("Expected sequence length to be larger than 0 in RNN"), a wrong hidden size ("Expected hidden[0] size ...,
    got [...]"), a hidden state of another dtype, tensors on different devices, and an ``hx`` that is not two
    states ("lstm expects two hidden states"); ValueError/TypeError for bad ``lengths`` (fastmtl's own argument).
    """
    return _lstm(input, hx, weights, num_layers, bidirectional, batch_first, dropout, training, lengths)


def _lstm(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor], num_layers: int,
          bidirectional: bool, batch_first: bool, dropout: float, training: bool,
          lengths: Optional[Tensor], packed_order: bool = False) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """:func:`lstm` with TorchScript's types: the checks, then :func:`_drive`. Eager calls, ``torch.jit.script`` of
    fastmtl.nn.LSTM, torch.compile, torch.export and ONNX export all run this code. ``packed_order``: the batch is
    already in a PackedSequence's order (non-increasing lengths), the order in which torch draws dropout masks;
    otherwise that order is the one ``pack_padded_sequence(enforce_sorted=False)`` would give."""
    # TorchScript compiles this code but skips what it cannot compile: the `if not torch.jit.is_scripting():` blocks
    # here and in fastmtl.nn.LSTM.forward (with the helpers only they call, out of line where TorchScript could not
    # even parse them), _standard_layer (torch.jit.unused; `standard` is never true in TorchScript) and the
    # `with torch.autocast(...)`, which is why the stack itself is a function of its own (_drive). So a scripted
    # module takes typed arguments only (lengths a tensor, hx a tuple of two tensors), knows no autocast, gives
    # torch.nn.LSTM's current wording for a dtype mismatch and writes dtypes in messages as numbers, and leaves a
    # dtype the kernels lack to the kernel's own error; in all else it is the eager module.
    D = 2 if bidirectional else 1
    ac_dtype: Optional[torch.dtype] = None
    if not torch.jit.is_scripting():
        if not isinstance(input, Tensor):
            raise TypeError("fastmtl.lstm: input must be a Tensor, got %s" % type(input).__name__)
        weights = list(weights)
        ac_dtype = _autocast_dtype(input.device.type)
        if ac_dtype is not None:
            input, hx, weights = _autocast(input, hx, weights, ac_dtype)
    if input.dim() != 3:
        raise ValueError("LSTM: Expected input to be 3D, got %dD instead (fastmtl.lstm: input must be (%s, "
                         "input_size), got shape %s)"
                         % (input.dim(), "B, T" if batch_first else "T, B", _shape(input.shape)))
    if not torch.jit.is_scripting():
        num_layers = int(num_layers)
    if num_layers < 1:
        raise ValueError("fastmtl.lstm: num_layers must be >= 1, got %d" % num_layers)
    per_layer = len(weights) // num_layers
    if per_layer * num_layers != len(weights) or (per_layer != 2 * D and per_layer != 4 * D):
        raise ValueError("fastmtl.lstm: expected %d (no bias) or %d (bias) weight tensors for num_layers=%d, "
                         "bidirectional=%s; got %d" % (2 * D * num_layers, 4 * D * num_layers, num_layers,
                                                       bidirectional, len(weights)))
    if not torch.jit.is_scripting():
        for i, w in enumerate(weights):
            if not isinstance(w, Tensor):
                raise TypeError("fastmtl.lstm: weights[%d] must be a Tensor, got %s" % (i, type(w).__name__))
    for i, w in enumerate(weights):
        if w.dtype != input.dtype:
            raise ValueError("%s (fastmtl.lstm: input has dtype %s but weights[%d] has dtype %s; they must match)"
                             % (_torch_dtype_message(input.dtype, w.dtype), input.dtype, i, w.dtype))
    if not torch.jit.is_scripting():
        dev = input.device.type
        if input.dtype not in _SUPPORTED.get(dev, (torch.float32, torch.float64)):
            raise TypeError("fastmtl.lstm: input dtype %s is not supported on %s (supported: %s)"
                            % (input.dtype, dev, ", ".join([str(d) for d in _SUPPORTED.get(dev, ())])))
    for i, w in enumerate(weights):
        if w.device != input.device:
            raise RuntimeError("Input and parameter tensors are not at the same device, found input tensor at %s "
                               "and parameter tensor at %s (fastmtl.lstm: weights[%d])"
                               % (input.device, w.device, i))
    if weights[1].dim() != 2:
        raise ValueError("fastmtl.lstm: weights[1] (weight_hh_l0) must be 2-D, got shape %s"
                         % _shape(weights[1].shape))
    H = weights[1].shape[1]
    E = weights[0].shape[1] if weights[0].dim() == 2 else -1
    if input.shape[-1] != E:
        raise RuntimeError("input.size(-1) must be equal to input_size. Expected %d, got %d (fastmtl.lstm: input "
                           "has shape %s)" % (E, input.shape[-1], _shape(input.shape)))
    T, B = (input.shape[1], input.shape[0]) if batch_first else (input.shape[0], input.shape[1])
    if T == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN (fastmtl.lstm: input has shape %s, "
                           "%s)" % (_shape(input.shape), "batch_first" if batch_first else "time-major"))
    if hx is None:
        h0 = input.new_zeros([num_layers * D, B, H])
        c0 = h0
    else:
        if not torch.jit.is_scripting():
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise RuntimeError("lstm expects two hidden states (fastmtl.lstm: hx must be a tuple (h_0, c_0), "
                                   "got %s)" % (type(hx).__name__ if not isinstance(hx, (tuple, list))
                                                else "%d elements" % len(hx)))
        h0, c0 = hx
        expected = [num_layers * D, B, H]
        _check_hidden("h_0", 0, h0, input, expected)
        _check_hidden("c_0", 1, c0, input, expected)
    standard = False
    if not torch.jit.is_scripting():
        standard = torch.onnx.is_in_onnx_export()
        if ac_dtype is not None:
            # The fused op runs in the dtype it is given: autocast must not recast anything inside it.
            with torch.autocast(input.device.type, enabled=False):
                return _drive(input, h0, c0, weights, num_layers, bidirectional, batch_first, dropout, training,
                              lengths, standard, packed_order)
    return _drive(input, h0, c0, weights, num_layers, bidirectional, batch_first, dropout, training, lengths,
                  standard, packed_order)


def _drive(input: Tensor, h0: Tensor, c0: Tensor, weights: List[Tensor], num_layers: int, bidirectional: bool,
           batch_first: bool, dropout: float, training: bool, lengths: Optional[Tensor],
           standard: bool, packed_order: bool = False) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """The LSTM stack on checked arguments: batch-first -> time-major, lengths sorted once, one fused op per layer
    (``standard``: :func:`_standard_layer`, for ONNX), dropout between layers, and everything undone at the end."""
    D = 2 if bidirectional else 1
    per_layer = len(weights) // num_layers
    x = input.transpose(0, 1) if batch_first else input
    T, B = x.shape[0], x.shape[1]

    # bfloat16/float16 on the CPU: float32 math inside (differentiable casts), rounded back at the end.
    out_dtype = x.dtype
    upcast = not standard and x.device.type == "cpu" and (out_dtype == torch.bfloat16 or out_dtype == torch.float16)
    if upcast:
        x, h0, c0 = x.float(), h0.float(), c0.float()
        weights = [w.float() for w in weights]

    # Lengths: sort once (non-increasing) so the running sequences are a prefix at every step (the standard
    # layers mask instead, and a traced graph must not depend on the example's order).
    inv: Optional[Tensor] = None
    layer_lengths: Optional[Tensor] = None
    drop_rows: Optional[Tensor] = None
    T_run = T
    if lengths is not None:
        compiling = torch.compiler.is_compiling()
        lens = _check_lengths(lengths, B, T, compiling)
        given_lens = lens
        if not standard and (compiling or (B > 0 and bool((lens[:-1] < lens[1:]).any()))):
            perm = torch.argsort(lens, descending=True, stable=True)
            inv = torch.argsort(perm)
            lens = lens.index_select(0, perm)
            dperm = perm.to(x.device)
            x = x.index_select(1, dperm)
            h0 = h0.index_select(1, dperm)
            c0 = c0.index_select(1, dperm)
        full = False
        if not standard and not compiling and B > 0:
            T_run = int(lens[0])
            full = T_run == T and int(lens[-1]) == T
        layer_lengths = None if full else lens  # every sequence full length: the plain path
        if training and dropout > 0 and num_layers > 1 and not standard and not compiling and B > 0:
            drop_rows = _packed_rows(given_lens, inv, T_run, B, packed_order)
            if drop_rows is not None:
                drop_rows = drop_rows.to(x.device)
    if T_run < T:
        x = x[:T_run]  # nothing runs past the longest sequence

    hys: List[Tensor] = []
    cys: List[Tensor] = []
    layer_in = x.contiguous()
    # torch.jit.trace records need_reserve as a constant (and check_trace re-traces under no_grad): a traced graph
    # always keeps what backward needs, so it can be trained.
    tracing = torch.jit.is_tracing()
    for layer in range(num_layers):
        w = weights[layer * per_layer:(layer + 1) * per_layer]
        h, c = h0[layer * D:(layer + 1) * D], c0[layer * D:(layer + 1) * D]
        if standard:
            out, hy, cy = _standard_layer(layer_in, layer_lengths, h, c, w, bidirectional)
        else:
            need_reserve = tracing or _needs_grad(layer_in, h, c, w)
            out, hy, cy, _ = torch.ops.fastmtl.lstm_layer_forward(layer_in.contiguous(), layer_lengths,
                                                                  h.contiguous(), c.contiguous(), w, bidirectional,
                                                                  need_reserve)
        hys.append(hy)
        cys.append(cy)
        if layer + 1 < num_layers and dropout > 0 and training:
            if drop_rows is not None:
                out = _packed_dropout(out, drop_rows, dropout, out_dtype)
            elif upcast:  # the mask torch draws in the input's dtype (its kept value is 1 / (1 - p) rounded)
                out = out * torch.dropout(torch.ones(out.shape, dtype=out_dtype, device=out.device), dropout,
                                          True).to(out.dtype)
            else:
                out = torch.dropout(out, dropout, True)
        layer_in = out
    output = layer_in
    h_n = torch.cat(hys, 0) if num_layers > 1 else hys[0]
    c_n = torch.cat(cys, 0) if num_layers > 1 else cys[0]
    if inv is not None:
        dinv = inv.to(output.device)
        output = output.index_select(1, dinv)
        h_n = h_n.index_select(1, dinv)
        c_n = c_n.index_select(1, dinv)
    if T_run < T:
        output = F.pad(output, [0, 0, 0, 0, 0, T - T_run])
    if batch_first:
        output = output.transpose(0, 1)
    if upcast:
        output, h_n, c_n = output.to(out_dtype), h_n.to(out_dtype), c_n.to(out_dtype)
    return output, (h_n, c_n)


def _packed_rows(lens: Tensor, inv: Optional[Tensor], T: int, B: int, packed_order: bool) -> Optional[Tensor]:
    """The rows of the (T * B) flattened time-major layout of the fused op, one per row of torch's packed data, in
    the packed order (time-major; at each step the running sequences in the packing's order), or None when they are
    all the rows in order (the padded layout's own dropout then draws the same mask). ``lens`` are the lengths in
    the caller's batch order (int64, CPU), ``inv`` the position of each of those sequences in the layout (None: the
    same order), ``packed_order`` whether the caller's order already is the packed order (a PackedSequence);
    otherwise it is ``pack_padded_sequence(enforce_sorted=False)``'s, ``torch.sort(lengths, descending=True)``."""
    steps = torch.arange(T).unsqueeze(1)
    if packed_order and inv is None:  # the layout is the packed order: its running (t, b) in row-major order
        if int(lens[-1]) == T:
            return None
        return (steps < lens.unsqueeze(0)).view(-1).nonzero().view(-1)
    if packed_order:
        order = torch.arange(B)
        sorted_lens = lens
    else:
        sorted_lens, order = torch.sort(lens, descending=True)
    col = order if inv is None else inv.index_select(0, order)
    if int(sorted_lens[-1]) == T and torch.equal(col, torch.arange(B)):
        return None
    return (steps * B + col.unsqueeze(0))[steps < sorted_lens.unsqueeze(0)]


def _packed_dropout(out: Tensor, rows: Tensor, p: float, mask_dtype: torch.dtype) -> Tensor:
    """Dropout of a padded (T, B, F) layer output with torch's mask for its packed data (rows.numel(), F) in the
    input's dtype, scattered to the padded layout (zero at padding, where the output is zero already); the gradient
    is masked and scaled the same way. On the CPU the mask is what ``at::dropout`` (the call torch's RNN makes)
    draws there, ``empty(...).bernoulli_(1 - p).div_(1 - p)``, without multiplying it into ones (tests compare it
    with torch's own); elsewhere, and for p = 1 (nothing drawn), it is ``torch.dropout`` of ones."""
    T, B, Fd = out.shape[0], out.shape[1], out.shape[2]
    if out.device.type == "cpu" and p < 1.0:
        # at::dropout's CPU mask (_dropout_impl), without the ones it would be multiplied into
        mask = torch.empty([rows.numel(), Fd], dtype=mask_dtype).bernoulli_(1.0 - p).div_(1.0 - p)
    else:
        mask = torch.dropout(torch.ones([rows.numel(), Fd], dtype=mask_dtype, device=out.device), p, True)
    full = out.new_zeros([T * B, Fd]).index_copy_(0, rows, mask.to(out.dtype))
    return out * full.view(T, B, Fd)


def _needs_grad(x: Tensor, h: Tensor, c: Tensor, weights: List[Tensor]) -> bool:
    """Whether autograd will need a layer's saved activations (the op's ``need_reserve``)."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or h.requires_grad or c.requires_grad:
        return True
    for w in weights:
        if w.requires_grad:
            return True
    return False


@torch.jit.unused
def _standard_layer(x: Tensor, lengths: Optional[Tensor], h: Tensor, c: Tensor, weights: List[Tensor],
                    bidirectional: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer in standard PyTorch ops, for exporters that cannot see inside the fused op (ONNX): without lengths
    ``aten::lstm`` (the ONNX exporter writes an ONNX LSTM), with lengths the masked reference loop (unrolled over
    the T of the example input)."""
    if lengths is None:
        out, hy, cy = torch.lstm(x, (h, c), weights, len(weights) == (8 if bidirectional else 4), 1, 0.0, False,
                                 bidirectional, False)
        # (torch 2.8's ONNX decomposition of one aten::lstm layer gives its states as (D, 1, B, H))
        return out, hy.reshape(h.shape), cy.reshape(c.shape)
    from ..reference.lstm import lstm_reference
    out, (hy, cy) = lstm_reference(x, (h, c), weights, 1, bidirectional, False, lengths)
    return out, hy, cy
