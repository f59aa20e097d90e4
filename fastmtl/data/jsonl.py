"""JSONL reader: one object per line, ``{"tokens": [...], "<task>": label or [one label per token]}``."""
import json

from .errors import DataFormatError
from .text import read_lines

__all__ = ["read_jsonl"]


def _label(v):
    """A label as its string, or None when ``v`` cannot be one: labels are strings; integers (and booleans) are
    accepted and written as their text (``3`` -> ``"3"``), as class ids often are. null, floats, lists and objects
    are not labels (``str()`` would make ``None`` the label "None" and ``["O"]`` the label "['O']")."""
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, int)):
        return str(v)
    return None


def _kind(v):
    return "null" if v is None else {dict: "an object", list: "a list", float: "a number"}.get(type(v), type(v).__name__)


def read_jsonl(path):
    """Reads a JSONL file. Every object needs ``tokens`` (a non-empty list of strings); a list-valued field must
    have one label per token; a scalar field is a sentence label (``null`` means: no label for this sentence).
    A label is a string or an integer (written as its text). Blank lines are skipped.

    Lines end at ``\\n`` only (raw U+2028 inside a JSON string is valid JSON), a leading UTF-8 BOM is ignored and
    every problem, bytes that are not UTF-8 included, raises :class:`DataFormatError` ``"<path>:<line>: ..."``."""
    examples = []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, lineno, "invalid JSON (%s at column %d)" % (e.msg, e.colno)) from None
        except RecursionError:
            raise DataFormatError(path, lineno, "invalid JSON (nested too deeply)") from None
        except ValueError as e:  # e.g. an integer past Python's int/str conversion limit
            raise DataFormatError(path, lineno, "invalid JSON (%s)" % e) from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, lineno, "expected a JSON object, found %s" % _kind(obj))
        toks = obj.get("tokens")
        if not isinstance(toks, list) or not toks or not all(isinstance(t, str) for t in toks):
            raise DataFormatError(path, lineno, "'tokens' must be a non-empty list of strings")
        ex = {"tokens": toks}
        for k, v in obj.items():
            if k == "tokens":
                continue
            if isinstance(v, list):
                if len(v) != len(toks):
                    raise DataFormatError(path, lineno, "field %r has %d labels for %d tokens" % (k, len(v), len(toks)))
                labels = []
                for i, x in enumerate(v):
                    s = _label(x)
                    if s is None:
                        raise DataFormatError(path, lineno, "field %r: label %d (token %r) is %s; a token label must "
                                              "be a string or an integer" % (k, i + 1, toks[i], _kind(x)))
                    labels.append(s)
                ex[k] = labels
            elif v is None:
                continue
            else:
                s = _label(v)
                if s is None:
                    raise DataFormatError(path, lineno, "field %r is %s; it must be a label (a string or an integer)"
                                          " or a list of one label per token" % (k, _kind(v)))
                ex[k] = s
        examples.append(ex)
    if not examples:
        raise DataFormatError(path, None, "no examples found")
    return examples
