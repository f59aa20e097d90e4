"""``fastmtl.nn.LSTM``: a drop-in replacement for ``torch.nn.LSTM`` running the fused fastmtl kernels.

It is built by ``torch.nn.RNNBase`` in ``"LSTM"`` mode exactly as ``torch.nn.LSTM`` is (same constructor, parameter
names, shapes, gate order, initialisation and state_dict; it subclasses RNNBase rather than torch.nn.LSTM because
torch.compile refuses to trace torch.nn.LSTM instances), so weights move freely between the two with ``load_state_dict``. ``forward`` takes what
torch.nn.LSTM takes (a batched or unbatched Tensor, or a PackedSequence, and optional ``(h_0, c_0)``) and returns the
same types and shapes; padded input may also come with ``lengths=`` (the fast path: no packing at all).

``proj_size > 0`` is not implemented and raises NotImplementedError at construction.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ..functional.lstm import lstm as _lstm

__all__ = ["LSTM"]


class LSTM(torch.nn.RNNBase):
    """Drop-in ``torch.nn.LSTM`` backed by fastmtl's fused kernels.

    Extra keyword of ``forward``: ``lengths`` (1-D integer tensor or list, one entry per sequence, in [1, T]) for
    padded input: output positions past a sequence's length are zero and ``(h_n, c_n)`` are the states at its
    last real token, exactly as torch.nn.LSTM over ``pack_padded_sequence`` (the reverse direction starts at the
    last real token), without building a PackedSequence.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        if proj_size:
            raise NotImplementedError(
                "fastmtl.nn.LSTM does not implement proj_size > 0 (got proj_size=%r); use torch.nn.LSTM for "
                "projected LSTMs" % (proj_size,))
        super().__init__("LSTM", input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, proj_size=0, device=device, dtype=dtype)

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[Tuple[Tensor, Tensor]] = None,
                lengths: Optional[Union[Tensor, Sequence[int]]] = None):
        if self.proj_size:  # set after construction
            raise NotImplementedError("fastmtl.nn.LSTM does not implement proj_size > 0")
        D = 2 if self.bidirectional else 1
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("fastmtl.nn.LSTM: lengths= is for padded input; a PackedSequence carries its own")
            return self._forward_packed(input, hx)
        if not isinstance(input, Tensor):
            raise TypeError("fastmtl.nn.LSTM: input must be a Tensor or a PackedSequence, got %s"
                            % type(input).__name__)
        if input.dim() not in (2, 3):
            raise ValueError("fastmtl.nn.LSTM: input must be 2-D (unbatched: T, input_size) or 3-D (batched), "
                             "got shape %s" % (tuple(input.shape),))
        batched = input.dim() == 3
        if not batched:
            if hx is not None:
                self._check_hx_pair(hx)
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise ValueError("fastmtl.nn.LSTM: for unbatched 2-D input, h_0 and c_0 must be 2-D "
                                     "(num_layers * num_directions, hidden_size), got shapes %s and %s"
                                     % (tuple(hx[0].shape), tuple(hx[1].shape)))
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            if lengths is not None:
                lengths = torch.as_tensor(lengths).reshape(1)
            input = input.unsqueeze(0 if self.batch_first else 1)
        elif hx is not None:
            self._check_hx_pair(hx)
            if hx[0].dim() != 3 or hx[1].dim() != 3:
                raise ValueError("fastmtl.nn.LSTM: for batched 3-D input, h_0 and c_0 must be 3-D "
                                 "(num_layers * num_directions, batch, hidden_size), got shapes %s and %s"
                                 % (tuple(hx[0].shape), tuple(hx[1].shape)))
        output, (h_n, c_n) = _lstm(input, hx, self._flat_weights, self.num_layers, self.bidirectional,
                                   self.batch_first, self.dropout, self.training, lengths)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    @staticmethod
    def _check_hx_pair(hx):
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(t, Tensor) for t in hx)):
            raise TypeError("fastmtl.nn.LSTM: hx must be a tuple of two Tensors (h_0, c_0)")

    def _forward_packed(self, input: PackedSequence, hx):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        T = batch_sizes.numel()
        # Padded, time-major, in the PackedSequence's (sorted, non-increasing lengths) order.
        padded, lengths = torch._VF._pad_packed_sequence(data, batch_sizes, False, 0.0, T)
        if hx is not None:
            self._check_hx_pair(hx)
            h0, c0 = hx
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices.to(h0.device))
                c0 = c0.index_select(1, sorted_indices.to(c0.device))
            hx = (h0, c0)
        out, (h_n, c_n) = _lstm(padded, hx, self._flat_weights, self.num_layers, self.bidirectional, False,
                                self.dropout, self.training, lengths)
        out_data, out_batch_sizes = torch._VF._pack_padded_sequence(out, lengths, False)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices.to(h_n.device))
            c_n = c_n.index_select(1, unsorted_indices.to(c_n.device))
        return PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
