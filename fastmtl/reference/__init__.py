"""Pure-PyTorch references of every fastmtl op: the ground truth for tests and the baseline for benchmarks."""
from .lstm import *  # noqa: F401,F403
from .heads import *  # noqa: F401,F403
from .crf import *  # noqa: F401,F403
