"""``fastmtl.nn.LSTM``: a drop-in replacement for ``torch.nn.LSTM`` running the fused fastmtl kernels.

It is built by ``torch.nn.RNNBase`` in ``"LSTM"`` mode exactly as ``torch.nn.LSTM`` is (same constructor, parameter
names, shapes, gate order, initialisation and state_dict), so weights move freely between the two with
``load_state_dict`` (or :meth:`LSTM.to_torch` / :meth:`LSTM.from_torch`). ``forward`` takes what torch.nn.LSTM
takes (a batched or unbatched Tensor, or a PackedSequence, and optional ``(h_0, c_0)``) and returns the same types
and shapes; padded input may also come with ``lengths=`` (the fast path: no packing at all).

Where a user can observe it, it behaves as torch.nn.LSTM does:

* every forward reads the current parameter tensors (by ``_flat_weights_names``), so ``torch.func.functional_call``,
  ``torch.nn.utils.parametrize`` and weight/spectral norm see the weights they substitute;
* mistakes raise torch.nn.LSTM's exception types with its wording, fastmtl's detail appended;
* bfloat16/float16 run on the CPU (float32 math inside) and CPU/CUDA autocast gives torch.nn.LSTM's dtypes;
* in training, dropout between layers draws from torch's global generator exactly as torch.nn.LSTM does on the CPU
  (the same masks and the same generator state after a forward, padded or packed input; ``lengths=`` as torch over
  ``pack_padded_sequence(enforce_sorted=False)``); on CUDA torch's cuDNN draws inside cuDNN, which cannot be
  reproduced (see ``fastmtl.functional.lstm``);
* ``torch.jit.script`` (the same code, typed; ``lengths`` must then be a tensor), ``torch.jit.trace``,
  ``torch.fx.symbolic_trace`` (it is a leaf module, as torch.nn.LSTM is), ``torch.onnx.export`` (standard ops
  while exporting), ``torch.compile(fullgraph=True)`` and ``torch.export``.

It subclasses RNNBase, not torch.nn.LSTM, so ``isinstance(m, torch.nn.LSTM)`` is False: torch._dynamo refuses to
trace any torch.nn.LSTM instance (subclasses included) without ``torch._dynamo.config.allow_rnn``, which would take
``torch.compile(fullgraph=True)`` away. For the same exact-type reason ``torch.ao.quantization.quantize_dynamic``
does not pick it up from ``{torch.nn.LSTM}``: pass ``fastmtl.nn.LSTM`` in the spec together with
``mapping=fastmtl.nn.dynamic_quant_mapping()`` (it becomes torch's dynamic quantized LSTM), or convert with
:meth:`LSTM.to_torch` first. A fastmtl.nn.LSTM that was given a qconfig but not converted warns when it runs.

``proj_size > 0`` is not implemented and raises NotImplementedError at construction.
"""
import sys
import warnings
from typing import List, Optional, Tuple, overload

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import _torch_private as _priv

from ..functional.lstm import _lstm, _shape

__all__ = ["LSTM", "dynamic_quant_mapping"]


def _fx_tracer(*args):
    """The torch.fx tracer of the first fx Proxy among the arguments (one level into tuples), else None."""
    for a in args:
        if isinstance(a, torch.fx.Proxy):
            return a.tracer
        if isinstance(a, (tuple, list)):
            for b in a:
                if isinstance(b, torch.fx.Proxy):
                    return b.tracer
    return None


def _quantizer_asked_for_torch_lstm(frame) -> bool:
    """Whether ``frame`` (or one of its two callers) is torch.ao.quantization propagating a qconfig spec that names
    torch.nn.LSTM (the setter of ``qconfig`` is then being handed None for this module because its type is not in the
    spec). Best effort: a different torch layout gives False (no warning), never an error."""
    spec = _priv.qconfig_propagation_spec(frame)  # a dict or None
    return spec is not None and spec.get(torch.nn.LSTM) is not None


class LSTM(torch.nn.RNNBase):
    """Drop-in ``torch.nn.LSTM`` backed by fastmtl's fused kernels.

    Extra keyword of ``forward``: ``lengths`` (1-D integer tensor or list, one entry per sequence, in [1, T]) for
    padded input: output positions past a sequence's length are zero and ``(h_n, c_n)`` are the states at its
    last real token, exactly as torch.nn.LSTM over ``pack_padded_sequence`` (the reverse direction starts at the
    last real token), without building a PackedSequence.
    """

    # torch.ao.quantization sets ``qconfig`` on the modules it means to convert (and deletes it afterwards); a
    # fastmtl.nn.LSTM that was given one and then runs was left unconverted (its type is not in the mapping): warn.
    __jit_unused_properties__ = list(torch.nn.RNNBase.__jit_unused_properties__) + ["qconfig"]
    _quantization_requested = False

    @property
    def qconfig(self):
        try:
            return self.__dict__["_qconfig"]
        except KeyError:
            raise AttributeError("'LSTM' object has no attribute 'qconfig'") from None

    @qconfig.setter
    def qconfig(self, value) -> None:
        self.__dict__["_qconfig"] = value
        if value is not None:
            self.__dict__["_quantization_requested"] = True
        elif _quantizer_asked_for_torch_lstm(sys._getframe(1)):
            warnings.warn(
                "torch.ao.quantization was asked to quantize torch.nn.LSTM modules, but it matches exact types, so "
                "this fastmtl.nn.LSTM stays float. Pass fastmtl.nn.LSTM in qconfig_spec together with "
                "mapping=fastmtl.nn.dynamic_quant_mapping() to quantize_dynamic, or convert it with .to_torch() "
                "first.", UserWarning, stacklevel=2)

    @qconfig.deleter
    def qconfig(self) -> None:
        self.__dict__.pop("_qconfig", None)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        if proj_size:
            raise NotImplementedError(
                "fastmtl.nn.LSTM does not implement proj_size > 0 (got proj_size=%r); use torch.nn.LSTM for "
                "projected LSTMs" % (proj_size,))
        super().__init__("LSTM", input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, proj_size=0, device=device, dtype=dtype)

    # TorchScript compiles forward once per overload (as for torch.nn.LSTM); eager Python runs the last def. Both run
    # the same code but for the `if not torch.jit.is_scripting():` blocks (see fastmtl.functional.lstm._lstm).
    @overload  # type: ignore[override]
    @_priv.overload_method
    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        pass

    @overload
    @_priv.overload_method
    def forward(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        pass

    def forward(self, input, hx=None, lengths=None):
        if not torch.jit.is_scripting():
            tracer = _fx_tracer(input, hx, lengths)
            if tracer is not None:
                # torch.fx.symbolic_trace: a leaf module (one call_module node), as torch.nn.LSTM is.
                args = (input,) if hx is None else (input, hx)
                kwargs = {} if lengths is None else {"lengths": lengths}
                return tracer.create_proxy("call_module", tracer.path_of_module(self), args, kwargs)
        if self.proj_size != 0:  # set after construction
            raise NotImplementedError("fastmtl.nn.LSTM does not implement proj_size > 0")
        if torch.jit.is_scripting():
            weights = self._flat_weights
        else:
            if self._quantization_requested:
                warnings.warn(
                    "fastmtl.nn.LSTM was given a quantization qconfig but is still a float fastmtl.nn.LSTM: "
                    "torch.ao.quantization swaps modules by exact type and its default mapping does not know this "
                    "class. Pass mapping=fastmtl.nn.dynamic_quant_mapping() to quantize_dynamic (with "
                    "fastmtl.nn.LSTM in qconfig_spec), or convert it with .to_torch() first.", UserWarning,
                    stacklevel=2)
            # The current parameter tensors, as torch.nn.LSTM's forward refreshes _flat_weights: functional_call,
            # parametrizations and weight norms substitute them.
            weights = [getattr(self, name) for name in self._flat_weights_names]
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("fastmtl.nn.LSTM: lengths= is for padded input; a PackedSequence carries its own")
            return self._forward_packed(input, hx, weights)
        if not torch.jit.is_scripting():
            if not isinstance(input, Tensor):
                raise TypeError("fastmtl.nn.LSTM: input must be a Tensor or a PackedSequence, got %s"
                                % type(input).__name__)
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError("LSTM: Expected input to be 2D or 3D, got %dD instead (fastmtl.nn.LSTM: input is "
                             "(T, input_size) unbatched or %s batched, got shape %s)"
                             % (input.dim(), "(B, T, input_size)" if self.batch_first else "(T, B, input_size)",
                                _shape(input.shape)))
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if hx is not None:
            if not torch.jit.is_scripting():
                hx = self._check_hx_pair(hx)
            h0, c0 = hx
            want = 3 if batched else 2
            if h0.dim() != want or c0.dim() != want:
                raise RuntimeError(
                    "For %s %d-D input, hx and cx should also be %d-D but got (%d-D, %d-D) tensors (fastmtl.nn.LSTM: "
                    "h_0 and c_0 have shapes %s and %s; expected (num_layers * num_directions, %shidden_size))"
                    % ("batched" if batched else "unbatched", want, want, h0.dim(), c0.dim(), _shape(h0.shape),
                       _shape(c0.shape), "batch, " if batched else ""))
            hx = (h0, c0) if batched else (h0.unsqueeze(1), c0.unsqueeze(1))
        if not batched:
            if lengths is not None:
                lengths = torch.as_tensor(lengths).reshape(1)
            input = input.unsqueeze(batch_dim)
        output, (h_n, c_n) = _lstm(input, hx, weights, self.num_layers, self.bidirectional, self.batch_first,
                                   self.dropout, self.training, lengths)
        if not batched:
            output = output.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    @staticmethod
    def _check_hx_pair(hx):
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(t, Tensor) for t in hx)):
            raise RuntimeError("lstm expects two hidden states (fastmtl.nn.LSTM: hx must be a tuple of two Tensors "
                               "(h_0, c_0), got %s)" % (
                                   type(hx).__name__ if not isinstance(hx, (tuple, list))
                                   else "a %s of %d" % (type(hx).__name__, len(hx))))
        return hx[0], hx[1]

    def _forward_packed(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]],
                        weights: List[Tensor]) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        # Padded, time-major, in the PackedSequence's (sorted, non-increasing lengths) order.
        padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes, None, None),
                                              total_length=batch_sizes.size(0))
        if hx is not None:
            if not torch.jit.is_scripting():
                hx = self._check_hx_pair(hx)
            h0, c0 = hx
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices.to(h0.device))
                c0 = c0.index_select(1, sorted_indices.to(c0.device))
            hx = (h0, c0)
        # packed_order: dropout masks drawn over the packed data in this order, as torch.nn.LSTM draws them.
        out, (h_n, c_n) = _lstm(padded, hx, weights, self.num_layers, self.bidirectional, False, self.dropout,
                                self.training, lengths, True)
        out_data = pack_padded_sequence(out, lengths, enforce_sorted=True).data
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices.to(h_n.device))
            c_n = c_n.index_select(1, unsorted_indices.to(c_n.device))
        return PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)

    # ----------------------------------------------------------------------------------------------- conversion
    @torch.jit.unused
    def to_torch(self) -> torch.nn.LSTM:
        """A ``torch.nn.LSTM`` with this module's configuration, device, dtype, training mode and (current, i.e.
        parametrized) weights, copied."""
        w0 = getattr(self, self._flat_weights_names[0])
        with warnings.catch_warnings():  # the dropout-with-one-layer warning was given when self was built
            warnings.simplefilter("ignore", UserWarning)
            m = torch.nn.LSTM(self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
                              batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
                              device=w0.device, dtype=w0.dtype)
        with torch.no_grad():
            for name in self._flat_weights_names:
                getattr(m, name).copy_(getattr(self, name))
        return m.train(self.training)

    @classmethod
    @torch.jit.unused
    def from_torch(cls, module: torch.nn.Module) -> "LSTM":
        """A fastmtl.nn.LSTM with the configuration, device, dtype, training mode and (current) weights of a
        ``torch.nn.LSTM`` (copied). ``proj_size > 0`` raises NotImplementedError."""
        if not (isinstance(module, torch.nn.RNNBase) and module.mode == "LSTM"):
            raise TypeError("fastmtl.nn.LSTM.from_torch expects a torch.nn.LSTM, got %s" % type(module).__name__)
        w0 = getattr(module, module._flat_weights_names[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            m = cls(module.input_size, module.hidden_size, module.num_layers, bias=module.bias,
                    batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
                    proj_size=module.proj_size, device=w0.device, dtype=w0.dtype)
        with torch.no_grad():
            for name in m._flat_weights_names:
                getattr(m, name).copy_(getattr(module, name))
        return m.train(module.training)


class _DynamicQuantizedLSTMFromFastmtl:
    """What torch.ao.quantization's convert calls for a fastmtl.nn.LSTM (``from_float``): torch's dynamic
    quantized LSTM built from the equivalent torch.nn.LSTM (:meth:`LSTM.to_torch`) with the module's qconfig."""

    @staticmethod
    def from_float(mod, use_precomputed_fake_quant=False):
        from torch.ao.nn.quantized.dynamic import LSTM as DynamicQuantizedLSTM
        float_lstm = mod.to_torch()
        float_lstm.qconfig = mod.qconfig
        return DynamicQuantizedLSTM.from_float(float_lstm, use_precomputed_fake_quant=use_precomputed_fake_quant)


def dynamic_quant_mapping() -> dict:
    """torch's default dynamic-quantization module mapping plus ``fastmtl.nn.LSTM`` -> torch's dynamic quantized
    LSTM, for ``torch.ao.quantization.quantize_dynamic(model, {fastmtl.nn.LSTM, ...}, mapping=...)``.

    torch.ao.quantization matches modules by exact type, so without this mapping a fastmtl.nn.LSTM is left as it is
    (it then warns when it runs). The quantized module is torch's: it takes Tensors and PackedSequences, not
    ``lengths=``.
    """
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings
    mapping = dict(get_default_dynamic_quant_module_mappings())
    mapping[LSTM] = _DynamicQuantizedLSTMFromFastmtl
    return mapping
