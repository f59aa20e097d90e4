"""fastmtl for flair users: :func:`accelerate` runs a flair ``SequenceTagger`` on fastmtl's kernels, in place.

``pip install fastmtl[flair]`` (flair >= 0.15.1, < 0.16; tested with 0.15.1)::

    from fastmtl.integrations.flair import accelerate
    tagger = accelerate(SequenceTagger(embeddings, tag_dictionary, "ner"))

What changes: behaviour only. Each changed object gets a subclass of its own class (``obj.__class__``) and the
tagger an instance ``forward``; nothing is rebuilt, so every parameter stays the same ``Parameter`` object, with
flair's names and values, and an optimizer made before or after ``accelerate`` (flair's ``ModelTrainer`` and its
plugins included) trains the same tensors.

* ``tagger.rnn`` and every ``torch.nn.LSTM`` inside ``tagger.embeddings`` (CharacterEmbeddings, FlairEmbeddings'
  language model) run on :class:`fastmtl.nn.LSTM`'s kernels (:class:`AcceleratedLSTM`, still a ``torch.nn.LSTM``).
  The tagger's forward hands the padded batch and its lengths to the LSTM instead of packing it (flair's
  ``pad_packed_sequence`` afterwards costs a copy of the batch per time step in backward); the rest of it is
  flair's, and where the LSTM would draw random numbers (dropout between stacked layers, in training) flair's own
  forward runs.
* With ``use_crf=True``: ``tagger.crf`` no longer builds flair's (B, T, K, K) score tensor; the emission scores go
  as they are to ``tagger.loss_function`` (flair's ``ViterbiLoss``: fastmtl's fused CRF negative log-likelihood,
  :func:`fastmtl.functional.crf_nll`) and ``tagger.viterbi_decoder`` (the path by
  :func:`fastmtl.functional.crf_decode`; flair's confidences, the softmax of the Viterbi scores at each position,
  by a loop over time vectorised over the batch).

flair's CRF, read from ``flair/models/sequence_tagger_utils`` (crf.py, viterbi.py): ``transitions`` is indexed
[to, from] over the K tags of the label dictionary, ``<START>`` and ``<STOP>`` included; a path y_0 .. y_{L-1} over all
K tags (START and STOP may be inner tags: their emission scores come from the linear layer and the -10000 that flair
puts in ``transitions[START, :]`` and ``transitions[:, STOP]`` are trainable parameters like any other) scores
``transitions[y_0, START] + sum_t e[t, y_t] + sum_{t>=1} transitions[y_t, y_{t-1}] + transitions[STOP, y_{L-1}]``.
That is fastmtl's (pytorch-crf's) linear-chain CRF with ``transitions.t()`` ([from, to]),
``start = transitions[:, START]`` and ``end = transitions[STOP, :]``: views of flair's own parameter, so its gradient
is flair's. Padding (t >= length) is never read. The loss is summed over the batch, as flair's.

What stays flair's: the tagger's class, ``forward_loss``/``predict``/``evaluate`` (and ``forward`` but for the
packing), embeddings, dropouts, reprojection, the linear layer, the label dictionary, ``state_dict`` names,
``tagger.save`` and ``SequenceTagger.load``. Pickling any of these objects (flair's ``save`` stores the state dict and configuration;
``torch.save(tagger)`` or ``pickle`` store the modules themselves) records flair's and torch's own classes, so a
tagger saved after ``accelerate`` loads and predicts in plain flair without fastmtl; call ``accelerate`` again after
loading. ``copy.deepcopy`` keeps the acceleration. :func:`restore` gives the tagger its plain classes back.

Equal to flair: the loss to float32 rounding (relative 1e-5), every parameter gradient (relative 1e-4), the predicted
tags and their confidences (1e-4), with and without ``return_probabilities_for_all_classes``; a single-layer LSTM
consumes no random numbers, so training with a fixed seed follows stock flair's run. Between stacked LSTM layers
(``rnn_layers > 1``: flair sets dropout 0.5 there) fastmtl's dropout masks are its own draws.

Refused, with the argument named (before anything is changed): a model other than a ``SequenceTagger``, a GRU or RNN
``rnn_type`` (pass ``lstm=False`` to accelerate only the CRF), an LSTM with ``proj_size > 0``, a CRF, loss or
decoder that is not flair's own class, a flair outside 0.15.1-0.15.x (flair 0.15.0 cannot load saved models under
torch >= 2.6, with or without fastmtl).
"""
import copy
import copyreg
import re
import types

import torch
import torch.nn.functional as F

try:
    import flair
    from flair.models import SequenceTagger
    from flair.models.sequence_tagger_utils.crf import CRF as _FlairCRF
    from flair.models.sequence_tagger_utils.viterbi import ViterbiDecoder as _FlairViterbiDecoder
    from flair.models.sequence_tagger_utils.viterbi import ViterbiLoss as _FlairViterbiLoss
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("fastmtl.integrations.flair needs flair (>=0.15.1,<0.16): pip install 'fastmtl[flair]'") from _e

import fastmtl.nn
from fastmtl.functional.crf import crf_decode, crf_nll

__all__ = ["accelerate", "restore", "AcceleratedLSTM", "AcceleratedCRF", "AcceleratedViterbiLoss",
           "AcceleratedViterbiDecoder", "SUPPORTED_FLAIR", "TESTED_FLAIR"]

SUPPORTED_FLAIR = ">=0.15.1,<0.16"
TESTED_FLAIR = ("0.15.1",)


def _check_flair_version():
    version = str(getattr(flair, "__version__", "unknown"))
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    v = tuple(int(x or 0) for x in m.groups()) if m else None
    if v is None or not (0, 15, 1) <= v < (0, 16, 0):
        raise RuntimeError(
            "fastmtl.integrations.flair supports flair %s (tested: %s), found flair %s: its CRF loss, decoder and "
            "tagger forward are replaced by code that follows flair 0.15's; install it with "
            "pip install 'fastmtl[flair]'%s" % (SUPPORTED_FLAIR, ", ".join(TESTED_FLAIR), version,
                                                " (flair 0.15.0 cannot load saved models with torch >= 2.6)"
                                                if v is not None and v[:2] == (0, 15) else ""))


class _PicklesAsPlain:
    """Pickles as the flair/torch class it stands in for (``_plain_class``): a pickle holds no fastmtl class and
    loads without fastmtl. ``copy.copy``/``copy.deepcopy`` keep the accelerated class."""

    _plain_class = object

    def __reduce_ex__(self, protocol):
        # copyreg._reconstructor(cls, object, None) is object.__new__(cls): the standard library's own reconstructor
        # (copyreg.__newobj__ would insist on the object's own class)
        return copyreg._reconstructor, (self._plain_class, object, None), _get_state(self)

    def __copy__(self):
        new = object.__new__(type(self))
        _set_state(new, _get_state(self))
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        _set_state(new, copy.deepcopy(_get_state(self), memo))
        return new


def _get_state(obj):
    getstate = getattr(obj, "__getstate__", None)  # (object.__getstate__ is Python 3.11+)
    state = getstate() if getstate is not None else obj.__dict__
    return {} if state is None else state


def _set_state(obj, state):
    setstate = getattr(obj, "__setstate__", None)
    if setstate is not None:
        setstate(state)
    else:
        obj.__dict__.update(state)


class AcceleratedLSTM(_PicklesAsPlain, fastmtl.nn.LSTM, torch.nn.LSTM):
    """A ``torch.nn.LSTM`` (same parameters, same ``isinstance``) whose ``forward`` is :class:`fastmtl.nn.LSTM`'s.
    Pickles as ``torch.nn.LSTM``."""

    _plain_class = torch.nn.LSTM


class AcceleratedCRF(_PicklesAsPlain, _FlairCRF):
    """flair's CRF (same ``transitions`` parameter) whose ``forward`` returns the emission scores (B, T, K) as they
    are: the accelerated loss and decoder take the transitions from flair's features tuple, so flair's
    (B, T, K, K) tensor is never built. Pickles as flair's CRF."""

    _plain_class = _FlairCRF

    def forward(self, features):
        return features


def _crf_arguments(features, lengths, transitions, start_tag, stop_tag, who):
    """flair's CRF inputs -> fastmtl's: emissions (B, T, K), lengths (B,) int64 on the emissions' device and as a
    list, transitions [from, to], start, end (views of flair's parameter)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ValueError("%s: features must be the emission scores (batch, seq len, tagset size), got %s"
                         % (who, tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)))
    B, T, K = features.shape
    if not isinstance(transitions, torch.Tensor) or tuple(transitions.shape) != (K, K):
        raise ValueError("%s: transitions must be flair's (K, K) = (%d, %d) [to, from] matrix, got %s"
                         % (who, K, K, tuple(getattr(transitions, "shape", ())) or type(transitions).__name__))
    lengths_list = [int(x) for x in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if len(lengths_list) != B or any(not 1 <= x <= T for x in lengths_list):
        raise ValueError("%s: lengths must hold %d lengths in [1, %d] (one per sentence of the batch), got %s"
                         % (who, B, T, lengths_list))
    lengths_t = torch.tensor(lengths_list, dtype=torch.long, device=features.device)
    return (features, lengths_t, lengths_list, transitions.t(), transitions[:, start_tag], transitions[stop_tag, :])


class AcceleratedViterbiLoss(_PicklesAsPlain, _FlairViterbiLoss):
    """flair's ``ViterbiLoss`` computed by :func:`fastmtl.functional.crf_nll` (summed over the batch, as flair's)
    from the emission scores of :class:`AcceleratedCRF`. Given flair's own (B, T, K, K) scores (a plain CRF) it runs
    flair's code. Pickles as flair's ViterbiLoss."""

    _plain_class = _FlairViterbiLoss

    def forward(self, features_tuple, targets):
        features = features_tuple[0]
        if isinstance(features, torch.Tensor) and features.dim() == 4:
            return _FlairViterbiLoss.forward(self, features_tuple, targets)
        emissions, lengths, lengths_list, trans, start, end = _crf_arguments(
            *features_tuple, self.start_tag, self.stop_tag, who="ViterbiLoss (fastmtl)")
        B, T, K = emissions.shape
        if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.numel() != sum(lengths_list):
            raise ValueError("ViterbiLoss (fastmtl): targets must be the 1-D tag indices of the batch's %d tokens (the "
                             "sum of lengths), got %s" % (sum(lengths_list), tuple(targets.shape)
                                                         if isinstance(targets, torch.Tensor) else type(targets)))
        mask = torch.arange(T, device=emissions.device).unsqueeze(0) < lengths.unsqueeze(1)
        tags = torch.zeros(B, T, dtype=torch.long, device=emissions.device)
        tags.masked_scatter_(mask, targets.to(device=emissions.device, dtype=torch.long))
        return crf_nll(emissions, tags, lengths, trans, start, end, reduction="sum")


def _viterbi_scores(emissions, lengths_list, transitions, start):
    """flair's Viterbi scores: out[b, t, j] = the best score of a path over positions 0..t that ends in tag j
    (transitions [to, from] as flair's), for t < lengths[b]; 0 at padding."""
    B, T, K = emissions.shape
    out = torch.zeros_like(emissions)
    out[:, 0] = emissions[:, 0] + start
    # flair sorts a batch by decreasing length: the rows still running at t are then a prefix
    ordered = all(a >= b for a, b in zip(lengths_list, lengths_list[1:]))
    trans = transitions.unsqueeze(0)  # (1, to, from)
    for t in range(1, T):
        n = sum(1 for x in lengths_list if x > t) if ordered else B
        if n == 0:
            break
        best = (out[:n, t - 1].unsqueeze(1) + trans).amax(dim=2)  # max over `from`
        out[:n, t] = emissions[:n, t] + best
    return out


class AcceleratedViterbiDecoder(_PicklesAsPlain, _FlairViterbiDecoder):
    """flair's ``ViterbiDecoder``: the best path by :func:`fastmtl.functional.crf_decode`, each tag's confidence as
    flair defines it (the largest softmax probability of the Viterbi scores at its position) and, if asked, the
    probabilities of every tag (flair's ``_all_scores_for_token``). Given flair's own (B, T, K, K) scores it runs
    flair's code. Pickles as flair's ViterbiDecoder."""

    _plain_class = _FlairViterbiDecoder

    def decode(self, features_tuple, probabilities_for_all_classes, sentences):
        features = features_tuple[0]
        if isinstance(features, torch.Tensor) and features.dim() == 4:
            return _FlairViterbiDecoder.decode(self, features_tuple, probabilities_for_all_classes, sentences)
        with torch.no_grad():
            emissions, lengths, lengths_list, trans, start, end = _crf_arguments(
                *features_tuple, self.start_tag, self.stop_tag, who="ViterbiDecoder (fastmtl)")
            emissions = emissions.detach()
            paths = crf_decode(emissions, lengths, trans, start, end)
            scores = F.softmax(_viterbi_scores(emissions, lengths_list, features_tuple[2].detach(), start), dim=2)
            confidences = scores.max(dim=2).values
        item = self.tag_dictionary.get_item_for_index
        tags = [[(item(tag), conf) for tag, conf in zip(path[:n], conf_row[:n])]
                for path, conf_row, n in zip(paths.tolist(), confidences.tolist(), lengths_list)]
        all_tags = []
        if probabilities_for_all_classes:
            decoded = paths.masked_fill(paths < 0, self.stop_tag)  # flair's padding tag
            all_tags = self._all_scores_for_token(scores.cpu(), decoded.cpu(), lengths.cpu(), sentences)
        return tags, all_tags


_ACCELERATED = (AcceleratedLSTM, AcceleratedCRF, AcceleratedViterbiLoss, AcceleratedViterbiDecoder)


def _tagger_forward(self, sentence_tensor, lengths):
    """flair 0.15's ``SequenceTagger.forward`` with the padded batch handed to the fastmtl LSTM together with its
    lengths, instead of ``pack_padded_sequence`` -> LSTM -> ``pad_packed_sequence``: the same output (zeros past each
    length) without the packing, whose backward copies the whole batch once per time step. Where the LSTM would
    draw random numbers (dropout between stacked layers, in training) or is not a fastmtl one, flair's own forward
    runs."""
    rnn = getattr(self, "rnn", None) if self.use_rnn else None
    if rnn is None or not isinstance(rnn, fastmtl.nn.LSTM) or (rnn.training and rnn.num_layers > 1 and rnn.dropout):
        return type(self).forward(self, sentence_tensor, lengths)
    if self.use_dropout:
        sentence_tensor = self.dropout(sentence_tensor)
    if self.use_word_dropout:
        sentence_tensor = self.word_dropout(sentence_tensor)
    if self.use_locked_dropout:
        sentence_tensor = self.locked_dropout(sentence_tensor)

    if self.reproject_embeddings:
        sentence_tensor = self.embedding2nn(sentence_tensor)

    # flair packs with batch_first=True whatever the LSTM's layout; its output has max(lengths) positions
    lengths_list = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
    longest = max(lengths_list)
    if rnn.batch_first:
        sentence_tensor, _ = rnn(sentence_tensor, lengths=lengths)
        sentence_tensor = sentence_tensor[:, :longest]
    else:
        sentence_tensor, _ = rnn(sentence_tensor.transpose(0, 1), lengths=lengths)
        sentence_tensor = sentence_tensor[:longest].transpose(0, 1)

    if self.use_dropout:
        sentence_tensor = self.dropout(sentence_tensor)
    if self.use_locked_dropout:
        sentence_tensor = self.locked_dropout(sentence_tensor)

    features = self.linear(sentence_tensor)
    if self.use_crf:
        features = self.crf(features)
        return features, lengths, self.crf.transitions
    return self._get_scores_from_features(features, lengths)


# A bound method pickles as getattr(tagger, __name__): a pickled tagger resolves it to flair's own forward.
_tagger_forward.__name__ = _tagger_forward.__qualname__ = "forward"


def _accelerated_forward_of(tagger):
    f = tagger.__dict__.get("forward")
    return f if isinstance(f, types.MethodType) and f.__func__ is _tagger_forward else None


def _forward_replaceable(tagger):
    """No instance forward, or only flair's own bound to the tagger (what unpickling an accelerated tagger leaves):
    a forward that someone else put on the instance is left alone."""
    f = tagger.__dict__.get("forward")
    return f is None or (isinstance(f, types.MethodType) and f.__self__ is tagger
                         and f.__func__ in (_tagger_forward, type(tagger).forward))


def _lstm_problem(module, where):
    if type(module) is torch.nn.LSTM and module.proj_size:
        return ("%s is a torch.nn.LSTM with proj_size=%d; fastmtl.nn.LSTM does not implement projections (pass "
                "lstm=False to leave the LSTMs to torch)" % (where, module.proj_size))
    return None


def accelerate(tagger, *, lstm=True, crf=True):
    """Run a flair ``SequenceTagger``'s LSTMs and CRF on fastmtl's kernels, in place; returns ``tagger``.

    ``lstm``: ``tagger.rnn`` and every ``torch.nn.LSTM`` inside ``tagger.embeddings`` run on
    :class:`fastmtl.nn.LSTM`'s kernels. ``crf``: with ``use_crf=True``, flair's CRF loss and Viterbi decoding run on
    :func:`fastmtl.functional.crf_nll` / :func:`fastmtl.functional.crf_decode`. Parameters stay the same objects
    (names, values, optimizers unchanged); the saved model is plain flair. Calling it again changes nothing; see the
    module's documentation for what changes and what is refused.
    """
    _check_flair_version()
    if not isinstance(tagger, SequenceTagger):
        raise TypeError("fastmtl.integrations.flair.accelerate: tagger must be a flair SequenceTagger, got %s"
                        % type(tagger).__name__)
    # Everything is checked before anything is changed.
    lstms = []
    if lstm:
        if tagger.use_rnn:
            rnn = tagger.rnn
            if isinstance(rnn, (AcceleratedLSTM, fastmtl.nn.LSTM)):
                pass
            elif type(rnn) is torch.nn.LSTM:
                lstms.append(("tagger.rnn", rnn))
            else:
                raise ValueError(
                    "fastmtl.integrations.flair.accelerate: tagger.rnn is a %s (rnn_type=%r); fastmtl runs LSTMs "
                    "only. Build the tagger with rnn_type='LSTM', or pass lstm=False to accelerate only the CRF"
                    % (type(rnn).__name__, getattr(tagger, "rnn_type", None)))
        for name, module in tagger.embeddings.named_modules():
            if type(module) is torch.nn.LSTM:
                lstms.append(("tagger.embeddings" + ("." + name if name else ""), module))
        for where, module in lstms:
            problem = _lstm_problem(module, where)
            if problem:
                raise ValueError("fastmtl.integrations.flair.accelerate: " + problem)
    crf_parts = []
    if crf and tagger.use_crf:
        for attr, plain, fast in (("crf", _FlairCRF, AcceleratedCRF),
                                  ("loss_function", _FlairViterbiLoss, AcceleratedViterbiLoss),
                                  ("viterbi_decoder", _FlairViterbiDecoder, AcceleratedViterbiDecoder)):
            obj = getattr(tagger, attr, None)
            if type(obj) is fast:
                continue
            if type(obj) is not plain:
                raise TypeError(
                    "fastmtl.integrations.flair.accelerate: tagger.%s must be flair's %s.%s for use_crf=True, got %s "
                    "(pass crf=False to leave a custom CRF alone)"
                    % (attr, plain.__module__, plain.__name__, type(obj).__name__))
            crf_parts.append((obj, fast))
        K = len(tagger.label_dictionary)
        if tuple(tagger.crf.transitions.shape) != (K, K):
            raise ValueError("fastmtl.integrations.flair.accelerate: tagger.crf.transitions has shape %s, expected "
                             "(%d, %d) (the label dictionary's size)" % (tuple(tagger.crf.transitions.shape), K, K))
    for _, module in lstms:
        module.__class__ = AcceleratedLSTM
    for obj, fast in crf_parts:
        obj.__class__ = fast
    # (a subclass with a forward of its own keeps it, packing included)
    if lstm and tagger.use_rnn and type(tagger).forward is SequenceTagger.forward and _forward_replaceable(tagger):
        tagger.forward = types.MethodType(_tagger_forward, tagger)
    return tagger


def restore(tagger):
    """Undo :func:`accelerate`: every accelerated module or decoder of ``tagger`` gets its flair/torch class back
    (parameters untouched); returns ``tagger``."""
    if not isinstance(tagger, torch.nn.Module):
        raise TypeError("fastmtl.integrations.flair.restore: tagger must be a flair model, got %s"
                        % type(tagger).__name__)
    for module in tagger.modules():
        if isinstance(module, _ACCELERATED):
            module.__class__ = module._plain_class
    decoder = getattr(tagger, "viterbi_decoder", None)
    if isinstance(decoder, AcceleratedViterbiDecoder):
        decoder.__class__ = _FlairViterbiDecoder
    if _accelerated_forward_of(tagger) is not None:
        del tagger.__dict__["forward"]
    return tagger
