"""Task specs, encoding of examples, length-bucketed batches."""
import random
from dataclasses import dataclass

import torch

from .vocab import LabelVocab

__all__ = ["TaskSpec", "parse_task", "Batch", "encode_examples", "bucket_batches", "collate", "check_tasks"]


@dataclass(frozen=True)
class TaskSpec:
    """A task: ``name``, ``level`` (``"sequence"`` or ``"token"``), ``source`` (the example field it reads) and
    ``dataset`` (the name of the dataset whose examples carry its labels; None: the only one) and ``crf`` (a token
    task scored by a linear-chain CRF instead of per-token cross-entropy)."""

    name: str
    level: str
    source: str
    dataset: str = None
    crf: bool = False

    def __post_init__(self):
        if self.level not in ("sequence", "token"):
            raise ValueError("fastmtl: task %r: level must be 'sequence' or 'token', got %r" % (self.name, self.level))
        if not isinstance(self.crf, bool):
            raise ValueError("fastmtl: task %r: crf must be true or false, got %r" % (self.name, self.crf))
        if self.crf and self.level != "token":
            raise ValueError("fastmtl: task %r: a CRF needs a token task (level 'token'), got level %r"
                             % (self.name, self.level))


def parse_task(text):
    """Parses ``NAME:LEVEL:SOURCE[:crf]`` (``SOURCE`` defaults to ``NAME``), e.g. ``upos:token:upos`` or
    ``slots:token:slots:crf`` (a token task with a CRF)."""
    parts = text.split(":")
    crf = len(parts) == 4 and parts[3] == "crf"
    if crf:
        parts.pop()
    if len(parts) == 2:
        parts.append(parts[0])
    if len(parts) != 3 or not all(parts):
        raise ValueError("fastmtl: --task must be NAME:LEVEL:SOURCE or NAME:token:SOURCE:crf (e.g. "
                         "intent:sequence:intent), got %r" % text)
    return TaskSpec(*parts, crf=crf)


def check_tasks(examples, tasks, path):
    """Every task's source field must exist (in at least one example) with the right shape."""
    from .errors import DataFormatError

    for t in tasks:
        found = False
        for ex in examples:
            v = ex.get(t.source)
            if v is None:
                continue
            found = True
            if t.level == "token" and not isinstance(v, list):
                raise DataFormatError(path, None, "task %r reads field %r as token labels, but it is a sentence "
                                      "label (%r); use level 'sequence'" % (t.name, t.source, v))
            if t.level == "sequence" and isinstance(v, list):
                raise DataFormatError(path, None, "task %r reads field %r as a sentence label, but it has one label "
                                      "per token; use level 'token'" % (t.name, t.source))
            break
        if not found:
            if any(t.source in ex for ex in examples):
                raise DataFormatError(path, None, "field %r of task %r has no labels (null in every example)"
                                      % (t.source, t.name))
            fields = sorted({k for ex in examples[:100] for k in ex if k != "tokens"})
            raise DataFormatError(path, None, "no field %r for task %r (fields found: %s)"
                                  % (t.source, t.name, ", ".join(fields) or "none"))


def build_label_vocabs(examples, tasks):
    vocabs = {}
    for t in tasks:
        if t.level == "token":  # (a sentence label read at token level counts once per sentence)
            labels = [l for ex in examples if ex.get(t.source) is not None
                      for l in (ex[t.source] if isinstance(ex[t.source], list) else [ex[t.source]])]
        else:
            labels = [ex[t.source] for ex in examples if ex.get(t.source) is not None]
        vocabs[t.name] = LabelVocab.build(labels)
    return vocabs


def encode_examples(examples, vocab, label_vocabs, tasks, ignore_index=-100):
    """Returns a list of ``(ids, {task: target})``; a missing or unseen label becomes ``ignore_index``."""
    out = []
    for ex in examples:
        ids = vocab.encode(ex["tokens"])
        tg = {}
        for t in tasks:
            v = ex.get(t.source)
            lv = label_vocabs[t.name]
            if t.level == "token":
                if isinstance(v, str):  # a sentence label as an auxiliary token-level target on every token
                    v = [v] * len(ids)
                tg[t.name] = [ignore_index] * len(ids) if v is None else [lv.encode(l, ignore_index) for l in v]
            else:
                tg[t.name] = ignore_index if v is None else lv.encode(v, ignore_index)
        out.append((ids, tg))
    return out


def bucket_batches(lengths, batch_size, shuffle=True, seed=0, pool=50):
    """Splits indices into batches of similar length.

    Shuffled: indices are shuffled, cut into pools of ``pool`` batches, each pool sorted by length and cut into
    batches, and the batch order shuffled (``seed`` makes it reproducible). Not shuffled: sorted by length.
    """
    if batch_size < 1:
        raise ValueError("fastmtl: batch_size must be >= 1, got %r" % (batch_size,))
    idx = list(range(len(lengths)))
    if not shuffle:
        idx.sort(key=lambda i: lengths[i])
        return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(idx)
    batches = []
    step = batch_size * pool
    for p in range(0, len(idx), step):
        chunk = sorted(idx[p:p + step], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    ids: torch.Tensor        # (B, T) int64, padded with 0
    lengths: torch.Tensor    # (B,) int64
    targets: dict            # task -> (B,) or (B, T) int64, padded with ignore_index
    indices: list            # positions in the dataset
    raw_ids: torch.Tensor = None  # (B, T) the ids before the random <unk> replacement (None: same as ids)

    @property
    def num_tokens(self):
        return int(self.lengths.sum())

    def to(self, device):
        return Batch(self.ids.to(device), self.lengths.to(device),
                     {k: v.to(device) for k, v in self.targets.items()}, self.indices,
                     None if self.raw_ids is None else self.raw_ids.to(device))


def collate(encoded, indices, tasks, ignore_index=-100, unk_probs=None, generator=None):
    """Pads the examples at ``indices`` into a :class:`Batch`. ``unk_probs`` (a float tensor over the vocabulary)
    replaces words by ``<unk>`` (index 1) at random, drawn with ``generator``."""
    lens = [len(encoded[i][0]) for i in indices]
    B, T = len(indices), max(lens)
    ids = torch.zeros(B, T, dtype=torch.long)
    targets = {}
    for t in tasks:
        targets[t.name] = (torch.full((B, T), ignore_index, dtype=torch.long) if t.level == "token"
                           else torch.full((B,), ignore_index, dtype=torch.long))
    for r, i in enumerate(indices):
        x, tg = encoded[i]
        ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        for t in tasks:
            if t.level == "token":
                targets[t.name][r, :len(x)] = torch.tensor(tg[t.name], dtype=torch.long)
            else:
                targets[t.name][r] = tg[t.name]
    raw = ids
    if unk_probs is not None:
        p = unk_probs[ids]
        drop = torch.rand(ids.shape, generator=generator) < p
        ids = ids.masked_fill(drop, 1)
    return Batch(ids, torch.tensor(lens, dtype=torch.long), targets, list(indices), raw)
