"""Readers for CoNLL-U and CoNLL column files.

Both return a list of examples: ``{"tokens": [...], <column>: [one label per token], <key>: sentence label}``.

* CoNLL-U (https://universaldependencies.org/format.html): 10 tab-separated columns
  ``ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC``; every column except ID and FORM becomes a token field
  (``lemma``, ``upos``, ``xpos``, ``feats``, ``head``, ``deprel``, ``deps``, ``misc``). Multi-word token lines
  (``1-2``) and empty nodes (``1.1``) are skipped. Comment lines ``# key = value`` become sentence-level fields
  (e.g. ``# intent = book_flight`` gives the field ``intent``).
* Column files (CoNLL-2000/2003 style): whitespace-separated columns, blank lines between sentences,
  ``-DOCSTART-`` lines ignored. Column 0 is the word; the others are named by ``columns`` (e.g.
  ``["word", "pos", "chunk", "ner"]``) or ``col1``, ``col2``, ... by default. ``# key = value`` comments give
  sentence-level fields as in CoNLL-U.
"""
import re

from .errors import DataFormatError

__all__ = ["read_conllu", "read_conll", "CONLLU_FIELDS"]

CONLLU_FIELDS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")
_COMMENT = re.compile(r"^#\s*([^=]+?)\s*=\s*(.*?)\s*$")


def _open_lines(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, "not UTF-8 text (%s)" % e) from None


def _finish(examples, sent, meta, path):
    if sent["tokens"]:
        sent.update(meta)
        examples.append(sent)


def read_conllu(path):
    """Reads a CoNLL-U file (see the module docstring). Raises :class:`DataFormatError` on malformed lines."""
    examples = []
    sent, meta, expected_id = None, {}, 1

    def new():
        return {"tokens": [], **{k: [] for k in CONLLU_FIELDS[2:]}}

    sent = new()
    start_line = 1
    for lineno, raw in enumerate(_open_lines(path), 1):
        line = raw.rstrip("\n\r")
        if not line.strip():
            if sent["tokens"]:
                _finish(examples, sent, meta, path)
            elif meta:
                raise DataFormatError(path, lineno, "sentence with comments but no tokens (started at line %d)"
                                      % start_line)
            sent, meta, expected_id, start_line = new(), {}, 1, lineno + 1
            continue
        if line.startswith("#"):
            if sent["tokens"]:
                raise DataFormatError(path, lineno, "comment inside a sentence (a blank line must end the sentence)")
            m = _COMMENT.match(line)
            if m:
                meta[m.group(1)] = m.group(2)
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise DataFormatError(path, lineno, "expected 10 tab-separated columns, found %d" % len(cols))
        tid = cols[0]
        if "-" in tid or "." in tid:
            continue  # multi-word token range or empty node
        if not tid.isdigit() or int(tid) != expected_id:
            raise DataFormatError(path, lineno, "token ID %r where %d was expected" % (tid, expected_id))
        if not cols[1]:
            raise DataFormatError(path, lineno, "empty FORM column")
        expected_id += 1
        sent["tokens"].append(cols[1])
        for name, value in zip(CONLLU_FIELDS[2:], cols[2:]):
            sent[name].append(value)
    _finish(examples, sent, meta, path)
    if not examples:
        raise DataFormatError(path, None, "no sentences found")
    return examples


def read_conll(path, columns=None):
    """Reads a whitespace-separated column file (see the module docstring).

    ``columns``: names for all columns, the first being the word (its name is ignored; the field is ``tokens``).
    Every line of the file must have the same number of columns.
    """
    examples = []
    sent, meta, ncols = {"tokens": []}, {}, None
    names = None
    for lineno, raw in enumerate(_open_lines(path), 1):
        line = raw.strip()
        if not line:
            if sent["tokens"]:
                _finish(examples, sent, meta, path)
            sent, meta = {"tokens": []}, {}
            continue
        if line.startswith("-DOCSTART-"):
            continue
        if line.startswith("#") and not sent["tokens"]:
            m = _COMMENT.match(line)
            if m:
                meta[m.group(1)] = m.group(2)
                continue
        cols = line.split()
        if ncols is None:
            ncols = len(cols)
            if columns is not None:
                if len(columns) != ncols:
                    raise DataFormatError(path, lineno, "%d columns but %d column names were given (%s)"
                                          % (ncols, len(columns), ", ".join(columns)))
                names = list(columns[1:])
            else:
                names = ["col%d" % i for i in range(1, ncols)]
        elif len(cols) != ncols:
            raise DataFormatError(path, lineno, "expected %d columns like the first token line, found %d"
                                  % (ncols, len(cols)))
        sent["tokens"].append(cols[0])
        for name, value in zip(names, cols[1:]):
            sent.setdefault(name, []).append(value)
    _finish(examples, sent, meta, path)
    if not examples:
        raise DataFormatError(path, None, "no sentences found")
    return examples
