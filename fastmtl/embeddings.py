"""Pretrained word vectors from a word2vec or GloVe text file."""
import torch

from .data.errors import DataFormatError
from .fileio import open_regular

__all__ = ["read_vectors", "embedding_matrix"]


def read_vectors(path, words=None):
    """Reads ``word v1 v2 ...`` lines (GloVe; word2vec text files start with a ``count dim`` header, which is
    skipped). ``words``: keep only these (a set), to save memory. Returns ``({word: list of floats}, dim)``."""
    vectors, dim = {}, None
    with open_regular(path, "--pretrained", "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header
            if len(parts) < 2:
                if not line.strip():
                    continue
                raise DataFormatError(path, lineno, "expected 'word v1 v2 ...'")
            if dim is None:
                dim = len(parts) - 1
            elif len(parts) - 1 != dim:
                raise DataFormatError(path, lineno, "vector has %d values, earlier ones had %d" % (len(parts) - 1, dim))
            if words is not None and parts[0] not in words:
                continue
            try:
                vectors[parts[0]] = [float(x) for x in parts[1:]]
            except ValueError:
                raise DataFormatError(path, lineno, "non-numeric vector value") from None
    if dim is None:
        raise DataFormatError(path, None, "no vectors found")
    return vectors, dim


def embedding_matrix(vocab, path, embedding_dim=None, scale=0.1, generator=None):
    """A (len(vocab), dim) matrix: pretrained vectors where the file has the word (exact, then normalised form),
    small random values elsewhere, zeros for padding. Returns ``(matrix, number of words found)``."""
    vectors, dim = read_vectors(path)
    if embedding_dim is not None and embedding_dim != dim:
        raise ValueError("fastmtl: %s has %d-dimensional vectors but embedding_dim is %d" % (path, dim, embedding_dim))
    normalised = {}
    for w, v in vectors.items():
        normalised.setdefault(vocab.normalize(w), v)
    m = (torch.rand(len(vocab), dim, generator=generator) * 2 - 1) * scale
    found = 0
    for i, w in enumerate(vocab.itos):
        v = vectors.get(w) or normalised.get(w)
        if v is not None and i >= 2:
            m[i] = torch.tensor(v)
            found += 1
    m[0] = 0
    return m, found
