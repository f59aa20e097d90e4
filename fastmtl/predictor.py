"""Predictions for raw sentences from a trained checkpoint: :func:`load` and :class:`Predictor`.

::

    import fastmtl

    predictor = fastmtl.load("runs/atis/best.pt")          # device="cpu" by default
    [r] = predictor.predict(["show me flights from boston to denver"])
    r["intent"]["label"], r["intent"]["confidence"]           # 'atis_flight', 0.98
    r["slots"]["spans"]     # [{'type': 'fromloc.city_name', 'start': 4, 'end': 5, 'text': 'boston', ...}, ...]

Results are plain dicts, lists, strings, floats and ints (``json.dumps`` takes them as they are), one per sentence:

* ``"tokens"``: the words of the sentence (a string is split on whitespace, a list is taken as the words);
* one entry per **sequence task**: ``{"label", "confidence", "probs"}``: the predicted label, its probability, and
  the distribution ``{label: probability}`` in decreasing order of probability (every label, or the ``top_k`` best);
* one entry per **token task**: ``{"labels", "confidences"}``, one label and its probability per token (with
  ``token_probs=True`` also ``"probs"``, one ``{label: probability}`` dict per token, ``top_k`` best), and for a
  span tag set (BIO/IOB2/IOBES tags, :func:`fastmtl.metrics.is_span_tagset`) ``"spans"``: ``{"type", "start",
  "end", "text", "confidence"}`` with ``end`` exclusive (``tokens[start:end]`` are the span's words, ``text`` them
  joined by spaces) and ``confidence`` the **minimum** of the span's tokens' probabilities (a span is as sure as its
  least sure word).

Token probabilities: for a task that the model decodes under span constraints (``--constrained-decoding``, the
default for BIO/IOBES tag sets) the labels are the best valid tag sequence (Viterbi) and each token's probability is
its marginal over the valid tag sequences (:func:`fastmtl.decoding.constrained_marginals`), so ``I-X`` after ``O``
has probability 0 and the spans are the decoded ones; for the other token tasks it is the head's softmax. Spans are
read from the labels with conlleval's rules (:func:`fastmtl.metrics.get_spans`), the ones the metrics count.

An empty sentence (``""``, only whitespace, or ``[]``) gets ``"tokens": []``, ``{"label": None, "confidence": None,
"probs": {}}`` for sequence tasks and empty lists for token tasks. Checkpoints are read with
:func:`fastmtl.train.load_checkpoint` (safetensors and JSON; pickle files are refused, never unpickled).
"""
import torch

from .data.batching import bucket_batches

__all__ = ["load", "Predictor"]


def load(path, device="cpu", batch_size=64):
    """A :class:`Predictor` for the checkpoint at ``path`` (a ``best.pt`` written by ``fastmtl train``) on
    ``device``. Raises ``fastmtl.checkpoint.CheckpointError`` (a ``ValueError``) naming the file for a missing,
    corrupted or foreign file and for pickles, which are never unpickled."""
    from .train import check_device, load_checkpoint

    device = check_device(str(device))  # a one-line error for cuda without CUDA
    model, vocab, label_vocabs, specs, _ = load_checkpoint(path, device)
    return Predictor(model, vocab, label_vocabs, specs, device=device, batch_size=batch_size)


def _is_span_tagset(labels):
    from .metrics import is_span_tagset

    return is_span_tagset(labels)


class Predictor:
    """Predicts every task of a trained :class:`fastmtl.MultiTaskLSTM` for raw sentences.

    Made by :func:`load`, or from the parts that :func:`fastmtl.train.load_checkpoint` returns:
    ``Predictor(model, vocab, label_vocabs, specs, device="cpu", batch_size=64)``.

    Attributes: ``model``, ``vocab``, ``label_vocabs``, ``specs`` (the tasks' ``TaskSpec``), ``device``,
    ``batch_size``. Properties: :attr:`tasks`, :attr:`labels`, :attr:`span_tasks`.
    """

    def __init__(self, model, vocab, label_vocabs, specs, device="cpu", batch_size=64):
        self.model = model
        self.vocab = vocab
        self.label_vocabs = dict(label_vocabs)
        self.specs = list(specs)
        self.device = torch.device(device)
        self.batch_size = _positive_int(batch_size, "batch_size")
        missing = [s.name for s in self.specs if s.name not in self.label_vocabs or s.name not in model.task_names]
        if missing:
            raise ValueError("fastmtl: Predictor: tasks %s have no label vocabulary or no head in the model" % missing)
        if "tokens" in [s.name for s in self.specs]:
            raise ValueError("fastmtl: Predictor: a task may not be named 'tokens' (the key of the words in results)")
        self._span = {s.name for s in self.specs
                      if s.level == "token" and _is_span_tagset(self.label_vocabs[s.name].itos)}
        self.model.to(self.device)

    # -- what the model predicts -----------------------------------------------------------------------------
    @property
    def tasks(self):
        """``{task name: "sequence" | "token"}``, in the model's order."""
        return {s.name: s.level for s in self.specs}

    @property
    def labels(self):
        """``{task name: [label, ...]}``: every label each task can predict (a copy)."""
        return {s.name: list(self.label_vocabs[s.name].itos) for s in self.specs}

    @property
    def span_tasks(self):
        """Names of the token tasks whose tags form a span tag set (their results have ``"spans"``)."""
        return [s.name for s in self.specs if s.name in self._span]

    def __repr__(self):
        return "Predictor(tasks=%r, device=%r)" % (self.tasks, str(self.device))

    # -- predict ---------------------------------------------------------------------------------------------
    def predict(self, sentences, batch_size=None, top_k=None, token_probs=False):
        """One result dict per sentence (see the module docstring), in the order given.

        ``sentences``: a list (or any iterable) of strings (split on whitespace) or of token lists. A single string
        is refused (``TypeError``): pass ``[sentence]``. ``batch_size``: sentences per forward pass (default: the
        predictor's); they are grouped by length, which changes no result. ``top_k``: keep only the ``k`` most
        probable labels in every ``"probs"`` (default: all). ``token_probs``: add each token's distribution."""
        if top_k is not None:
            top_k = _positive_int(top_k, "top_k")
        return self._run(sentences, batch_size, "predict", self._empty, True,
                         lambda sents, out: self._details(sents, *out, top_k, token_probs))

    def predict_labels(self, sentences, batch_size=None):
        """The labels only, one dict per sentence: ``{"tokens": [...], task: label}`` for a sequence task and
        ``task: [label per token]`` for a token task (what ``fastmtl predict`` prints without ``--details``; the
        same labels as :meth:`predict`). An empty sentence gets ``{"tokens": []}``."""
        return self._run(sentences, batch_size, "predict_labels", lambda t: {"tokens": list(t)}, False,
                         lambda sents, preds: label_rows([{"tokens": list(t)} for t in sents], self.specs,
                                                         self.label_vocabs, sents, preds))

    def __call__(self, sentences, **kwargs):
        return self.predict(sentences, **kwargs)

    def _run(self, sentences, batch_size, what, empty, return_probs, results_of):
        if isinstance(sentences, (str, bytes)):
            raise TypeError("fastmtl: Predictor.%s takes a list of sentences, got a single %s; use "
                            "%s([sentence])[0]" % (what, type(sentences).__name__, what))
        batch_size = self.batch_size if batch_size is None else _positive_int(batch_size, "batch_size")
        tokens = [_tokens(s, i) for i, s in enumerate(sentences)]
        results = [empty(t) for t in tokens]
        keep = [i for i, t in enumerate(tokens) if t]
        for idx, sents, out in predict_batches(self.model, self.vocab, tokens, self.device, batch_size,
                                               tasks=[s.name for s in self.specs], return_probs=return_probs,
                                               indices=keep):
            for i, r in zip(idx, results_of(sents, out)):
                results[i] = r
        return results

    def _empty(self, tokens):
        r = {"tokens": list(tokens)}
        for s in self.specs:
            if s.level == "sequence":
                r[s.name] = {"label": None, "confidence": None, "probs": {}}
            else:
                r[s.name] = {"labels": [], "confidences": []}
                if s.name in self._span:
                    r[s.name]["spans"] = []
        return r

    def _details(self, sents, preds, probs, top_k, token_probs):
        out = [{"tokens": list(t)} for t in sents]
        for s in self.specs:
            itos = self.label_vocabs[s.name].itos
            pred_t = preds[s.name].cpu()
            prob_t = probs[s.name].cpu().float()
            pred = pred_t.tolist()
            # every tensor read once, as lists: per-element tensor indexing costs microseconds each
            conf = prob_t.gather(-1, pred_t.clamp_min(0).unsqueeze(-1)).squeeze(-1).tolist()
            if s.level == "sequence":
                dists = _distributions(prob_t, itos, top_k)
                for r in range(len(sents)):
                    out[r][s.name] = {"label": itos[pred[r]], "confidence": conf[r], "probs": dists[r]}
                continue
            dists = _distributions(prob_t, itos, top_k) if token_probs else None
            for r, t in enumerate(sents):
                n = len(t)
                labels = [itos[c] for c in pred[r][:n]]
                res = {"labels": labels, "confidences": conf[r][:n]}
                if token_probs:
                    res["probs"] = dists[r][:n]
                if s.name in self._span:
                    res["spans"] = _spans(t, labels, res["confidences"])
                out[r][s.name] = res
        return out


# -- the prediction loop (the Predictor's, and evaluation's: fastmtl.training.evaluation.predict_examples) ---------
def predict_batches(model, vocab, sentences, device, batch_size, tasks=None, return_probs=False, indices=None):
    """Runs ``model.predict`` (which decodes CRF and span-constrained tasks) over ``sentences`` (lists of words), the
    ones at ``indices`` (default all), in batches of ``batch_size`` sorted by length (stable; short batches pad
    little). Yields ``(indices of the batch, its sentences, model.predict's result)`` per batch."""
    order = range(len(sentences)) if indices is None else indices
    for batch in bucket_batches([len(sentences[i]) for i in order], batch_size, shuffle=False):
        idx = [order[j] for j in batch]
        sents = [sentences[i] for i in idx]
        yield idx, sents, _forward(model, vocab, sents, device, tasks, return_probs)


def _forward(model, vocab, sents, device, tasks, return_probs):
    lengths = [len(t) for t in sents]
    T = max(lengths)
    ids = torch.tensor([vocab.encode(t) + [0] * (T - n) for t, n in zip(sents, lengths)], dtype=torch.long)
    chars = None
    if getattr(model, "char_cnn", None) is not None:  # the real characters, also of out-of-vocabulary words
        chars = model.char_cnn.chars_tensor([[vocab.normalize(w) for w in t] for t in sents]).to(device)
    return model.predict(ids.to(device), torch.tensor(lengths, dtype=torch.long).to(device), chars=chars,
                         return_probs=return_probs, tasks=tasks)


def label_rows(rows, specs, label_vocabs, sents, preds):
    """Writes each task's predicted label strings into ``rows`` (one dict per sentence of ``sents``): a label for a
    sequence task, one per word for a token task; returns ``rows``."""
    for s in specs:
        itos = label_vocabs[s.name].itos
        pred = preds[s.name].tolist()
        if s.level == "sequence":
            for row, c in zip(rows, pred):
                row[s.name] = itos[c]
        else:
            for row, t, cs in zip(rows, sents, pred):
                row[s.name] = [itos[c] for c in cs[:len(t)]]
    return rows


def _positive_int(v, what):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError("fastmtl: Predictor: %s must be an integer >= 1, got %r" % (what, v))
    return v


def _tokens(sentence, i):
    if isinstance(sentence, str):
        return sentence.split()
    if isinstance(sentence, bytes):
        raise TypeError("fastmtl: Predictor.predict: sentence %d is bytes; decode it to str first" % i)
    try:
        toks = list(sentence)
    except TypeError:
        raise TypeError("fastmtl: Predictor.predict: sentence %d must be a string or a list of token strings, got %s"
                        % (i, type(sentence).__name__)) from None
    for w in toks:
        if not isinstance(w, str):
            raise TypeError("fastmtl: Predictor.predict: sentence %d: tokens must be strings, got %r" % (i, w))
        if not w:
            raise ValueError("fastmtl: Predictor.predict: sentence %d has an empty token" % i)
    return toks


def _distributions(p, itos, top_k):
    """``{label: probability}`` dicts of the distributions in the last dimension of ``p`` ((..., C), nested lists
    of dicts), most probable first (ties: label order)."""
    k = len(itos) if top_k is None else min(top_k, len(itos))
    vals, order = torch.sort(p, dim=-1, descending=True, stable=True)
    vals, order = vals[..., :k].tolist(), order[..., :k].tolist()

    def build(v, o):
        if o and isinstance(o[0], list):
            return [build(vv, oo) for vv, oo in zip(v, o)]
        return {itos[j]: x for x, j in zip(v, o)}

    return build(vals, order)


def _spans(tokens, labels, conf):
    from .metrics import get_spans

    return [{"type": typ, "start": a, "end": b + 1, "text": " ".join(tokens[a:b + 1]),
             "confidence": min(conf[a:b + 1])} for typ, a, b in get_spans(labels)]
