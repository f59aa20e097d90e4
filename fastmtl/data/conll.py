"""Readers for CoNLL-U and CoNLL column files.

Both return a list of examples: ``{"tokens": [...], <column>: [one label per token], <key>: sentence label}``.

* CoNLL-U (https://universaldependencies.org/format.html): 10 tab-separated columns
  ``ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC``; every column except ID and FORM becomes a token field
  (``lemma``, ``upos``, ``xpos``, ``feats``, ``head``, ``deprel``, ``deps``, ``misc``). Multi-word token lines
  (``1-2``) and empty nodes (``1.1``) are skipped. Comment lines ``# key = value`` become sentence-level fields
  (e.g. ``# intent = book_flight`` gives the field ``intent``).
* Column files (CoNLL-2000/2003 style): whitespace-separated columns, blank lines between sentences,
  ``-DOCSTART-`` lines ignored. Column 0 is the word; the others are named by ``columns`` (e.g.
  ``["word", "pos", "chunk", "ner"]``, no name twice) or ``col1``, ``col2``, ... by default. Columns are separated
  by spaces and tabs only, so a token may hold any other character (U+00A0, U+2028, form feed, ...).
  ``# key = value`` comments give sentence-level fields as in CoNLL-U.

Lines end at ``\n`` only (``\r\n`` too), a leading UTF-8 BOM is ignored and bytes that are not UTF-8 are an error
naming the line (see :mod:`fastmtl.data.text`).
"""
from .errors import DataFormatError
from .text import read_lines

__all__ = ["read_conllu", "read_conll", "parse_columns", "parse_comment", "CONLLU_FIELDS"]

CONLLU_FIELDS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")
_BLANKS = " \t"  # the column separators of a CoNLL column file


def parse_comment(line):
    """``"# key = value"`` -> ``("key", "value")`` (both stripped of whitespace; the key is everything before the
    first ``=``); None when ``line`` is not such a pair (no ``#`` first, no ``=``, or an empty key).

    Linear time: a regular expression for this (``^#\\s*([^=]+?)\\s*=\\s*(.*?)\\s*$``) backtracked cubically on a
    ``#`` line of many spaces."""
    if not line.startswith("#"):
        return None
    key, sep, value = line[1:].partition("=")
    key = key.strip()
    if not sep or not key:
        return None
    return key, value.strip()


def _split_columns(line):
    """The columns of a CoNLL column line: separated by runs of spaces and tabs (not by other whitespace)."""
    return [c for c in line.replace("\t", " ").split(" ") if c]


def _finish(examples, sent, meta, path):
    """Appends ``sent`` with its sentence fields ``meta`` (key -> (value, line)); a comment key that names one of
    the sentence's token fields is an error (it would replace the tokens or labels by a string)."""
    if sent["tokens"]:
        for key, (value, lineno) in meta.items():
            if key in sent:
                raise DataFormatError(path, lineno, "comment '# %s = ...' names the token field %r of this sentence "
                                      "(a sentence field must not replace a column)" % (key, key))
            sent[key] = value
        examples.append(sent)


def read_conllu(path):
    """Reads a CoNLL-U file (see the module docstring). Raises :class:`DataFormatError` on malformed lines."""
    examples = []
    sent, meta, expected_id = None, {}, 1

    def new():
        return {"tokens": [], **{k: [] for k in CONLLU_FIELDS[2:]}}

    sent = new()
    start_line = 1
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip(_BLANKS):
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
            kv = parse_comment(line)
            if kv:
                meta[kv[0]] = (kv[1], lineno)
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


def parse_columns(columns):
    """The column names of a CoNLL column file (a list, or one comma-separated string as ``--columns`` takes them)
    as a list of stripped names: the first names the word column (its field is ``tokens``); the others must be
    distinct, non-empty and not ``tokens`` (a repeated name would merge two columns into one field). Raises
    ValueError naming the problem."""
    if isinstance(columns, str):
        columns = columns.split(",")
    columns = [c.strip() if isinstance(c, str) else c for c in columns]
    if not columns:
        raise ValueError("fastmtl: columns: give at least one column name (the first is the word)")
    seen = {}
    for i, name in enumerate(columns):
        if not isinstance(name, str):
            raise ValueError("fastmtl: columns: column %d name %r is not a string" % (i + 1, name))
        if i == 0:
            continue  # the word column's name is ignored (its field is "tokens")
        if not name:
            raise ValueError("fastmtl: columns: column %d has an empty name (columns: %s)"
                             % (i + 1, ",".join(map(str, columns))))
        if name == "tokens":
            raise ValueError("fastmtl: columns: column %d is named 'tokens', the field of the word column (column 1)"
                             % (i + 1))
        if name in seen:
            raise ValueError("fastmtl: columns: duplicate column name %r (columns %d and %d of %s)"
                             % (name, seen[name], i + 1, ",".join(map(str, columns))))
        seen[name] = i + 1
    return columns


def read_conll(path, columns=None):
    """Reads a whitespace-separated column file (see the module docstring).

    ``columns``: names for all columns, the first being the word (its name is ignored; the field is ``tokens``).
    Every line of the file must have the same number of columns.
    """
    examples = []
    sent, meta, ncols = {"tokens": []}, {}, None
    names = None
    if columns is not None:
        columns = parse_columns(columns)
    for lineno, raw in enumerate(read_lines(path), 1):
        line = raw.strip(_BLANKS)
        if not line:
            if sent["tokens"]:
                _finish(examples, sent, meta, path)
            sent, meta = {"tokens": []}, {}
            continue
        if line.startswith("-DOCSTART-"):
            continue
        if line.startswith("#") and not sent["tokens"]:
            kv = parse_comment(line)
            if kv:
                meta[kv[0]] = (kv[1], lineno)
                continue
        cols = _split_columns(line)
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
