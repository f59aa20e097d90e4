"""Comparison runner: ``python benchmarks/compare.py <lstm|heads|train|train_step|all> [--device cuda]``.

Thin wrapper over ``python -m fastmtl.bench``; see fastmtl/bench/.
"""
import sys

from fastmtl.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
