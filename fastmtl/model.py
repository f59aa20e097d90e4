"""``fastmtl.MultiTaskLSTM``: word embeddings -> shared (Bi)LSTM (``fastmtl.nn.LSTM``) -> ``fastmtl.nn.MultiTaskHeads``."""
import copy
from dataclasses import dataclass, field

import torch

from .nn import MultiTaskHeads
from .sharing import SHARING, Encoder, soft_sharing_penalty

__all__ = ["MultiTaskLSTM", "ModelOutput"]


@dataclass
class ModelOutput:
    loss: torch.Tensor                          # the total training loss (weighted task losses + penalties)
    losses: dict = field(default_factory=dict)  # task name -> its (unweighted) mean loss
    penalty: torch.Tensor = None                # the soft-sharing penalty, when sharing="soft"


def _with_pooling(task, pooling):
    t = copy.copy(task)
    object.__setattr__(t, "pooling", pooling)
    return t


class MultiTaskLSTM(torch.nn.Module):
    """A multi-task (Bi)LSTM tagger/classifier.

    Args:
        vocab_size, embedding_dim: the word embedding table (index 0 is padding).
        hidden_size: LSTM hidden size per direction.
        tasks: ``fastmtl.nn.SequenceTask`` / ``fastmtl.nn.TokenTask`` objects. On a bidirectional encoder a sequence
            task with ``pooling="last"`` reads the forward direction's last real state and the backward direction's
            first (``"last_first"``), i.e. the final state of each direction.
        num_layers, bidirectional: the encoder.
        dropout: dropout on the embeddings, between LSTM layers and on the encoder output.
        sharing: ``"hard"`` (default), ``"soft"`` or ``"hierarchical"`` (see :mod:`fastmtl.sharing`).
        task_layers: for ``hierarchical``: ``{task: layer}`` (1-based; default: the top layer).
        soft_lambda: the soft-sharing penalty strength.
        pretrained: an optional (vocab_size, embedding_dim) tensor to initialise the embeddings.
        freeze_embeddings: keep the embeddings fixed.

    ``forward(ids, lengths, targets, weights=None)`` returns a :class:`ModelOutput`; ``predict(ids, lengths)`` a dict
    task -> predictions (padded token positions are -1). Padding is handled through ``lengths`` everywhere.
    """

    def __init__(self, vocab_size, embedding_dim, hidden_size, tasks, num_layers=1, bidirectional=True, dropout=0.3,
                 sharing="hard", task_layers=None, soft_lambda=1e-3, pretrained=None, freeze_embeddings=False,
                 padding_idx=0):
        super().__init__()
        if sharing not in SHARING:
            raise ValueError("fastmtl: MultiTaskLSTM: sharing must be one of %s, got %r" % (", ".join(SHARING), sharing))
        tasks = list(tasks)
        if not tasks:
            raise ValueError("fastmtl: MultiTaskLSTM: tasks must not be empty")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError("fastmtl: MultiTaskLSTM: duplicate task names %s" % names)
        if bidirectional:
            tasks = [_with_pooling(t, "last_first") if getattr(t, "pooling", None) == "last" else t for t in tasks]
        self.tasks = tasks
        self.task_names = names
        self.sharing, self.soft_lambda, self.dropout = sharing, soft_lambda, dropout
        self.config = dict(vocab_size=vocab_size, embedding_dim=embedding_dim, hidden_size=hidden_size,
                           num_layers=num_layers, bidirectional=bidirectional, dropout=dropout, sharing=sharing,
                           task_layers=dict(task_layers or {}), soft_lambda=soft_lambda)
        self.embedding = torch.nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
        if pretrained is not None:
            if tuple(pretrained.shape) != (vocab_size, embedding_dim):
                raise ValueError("fastmtl: MultiTaskLSTM: pretrained has shape %s, expected (%d, %d)"
                                 % (tuple(pretrained.shape), vocab_size, embedding_dim))
            with torch.no_grad():
                self.embedding.weight.copy_(pretrained)
        self.embedding.weight.requires_grad_(not freeze_embeddings)

        def enc(layerwise=False):
            return Encoder(embedding_dim, hidden_size, num_layers, bidirectional, dropout, layerwise)

        out = hidden_size * (2 if bidirectional else 1)
        self.groups = []  # (key, [task names]) : which encoder output each heads module reads
        if sharing == "hard":
            if task_layers:
                raise ValueError("fastmtl: MultiTaskLSTM: task_layers needs sharing='hierarchical'")
            self.encoder = enc()
            self.heads = torch.nn.ModuleDict({"top": MultiTaskHeads(out, tasks)})
            self.groups = [("top", names)]
        elif sharing == "hierarchical":
            task_layers = dict(task_layers or {})
            unknown = set(task_layers) - set(names)
            if unknown:
                raise ValueError("fastmtl: MultiTaskLSTM: task_layers names unknown tasks %s" % sorted(unknown))
            layer_of = {}
            for n in names:
                l = int(task_layers.get(n, num_layers))
                if not 1 <= l <= num_layers:
                    raise ValueError("fastmtl: MultiTaskLSTM: task %r reads layer %d, but the encoder has layers "
                                     "1..%d" % (n, l, num_layers))
                layer_of[n] = l
            self.encoder = enc(layerwise=True)
            self.heads = torch.nn.ModuleDict()
            for l in sorted(set(layer_of.values())):
                group = [t for t in tasks if layer_of[t.name] == l]
                self.heads["layer%d" % l] = MultiTaskHeads(out, group)
                self.groups.append(("layer%d" % l, [t.name for t in group]))
            self.layer_of = layer_of
        else:  # soft
            if task_layers:
                raise ValueError("fastmtl: MultiTaskLSTM: task_layers needs sharing='hierarchical'")
            self.encoder = enc()  # the shared anchor
            self.task_encoders = torch.nn.ModuleDict({n: enc() for n in names})
            with torch.no_grad():  # start every task encoder at the anchor
                for e in self.task_encoders.values():
                    e.load_state_dict(self.encoder.state_dict())
            self.heads = torch.nn.ModuleDict({n: MultiTaskHeads(out, [t]) for n, t in zip(names, tasks)})
            self.groups = [(n, [n]) for n in names]

    # -- encoder ---------------------------------------------------------------------------------------------
    def _embed(self, ids):
        x = self.embedding(ids)
        return torch.nn.functional.dropout(x, self.dropout, self.training)

    def _drop(self, h):
        return torch.nn.functional.dropout(h, self.dropout, self.training)

    def encode(self, ids, lengths):
        """Returns ``{group key: hidden (B, T, D)}`` for every heads module."""
        x = self._embed(ids)
        if self.sharing == "hard":
            return {"top": self._drop(self.encoder(x, lengths)[-1])}
        if self.sharing == "hierarchical":
            outs = self.encoder(x, lengths)
            return {key: self._drop(outs[int(key[5:]) - 1]) for key, _ in self.groups}
        return {n: self._drop(self.task_encoders[n](x, lengths)[-1]) for n in self.task_names}

    def shared_parameters(self):
        """The last shared layer's weights (GradNorm's W): the top encoder layer, or the embeddings for soft sharing."""
        if self.sharing == "soft":
            return [self.embedding.weight]
        return self.encoder.last_layer_parameters()

    def encoder_state_dict(self):
        """Embeddings and encoder(s): what transfer learning carries to a model with other tasks."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("heads.")}

    def load_encoder(self, state, freeze=False):
        """Loads :meth:`encoder_state_dict` (a dict or a checkpoint path); ``freeze`` stops their training."""
        if isinstance(state, str):
            ckpt = torch.load(state, map_location="cpu", weights_only=False)
            state = ckpt.get("model", ckpt)
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
        own = self.encoder_state_dict()
        missing = sorted(set(own) - set(state))
        bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or bad:
            raise ValueError("fastmtl: load_encoder: the checkpoint's encoder does not fit this model (missing: %s; "
                             "shape mismatch: %s)" % (missing[:5], bad[:5]))
        self.load_state_dict(state, strict=False)
        if freeze:
            for k, p in self.named_parameters():
                if not k.startswith("heads."):
                    p.requires_grad_(False)

    # -- forward / predict -----------------------------------------------------------------------------------
    def forward(self, ids, lengths, targets, weights=None):
        hidden = self.encode(ids, lengths)
        total, losses = None, {}
        for key, names in self.groups:
            tg = {n: targets[n] for n in names if n in targets}
            if not tg:
                continue
            w = None if weights is None else {n: weights[n] for n in names if n in weights}
            out = self.heads[key](hidden[key], lengths=lengths, targets=tg, weights=w)
            total = out.loss if total is None else total + out.loss
            losses.update(out.losses)
        if total is None:
            raise ValueError("fastmtl: MultiTaskLSTM: targets names none of the tasks %s" % self.task_names)
        penalty = None
        if self.sharing == "soft" and self.soft_lambda > 0:
            penalty = self.soft_lambda * soft_sharing_penalty(self.task_encoders.values(), self.encoder)
            total = total + penalty
        return ModelOutput(total, losses, penalty)

    @torch.no_grad()
    def predict(self, ids, lengths):
        hidden = self.encode(ids, lengths)
        preds = {}
        for key, _ in self.groups:
            preds.update(self.heads[key].predict(hidden[key], lengths))
        return preds
