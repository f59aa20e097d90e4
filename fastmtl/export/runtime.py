"""Runtime of a fastmtl export bundle: sentences in, labels out, with NumPy and ONNX Runtime only.

``fastmtl export CHECKPOINT DIR`` copies this file into the bundle as ``runtime.py``, next to ``model.onnx`` and
``meta.json``. It needs neither torch nor fastmtl::

    import runtime                      # with DIR on sys.path, or copy runtime.py next to your code
    model = runtime.load("DIR")
    [r] = model.predict(["show me flights from boston to denver"])
    r["intent"]["label"], r["intent"]["confidence"], r["slots"]["spans"]

``load(DIR).predict(sentences)`` returns what ``fastmtl.load(checkpoint).predict(sentences)`` returns (one dict per
sentence: ``"tokens"``; per sequence task ``{"label", "confidence", "probs"}``; per token task ``{"labels",
"confidences"}`` and ``"spans"`` for BIO/IOBES tag sets), with the same options (``batch_size``, ``top_k``,
``token_probs``); ``predict_labels`` the labels only, as ``fastmtl predict`` prints them. Run as a script,
``python runtime.py DIR "a sentence" ...`` (or sentences on stdin, one per line) prints JSON lines.

What it does, as fastmtl does it: words are normalised as the model's vocabulary was built (``str.lower`` and every
ASCII digit to ``0``, when the vocabulary says so) and looked up (unknown words get ``<unk>``); the characters of the
normalised words feed the character CNN; the ONNX model gives each task's log-probabilities (a CRF task: its emission
scores); token tasks are decoded by argmax, or by Viterbi over the allowed BIO/IOBES transitions (constrained
decoding), or by the CRF's Viterbi with its learned transitions, and their probabilities are the softmax, or the
marginals over the allowed tag sequences (a scaled forward-backward in float64). A bundle exported with ``--format
torchscript`` or ``pt2`` is run through torch instead of ONNX Runtime (then torch, and for pt2 or ``--lstm fastmtl``
also fastmtl, must be importable).
"""
import json
import os
import re
import sys

import numpy as np

__all__ = ["load", "Model", "Encoder", "viterbi", "marginals", "get_spans", "BUNDLE_FORMAT", "BUNDLE_VERSION"]

BUNDLE_FORMAT = "fastmtl-bundle"
BUNDLE_VERSION = 1
_DIGITS = re.compile(r"[0-9]")


def load(directory, batch_size=64, threads=None, providers=None):
    """The :class:`Model` of the bundle in ``directory``. ``threads``: ONNX Runtime's intra-op threads (default:
    its own choice); ``providers``: ONNX Runtime execution providers (default: the CPU)."""
    return Model(directory, batch_size=batch_size, threads=threads, providers=providers)


class Model:
    """A loaded bundle. Attributes: ``meta`` (meta.json), ``encoder`` (:class:`Encoder`), ``tasks`` ({name:
    "sequence" | "token"}), ``labels`` ({name: [label, ...]}), ``span_tasks``."""

    def __init__(self, directory, batch_size=64, threads=None, providers=None):
        directory = os.fspath(directory)
        path = os.path.join(directory, "meta.json")
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except OSError as e:
            raise ValueError("fastmtl runtime: cannot read %s: %s" % (path, e.strerror or e)) from None
        except ValueError as e:
            raise ValueError("fastmtl runtime: %s is not valid JSON (%s)" % (path, e)) from None
        if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
            raise ValueError("fastmtl runtime: %s is not the meta.json of a fastmtl bundle" % path)
        if not isinstance(meta.get("format_version"), int) or meta["format_version"] > BUNDLE_VERSION:
            raise ValueError("fastmtl runtime: %s is a bundle of version %r; this runtime reads versions up to %d"
                             % (path, meta.get("format_version"), BUNDLE_VERSION))
        self.meta = meta
        self.directory = directory
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.encoder = Encoder(meta["vocab"], meta.get("chars"))
        self._tasks = [_Task(t) for t in meta["tasks"]]
        fmt = meta.get("model_format", "onnx")
        name = meta.get("model_file")
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise ValueError("fastmtl runtime: %s: model_file must name a file in the bundle folder, got %r"
                             % (path, name))
        model_path = os.path.join(directory, name)
        if fmt == "onnx":
            self._engine = _OnnxEngine(model_path, threads, providers)
        elif fmt in ("torchscript", "pt2"):
            self._engine = _TorchEngine(model_path, fmt, threads)
        else:
            raise ValueError("fastmtl runtime: %s: unknown model_format %r" % (path, fmt))

    # -- what the model predicts -----------------------------------------------------------------------------
    @property
    def tasks(self):
        return {t.name: t.level for t in self._tasks}

    @property
    def labels(self):
        return {t.name: list(t.labels) for t in self._tasks}

    @property
    def span_tasks(self):
        return [t.name for t in self._tasks if t.spans]

    def __repr__(self):
        return "runtime.Model(%r, tasks=%r)" % (self.directory, self.tasks)

    # -- text -> inputs ----------------------------------------------------------------------------------------
    def normalize(self, word):
        """A word as the model's vocabulary writes it."""
        return self.encoder.normalize(word)

    def encode(self, sentences):
        """The model's inputs for a list of token lists (see :meth:`Encoder.encode`)."""
        return self.encoder.encode(sentences)

    def scores(self, sentences):
        """The model's raw outputs for a list of token lists: ``{"<task>.log_probs" | "<task>.emissions": array}``."""
        return self._engine.run(self.encode(sentences))

    # -- predict ---------------------------------------------------------------------------------------------
    def predict(self, sentences, batch_size=None, top_k=None, token_probs=False):
        """One result dict per sentence, as ``fastmtl.load(checkpoint).predict``."""
        if top_k is not None:
            top_k = _positive_int(top_k, "top_k")
        return self._run(sentences, batch_size, "predict", self._empty,
                         lambda s: self._predict_batch(s, top_k, token_probs))

    def predict_labels(self, sentences, batch_size=None):
        """The labels only: ``{"tokens": [...], task: label | [labels]}`` per sentence (``fastmtl predict``)."""
        return self._run(sentences, batch_size, "predict_labels", lambda t: {"tokens": list(t)}, self._labels_batch)

    def __call__(self, sentences, **kwargs):
        return self.predict(sentences, **kwargs)

    def _run(self, sentences, batch_size, what, empty, predict_batch):
        if isinstance(sentences, (str, bytes)):
            raise TypeError("fastmtl runtime: Model.%s takes a list of sentences, got a single %s; use "
                            "%s([sentence])[0]" % (what, type(sentences).__name__, what))
        batch_size = self.batch_size if batch_size is None else _positive_int(batch_size, "batch_size")
        tokens = [_tokens(s, i) for i, s in enumerate(sentences)]
        results = [None if t else empty(t) for t in tokens]
        keep = sorted((i for i, t in enumerate(tokens) if t), key=lambda i: len(tokens[i]))
        for b in range(0, len(keep), batch_size):
            idx = keep[b:b + batch_size]
            for i, r in zip(idx, predict_batch([tokens[i] for i in idx])):
                results[i] = r
        return results

    def _empty(self, tokens):
        r = {"tokens": list(tokens)}
        for t in self._tasks:
            if t.level == "sequence":
                r[t.name] = {"label": None, "confidence": None, "probs": {}}
            else:
                r[t.name] = {"labels": [], "confidences": []}
                if t.spans:
                    r[t.name]["spans"] = []
        return r

    def _labels_batch(self, sents):
        out = self.scores(sents)
        lengths = np.array([len(s) for s in sents])
        res = [{"tokens": list(s)} for s in sents]
        for t in self._tasks:
            pred = t.decode(out[t.output], lengths, probs=False)[0]
            for r, s in enumerate(sents):
                res[r][t.name] = t.labels[pred[r]] if t.level == "sequence" else \
                    [t.labels[c] for c in pred[r][:len(s)]]
        return res

    def _predict_batch(self, sents, top_k, token_probs):
        out = self.scores(sents)
        lengths = np.array([len(s) for s in sents])
        res = [{"tokens": list(s)} for s in sents]
        for t in self._tasks:
            pred, prob = t.decode(out[t.output], lengths, probs=True)
            itos = t.labels
            conf = np.take_along_axis(prob, np.maximum(pred, 0)[..., None], axis=-1)[..., 0].tolist()
            if t.level == "sequence":
                dists = _distributions(prob, itos, top_k)
                for r in range(len(sents)):
                    res[r][t.name] = {"label": itos[pred[r]], "confidence": conf[r], "probs": dists[r]}
                continue
            dists = _distributions(prob, itos, top_k) if token_probs else None
            pred = pred.tolist()
            for r, s in enumerate(sents):
                n = len(s)
                labels = [itos[c] for c in pred[r][:n]]
                item = {"labels": labels, "confidences": conf[r][:n]}
                if token_probs:
                    item["probs"] = dists[r][:n]
                if t.spans:
                    item["spans"] = _spans(s, labels, item["confidences"])
                res[r][t.name] = item
        return res


class Encoder:
    """Token lists -> the model's inputs, from meta.json's ``vocab`` and ``chars`` entries."""

    def __init__(self, vocab, chars=None):
        self._stoi = {w: i for i, w in enumerate(vocab["itos"])}
        self._unk = int(vocab["unk"])
        self._lower, self._digits = bool(vocab["lower"]), bool(vocab["digits"])
        self._char_stoi = None
        if chars:
            self._char_stoi = {c: i for i, c in enumerate(chars["itos"])}
            self._char_unk, self._max_word_len = int(chars["unk"]), int(chars["max_word_len"])

    def normalize(self, word):
        """A word as the model's vocabulary writes it."""
        if self._lower:
            word = word.lower()
        if self._digits:
            word = _DIGITS.sub("0", word)
        return word

    def encode(self, sentences):
        """``{"ids", "lengths"[, "chars"]}``, int64 arrays (0-padded), for a list of non-empty token lists."""
        norm = [[self.normalize(w) for w in s] for s in sentences]
        B = len(norm)
        T = max([1] + [len(s) for s in norm])
        ids = np.zeros((B, T), dtype=np.int64)
        get, unk = self._stoi.get, self._unk
        for b, s in enumerate(norm):
            ids[b, :len(s)] = [get(w, unk) for w in s]
        feeds = {"ids": ids, "lengths": np.array([len(s) for s in norm], dtype=np.int64)}
        if self._char_stoi is not None:
            cget, cunk, n = self._char_stoi.get, self._char_unk, self._max_word_len
            enc = [[[cget(c, cunk) for c in w[:n]] for w in s] for s in norm]
            L = max([1] + [len(w) for s in enc for w in s])
            chars = np.zeros((B, T, L), dtype=np.int64)
            for b, s in enumerate(enc):
                for t, w in enumerate(s):
                    chars[b, t, :len(w)] = w
            feeds["chars"] = chars
        return feeds


class _Task:
    """One task of meta.json and its decoding."""

    def __init__(self, d):
        self.name, self.level, self.labels = d["name"], d["level"], list(d["labels"])
        self.output, self.decoding, self.spans = d["output"], d["decoding"], bool(d.get("spans"))
        C = len(self.labels)
        if self.decoding in ("viterbi", "crf"):
            ninf = -np.inf
            crf = d.get("crf") or {}
            cons = d.get("constraints") or {}
            trans = np.array(crf.get("transitions", np.zeros((C, C))), dtype=np.float64).reshape(C, C)
            start = np.array(crf.get("start_transitions", np.zeros(C)), dtype=np.float64).reshape(C)
            end = np.array(crf.get("end_transitions", np.zeros(C)), dtype=np.float64).reshape(C)
            allowed = np.array(cons.get("allowed", np.ones((C, C))), dtype=bool).reshape(C, C)
            allowed_start = np.array(cons.get("start", np.ones(C)), dtype=bool).reshape(C)
            allowed_end = np.array(cons.get("end", np.ones(C)), dtype=bool).reshape(C)
            self.trans = np.where(allowed, trans, ninf)
            self.start = np.where(allowed_start, start, ninf)
            self.end = np.where(allowed_end, end, ninf)
        elif self.decoding != "argmax":
            raise ValueError("fastmtl runtime: task %r: unknown decoding %r" % (self.name, self.decoding))

    def decode(self, scores, lengths, probs=True):
        """``(labels, probabilities or None)`` of this task's (B, C) or (B, T, C) scores; labels are -1 and
        probabilities 0 at padded positions."""
        if self.decoding == "argmax":
            labels = scores.argmax(axis=-1)
            p = np.exp(scores.astype(np.float32)) if probs else None
            if self.level == "token":
                valid = np.arange(scores.shape[1])[None, :] < lengths[:, None]
                labels = np.where(valid, labels, -1)
                if probs:
                    p = p * valid[:, :, None]
            return labels, p
        s = scores.astype(np.float64)
        labels = viterbi(s, lengths, self.trans, self.start, self.end)
        return labels, (marginals(s, lengths, self.trans, self.start, self.end).astype(np.float32) if probs
                        else None)


# -- decoding (linear-chain: score of a path = start + sum of scores + sum of transitions + end; -inf = forbidden) --

def viterbi(scores, lengths, trans, start, end):
    """Best paths (B, T) int64, -1 at padding; ties go to the lowest tag index (the first maximum)."""
    B, T, C = scores.shape
    lengths = np.asarray(lengths)
    out = np.full((B, T), -1, dtype=np.int64)
    if B == 0 or T == 0:
        return out
    history = np.zeros((max(T - 1, 0), B, C), dtype=np.int64)
    trans_t = np.ascontiguousarray(trans.T)                                      # (to, from)
    with np.errstate(invalid="ignore"):
        score = start[None, :] + scores[:, 0]
        for t in range(1, T):
            cand = score[:, None, :] + trans_t[None, :, :]                     # (B, to, from): from contiguous
            idx = cand.argmax(axis=2)
            best = np.take_along_axis(cand, idx[:, :, None], axis=2)[:, :, 0] + scores[:, t]
            score = np.where((lengths > t)[:, None], best, score)
            history[t - 1] = idx
        last = (score + end[None, :]).argmax(axis=1)
    for b in range(B):
        n = int(lengths[b])
        tag = int(last[b])
        out[b, n - 1] = tag
        for t in range(n - 1, 0, -1):
            tag = int(history[t - 1, b, tag])
            out[b, t - 1] = tag
    return out


def _exp_shifted(x, axis=None):
    """exp(x - max(x)) (over ``axis``, or all of x): the factors of the scaled forward-backward; -inf gives 0."""
    m = np.max(x, axis=axis, keepdims=axis is not None)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.exp(x - m)


_SMALL_PRODUCT = 1 << 18  # m*n*k below which OpenBLAS (NumPy's usual BLAS) multiplies in the calling thread


def _matmul(x, a):
    """``x @ a`` in row blocks small enough for the BLAS to keep in the calling thread: these products are small,
    and waking a BLAS thread pool for each of them costs more than it saves (on a busy machine, a hundred times
    more)."""
    rows = max(1, _SMALL_PRODUCT // max(1, a.shape[0] * a.shape[1]))
    if x.shape[0] <= rows:
        return x @ a
    return np.concatenate([x[i:i + rows] @ a for i in range(0, x.shape[0], rows)], axis=0)


def marginals(scores, lengths, trans, start, end):
    """Per-token marginal probabilities (B, T, C) over the paths (forward-backward), 0 at padding and in a sentence
    that no allowed path fits. Scaled in probability space (each step normalised, the transitions a matrix product),
    in float64."""
    B, T, C = scores.shape
    lengths = np.asarray(lengths)
    out = np.zeros((B, T, C))
    if B == 0 or T == 0:
        return out
    A = _exp_shifted(trans)                   # (from, to); forbidden: 0
    AT = np.ascontiguousarray(A.T)
    E = _exp_shifted(scores, axis=2)          # (B, T, C)
    run = np.arange(T)[None, :] < lengths[:, None]
    alphas = np.empty((B, T, C))
    alpha = _exp_shifted(start)[None, :] * E[:, 0]
    alpha = alpha / np.maximum(alpha.sum(axis=1, keepdims=True), 1e-300)
    alphas[:, 0] = alpha
    for t in range(1, T):
        nxt = _matmul(alpha, A) * E[:, t]
        nxt = nxt / np.maximum(nxt.sum(axis=1, keepdims=True), 1e-300)
        alpha = np.where(run[:, t, None], nxt, alpha)
        alphas[:, t] = alpha
    fin = _exp_shifted(end)[None, :]
    beta = np.broadcast_to(fin, (B, C))
    out[:, T - 1] = alphas[:, T - 1] * beta
    for t in range(T - 2, -1, -1):
        nb = _matmul(E[:, t + 1] * beta, AT)
        nb = nb / np.maximum(nb.sum(axis=1, keepdims=True), 1e-300)
        beta = np.where(run[:, t + 1, None], nb, fin)
        out[:, t] = alphas[:, t] * beta
    z = out.sum(axis=2, keepdims=True)
    ok = run[:, :, None] & (z > 0)
    return np.where(ok, out / np.where(z > 0, z, 1.0), 0.0)


# -- results -----------------------------------------------------------------------------------------------------

def _distributions(p, itos, top_k):
    """``{label: probability}`` dicts, most probable first (ties: label order), of the last dimension of ``p``."""
    k = len(itos) if top_k is None else min(top_k, len(itos))
    order = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    vals = np.take_along_axis(p, order, axis=-1).tolist()
    order = order.tolist()

    def build(v, o):
        if o and isinstance(o[0], list):
            return [build(vv, oo) for vv, oo in zip(v, o)]
        return {itos[j]: x for x, j in zip(v, o)}

    return build(vals, order)


def _split(tag):
    if tag in ("O", "."):
        return tag, ""
    rest = tag[1:]
    if rest.startswith("-") or rest.startswith("_"):
        rest = rest[1:]
    return tag[0], rest


def get_spans(tags):
    """Chunks ``(type, start, end)`` (end inclusive) of a tag sequence, with conlleval's rules (as
    ``fastmtl.metrics.get_spans``)."""
    spans = []
    prev_tag, prev_type, start = "O", "", None
    for i, t in enumerate(list(tags) + ["O"]):
        tag, type_ = _split(t)
        end_chunk = (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
                     or (prev_tag not in ("O", ".") and prev_type != type_))
        if end_chunk and start is not None:
            spans.append((prev_type, start, i - 1))
            start = None
        if (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
                or (tag not in ("O", ".") and prev_type != type_)):
            start = i
        prev_tag, prev_type = tag, type_
    return spans


def _spans(tokens, labels, conf):
    return [{"type": typ, "start": a, "end": b + 1, "text": " ".join(tokens[a:b + 1]),
             "confidence": min(conf[a:b + 1])} for typ, a, b in get_spans(labels)]


def _positive_int(v, what):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError("fastmtl runtime: %s must be an integer >= 1, got %r" % (what, v))
    return v


def _tokens(sentence, i):
    if isinstance(sentence, str):
        return sentence.split()
    if isinstance(sentence, bytes):
        raise TypeError("fastmtl runtime: sentence %d is bytes; decode it to str first" % i)
    try:
        toks = list(sentence)
    except TypeError:
        raise TypeError("fastmtl runtime: sentence %d must be a string or a list of token strings, got %s"
                        % (i, type(sentence).__name__)) from None
    for w in toks:
        if not isinstance(w, str):
            raise TypeError("fastmtl runtime: sentence %d: tokens must be strings, got %r" % (i, w))
        if not w:
            raise ValueError("fastmtl runtime: sentence %d has an empty token" % i)
    return toks


# -- engines -------------------------------------------------------------------------------------------------------

class _OnnxEngine:
    def __init__(self, path, threads, providers):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = _positive_int(threads, "threads")
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        return dict(zip(self.outputs, self.session.run(self.outputs, {k: v for k, v in feeds.items()
                                                                       if k in self.inputs})))


class _TorchEngine:
    """A torchscript (``torch.jit.load``) or pt2 (``torch.export.load``) bundle, run through torch."""

    def __init__(self, path, fmt, threads):
        import torch

        if threads is not None:
            torch.set_num_threads(_positive_int(threads, "threads"))
        self.torch = torch
        if fmt == "torchscript":
            import warnings

            with warnings.catch_warnings():  # (torch 2.13 deprecates TorchScript)
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(path, map_location="cpu")
        else:
            import fastmtl  # noqa: F401  (the program calls fastmtl's ops)

            self.module = torch.export.load(path).module()

    def run(self, feeds):
        torch = self.torch
        args = [torch.from_numpy(feeds["ids"]), torch.from_numpy(feeds["lengths"])]
        if "chars" in feeds:
            args.append(torch.from_numpy(feeds["chars"]))
        with torch.no_grad():
            out = self.module(*args)
        return {k: v.numpy() for k, v in out.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python runtime.py BUNDLE_DIR [--labels] [SENTENCE ...]  (default: sentences on stdin, one "
              "per line)\nprints one JSON line per sentence (--labels: the labels only)")
        return 0 if argv else 2
    model = load(argv[0])
    labels_only = "--labels" in argv[1:]
    sents = [a for a in argv[1:] if a != "--labels"] or [line.rstrip("\n") for line in sys.stdin]
    res = model.predict_labels(sents) if labels_only else model.predict(sents)
    sys.stdout.write("".join(json.dumps(r) + "\n" for r in res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
