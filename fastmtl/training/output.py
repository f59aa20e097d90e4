"""The log stage and the output folder: messages, progress bars, log.jsonl, the learning-curve plot, and the rules
for reusing an ``--output-dir``."""
import io
import os
import stat
import sys

from ..fileio import atomic_write

__all__ = ["RUN_FILES", "LOCK_FILE", "OutputDirLock", "prepare_output_dir", "remove_run_files",
           "remove_stale_temporaries", "plot_history",
           "Logger"]

# what a run writes into --output-dir (and atomic_write's temporaries of them): --overwrite removes these, and only these
RUN_FILES = ("best.pt", "last.pt", "log.jsonl", "metrics.json", "learning_curve.png")


# held (flock) by the run that writes into the folder and removed when it ends; the kernel releases the flock when
# that process ends, so the lock file a killed run leaves behind is free again at once
LOCK_FILE = ".fastmtl.lock"


class OutputDirLock:
    """An exclusive lock on an ``--output-dir`` for the life of a run: a second run into the same folder stops at once
    with a one-line error naming the process that holds it. ``flock`` on ``<dir>/.fastmtl.lock`` (created without
    following a link, a regular file only); the kernel drops it when the holder exits, so the lock of a killed run
    never blocks the next. The holder removes the file when it releases the lock; a run that took the lock of a file
    removed meanwhile (its path no longer names the file it holds) tries again. Where the platform has no ``flock``
    (Windows) there is no lock."""

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.file = None

    def acquire(self):
        for _ in range(100):
            if self._try_acquire():
                return self
        raise ValueError("fastmtl: --output-dir %s: could not take its lock %s (it keeps being replaced)"
                         % (self.directory, self.path))

    def _try_acquire(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform
            return True
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise ValueError("fastmtl: --output-dir %s: cannot open its lock file %s (%s)"
                             % (self.directory, self.path, e.strerror or e)) from None
        f = os.fdopen(fd, "r+b")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("fastmtl: --output-dir %s: %s is not a regular file" % (self.directory, self.path))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = f.read(32).decode("ascii", "replace").strip()
                raise ValueError("fastmtl: --output-dir %s is in use by another fastmtl run%s: wait for it to end or "
                                 "choose another folder" % (self.directory,
                                                            " (pid %s)" % holder if holder.isdigit() else "")) \
                    from None
            try:
                now = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            held = os.fstat(fd)
            if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                f.close()  # the file was removed by the run that held it: take the lock anew
                return False
            f.seek(0)
            f.truncate()
            f.write(b"%d\n" % os.getpid())
            f.flush()
        except BaseException:
            f.close()
            raise
        self.file = f
        return True

    def release(self):
        if self.file is not None:
            try:
                os.unlink(self.path)  # still holding the lock: a run waiting on this file will see it gone
            except OSError:
                pass
            self.file.close()  # closing the descriptor releases the flock
            self.file = None


def is_run_file(name):
    if name in RUN_FILES:
        return True
    return name.endswith(".tmp") and any(name.startswith("." + f + ".") for f in RUN_FILES)


def prepare_output_dir(cfg):
    """Refuses an existing, non-empty ``output_dir`` unless ``resume`` or ``overwrite``."""
    d = cfg.output_dir
    if not os.path.lexists(d):
        return
    if not os.path.isdir(d):
        raise ValueError("fastmtl: --output-dir %s exists and is not a folder" % d)
    if cfg.resume or cfg.overwrite:
        return
    entries = sorted(e for e in os.listdir(d) if e != LOCK_FILE)
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError("fastmtl: --output-dir %s is not empty (%s): give --resume to continue its run or "
                         "--overwrite to replace it" % (d, shown))


def remove_run_files(d):
    """--overwrite: removes the files of an earlier run (links themselves, never their targets); others stay."""
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if is_run_file(name) and (os.path.islink(p) or not os.path.isdir(p)):
            os.unlink(p)


def remove_stale_temporaries(d):
    """Removes the temporaries of :func:`fastmtl.fileio.atomic_write` that a run killed during a save left behind
    (``.best.pt.<random>.tmp`` etc.; links themselves, never their targets). Called by the run that holds the
    folder's lock, so no other run can be writing them."""
    removed = []
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if name.endswith(".tmp") and is_run_file(name) and (os.path.islink(p) or not os.path.isdir(p)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                continue
            removed.append(name)
    return sorted(removed)


class Logger:
    """Messages to stderr (rank 0, not ``quiet``) and the per-epoch progress bar: a tqdm bar only when stderr is a
    terminal (a log file or a CI pipe gets the one line per epoch, not thousands of bar updates)."""

    def __init__(self, cfg, rank=0, stream=None):
        self.cfg, self.rank = cfg, rank
        self.stream = stream if stream is not None else sys.stderr

    @property
    def active(self):
        return self.rank == 0 and not self.cfg.quiet

    def __call__(self, msg):
        if self.active:
            print(msg, file=self.stream, flush=True)

    def bar(self, total, desc):
        """A tqdm bar, or None (no tqdm, ``progress`` off, quiet, another rank, or stderr not a terminal)."""
        if not (self.cfg.progress and self.active):
            return None
        isatty = getattr(self.stream, "isatty", None)
        if not (isatty and isatty()):
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # optional
            return None
        return tqdm(total=total, desc=desc, leave=False, file=self.stream, dynamic_ncols=True, mininterval=0.5)


def plot_history(history, path, log):
    """learning_curve.png: training loss and the dev main metrics per epoch (matplotlib, an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("fastmtl: matplotlib is not installed, so no learning-curve plot (pip install fastmtl[plot])")
        return False
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    last_dev = history[-1].get("dev") or {}
    for k, sub in last_dev.items():
        if isinstance(sub, dict):
            mk = "f1" if "f1" in sub else "accuracy"
            ax[1].plot(ep, [(h.get("dev") or {}).get(k, {}).get(mk, float("nan")) for h in history], marker="o",
                       label="%s %s" % (k, mk))
        else:
            ax[1].plot(ep, [(h.get("dev") or {}).get(k, float("nan")) for h in history], marker="o",
                       label=k.replace("_", " "))
    ax[1].set_xlabel("epoch")
    ax[1].set_title("dev")
    if ax[1].get_legend_handles_labels()[0]:
        ax[1].legend()
    else:  # no dev data
        ax[1].text(0.5, 0.5, "no dev data", ha="center", va="center", transform=ax[1].transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return True
