"""The log stage and the output folder: messages, progress bars, log.jsonl, the learning-curve plot, and the rules
for reusing an ``--output-dir``."""
import io
import os
import sys

from ..fileio import atomic_write

__all__ = ["RUN_FILES", "prepare_output_dir", "remove_run_files", "plot_history", "Logger"]

# what a run writes into --output-dir (and atomic_write's temporaries of them): --overwrite removes these, and only these
RUN_FILES = ("best.pt", "last.pt", "log.jsonl", "metrics.json", "learning_curve.png")


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
    entries = sorted(os.listdir(d))
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
