"""The torch releases fastmtl supports: one place, read by setup.py (at build time, without importing fastmtl),
by ``import fastmtl``, by pyproject.toml's bounds (a test compares them) and by the README's support table.

Every release in the window was built and passed the core suite (``pytest -m core``); CI checks the oldest and the
newest (.ci/torch_window.sh). ``FASTMTL_ALLOW_UNSUPPORTED_TORCH=1`` turns the refusal of a release outside the
window into a warning, at build time and at import, for trying a torch that is not yet supported.
"""
import os
import re
import warnings

TORCH_MIN = (2, 8)   # oldest supported torch release (major, minor)
TORCH_MAX = (2, 15)  # newest supported torch release (major, minor); every patch release of it is included
PYTHON_MIN = (3, 10)

ALLOW_ENV = "FASTMTL_ALLOW_UNSUPPORTED_TORCH"


def parse_version(version: str):
    """(major, minor) of a torch version string such as ``2.13.0+cpu`` or ``2.15.0a0+git1234``."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if not m:
        raise ValueError("fastmtl: cannot read a torch version from %r" % (version,))
    return int(m.group(1)), int(m.group(2))


def window() -> str:
    return "%d.%d-%d.%d" % (TORCH_MIN + TORCH_MAX)


def unsupported_reason(version: str):
    """None when torch ``version`` is inside the support window, else a sentence saying why not."""
    v = parse_version(version)
    if TORCH_MIN <= v <= TORCH_MAX:
        return None
    side = "older than the oldest" if v < TORCH_MIN else "newer than the newest"
    return ("torch %s is %s release fastmtl supports (torch %s). Install a torch of that range "
            "(e.g. pip install 'torch>=%d.%d,<%d.%d'), or set %s=1 to try this one anyway (untested: private torch "
            "APIs that fastmtl uses may have changed; install fastmtl with --no-deps then, or pip replaces this "
            "torch)." % (version, side, window(), TORCH_MIN[0], TORCH_MIN[1],
                                                           TORCH_MAX[0], TORCH_MAX[1] + 1, ALLOW_ENV))


def check(version: str, what: str, error=RuntimeError) -> None:
    """Raises ``error`` (or warns, under FASTMTL_ALLOW_UNSUPPORTED_TORCH=1) when ``version`` is outside the window."""
    reason = unsupported_reason(version)
    if reason is None:
        return
    if os.environ.get(ALLOW_ENV, "").strip() == "1":
        warnings.warn("fastmtl %s: %s" % (what, reason), RuntimeWarning, stacklevel=3)
        return
    raise error("fastmtl %s: %s" % (what, reason))
