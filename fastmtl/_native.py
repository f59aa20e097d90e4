"""Loads the compiled extension ``fastmtl._C`` with a clear message when it is missing or stale."""
import torch

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
