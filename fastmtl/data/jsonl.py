"""JSONL reader: one object per line, ``{"tokens": [...], "<task>": label or [one label per token]}``."""
import json

from .errors import DataFormatError

__all__ = ["read_jsonl"]


def read_jsonl(path):
    """Reads a JSONL file. Every object needs ``tokens`` (a non-empty list of strings); a list-valued field must
    have one label per token; a scalar field is a sentence label. Blank lines are skipped."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, "not UTF-8 text (%s)" % e) from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, lineno, "invalid JSON (%s)" % e.msg) from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, lineno, "expected a JSON object, found %s" % type(obj).__name__)
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
                ex[k] = [str(x) for x in v]
            elif v is None:
                continue
            elif isinstance(v, (str, int, bool)):
                ex[k] = str(v)
            else:
                raise DataFormatError(path, lineno, "field %r must be a label or a list of labels" % k)
        examples.append(ex)
    if not examples:
        raise DataFormatError(path, None, "no examples found")
    return examples
