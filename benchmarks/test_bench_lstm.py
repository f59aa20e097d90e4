"""pytest-benchmark suite for the LSTM: fastmtl.nn.LSTM vs torch.nn.LSTM, forward+backward, one small shape per
case (the full comparison with ratios and GFLOP/s is ``python -m fastmtl.bench lstm``).

    pytest benchmarks/test_bench_lstm.py --benchmark-enable
"""
import pytest

from fastmtl.bench.lstm import make_workload

SHAPE = dict(B=64, T=32, E=128, H=256)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("provider,lengths", [("fastmtl", "equal"), ("torch", "equal"), ("fastmtl", "var"),
                                              ("torch_packed", "var")])
def test_lstm_fwd_bwd(benchmark, provider, lengths, bidirectional):
    benchmark.group = "lstm fwd+bwd %s %s" % ("bi" if bidirectional else "uni", lengths)
    fn = make_workload(provider, bidirectional=bidirectional, lengths=lengths, mode="fwd+bwd", **SHAPE)
    benchmark.pedantic(fn, warmup_rounds=2, rounds=5, iterations=1)


@pytest.mark.parametrize("provider", ["fastmtl", "torch"])
def test_lstm_forward(benchmark, provider):
    benchmark.group = "lstm fwd uni equal"
    fn = make_workload(provider, bidirectional=False, lengths="equal", mode="fwd", **SHAPE)
    benchmark.pedantic(fn, warmup_rounds=2, rounds=5, iterations=1)
