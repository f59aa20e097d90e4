"""``fastmtl.train``: the trainer's public names (the implementation lives in :mod:`fastmtl.training`, in stages).

``from fastmtl.train import TrainConfig, train`` and ``fastmtl.train.load_checkpoint(...)`` keep working."""
from . import data as D  # noqa: F401
from .training import *  # noqa: F401,F403
from .training import __all__  # noqa: F401
from .training.checkpoint_content import rng_state as _rng_state, set_rng_state as _set_rng_state  # noqa: F401
from .weighting import make_weighting  # noqa: F401
