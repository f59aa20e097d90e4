"""``torch.ops.fastmtl.tagger_forward``: a whole MultiTaskLSTM's inference in one CPU op (csrc/cpu/tagger.cpp).

Word embeddings and the character CNN, the LSTM layers and every head's scores (logits or log-probabilities) from
prepared tensors. It is what :meth:`fastmtl.MultiTaskLSTM.scores` and ``predict`` run on the CPU at inference
(no gradient, eval mode, hard or hierarchical sharing); anything else takes the modules' own path, which is also
its reference in the tests. The op has no gradient: with grad mode on, an input that requires one is an error at the
call (its autograd kernel is C++, csrc/cpu/tagger.cpp, so an inference call pays no Python autograd layer).
"""
import torch

__all__ = ["tagger_forward"]

# tagger_forward(ids, lengths, chars, word_weight, char_weight, conv_weight, conv_bias, lstm_weights, num_layers,
# bidirectional, head_weights, head_biases, head_layers, levels, poolings, outputs) -> list of K tensors:
# ``ids`` (B, T) int64 word ids, ``lengths`` (B,) int64 in [1, T], ``chars`` (B, T, L) int64 character ids
# (0 = padding) or None, ``word_weight`` (V, E), the character CNN's ``char_weight`` (V_c, C), ``conv_weight``
# (F, C, k) (odd k, zero padding k // 2) and ``conv_bias`` (F,) or all None, ``lstm_weights`` as
# ``torch.nn.LSTM``'s ``_flat_weights`` (W_ih, W_hh[, b_ih, b_hh] per layer and direction), and per head: weight
# (C, D*H), bias (C,), the 0-based layer it reads, level (0 sequence, 1 token), pooling of a sequence head (0 last,
# 1 first, 2 mean, 3 max, 4 last_first) and output (0 scores, 1 log-probabilities). Returns the K heads' (B, C) or
# (B, T, C) outputs.
tagger_forward = torch.ops.fastmtl.tagger_forward


@torch.library.register_fake("fastmtl::tagger_forward")
def _tagger_forward_fake(ids, lengths, chars, word_weight, char_weight, conv_weight, conv_bias, lstm_weights,
                         num_layers, bidirectional, head_weights, head_biases, head_layers, levels, poolings,
                         outputs):
    B, T = ids.shape
    return [word_weight.new_empty((B, T, w.shape[0]) if lv == 1 else (B, w.shape[0]))
            for w, lv in zip(head_weights, levels)]
