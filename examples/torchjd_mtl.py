"""Jacobian descent with TorchJD on a model built on fastmtl's LSTM: ``torchjd.autojac.mtl_backward`` computes the
Jacobian of the task losses with respect to the shared encoder (embeddings + BiLSTM), one row per task, and
``jac_to_grad`` aggregates it with UPGrad into the encoder's ``.grad``; each head gets its own task's gradient.

``fastmtl.nn.LSTM`` replaces ``torch.nn.LSTM`` as is: TorchJD differentiates the K losses at once with
``torch.vmap`` over K cotangents, which fastmtl's LSTM runs as one multi-cotangent backward per layer. The Jacobian
equals torch.nn.LSTM's (``tests/test_torchjd_example.py``); ``python -m fastmtl.bench torchjd`` times the step with
either LSTM.

    pip install "fastmtl[torchjd]"
    python examples/torchjd_mtl.py          # a few steps on random ATIS-sized batches
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastmtl


class JointModel(nn.Module):
    """Embeddings -> BiLSTM (``lstm``: fastmtl.nn.LSTM or torch.nn.LSTM) -> an intent head on the max-pooled states
    and a slot head on every state."""

    def __init__(self, vocab_size, embedding_dim, hidden_size, n_intents, n_slots, lstm=fastmtl.nn.LSTM):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = lstm(embedding_dim, hidden_size, batch_first=True, bidirectional=True)
        self.intent = nn.Linear(2 * hidden_size, n_intents)
        self.slots = nn.Linear(2 * hidden_size, n_slots)

    def shared_parameters(self):
        return list(self.embedding.parameters()) + list(self.lstm.parameters())

    def features(self, ids, lengths):
        x = pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(x)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return out

    def losses(self, features, lengths, intent, slots):
        T = features.shape[1]
        valid = torch.arange(T, device=features.device)[None, :] < lengths.to(features.device)[:, None]
        pooled = features.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        intent_loss = F.cross_entropy(self.intent(pooled), intent)
        slot_loss = F.cross_entropy(self.slots(features).flatten(0, 1), slots.masked_fill(~valid, -100).flatten(),
                                    ignore_index=-100)
        return [intent_loss, slot_loss]


def jacobian_step(model, optimizer, ids, lengths, intent, slots, aggregator=None):
    """One step of Jacobian descent; returns the task losses."""
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    optimizer.zero_grad(set_to_none=True)
    features = model.features(ids, lengths)
    losses = model.losses(features, lengths, intent, slots)
    mtl_backward(losses, features=features)  # heads: .grad; shared encoder: .jac (one row per task)
    jac_to_grad(model.shared_parameters(), aggregator if aggregator is not None else UPGrad())
    optimizer.step()
    return [float(l.detach()) for l in losses]


def random_batch(B, T, vocab_size, n_intents, n_slots, generator):
    lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=generator)
    lengths[0] = T
    ids = torch.randint(1, vocab_size, (B, T), generator=generator)
    ids[torch.arange(T)[None, :] >= lengths[:, None]] = 0
    return ids, lengths, torch.randint(0, n_intents, (B,), generator=generator), \
        torch.randint(0, n_slots, (B, T), generator=generator)


def main():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = JointModel(1000, 64, 128, 26, 130)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = random_batch(32, 24, 1000, 26, 130, g)
    for step in range(5):
        print("step %d: intent %.4f, slots %.4f" % (step, *jacobian_step(model, opt, *batch)))


if __name__ == "__main__":
    main()
