"""User-facing functions: argument normalisation and clear errors, then ``fastmtl.ops``."""
from .dropout import dropout  # noqa: F401
from .lstm import lstm  # noqa: F401
from .heads import check_input_errors, multitask_cross_entropy, multitask_predict  # noqa: F401
from .crf import crf_decode, crf_marginals, crf_nll  # noqa: F401

__all__ = ["dropout", "lstm", "multitask_cross_entropy", "multitask_predict", "check_input_errors", "crf_nll",
           "crf_decode", "crf_marginals"]
