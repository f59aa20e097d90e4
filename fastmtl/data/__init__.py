"""The data layer: readers (ATIS, CoNLL-U, CoNLL columns, JSONL), vocabularies, task specs, batching."""
import os

from .errors import DataFormatError
from .text import read_lines, decode_lines, split_lines, iter_line_blocks
from .atis import load_atis, parse_atis_lines
from .conll import read_conll, read_conllu, parse_columns
from .jsonl import read_jsonl
from .vocab import Vocab, LabelVocab, normalize_word
from .batching import (TaskSpec, parse_task, Batch, encode_examples, bucket_batches, collate, check_tasks,
                       build_label_vocabs)

__all__ = ["DataFormatError", "load_atis", "parse_atis_lines", "read_conll", "read_conllu", "read_jsonl", "Vocab",
           "LabelVocab", "normalize_word", "TaskSpec", "parse_task", "Batch", "encode_examples", "bucket_batches",
           "collate", "check_tasks", "build_label_vocabs", "read_examples", "FORMATS", "read_lines", "decode_lines",
           "iter_line_blocks", "split_lines", "parse_columns"]

FORMATS = ("atis", "conllu", "conll", "jsonl")


def read_examples(path, format=None, columns=None):
    """Reads ``path`` in ``format`` (``atis``, ``conllu``, ``conll`` or ``jsonl``; guessed from the extension when
    None: ``.conllu``, ``.jsonl``/``.json``, else column files)."""
    if format is None:
        ext = os.path.splitext(str(path))[1].lower()
        format = {".conllu": "conllu", ".jsonl": "jsonl", ".json": "jsonl"}.get(ext, "conll")
    if not os.path.exists(path):
        raise FileNotFoundError("fastmtl: data file %s does not exist" % path)
    if format == "conllu":
        return read_conllu(path)
    if format == "conll":
        return read_conll(path, columns)
    if format == "jsonl":
        return read_jsonl(path)
    if format == "atis":
        return parse_atis_lines(read_lines(path), path=path)
    raise ValueError("fastmtl: unknown data format %r (expected one of %s)" % (format, ", ".join(FORMATS)))
