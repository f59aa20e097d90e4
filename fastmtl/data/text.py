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
import os
import select

from ..fileio import open_regular
from .errors import DataFormatError

__all__ = ["read_lines", "decode_lines", "split_lines", "iter_line_blocks"]

_BOM = codecs.BOM_UTF8


def split_lines(text, bom=True):
    """Splits ``text`` into lines at ``\\n`` only, dropping a trailing ``\\r`` from each line and a leading BOM
    (U+FEFF; ``bom=False``: ``text`` is not the start of its file, and keeps it). A final newline does not start an
    empty last line (as with ``str.splitlines``)."""
    if bom and text.startswith("\ufeff"):
        text = text[1:]
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [l[:-1] if l.endswith("\r") else l for l in lines]


def decode_lines(data, path, first_line=1):
    """Decodes the bytes ``data`` of the file ``path`` as UTF-8 (a leading BOM is dropped) and splits them with
    :func:`split_lines`. Raises :class:`DataFormatError` ``"<path>:<line>: not valid UTF-8 ..."`` on bad bytes
    (``first_line``: the line number of ``data``'s first line in the file; a BOM counts only on line 1)."""
    start = len(_BOM) if first_line == 1 and data.startswith(_BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        pos = start + e.start  # offset of the first bad byte in the file
        lineno = data.count(b"\n", 0, pos) + first_line
        line_start = max(data.rfind(b"\n", 0, pos) + 1, start)
        column = len(data[line_start:pos].decode("utf-8")) + 1  # the bytes before the bad one decoded fine
        bad = data[pos:pos + max(1, min(e.end - e.start, 4))]
        hint = ("the file starts with a UTF-16 byte order mark; " if first_line == 1 and data.startswith(
            (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "")
        raise DataFormatError(path, lineno, "not valid UTF-8 (byte%s %s at column %d: %s); %ssave the file as UTF-8"
                              % ("s" if len(bad) > 1 else "", " ".join("0x%02x" % b for b in bad), column,
                                 e.reason, hint)) from None
    return split_lines(text, bom=first_line == 1)


def read_lines(path):
    """The lines of the file ``path`` (see :func:`decode_lines`)."""
    with open_regular(path, "data file") as f:
        data = f.read()
    return decode_lines(data, path)


def iter_line_blocks(f, path, max_lines=256, read_size=1 << 16, max_line_bytes=None):
    """The lines of the binary stream ``f`` (a file, a pipe, stdin) as they arrive: lists of at most ``max_lines``
    decoded lines, with the rules of :func:`decode_lines` (UTF-8 checked with the right line numbers, a BOM dropped
    only at the start). A block is handed over as soon as the stream has no more bytes ready, so a caller answering
    a slow writer (a person typing, a process feeding one line at a time) answers each line at once, and one reading
    a file gets full blocks. Memory: one block and one read (and a line: ``max_line_bytes`` bounds it, for a stream
    such as /dev/zero that never ends a line); time: linear in the input.

    A stream with a file descriptor is read with ``os.read`` on it (bytes ``f`` buffered before the call are not
    seen: pass a stream nothing has read from); one without (``io.BytesIO``) with ``f.read``."""
    fd = _fileno(f)
    pending = bytearray()
    lines, line_no = [], 1
    while True:
        chunk = os.read(fd, read_size) if fd is not None else f.read(read_size)
        error = None
        if chunk:
            cut = chunk.rfind(b"\n")  # only the new bytes are searched: a long line costs linear time
            # (only the line that began in an earlier read can be long: the others fit in this read)
            first = len(pending) + (chunk.find(b"\n") if cut >= 0 else len(chunk))
            if max_line_bytes is not None and first > max_line_bytes:
                error = DataFormatError(path, line_no, "a line of more than %d bytes; one record per line is "
                                                       "expected" % max_line_bytes)
            elif cut < 0:
                pending += chunk
            else:
                data = bytes(pending) + chunk[:cut + 1]
                pending = bytearray(chunk[cut + 1:])
                error = _decode_into(lines, data, path, line_no)
                line_no += data.count(b"\n")
        elif pending:  # the last line has no final newline
            error = _decode_into(lines, bytes(pending), path, line_no)
            pending = bytearray()
        if error is not None:  # the lines before the bad one are handed over first
            while lines:
                yield lines[:max_lines]
                del lines[:max_lines]
            raise error
        while len(lines) >= max_lines:
            yield lines[:max_lines]
            del lines[:max_lines]
        if not chunk:
            break
        if lines and fd is not None and not _ready(fd):
            yield lines
            lines = []
    if lines:
        yield lines


def _decode_into(lines, data, path, line_no):
    """Appends the lines of ``data`` (whole lines, the first being line ``line_no``) to ``lines``; on bad UTF-8 the
    lines before the bad one, and returns the error (None: all fine)."""
    try:
        lines.extend(decode_lines(data, path, line_no))
        return None
    except DataFormatError as e:
        good = e.line - line_no  # whole lines before the bad one
        end = 0
        for _ in range(good):
            end = data.index(b"\n", end) + 1
        lines.extend(decode_lines(data[:end], path, line_no))
        return e


def _fileno(f):
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream
        return None


def _ready(fd):
    """Whether reading ``fd`` now returns without waiting."""
    try:
        r, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):  # a descriptor select cannot watch: treat it as a file
        return True
    return bool(r)
