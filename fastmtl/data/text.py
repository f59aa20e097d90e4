"""Lines of a data file, split the way data files mean them.

Every reader (and every place that splits user text into one record per line) goes through here, so that:

* lines end only at ``\\n`` (a trailing ``\\r`` of a CRLF file is dropped). ``str.splitlines()`` would also split at
  U+2028/U+2029, U+0085, form feed, vertical tab and U+001C-U+001E, which are valid characters inside a token or a
  JSON string: the columns of such a line would come apart and every later line number would be wrong;
* a leading UTF-8 byte order mark is dropped (as the ``utf-8-sig`` codec does), so it cannot stick to the first
  token (a BOM before CoNLL's ``-DOCSTART-`` made it a training sentence);
* bytes that are not UTF-8 raise :class:`DataFormatError` naming the file, the line and the column.
"""
import codecs

from ..fileio import open_regular
from .errors import DataFormatError

__all__ = ["read_lines", "decode_lines", "split_lines"]

_BOM = codecs.BOM_UTF8


def split_lines(text):
    """Splits ``text`` into lines at ``\\n`` only, dropping a trailing ``\\r`` from each line and a leading BOM
    (U+FEFF). A final newline does not start an empty last line (as with ``str.splitlines``)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [l[:-1] if l.endswith("\r") else l for l in lines]


def decode_lines(data, path):
    """Decodes the bytes ``data`` of the file ``path`` as UTF-8 (a leading BOM is dropped) and splits them with
    :func:`split_lines`. Raises :class:`DataFormatError` ``"<path>:<line>: not valid UTF-8 ..."`` on bad bytes."""
    start = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        pos = start + e.start  # offset of the first bad byte in the file
        lineno = data.count(b"\n", 0, pos) + 1
        line_start = max(data.rfind(b"\n", 0, pos) + 1, start)
        column = len(data[line_start:pos].decode("utf-8")) + 1  # the bytes before the bad one decoded fine
        bad = data[pos:pos + max(1, min(e.end - e.start, 4))]
        hint = ("the file starts with a UTF-16 byte order mark; " if data.startswith((codecs.BOM_UTF16_LE,
                                                                                       codecs.BOM_UTF16_BE)) else "")
        raise DataFormatError(path, lineno, "not valid UTF-8 (byte%s %s at column %d: %s); %ssave the file as UTF-8"
                              % ("s" if len(bad) > 1 else "", " ".join("0x%02x" % b for b in bad), column,
                                 e.reason, hint)) from None
    return split_lines(text)


def read_lines(path):
    """The lines of the file ``path`` (see :func:`decode_lines`)."""
    with open_regular(path, "data file") as f:
        data = f.read()
    return decode_lines(data, path)
