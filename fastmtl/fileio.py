"""Files, safely: :func:`atomic_write`, used for every file the library writes (checkpoints, metrics, logs, plots,
benchmark results), and :func:`open_regular`, used for every file it reads (checkpoints, ``--config``, data,
pretrained vectors)."""
import errno
import io
import os
import stat
import tempfile

__all__ = ["atomic_write", "open_regular"]


def _kind(mode):
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, what, mode="rb", max_bytes=None, error=ValueError, **text_kw):
    """Opens ``path`` for reading when it is a regular file (after links) of at most ``max_bytes`` bytes; otherwise
    raises ``error`` naming ``what`` (e.g. ``"--config"``), the path and what it is. A named pipe, a device such as
    /dev/zero or a folder (also behind a link) would hang the open or be read without end: the file is opened
    non-blocking, checked with fstat, then read normally. ``mode`` ``"rb"`` or ``"r"`` (``text_kw``: encoding,
    errors, newline). OSError (missing file, no permission) propagates as from :func:`open`."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error("fastmtl: %s %s is %s, not a regular file" % (what, path, _kind(st.st_mode)))
        if max_bytes is not None and st.st_size > max_bytes:
            raise error("fastmtl: %s %s is %d bytes, more than the %d this reads" % (what, path, st.st_size,
                                                                                     max_bytes))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = io.open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    if mode == "rb":
        return f
    if mode != "r":
        f.close()
        raise ValueError("open_regular: mode must be 'rb' or 'r', got %r" % (mode,))
    return io.TextIOWrapper(f, **text_kw)


def _umask():
    """The process umask, read without changing it where the system allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting (briefly visible to other threads)
    os.umask(mask)
    return mask


def _fsync_dir(directory):
    """Makes the rename durable: fsync the folder that holds the new name (POSIX; a no-op where folders cannot be
    opened or synced, e.g. Windows or some network file systems)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path, data):
    """Writes ``data`` (str, written as UTF-8, or bytes-like) to ``path`` so that readers see either the old file or the
    whole new one, never a part.

    The data goes to a fresh temporary file in the destination's folder, created by :func:`tempfile.mkstemp`
    (``O_CREAT | O_EXCL`` under an unpredictable name, so a file or symlink planted there is never opened or written
    through), is flushed and fsynced, and then renamed over ``path`` with :func:`os.replace`; the folder is fsynced so
    the rename survives a crash. If ``path`` is a symlink, the link itself is replaced (its target is left alone). On
    any failure the temporary file is removed and ``path`` keeps its earlier content. The new file gets the usual
    permissions of a new file (0666 less the umask), not mkstemp's 0600.
    """
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # a failed write or fsync (disk full: ENOSPC) names no file: name the one being written
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise
    _fsync_dir(directory)
