"""Loads the compiled extension ``fastmtl._C`` with a clear message when it is missing or stale; build facts and the
choice of the CPU kernels' instruction set."""
import contextlib
from typing import Iterator, List

import torch

from . import _support

_support.check(torch.__version__, "import", error=ImportError)

_REBUILD = (
    "Rebuild fastmtl against the torch that is installed: "
    "`pip install --no-build-isolation -e .` (or without -e) in the fastmtl source tree."
)

try:
    from . import _build_meta
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError("fastmtl: the native extension has not been built. " + _REBUILD) from e

if _build_meta.TORCH_VERSION != torch.__version__:
    raise ImportError(
        "fastmtl was built against torch %s but torch %s is installed. %s"
        % (_build_meta.TORCH_VERSION, torch.__version__, _REBUILD)
    )

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastmtl.*)
except ImportError as e:  # pragma: no cover
    raise ImportError("fastmtl: could not load the native extension fastmtl._C (%s). %s" % (e, _REBUILD)) from e


def build_info():
    """How the native extension was built.

    Returns a dict with ``torch_version`` (the torch it was compiled against), ``cuda`` (whether the CUDA
    kernels were compiled in), ``cuda_version``, ``flags`` (compiler flags), ``compiler`` and ``openmp``.
    """
    info = dict(_C.build_info())
    info["cuda_version"] = _build_meta.CUDA_VERSION
    return info


def cpu_kernels() -> List[str]:
    """The instruction sets of the CPU kernels that this CPU and build can run, baseline first: a subset of
    ``["scalar", "avx2", "avx512"]`` (``"scalar"`` is the portable baseline, the only one on aarch64)."""
    return list(_C.cpu_kernels())


def cpu_kernel() -> str:
    """The instruction set the CPU kernels use now: the best of :func:`cpu_kernels` unless overridden by
    :func:`set_cpu_kernel` or the environment variable ``FASTMTL_CPU_KERNEL`` (read once, on first use)."""
    return _C.cpu_kernel()


def set_cpu_kernel(name: str) -> None:
    """Selects the CPU kernels' instruction set for the whole process: ``"auto"`` (the best this CPU supports),
    ``"scalar"``, ``"avx2"`` or ``"avx512"``. Raises ValueError for a name this CPU or build cannot run. It applies
    to every thread from the next op call on and replaces ``FASTMTL_CPU_KERNEL``'s choice. Meant for tests and
    debugging; the default choice is made from the CPU's features."""
    if not isinstance(name, str):
        raise TypeError("fastmtl.set_cpu_kernel: name must be a str, got %s" % type(name).__name__)
    _C.set_cpu_kernel(name)


@contextlib.contextmanager
def use_cpu_kernel(name: str) -> Iterator[str]:
    """Context manager: run the CPU kernels with instruction set ``name`` inside the block, then restore the previous
    setting (``"auto"`` stays automatic). Like :func:`set_cpu_kernel` it is process-wide: other threads running
    fastmtl ops meanwhile use ``name`` too."""
    previous = _C.cpu_kernel_override()
    set_cpu_kernel(name)
    try:
        yield name
    finally:
        _C.set_cpu_kernel(previous)
