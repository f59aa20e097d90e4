"""Autograd Functions and fake (meta) kernels over ``torch.ops.fastmtl.*``.

One module per op family: :mod:`fastmtl.ops.lstm`, :mod:`fastmtl.ops.heads` and :mod:`fastmtl.ops.crf`.
"""
from .. import _native  # noqa: F401  loads the extension (op schemas) first
from . import lstm, heads, crf  # noqa: F401
