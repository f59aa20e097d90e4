"""``fastmtl.MultiTaskLSTM``: word embeddings -> shared (Bi)LSTM (``fastmtl.nn.LSTM``) -> ``fastmtl.nn.MultiTaskHeads``."""
import copy
import os
from dataclasses import dataclass, field

import torch

from .decoding import constrained_marginals, viterbi_decode
from .functional.dropout import dropout
from .functional.heads import pool_hidden
from .nn import MultiTaskHeads
from .sharing import SHARING, Encoder, soft_sharing_penalty

__all__ = ["MultiTaskLSTM", "ModelOutput", "CharCNN"]


class CharCNN(torch.nn.Module):
    """Character-level word features (Ma & Hovy 2016 style): char embeddings -> Conv1d -> ReLU -> max over the word.

    ``words``: the word vocabulary (index -> string); each word id's characters are kept in a buffer ``char_ids``
    (V, L) so ``forward(ids)`` maps (B, T) word ids to (B, T, filters) features. Ids whose string is a special
    token (``<pad>``, ``<unk>``, anything in ``<...>``) or empty get a zero feature vector; padding positions
    (no characters) never leak into the max. ``forward(ids, chars)`` takes the characters explicitly instead
    ((B, T, L) ids from :meth:`encode_words`, 0-padded), which gives words outside the vocabulary (``<unk>``)
    their real character features; index 1 is the unknown character.
    """

    def __init__(self, words, char_dim=32, filters=64, kernel_size=3, max_word_len=20):
        super().__init__()
        if char_dim < 1 or filters < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError("fastmtl: CharCNN: char_dim and filters must be >= 1 and kernel_size odd, got %r, %r, %r"
                             % (char_dim, filters, kernel_size))
        words = list(words)
        special = [w.startswith("<") and w.endswith(">") and len(w) > 2 for w in words]
        chars = sorted({c for w, sp in zip(words, special) if not sp for c in w})
        self.char_itos = ["<pad>", "<unk>"] + chars
        self.char_stoi = stoi = {c: i + 2 for i, c in enumerate(chars)}
        self.max_word_len = max_word_len
        L = max([1] + [min(len(w), max_word_len) for w, sp in zip(words, special) if not sp])
        table = torch.zeros(len(words), L, dtype=torch.long)
        for i, (w, sp) in enumerate(zip(words, special)):
            if not sp:
                cs = [stoi[c] for c in w[:max_word_len]]
                table[i, : len(cs)] = torch.tensor(cs, dtype=torch.long)
        self.register_buffer("char_ids", table, persistent=True)
        self.embedding = torch.nn.Embedding(len(self.char_itos), char_dim, padding_idx=0)
        self.conv = torch.nn.Conv1d(char_dim, filters, kernel_size, padding=kernel_size // 2)
        self.output_size = filters

    def encode_words(self, words):
        """Character ids (lists, at most ``max_word_len`` long) of word strings; unknown characters get 1."""
        get = self.char_stoi.get
        return [[get(c, 1) for c in w[: self.max_word_len]] for w in words]

    def chars_tensor(self, sentences):
        """(B, T, L) 0-padded character ids of a list of word-string lists."""
        enc = [self.encode_words(s) for s in sentences]
        T = max([1] + [len(s) for s in enc])
        L = max([1] + [len(w) for s in enc for w in s])
        out = torch.zeros(len(enc), T, L, dtype=torch.long)
        for b, s in enumerate(enc):
            for t, w in enumerate(s):
                if w:
                    out[b, t, : len(w)] = torch.tensor(w, dtype=torch.long)
        return out

    def forward(self, ids, chars=None):
        B, T = ids.shape
        if chars is not None:
            if chars.dim() != 3 or tuple(chars.shape[:2]) != (B, T):
                raise ValueError("fastmtl: CharCNN: chars must be (B, T, L) = (%d, %d, L), got %s"
                                 % (B, T, tuple(chars.shape)))
            c = chars.reshape(B * T, -1).to(ids.device)
        else:
            c = self.char_ids[ids.reshape(-1)]                   # (N, L)
        # The max over a word's real characters: the ReLU's outputs are >= 0, so zeroing the padded positions
        # leaves the max (and its gradient) as masking them out would, and a word without characters gets zeros.
        e = self.embedding(c)                                    # (N, L, C)
        pad = c == 0                                             # (N, L)
        if not torch.jit.is_scripting() and self._inference(e):
            h = self._conv_windows(e).relu_().masked_fill_(pad.unsqueeze(2), 0)   # (N, L, F)
            return h.amax(dim=1).reshape(B, T, -1)
        h = torch.relu(self.conv(e.transpose(1, 2))).masked_fill(pad.unsqueeze(1), 0)  # (N, F, L)
        return h.amax(dim=2).reshape(B, T, -1)

    @torch.jit.unused
    def _inference(self, e):
        """Whether the forward may take the inference path: nothing needs a gradient, eager CPU execution, and
        ``self.conv`` is still the plain zero-padded Conv1d without hooks (the path does not call it)."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        if e.device.type != "cpu" or torch.onnx.is_in_onnx_export():
            return False
        conv = self.conv
        if type(conv) is not torch.nn.Conv1d or conv.padding_mode != "zeros" or conv.bias is None:
            return False
        if conv._forward_hooks or conv._forward_pre_hooks:
            return False
        return not (torch.is_grad_enabled() and (e.requires_grad or self.conv.weight.requires_grad
                                                  or self.conv.bias.requires_grad))

    @torch.jit.unused
    def _conv_windows(self, e):
        """The Conv1d (zero padding, stride 1) on (N, L, C) as one GEMM over every position's window: (N, L, F).
        On the CPU at inference this is 2.5x (11 words) to 5x (640 words) faster than ``Conv1d``, which goes through
        oneDNN with a fixed cost per call."""
        N, L, C = e.shape
        k = self.conv.kernel_size[0]
        p = k // 2
        win = torch.nn.functional.pad(e, (0, 0, p, p)).unfold(1, k, 1)     # (N, L, C, k): windows
        win = win.transpose(2, 3).reshape(N * L, k * C)                    # position-major (k, C) windows
        w = self.conv.weight.permute(0, 2, 1).reshape(self.conv.out_channels, k * C)
        return torch.addmm(self.conv.bias, win, w.t()).view(N, L, -1)


def _masked_max(h, lengths):
    """The sentence vector of ``token_context``: the max over each sequence's real states."""
    return pool_hidden(h, lengths, "max")


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
        char_words, char_dim, char_filters, char_kernel: with ``char_words`` (the word vocabulary, index -> string)
            and ``char_dim > 0``, a :class:`CharCNN` feature (``char_filters`` wide) of each word is concatenated to
            its embedding (in plain PyTorch, before the fused LSTM).
        token_context: ``True``: token tasks also read the sentence vector (max over time of the encoder output),
            concatenated to every token's state (intent-conditioned slot tagging). Hard sharing only.

    ``forward(ids, lengths, targets, weights=None)`` returns a :class:`ModelOutput`; ``predict(ids, lengths)`` a dict
    task -> predictions (padded token positions are -1; eval mode, no grad; ``return_probs=True`` adds the
    probabilities). Padding is handled through ``lengths`` everywhere. For raw sentences use :func:`fastmtl.load`.
    """

    def __init__(self, vocab_size, embedding_dim, hidden_size, tasks, num_layers=1, bidirectional=True, dropout=0.3,
                 sharing="hard", task_layers=None, soft_lambda=1e-3, pretrained=None, freeze_embeddings=False,
                 padding_idx=0, char_words=None, char_dim=0, char_filters=64, char_kernel=3, token_context=False):
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
        self.decode_constraints = {}  # token task -> (allowed, start, end): constrained decoding in predict()
        self.sharing, self.soft_lambda, self.dropout = sharing, soft_lambda, dropout
        self.config = dict(vocab_size=vocab_size, embedding_dim=embedding_dim, hidden_size=hidden_size,
                           num_layers=num_layers, bidirectional=bidirectional, dropout=dropout, sharing=sharing,
                           task_layers=dict(task_layers or {}), soft_lambda=soft_lambda, char_dim=char_dim,
                           char_filters=char_filters, char_kernel=char_kernel, token_context=token_context)
        self.char_cnn = None
        if char_dim:
            if char_words is None or len(char_words) != vocab_size:
                raise ValueError("fastmtl: MultiTaskLSTM: char_dim > 0 needs char_words, the %d words of the vocabulary"
                                 " (got %s)" % (vocab_size, None if char_words is None else len(char_words)))
            self.char_cnn = CharCNN(char_words, char_dim, char_filters, char_kernel)
        input_size = embedding_dim + (self.char_cnn.output_size if self.char_cnn is not None else 0)
        self.token_context = bool(token_context)
        if token_context and sharing != "hard":
            raise ValueError("fastmtl: MultiTaskLSTM: token_context needs sharing='hard'")
        self.embedding = torch.nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
        if pretrained is not None:
            if tuple(pretrained.shape) != (vocab_size, embedding_dim):
                raise ValueError("fastmtl: MultiTaskLSTM: pretrained has shape %s, expected (%d, %d)"
                                 % (tuple(pretrained.shape), vocab_size, embedding_dim))
            with torch.no_grad():
                self.embedding.weight.copy_(pretrained)
        self.embedding.weight.requires_grad_(not freeze_embeddings)

        def enc(layerwise=False):
            return Encoder(input_size, hidden_size, num_layers, bidirectional, dropout, layerwise)

        out = hidden_size * (2 if bidirectional else 1)
        self.groups = []  # (key, [task names]) : which encoder output each heads module reads
        if sharing == "hard":
            if task_layers:
                raise ValueError("fastmtl: MultiTaskLSTM: task_layers needs sharing='hierarchical'")
            self.encoder = enc()
            seq = [t for t in tasks if t.level == "sequence"]
            tok = [t for t in tasks if t.level != "sequence"]
            if token_context and tok:
                self.heads = torch.nn.ModuleDict()
                if seq:
                    self.heads["top"] = MultiTaskHeads(out, seq)
                    self.groups.append(("top", [t.name for t in seq]))
                self.heads["context"] = MultiTaskHeads(2 * out, tok)
                self.groups.append(("context", [t.name for t in tok]))
            else:
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
    def _embed(self, ids, chars=None):
        x = self.embedding(ids)
        if self.char_cnn is not None:
            x = torch.cat([x, self.char_cnn(ids, chars).to(x.dtype)], dim=2)
        return dropout(x, self.dropout, self.training)

    def _drop(self, h):
        return dropout(h, self.dropout, self.training)

    def encode(self, ids, lengths, chars=None):
        """Returns ``{group key: hidden (B, T, D)}`` for every heads module. ``chars``: optional (B, T, L)
        character ids for the character CNN (default: the characters of each word id)."""
        x = self._embed(ids, chars)
        if self.sharing == "hard":
            h = self._drop(self.encoder(x, lengths)[-1])
            if not self.token_context:
                return {"top": h}
            ctx = _masked_max(h, lengths).unsqueeze(1).expand(-1, h.shape[1], -1)
            return {"top": h, "context": torch.cat([h, ctx], dim=2)}
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
        """Loads :meth:`encoder_state_dict` (a dict, or the path of a fastmtl checkpoint such as a ``best.pt``);
        ``freeze`` stops their training.

        A path is read with :func:`fastmtl.checkpoint.load_checkpoint_tree` (safetensors and JSON, checksummed; pickle
        files are refused, never unpickled); its ``"model"`` entry, or the whole tree if it has none, is the state."""
        if isinstance(state, (str, os.PathLike)):
            from .checkpoint import CheckpointError, load_checkpoint_tree

            path = os.fspath(state)
            ckpt = load_checkpoint_tree(path)
            state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in state.items()):
                raise CheckpointError("fastmtl: load_encoder: %s holds no model weights" % path)
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
    def forward(self, ids, lengths, targets, weights=None, chars=None):
        hidden = self.encode(ids, lengths, chars)
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

    def predict(self, ids, lengths, chars=None, return_probs=False, tasks=None):
        """``{task: predictions}``: sequence tasks (B,) labels, token tasks (B, T) labels with -1 at padding.
        Token tasks named in :attr:`decode_constraints` (``{task: (allowed, start, end)}`` from
        :func:`fastmtl.decoding.span_constraints`) get the best *allowed* tag sequence (Viterbi over the log-
        probabilities); the others the per-position argmax of the fused heads. CRF token tasks
        (``TokenTask(..., crf=True)``) get the CRF's Viterbi path, under the task's constraints if it has any.

        Runs in eval mode (no dropout) under ``torch.no_grad()`` and restores the module's previous training mode.
        ``tasks``: the task names to predict (default all). ``return_probs=True`` returns ``(predictions, probs)``,
        ``probs`` being ``{task: (B, C) or (B, T, C) float32 probabilities}`` (0 at padded token positions): the
        softmax of the head, and for constrained token tasks the per-token marginals over the allowed tag
        sequences (:func:`fastmtl.decoding.constrained_marginals`), for CRF tasks the CRF's per-token marginals
        (:func:`fastmtl.functional.crf_marginals`). The labels are the same as without it."""
        names = self.task_names if tasks is None else list(tasks)
        unknown = [n for n in names if n not in self.task_names]
        if unknown:
            raise ValueError("fastmtl: MultiTaskLSTM.predict: unknown tasks %s (the model has %s)"
                             % (unknown, self.task_names))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self._predict(ids, lengths, chars, return_probs, set(names))
        finally:
            self.train(was_training)

    def _predict(self, ids, lengths, chars, return_probs, wanted):
        hidden = self.encode(ids, lengths, chars)
        preds, probs = {}, {}
        for key, names in self.groups:
            names = [n for n in names if n in wanted]
            heads = self.heads[key]
            crf = [n for n in names if heads.is_crf(n)]
            if crf:  # Viterbi over the CRF (under the span constraints, if any); marginals as probabilities
                emissions = heads.predict(hidden[key], lengths, tasks=crf, output="logits")
                for n in crf:
                    cons = self.decode_constraints.get(n)
                    preds[n] = heads.crf_predict(n, emissions[n], lengths, "labels", cons)
                    if return_probs:
                        probs[n] = heads.crf_predict(n, emissions[n], lengths, "probs", cons)
            names = [n for n in names if n not in crf]
            constrained = [n for n in names if n in self.decode_constraints]
            free = [n for n in names if n not in self.decode_constraints]
            if free:
                preds.update(self.heads[key].predict(hidden[key], lengths, tasks=free))
                if return_probs:
                    lp = self.heads[key].predict(hidden[key], lengths, tasks=free, output="log_probs")
                    for n in free:
                        p = lp[n].float().exp()
                        if p.dim() == 3:
                            T = p.shape[1]
                            valid = torch.arange(T, device=p.device)[None] < lengths.to(p.device)[:, None]
                            p = p * valid.unsqueeze(2)
                        probs[n] = p
            if constrained:
                lp = self.heads[key].predict(hidden[key], lengths, tasks=constrained, output="log_probs")
                for n in constrained:
                    allowed, start, end = self.decode_constraints[n]
                    preds[n] = viterbi_decode(lp[n], lengths, allowed, start, end)
                    if return_probs:
                        probs[n] = constrained_marginals(lp[n], lengths, allowed, start, end)
        return (preds, probs) if return_probs else preds
