"""``fastmtl.MultiTaskLSTM``: word embeddings -> shared (Bi)LSTM (``fastmtl.nn.LSTM``) -> ``fastmtl.nn.MultiTaskHeads``."""
import contextlib
import copy
import os
from dataclasses import dataclass, field

import torch

from . import _torch_private as _priv
from .decoding import constrained_marginals, viterbi_decode
from .functional.dropout import dropout
from .functional.heads import POOLINGS, pool_hidden
from .nn import LSTM, MultiTaskHeads
from .nn.heads import CRFLinear
from .ops.tagger import tagger_forward  # the whole-model inference op (registers its fake kernel)
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
        pad_word = [0] * L
        # one tensor from nested lists (a tensor per word cost more than the model's forward at one sentence)
        rows = [[w + [0] * (L - len(w)) for w in s] + [pad_word] * (T - len(s)) for s in enc]
        return torch.tensor(rows, dtype=torch.long).reshape(len(enc), T, L)

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

    def scores(self, ids, lengths, chars=None, tasks=None):
        """``{task: scores}`` of the heads, at inference: the log-probabilities of each task ((B, C) for a sequence
        task, (B, T, C) for a token task, padded positions computed too), the emission scores of a CRF task: what
        the exported ONNX graph returns. Runs in eval mode under ``torch.no_grad()`` (restoring the training mode);
        on the CPU the whole model is one fused op (:mod:`fastmtl.ops.tagger`) where it can be."""
        names = self._wanted(tasks, "scores")
        crf = self._crf_tasks()
        kinds = {n: "logits" if n in crf else "log_probs" for n in names}
        with torch.no_grad():
            if self.training:
                with self._eval_mode():
                    return self._scores(ids, lengths, chars, names, kinds)
            return self._scores(ids, lengths, chars, names, kinds)

    def _crf_tasks(self):
        return {n for key, group in self.groups for n in group if self.heads[key].is_crf(n)}

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _wanted(self, tasks, what):
        names = self.task_names if tasks is None else list(tasks)
        unknown = [n for n in names if n not in self.task_names]
        if unknown:
            raise ValueError("fastmtl: MultiTaskLSTM.%s: unknown tasks %s (the model has %s)"
                             % (what, unknown, self.task_names))
        return names

    def _scores(self, ids, lengths, chars, names, kinds):
        """``{task: logits or log-probabilities}`` (``kinds[task]``: ``"logits"`` / ``"log_probs"``) of ``names``,
        through the fused op where :meth:`_fused_args` allows it, else through :meth:`encode` and the heads."""
        if not torch.jit.is_scripting():
            fused = self._fused_args(ids)  # (no dropout, whatever the submodules' modes: eval mode's result)
            if fused is not None:
                return self._fused_scores(fused, ids, lengths, chars, names, kinds)
            if any(m.training for m in self.modules()):
                with self._eval_mode():
                    hidden = self.encode(ids, lengths, chars)
            else:
                hidden = self.encode(ids, lengths, chars)
        else:
            hidden = self.encode(ids, lengths, chars)
        out = {}
        for key, group in self.groups:
            for kind in ("logits", "log_probs"):
                sel = [n for n in group if n in names and kinds[n] == kind]
                if sel:
                    out.update(self.heads[key].predict(hidden[key], lengths, tasks=sel, output=kind))
        return {n: out[n] for n in names}

    @torch.jit.unused
    def _fused_modules(self):
        """Every module the fused op stands in for (read from ``_modules``: attribute access on a module is slow at
        this scale); their identities key the cached plan."""
        mods = self._modules
        enc = mods["encoder"]
        out = [mods["embedding"], enc]
        cc = mods.get("char_cnn")
        if cc is not None:
            out += [cc, cc._modules["embedding"], cc._modules["conv"]]
        em = enc._modules
        out += list(em["layers"]._modules.values()) if "layers" in em else [em["lstm"]]
        for key, group in self.groups:
            heads = mods["heads"]._modules[key]
            out.append(heads)
            out += [heads._modules[n] for n in group]
        return tuple(out)

    @torch.jit.unused
    def _fused_plan(self, mods):
        """What the fused op needs that changes only with the modules (None where it does not apply): the LSTMs and
        their weight names, the layer each heads group reads, the character CNN."""
        emb, enc = mods[0], mods[1]
        if type(emb) is not torch.nn.Embedding or emb.max_norm is not None or type(enc) is not Encoder:
            return None
        cls = type(self)  # a subclass may compute the encoding its own way: the modules' path then
        if (cls.encode is not MultiTaskLSTM.encode or cls._embed is not MultiTaskLSTM._embed
                or cls._drop is not MultiTaskLSTM._drop):
            return None
        char = None
        if self.char_cnn is not None:
            cc, cemb, conv = mods[2:5]
            if (type(cc) is not CharCNN or type(cemb) is not torch.nn.Embedding or cemb.max_norm is not None
                    or type(conv) is not torch.nn.Conv1d or conv.padding_mode != "zeros" or conv.bias is None
                    or conv.stride != (1,) or conv.dilation != (1,) or conv.groups != 1
                    or conv.padding != (conv.kernel_size[0] // 2,)):
                return None
            char = (cemb, conv)
        lstms = list(enc.layers) if enc.layerwise else [enc.lstm]
        for m in lstms:
            if type(m) is not LSTM or m.proj_size != 0 or not m.batch_first:
                return None
            if m.bidirectional != lstms[0].bidirectional or m.bias != lstms[0].bias:
                return None
        if enc.layerwise:
            num_layers = len(lstms)
            layer_of = {key: int(key[5:]) - 1 for key, _ in self.groups}
        else:
            num_layers = lstms[0].num_layers
            layer_of = {key: num_layers - 1 for key, _ in self.groups}
        for key, group in self.groups:
            heads = self.heads[key]
            if type(heads) is not MultiTaskHeads:
                return None
            for n in group:  # plain (or CRF) linear heads with their own weight parameter (no parametrization)
                if type(heads[n]) not in (torch.nn.Linear, CRFLinear) or "weight" not in heads[n]._parameters:
                    return None
        lstm_params = [(m._parameters, list(m._flat_weights_names)) for m in lstms]
        return dict(char=char, lstm_params=lstm_params, num_layers=num_layers, bidir=lstms[0].bidirectional,
                    layer_of=layer_of, heads={})

    @torch.jit.unused
    def _fused_args(self, ids):
        """The fused op's plan and parameters, or None where it does not apply: it needs eval mode, no gradient,
        eager CPU execution without autocast, float32 or float64 parameters, hard sharing without token_context or
        hierarchical sharing, and the model's own modules without hooks or a forward replaced on an instance (the op
        calls none of them)."""
        if self.training or self.sharing == "soft" or self.token_context:
            return None
        if not isinstance(ids, torch.Tensor) or not ids.is_cpu or ids.dtype != torch.long or ids.dim() != 2:
            return None
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return None
        if torch.is_autocast_enabled("cpu") or _priv.global_forward_hooks():
            return None
        mods = self._fused_modules()
        # the plan holds the modules it was made for (so none of them can be freed and another one take its place)
        # and their types (a parametrization swaps the class of a module in place)
        cached = self.__dict__.get("_fused_cache")
        types = tuple(map(type, mods))
        if (cached is None or len(cached[0]) != len(mods) or cached[1] != types
                or not all(a is b for a, b in zip(cached[0], mods))):
            cached = (mods, types, self._fused_plan(mods))
            self.__dict__["_fused_cache"] = cached
        plan = cached[2]
        if plan is None:
            return None
        for m in mods:  # hooks, or a forward replaced on the instance: the module must run
            if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
                return None
        word = mods[0]._parameters["weight"]
        weights = [ps[n] for ps, names in plan["lstm_params"] for n in names]
        params = list(weights)
        char = None
        if plan["char"] is not None:
            cemb, conv = plan["char"]
            char = (cemb._parameters["weight"], conv._parameters["weight"], conv._parameters["bias"])
            params += char
        if word.dtype not in (torch.float32, torch.float64) or not word.is_cpu:
            return None
        if any(p is None or p.dtype != word.dtype or not p.is_cpu for p in params):
            return None
        if torch.is_grad_enabled() and (word.requires_grad or any(p.requires_grad for p in params)
                                        or any(p.requires_grad for m in mods for p in m._parameters.values()
                                               if p is not None)):
            return None
        return plan, word, char, weights

    @torch.jit.unused
    def _fused_scores(self, fused, ids, lengths, chars, names, kinds):
        plan, word, char, weights = fused
        B, T = ids.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long)
        elif not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.long or not lengths.is_cpu:
            lengths = torch.as_tensor(lengths).to(device="cpu", dtype=torch.long)
        if char is not None:
            if chars is None:
                chars = self.char_cnn.char_ids[ids]
            elif chars.dim() != 3 or tuple(chars.shape[:2]) != (B, T):
                raise ValueError("fastmtl: CharCNN: chars must be (B, T, L) = (%d, %d, L), got %s"
                                 % (B, T, tuple(chars.shape)))
            elif chars.dtype != torch.long or not chars.is_cpu:
                chars = chars.to(device="cpu", dtype=torch.long)
        else:
            chars = None
        # the heads' part of the plan, per task selection
        sel = (tuple(names), tuple(kinds[n] for n in names))
        heads_plan = plan["heads"].get(sel)
        if heads_plan is None:
            order, lins, layers, levels, pools, outs = [], [], [], [], [], []
            for key, group in self.groups:
                heads = self.heads[key]
                for n in group:
                    if n in names:
                        spec = heads.task_specs[n]
                        order.append(n)
                        lins.append(heads[n])
                        layers.append(plan["layer_of"][key])
                        levels.append(0 if spec.level == "sequence" else 1)
                        pools.append(POOLINGS.index(spec.pooling or "last") if spec.level == "sequence" else 0)
                        outs.append(1 if kinds[n] == "log_probs" else 0)
            heads_plan = plan["heads"][sel] = (order, lins, layers, levels, pools, outs)
        order, lins, layers, levels, pools, outs = heads_plan
        head_w, head_b = [], []
        for lin in lins:
            w, b = lin._parameters["weight"], lin._parameters.get("bias")
            if w.dtype != word.dtype or (b is not None and b.dtype != word.dtype):
                raise TypeError("fastmtl: MultiTaskLSTM: the heads' parameters have dtype %s, the embeddings %s"
                                % (w.dtype, word.dtype))
            head_w.append(w)
            head_b.append(b if b is not None else w.new_zeros(w.shape[:1]))
        res = tagger_forward(ids, lengths, chars, word, *(char or (None, None, None)), weights, plan["num_layers"],
                             plan["bidir"], head_w, head_b, layers, levels, pools, outs)
        got = dict(zip(order, res))
        return {n: got[n] for n in names}

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
        names = self._wanted(tasks, "predict")
        with torch.no_grad():
            if self.training:
                with self._eval_mode():
                    return self._predict(ids, lengths, chars, return_probs, list(dict.fromkeys(names)))
            return self._predict(ids, lengths, chars, return_probs, list(dict.fromkeys(names)))

    def _predict(self, ids, lengths, chars, return_probs, names):
        crf = self._crf_tasks()
        # CRF tasks decode their emission scores, constrained tasks the log-probabilities, the others the logits
        kinds = {n: "log_probs" if n in self.decode_constraints and n not in crf else "logits" for n in names}
        if lengths is not None and not isinstance(lengths, torch.Tensor):
            lengths = torch.as_tensor(lengths, dtype=torch.long, device=ids.device)
        scores = self._scores(ids, lengths, chars, names, kinds)
        B, T = ids.shape[0], ids.shape[1]
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=ids.device)
        preds, probs = {}, {}
        for key, group in self.groups:
            heads = self.heads[key]
            for n in group:
                if n not in names:
                    continue
                z = scores[n]
                cons = self.decode_constraints.get(n)
                if n in crf:  # Viterbi over the CRF (under the span constraints, if any); marginals as probabilities
                    preds[n] = heads.crf_predict(n, z, lengths, "labels", cons)
                    if return_probs:
                        probs[n] = heads.crf_predict(n, z, lengths, "probs", cons)
                elif cons is not None:
                    allowed, start, end = cons
                    preds[n] = viterbi_decode(z, lengths, allowed, start, end)
                    if return_probs:
                        probs[n] = constrained_marginals(z, lengths, allowed, start, end)
                else:
                    labels = z.argmax(-1)
                    if z.dim() == 3:
                        valid = torch.arange(T, device=z.device)[None] < lengths.to(z.device)[:, None]
                        labels = labels.masked_fill(~valid, -1)
                    preds[n] = labels
                    if return_probs:
                        p = z.log_softmax(-1).float().exp()
                        if p.dim() == 3:
                            p = p * valid.unsqueeze(2)
                        probs[n] = p
        return (preds, probs) if return_probs else preds
