r"""Encoders and parameter-sharing strategies for :class:`fastmtl.MultiTaskLSTM`.

* ``hard``: every task reads the top of one shared encoder (the default).
* ``hierarchical``: one shared encoder run layer by layer; each task reads the layer it is given
  (``task_layers={"slots": 1, "intent": 2}``, 1-based), as in Søgaard & Goldberg 2016.
* ``soft``: every task has its own encoder, and a shared encoder acts as their anchor; the loss gains
  :math:`\lambda \sum_t \|\theta_t - \theta_{shared}\|_2^2` over the encoder parameters (Duong et al. 2015), so the
  task encoders are pulled towards each other through the shared one (which learns only through this term and ends
  up near their mean). The word embeddings are shared in every strategy.
"""
import torch

from .functional.dropout import dropout
from .nn import LSTM

__all__ = ["Encoder", "soft_sharing_penalty", "SHARING"]

SHARING = ("hard", "soft", "hierarchical")


class Encoder(torch.nn.Module):
    """A (Bi)LSTM stack on padded batch-first input with ``lengths``.

    ``layerwise=False``: one :class:`fastmtl.nn.LSTM` with ``num_layers`` layers (dropout between layers inside).
    ``layerwise=True``: one single-layer LSTM per layer, so every layer's output is available (hierarchical tasks).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=True, dropout=0.0, layerwise=False):
        super().__init__()
        self.num_layers, self.layerwise, self.dropout = num_layers, layerwise, dropout
        self.output_size = hidden_size * (2 if bidirectional else 1)
        if layerwise:
            sizes = [input_size] + [self.output_size] * (num_layers - 1)
            self.layers = torch.nn.ModuleList(
                LSTM(s, hidden_size, 1, batch_first=True, bidirectional=bidirectional) for s in sizes)
        else:
            self.lstm = LSTM(input_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional,
                             dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, x, lengths):
        """Returns the list of layer outputs (only the top one unless ``layerwise``), each (B, T, output_size)."""
        if not self.layerwise:
            return [self.lstm(x, lengths=lengths)[0]]
        outs = []
        for i, layer in enumerate(self.layers):
            if i > 0 and self.dropout > 0:
                x = dropout(x, self.dropout, self.training)
            x = layer(x, lengths=lengths)[0]
            outs.append(x)
        return outs

    def last_layer_parameters(self):
        """The weights of the top layer (GradNorm's W)."""
        if self.layerwise:
            return list(self.layers[-1].parameters())
        k = self.num_layers - 1
        return [p for n, p in self.lstm.named_parameters()
                if n.endswith("_l%d" % k) or n.endswith("_l%d_reverse" % k)]


def soft_sharing_penalty(task_encoders, shared):
    r""":math:`\sum_t \|\theta_t - \theta_{shared}\|_2^2` summed over all parameters of the encoders."""
    shared_params = dict(shared.named_parameters())
    total = None
    for enc in task_encoders:
        for n, p in enc.named_parameters():
            d = (p - shared_params[n]).pow(2).sum()
            total = d if total is None else total + d
    return total if total is not None else torch.zeros(())
