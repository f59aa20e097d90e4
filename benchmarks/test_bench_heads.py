"""pytest-benchmark suite for the multi-task heads (forward + backward): fastmtl vs the PyTorch reference.

Run with ``pytest benchmarks/test_bench_heads.py --benchmark-enable`` (cases a and c of fastmtl/bench/heads.py;
case b, the 20,000-word head, with ``-m slow`` or ``python -m fastmtl.bench heads``).
"""
import pytest

pytest.importorskip("pytest_benchmark")

from fastmtl.bench.heads import make_workload  # noqa: E402


@pytest.mark.parametrize("provider", ["fastmtl", "reference"])
@pytest.mark.parametrize("lengths", ["variable", "full"])
@pytest.mark.parametrize("case", ["a", "c"])
def test_heads_fwd_bwd(benchmark, case, lengths, provider):
    benchmark.group = "heads-%s-%s" % (case, lengths)
    fn = make_workload(case, provider, lengths)
    benchmark.pedantic(fn, warmup_rounds=2, rounds=10)


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["fastmtl", "reference"])
def test_heads_large_vocab(benchmark, provider):
    benchmark.group = "heads-b-variable"
    fn = make_workload("b", provider, "variable")
    benchmark.pedantic(fn, warmup_rounds=1, rounds=3)
