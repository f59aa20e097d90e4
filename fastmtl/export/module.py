"""The inference module that every export format is made from: a trained :class:`fastmtl.MultiTaskLSTM` rewritten in
standard modules (``nn.Embedding``, ``nn.Conv1d``, ``nn.LSTM`` as the weights' holder, ``nn.Linear``) with a
TorchScript-typed forward.

``InferenceModule(ids, lengths, chars=None)`` returns ``{output name: scores}``, the outputs of the ONNX graph:
``"<task>.log_probs"`` ((B, C) for a sequence task, (B, T, C) for a token task) and, for a CRF task,
``"<task>.emissions"`` ((B, T, C)). Its ``predict`` method decodes them as :meth:`fastmtl.MultiTaskLSTM.predict`
does and returns ``{"<task>": labels, "<task>.probs": probabilities}`` (labels (B,) or (B, T) int64 with -1 at
padding; the softmax for plain tasks, the marginals over the allowed tag sequences for constrained and CRF tasks)
and the scores of ``forward`` as well.

The LSTM runs either through fastmtl's fused op (``lstm="fastmtl"``: ``torch.ops.fastmtl.lstm_layer_forward``, so the
extension must be loaded where the module runs) or through ``torch.nn.LSTM`` over packed sequences
(``lstm="torch"``: standard torch only); decoding likewise through fastmtl's CRF ops or a pure-torch Viterbi and
forward-backward. The ``"torch"`` module run eagerly is the model as plain PyTorch would run it, the baseline of
``python -m fastmtl.bench infer``.
"""
import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..functional.lstm import _lstm

__all__ = ["InferenceModule", "PredictModule", "from_model", "LSTM_BACKENDS", "POOLING_CODES", "KIND_ARGMAX",
           "KIND_CONSTRAINED", "KIND_CRF"]

LSTM_BACKENDS = ("torch", "fastmtl")
POOLING_CODES = {"last": 0, "first": 1, "mean": 2, "max": 3, "last_first": 4}
KIND_ARGMAX, KIND_CONSTRAINED, KIND_CRF = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------
# encoders: a stack of LSTM layers on time-major input whose lengths are sorted (non-increasing)

class TorchLSTM(nn.Module):
    """``torch.nn.LSTM`` (``num_layers`` layers) over a packed sequence; returns the top layer's output (T, B, D*H),
    zero past each sequence's length."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=True)
        out, _ = self.lstm(packed)
        y, _ = pad_packed_sequence(out, total_length=x.shape[0])
        return y


class FastmtlLSTM(nn.Module):
    """The same weights (held by an ``nn.LSTM``) through fastmtl's one LSTM driver (its fused op per layer)."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm
        self.num_layers = lstm.num_layers
        self.bidirectional = lstm.bidirectional

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        out, _ = _lstm(x, None, self.lstm._flat_weights, self.num_layers, self.bidirectional, False, 0.0, False,
                       lengths)
        return out


# ---------------------------------------------------------------------------------------------------------------
# decoders: Viterbi paths and marginals of (B, T, C) scores under transitions with -inf at forbidden entries

class TorchDecoder(nn.Module):
    """Viterbi and forward-backward in plain torch (a loop over time, vectorised over the batch and the tags)."""

    def decode(self, scores: Tensor, lengths: Tensor, trans: Tensor, start: Tensor, end: Tensor,
               allowed: Tensor, allowed_start: Tensor, allowed_end: Tensor) -> Tensor:
        ninf = float("-inf")
        trans = trans.masked_fill(~allowed, ninf)
        start = start.masked_fill(~allowed_start, ninf)
        end = end.masked_fill(~allowed_end, ninf)
        B, T = scores.shape[0], scores.shape[1]
        lengths = lengths.to(scores.device)
        score = start.unsqueeze(0) + scores[:, 0]
        history: List[Tensor] = []
        for t in range(1, T):
            best, idx = (score.unsqueeze(2) + trans.unsqueeze(0) + scores[:, t].unsqueeze(1)).max(dim=1)
            score = torch.where((lengths > t).unsqueeze(1), best, score)
            history.append(idx)
        last = (score + end.unsqueeze(0)).argmax(dim=1)
        out = torch.full([B, T], -1, dtype=torch.long, device=scores.device)
        tag = last
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                prev = history[t].gather(1, tag.clamp_min(0).unsqueeze(1)).squeeze(1)
            else:
                prev = last
            tag = torch.where(lengths - 1 == t, last, torch.where(lengths - 1 > t, prev, torch.full_like(prev, -1)))
            out[:, t] = tag
        return out

    def marginals(self, scores: Tensor, lengths: Tensor, trans: Tensor, start: Tensor, end: Tensor,
                  allowed: Tensor, allowed_start: Tensor, allowed_end: Tensor) -> Tensor:
        ninf = float("-inf")
        trans = trans.masked_fill(~allowed, ninf).unsqueeze(0)
        start = start.masked_fill(~allowed_start, ninf)
        end = end.masked_fill(~allowed_end, ninf).unsqueeze(0)
        B, T, C = scores.shape[0], scores.shape[1], scores.shape[2]
        lengths = lengths.to(scores.device)
        alpha = start.unsqueeze(0) + scores[:, 0]
        alphas: List[Tensor] = [alpha]
        for t in range(1, T):
            nxt = torch.logsumexp(alpha.unsqueeze(2) + trans, dim=1) + scores[:, t]
            alpha = torch.where((lengths > t).unsqueeze(1), nxt, alpha)
            alphas.append(alpha)
        log_z = torch.logsumexp(alpha + end, dim=1)
        beta = end.expand(B, C)
        betas: List[Tensor] = [beta]
        for t in range(T - 2, -1, -1):
            nb = torch.logsumexp(trans + (scores[:, t + 1] + beta).unsqueeze(1), dim=2)
            beta = torch.where((lengths > t + 1).unsqueeze(1), nb, end.expand(B, C))
            betas.append(beta)
        betas.reverse()
        m = torch.exp(torch.stack(alphas, 1) + torch.stack(betas, 1) - log_z.view(B, 1, 1))
        valid = (torch.arange(T, device=scores.device).unsqueeze(0) < lengths.unsqueeze(1)) & \
            torch.isfinite(log_z).unsqueeze(1)
        return torch.where(valid.unsqueeze(2), m, torch.zeros_like(m))


class FastmtlDecoder(nn.Module):
    """Viterbi and marginals through fastmtl's CRF ops (``torch.ops.fastmtl.crf_decode`` / ``crf_marginals``)."""

    def decode(self, scores: Tensor, lengths: Tensor, trans: Tensor, start: Tensor, end: Tensor,
               allowed: Tensor, allowed_start: Tensor, allowed_end: Tensor) -> Tensor:
        return torch.ops.fastmtl.crf_decode(scores, lengths, trans, start, end, allowed, allowed_start, allowed_end)

    def marginals(self, scores: Tensor, lengths: Tensor, trans: Tensor, start: Tensor, end: Tensor,
                  allowed: Tensor, allowed_start: Tensor, allowed_end: Tensor) -> Tensor:
        return torch.ops.fastmtl.crf_marginals(scores, lengths, trans, start, end, allowed, allowed_start,
                                               allowed_end)


# ---------------------------------------------------------------------------------------------------------------
# heads

class Head(nn.Module):
    """One task: pooling (sequence tasks), ``nn.Linear``, log-softmax (or the CRF's emission scores), decoding."""

    def __init__(self, name: str, level: str, linear: nn.Linear, group: int, pooling: str, kind: int,
                 decoder: nn.Module, constraints=None, crf=None):
        super().__init__()
        self.name = name
        self.output = name + (".emissions" if kind == KIND_CRF else ".log_probs")
        self.token = level == "token"
        self.group = group
        self.pooling = POOLING_CODES[pooling] if pooling is not None else 0
        self.kind = kind
        self.linear = linear
        self.decoder = decoder
        C = linear.out_features
        if constraints is None:
            allowed = torch.ones(C, C, dtype=torch.bool)
            allowed_start = torch.ones(C, dtype=torch.bool)
            allowed_end = torch.ones(C, dtype=torch.bool)
        else:
            allowed, allowed_start, allowed_end = (m.detach().to(torch.bool).cpu().clone() for m in constraints)
        if crf is None:
            trans, start, end = torch.zeros(C, C), torch.zeros(C), torch.zeros(C)
        else:
            trans, start, end = (p.detach().float().cpu().clone() for p in crf)
        self.register_buffer("transitions", trans)
        self.register_buffer("start_transitions", start)
        self.register_buffer("end_transitions", end)
        self.register_buffer("allowed", allowed)
        self.register_buffer("allowed_start", allowed_start)
        self.register_buffer("allowed_end", allowed_end)

    def forward(self, hidden: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        if self.token:
            x = hidden
        else:
            x = _pool(hidden, lengths, valid, self.pooling)
        z = self.linear(x)
        if self.kind == 2:  # KIND_CRF (TorchScript reads no module-level constants)
            return z
        return torch.log_softmax(z, dim=-1)

    def decode(self, scores: Tensor, lengths: Tensor, valid: Tensor) -> List[Tensor]:
        """``[labels, probabilities]`` of this head's scores."""
        if self.kind == 0:  # KIND_ARGMAX
            labels = scores.argmax(dim=-1)
            probs = scores.exp()
            if self.token:
                labels = torch.where(valid, labels, torch.full_like(labels, -1))
                probs = probs * valid.unsqueeze(2).to(probs.dtype)
            return [labels, probs]
        args = (self.transitions, self.start_transitions, self.end_transitions, self.allowed, self.allowed_start,
                self.allowed_end)
        s = scores.float()
        return [self.decoder.decode(s, lengths, *args), self.decoder.marginals(s, lengths, *args)]


def _pool(h: Tensor, lengths: Tensor, valid: Tensor, pooling: int) -> Tensor:
    B = h.shape[0]
    if pooling == 1:
        return h[:, 0]
    if pooling == 2:
        return (h * valid.unsqueeze(2).to(h.dtype)).sum(1) / lengths.unsqueeze(1).to(h.dtype)
    if pooling == 3:
        return h.masked_fill(~valid.unsqueeze(2), float("-inf")).amax(dim=1)
    last = h[torch.arange(B, device=h.device), lengths - 1]
    if pooling == 0:
        return last
    half = h.shape[2] // 2
    return torch.cat([last[:, :half], h[:, 0, half:]], dim=1)


# ---------------------------------------------------------------------------------------------------------------

class InferenceModule(nn.Module):
    """See the module docstring. Built by :func:`from_model`."""

    def __init__(self, embedding: nn.Embedding, char_embedding: Optional[nn.Embedding], char_conv: Optional[nn.Conv1d],
                 encoders: List[nn.Module], sources: List[int], contexts: List[bool], heads: List[Head]):
        super().__init__()
        self.embedding = embedding
        self.has_chars = char_embedding is not None
        self.char_embedding = char_embedding
        self.char_conv = char_conv
        self.encoders = nn.ModuleList(encoders)
        self.sources = list(sources)          # group -> index into the encoders' outputs (in encoder order)
        self.contexts = list(contexts)        # group -> whether the sentence vector is concatenated
        self.heads = nn.ModuleList(heads)
        self.outputs = [h.output for h in heads]
        self.tasks = [h.name for h in heads]

    def _chars(self, chars: Tensor) -> Tensor:
        """(B, T, L) character ids -> (B, T, F) features: embedding, Conv1d, ReLU, max over the real characters (a
        word without characters gets zeros; the ReLU makes the zeros of the padding harmless to the max)."""
        emb = self.char_embedding
        conv = self.char_conv
        assert emb is not None and conv is not None
        B, T, L = chars.shape[0], chars.shape[1], chars.shape[2]
        c = chars.reshape(B * T, L)
        x = emb(c).transpose(1, 2)
        h = torch.relu(conv(x)) * (c != 0).unsqueeze(1).to(x.dtype)
        return h.amax(dim=2).reshape(B, T, -1)

    def _scores(self, ids: Tensor, lengths: Tensor, chars: Optional[Tensor]):
        lengths = lengths.to(torch.long)
        B, T = ids.shape[0], ids.shape[1]
        x = self.embedding(ids)
        if self.has_chars:
            if chars is None:
                raise ValueError("fastmtl export: this model has a character CNN: chars (B, T, L) is required")
            x = torch.cat([x, self._chars(chars)], dim=2)
        valid = torch.arange(T, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        # the encoders run time-major on the batch sorted by length, once; their outputs are unsorted after
        order = torch.argsort(lengths, descending=True, stable=True)
        inv = torch.argsort(order)
        xs = x.index_select(0, order).transpose(0, 1)
        ls = lengths.index_select(0, order).cpu()
        outs: List[Tensor] = []
        for enc in self.encoders:
            for o in enc(xs, ls):
                outs.append(o.transpose(0, 1).index_select(0, inv))
        hidden: List[Tensor] = []
        for g in range(len(self.sources)):
            h = outs[self.sources[g]]
            if self.contexts[g]:
                ctx = h.masked_fill(~valid.unsqueeze(2), float("-inf")).amax(dim=1)
                h = torch.cat([h, ctx.unsqueeze(1).expand(-1, T, -1)], dim=2)
            hidden.append(h)
        res: Dict[str, Tensor] = {}
        for head in self.heads:
            res[head.output] = head(hidden[head.group], lengths, valid)
        return res, valid

    def forward(self, ids: Tensor, lengths: Tensor, chars: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``{"<task>.log_probs" | "<task>.emissions": scores}`` (the ONNX graph's outputs)."""
        return self._scores(ids, lengths, chars)[0]

    @torch.jit.export
    def predict(self, ids: Tensor, lengths: Tensor, chars: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``{"<task>": labels, "<task>.probs": probabilities}`` (see the module docstring), and the scores of
        :meth:`forward` under their names."""
        scores, valid = self._scores(ids, lengths, chars)
        lengths = lengths.to(torch.long)
        out: Dict[str, Tensor] = {}
        for k, v in scores.items():
            out[k] = v
        for head in self.heads:
            r = head.decode(scores[head.output], lengths, valid)
            out[head.name] = r[0]
            out[head.name + ".probs"] = r[1]
        return out


class PredictModule(nn.Module):
    """``forward`` = ``InferenceModule.predict`` (what ``torch.export`` exports for the pt2 format)."""

    def __init__(self, inner: InferenceModule):
        super().__init__()
        self.inner = inner

    def forward(self, ids: Tensor, lengths: Tensor, chars: Optional[Tensor] = None) -> Dict[str, Tensor]:
        return self.inner.predict(ids, lengths, chars)


# ---------------------------------------------------------------------------------------------------------------

def _torch_lstm(src_layers, bidirectional):
    """An ``nn.LSTM`` holding the layers ``src_layers`` (a list of ``(module, layer index)`` of fastmtl.nn.LSTM
    modules), in order."""
    first, k0 = src_layers[0]
    input_size = getattr(first, "weight_ih_l%d" % k0).shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = nn.LSTM(input_size, first.hidden_size, len(src_layers), bias=first.bias, bidirectional=bidirectional)
    with torch.no_grad():
        for i, (mod, k) in enumerate(src_layers):
            for suffix in ([""] + (["_reverse"] if bidirectional else [])):
                names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if mod.bias else [])
                for n in names:
                    getattr(out, "%s_l%d%s" % (n, i, suffix)).copy_(getattr(mod, "%s_l%d%s" % (n, k, suffix)))
    return out.eval()


def _stack_layers(encoder):
    """The layers of a :class:`fastmtl.sharing.Encoder` as ``(fastmtl.nn.LSTM, layer index)`` pairs."""
    if encoder.layerwise:
        return [(m, 0) for m in encoder.layers]
    return [(encoder.lstm, k) for k in range(encoder.lstm.num_layers)]


def from_model(model, tasks=None, lstm="torch"):
    """The :class:`InferenceModule` of a :class:`fastmtl.MultiTaskLSTM` (weights copied; eval mode).

    ``tasks``: the task names to keep, in this order (default: all); ``lstm``: ``"torch"`` or ``"fastmtl"``
    (see the module docstring). The model's ``decode_constraints`` (span constraints) are kept."""
    if lstm not in LSTM_BACKENDS:
        raise ValueError("fastmtl export: lstm must be one of %s, got %r" % (", ".join(LSTM_BACKENDS), lstm))
    from ..model import MultiTaskLSTM

    if not isinstance(model, MultiTaskLSTM):
        raise TypeError("fastmtl export: expected a fastmtl.MultiTaskLSTM, got %s" % type(model).__name__)
    names = list(model.task_names) if tasks is None else list(tasks)
    unknown = [n for n in names if n not in model.task_names]
    if unknown:
        raise ValueError("fastmtl export: unknown tasks %s (the model has %s)" % (unknown, model.task_names))
    wrap = TorchLSTM if lstm == "torch" else FastmtlLSTM
    decoder_cls = TorchDecoder if lstm == "torch" else FastmtlDecoder
    bidirectional = bool(model.config["bidirectional"])

    emb = nn.Embedding.from_pretrained(model.embedding.weight.detach().float().clone(), freeze=True)
    char_emb = char_conv = None
    if model.char_cnn is not None:
        cc = model.char_cnn
        char_emb = nn.Embedding.from_pretrained(cc.embedding.weight.detach().float().clone(), freeze=True)
        char_conv = nn.Conv1d(cc.conv.in_channels, cc.conv.out_channels, cc.conv.kernel_size[0],
                              padding=cc.conv.padding[0])
        char_conv.load_state_dict({k: v.detach().float() for k, v in cc.conv.state_dict().items()})

    # encoders (each returns one output) and the output each heads group reads
    encoders, sources, contexts = [], [], []
    if model.sharing == "hard":
        encoders.append(_Chain([wrap(_torch_lstm(_stack_layers(model.encoder), bidirectional))]))
        for key, _ in model.groups:
            sources.append(0)
            contexts.append(key == "context")
    elif model.sharing == "hierarchical":
        layers = _stack_layers(model.encoder)
        needed = sorted({int(key[5:]) for key, _ in model.groups})
        parts, done = [], 0
        for top in needed:  # one LSTM per run of layers up to the next layer that a group reads, chained
            parts.append(wrap(_torch_lstm(layers[done:top], bidirectional)))
            done = top
        encoders.append(_Chain(parts))
        for key, _ in model.groups:
            sources.append(needed.index(int(key[5:])))
            contexts.append(False)
    else:  # soft: one encoder per task
        for i, (key, _) in enumerate(model.groups):
            encoders.append(_Chain([wrap(_torch_lstm(_stack_layers(model.task_encoders[key]), bidirectional))]))
            sources.append(i)
            contexts.append(False)

    heads = []
    for g, (key, group_names) in enumerate(model.groups):
        mh = model.heads[key]
        for n in group_names:
            if n not in names:
                continue
            spec = mh.task_specs[n]
            lin_src = mh[n]
            lin = nn.Linear(lin_src.in_features, lin_src.out_features, bias=lin_src.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(lin_src.weight.detach())
                if lin_src.bias is not None:
                    lin.bias.copy_(lin_src.bias.detach())
            cons = model.decode_constraints.get(n)
            if mh.is_crf(n):
                kind, crf = KIND_CRF, lin_src.crf_params()
            else:
                kind, crf = (KIND_CONSTRAINED if cons is not None else KIND_ARGMAX), None
            pooling = (spec.pooling or "last") if spec.level == "sequence" else None
            heads.append((names.index(n), Head(n, spec.level, lin, g, pooling, kind, decoder_cls(), cons, crf)))
    heads = [h for _, h in sorted(heads, key=lambda x: x[0])]
    m = InferenceModule(emb, char_emb, char_conv, encoders, sources, contexts, heads)
    m.lstm_backend = lstm
    return m.requires_grad_(False).eval()


class _Chain(nn.Module):
    """LSTMs run one after the other, each on the previous one's output; returns every one's output (hierarchical
    sharing: the layers that the tasks read; otherwise one LSTM, the encoder)."""

    def __init__(self, parts):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor, lengths: Tensor) -> List[Tensor]:
        outs: List[Tensor] = []
        for p in self.parts:
            x = p(x, lengths)
            outs.append(x)
        return outs
