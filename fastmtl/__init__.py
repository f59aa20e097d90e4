"""fastmtl: fused C++/CUDA kernels for multi-task learning in NLP.

Layers: ``fastmtl.nn`` (drop-in modules) -> ``fastmtl.functional`` -> ``fastmtl.ops`` (autograd over
``torch.ops.fastmtl``) -> the native extension. The multi-task learning layer (data, metrics, weighting,
sharing, trainer, command line) sits on top of ``fastmtl.nn``.
"""
from ._native import build_info, cpu_kernel, cpu_kernels, set_cpu_kernel, use_cpu_kernel
from . import ops  # noqa: F401  registers fake kernels and autograd
from . import functional  # noqa: F401
from . import nn  # noqa: F401

__version__ = "0.1.0"

__all__ = ["build_info", "cpu_kernel", "cpu_kernels", "set_cpu_kernel", "use_cpu_kernel", "functional", "nn", "ops",
           "__version__"]


def __getattr__(name):
    # The training layer is imported lazily so `import fastmtl` stays light.
    if name in ("MultiTaskLSTM",):
        from .model import MultiTaskLSTM

        return MultiTaskLSTM
    if name in ("load", "Predictor"):  # fastmtl.load(path) -> a Predictor (fastmtl/predictor.py)
        from . import predictor

        return getattr(predictor, name)
    if name == "export":  # fastmtl.export(checkpoint, directory, ...): the package fastmtl/export/ is callable
        import importlib

        return importlib.import_module(".export", __name__)
    raise AttributeError("module 'fastmtl' has no attribute %r" % name)
