"""Autograd Functions and fake (meta) kernels over ``torch.ops.fastmtl.*``.

One module per op family: :mod:`fastmtl.ops.lstm` and :mod:`fastmtl.ops.heads`.
"""
from .. import _native  # noqa: F401  loads the extension (op schemas) first
from . import lstm, heads  # noqa: F401
