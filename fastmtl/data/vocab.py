"""Vocabularies: words (with unknown-word handling) and labels."""
import collections
import re

__all__ = ["Vocab", "LabelVocab", "normalize_word"]

_DIGITS = re.compile(r"[0-9]")


def normalize_word(word, lower=True, digits=True):
    """Lower-cases (``lower``) and maps every digit to ``0`` (``digits``), so ``838`` and ``1110`` share shapes."""
    if lower:
        word = word.lower()
    if digits:
        word = _DIGITS.sub("0", word)
    return word


class Vocab:
    """Word vocabulary. Index 0 is padding (``<pad>``), 1 is unknown (``<unk>``).

    ``min_count``: words seen fewer times in training become ``<unk>``. Counts are kept so the trainer can replace
    rare words by ``<unk>`` at random during training (:meth:`unk_probabilities`), which teaches the model what to do
    with words it has never seen.
    """

    PAD, UNK = 0, 1

    def __init__(self, itos, counts=None, lower=True, digits=True):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.counts = dict(counts or {})
        self.lower, self.digits = lower, digits

    @classmethod
    def build(cls, sentences, min_count=1, lower=True, digits=True, extra_words=()):
        """Builds from an iterable of token lists. ``extra_words`` (e.g. words of pretrained vectors) are added too."""
        if min_count < 1:
            raise ValueError("fastmtl: Vocab.build: min_count must be >= 1, got %r" % (min_count,))
        counts = collections.Counter(normalize_word(w, lower, digits) for s in sentences for w in s)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        seen = set(words)
        for w in extra_words:
            w = normalize_word(w, lower, digits)
            if w not in seen:
                seen.add(w)
                words.append(w)
        return cls(["<pad>", "<unk>"] + words, counts, lower, digits)

    def __len__(self):
        return len(self.itos)

    def normalize(self, word):
        return normalize_word(word, self.lower, self.digits)

    def encode(self, tokens):
        get = self.stoi.get
        return [get(self.normalize(w), self.UNK) for w in tokens]

    def unk_probabilities(self, alpha):
        """Per-index probability of replacing a word by ``<unk>`` during training: ``alpha / (alpha + count)``
        (Kiperwasser & Goldberg 2016), so singletons are dropped most often and frequent words almost never."""
        probs = [0.0] * len(self.itos)
        if alpha > 0:
            for i, w in enumerate(self.itos[2:], 2):
                c = self.counts.get(w, 0)
                probs[i] = alpha / (alpha + c) if c > 0 else 0.0
        return probs

    def state_dict(self):
        return {"itos": self.itos, "counts": self.counts, "lower": self.lower, "digits": self.digits}

    @classmethod
    def from_state_dict(cls, d):
        return cls(d["itos"], d.get("counts"), d.get("lower", True), d.get("digits", True))


class LabelVocab:
    """Labels of one task, in order of first appearance in training (sorted for stability).

    Labels not seen in training encode to ``ignore_index`` for the loss; evaluation compares label strings, so such
    labels always count as errors.
    """

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, labels):
        return cls(sorted(set(labels)))

    def __len__(self):
        return len(self.itos)

    def encode(self, label, ignore_index=-100):
        return self.stoi.get(label, ignore_index)

    def decode(self, index):
        return self.itos[index]

    def state_dict(self):
        return {"itos": self.itos}

    @classmethod
    def from_state_dict(cls, d):
        return cls(d["itos"])
