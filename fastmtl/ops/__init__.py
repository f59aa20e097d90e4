"""Autograd Functions and fake (meta) kernels over ``torch.ops.fastmtl.*``.

One module per op family: :mod:`fastmtl.ops.lstm`, :mod:`fastmtl.ops.heads`, :mod:`fastmtl.ops.crf` and
:mod:`fastmtl.ops.tagger`.
"""
from .. import _native  # noqa: F401  loads the extension (op schemas) first
from . import lstm, heads, crf, tagger  # noqa: F401
