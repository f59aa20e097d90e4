"""Benchmarks: ``python -m fastmtl.bench <name> [options]`` (names: lstm, heads, train, train_step, all).

Every runner measures fastmtl and its PyTorch baseline in the same run and prints ratios; results are merged
into ``benchmarks/results/<machine>.json`` (see :func:`fastmtl.bench.common.save_section`).
"""
