"""Multi-task heads benchmark: fastmtl's fused heads + losses vs the PyTorch reference (``nn.Linear`` +
pooling + ``F.cross_entropy`` per task, summed), forward + backward, time and peak memory.

Cases (B=64, T=32, D=512):
  a  ATIS-like: intent C=26 (sequence, last-token pooling) + slots C=130 (token)
  b  a + an auxiliary next-word head over a 20,000-word vocabulary (token)
  c  5 token tasks of 50 classes
Each case runs with variable lengths (uniform in [5, 32], like padded ATIS batches; padded positions never
count) and with every sequence at full length T=32 (no padding: the fused op then does exactly the reference's
GEMMs). Timing: fastmtl and the reference run alternately, call by call (so both see the same machine load,
which matters on a shared machine), and each side's median and quartiles are reported. Peak memory: ``fastmtl.bench.common.peak_memory_mb``
(peak-RSS growth of one forward + backward in a fresh subprocess on the CPU, allocator peak on CUDA), the same
method for both sides.
"""
import torch

import os
import statistics
import time

from .common import gemm_gflops, peak_memory_mb, print_table

CASES = {
    "a": [("intent", "sequence", 26), ("slots", "token", 130)],
    "b": [("intent", "sequence", 26), ("slots", "token", 130), ("next_word", "token", 20000)],
    "c": [("tok%d" % i, "token", 50) for i in range(5)],
}
B, T, D = 64, 32, 512


def _inputs(case, lengths, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = CASES[case]
    hidden = torch.randn(B, T, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    if lengths == "variable":
        lens = torch.randint(5, T + 1, (B,), generator=g).to(device)
    else:
        lens = None
    weights, biases, targets, levels = [], [], [], []
    for _, level, C in tasks:
        weights.append((torch.randn(C, D, generator=g) / D ** 0.5).to(device=device, dtype=dtype).requires_grad_())
        biases.append(torch.zeros(C, dtype=dtype, device=device).requires_grad_())
        shape = (B,) if level == "sequence" else (B, T)
        targets.append(torch.randint(0, C, shape, generator=g).to(device))
        levels.append(level)
    return hidden, lens, weights, biases, targets, levels


def make_workload(case="a", provider="fastmtl", lengths="variable", device="cpu"):
    """A zero-argument callable running forward + backward of the heads once (also used by peak_memory_mb)."""
    from ..functional import multitask_cross_entropy
    from ..reference.heads import multitask_cross_entropy_reference

    hidden, lens, weights, biases, targets, levels = _inputs(case, lengths, device)
    fn = multitask_cross_entropy if provider == "fastmtl" else multitask_cross_entropy_reference
    params = [hidden] + weights + biases

    def step():
        for p in params:
            p.grad = None
        total, _ = fn(hidden, weights, targets, levels, biases=biases, lengths=lens, poolings="last")
        total.backward()

    return step


def _gemm_flops(case, lengths):
    hidden, lens, *_ = _inputs(case, lengths, "cpu")
    rows = int(lens.sum()) if lens is not None else B * T
    f = 0
    for _, level, C in CASES[case]:
        f += 3 * 2 * (B if level == "sequence" else rows) * D * C
    return f


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _interleaved(fns, warmup, repeat, device):
    """Times the callables alternately, one call each per turn; {name: {median_ms, p25_ms, p75_ms}}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {p: [] for p in fns}
    for _ in range(repeat):
        for p, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[p].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for p, t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        out[p] = {"median_ms": statistics.median(t), "p25_ms": q[0], "p75_ms": q[2]}
    return out


def add_arguments(p):
    p.add_argument("--cases", default="a,b,c", help="comma-separated subset of a,b,c")
    p.add_argument("--lengths", default="variable,full", help="variable and/or full")
    p.add_argument("--rounds", type=int, default=3, help="multiplies the number of timed calls")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")


def run(args):
    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    cases = getattr(args, "cases", "a,b,c").split(",")
    lengths_modes = getattr(args, "lengths", "variable,full").split(",")
    rounds = 1 if quick else getattr(args, "rounds", 3)
    memory = not getattr(args, "no_memory", False)
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    peak_rate = gemm_gflops(device)
    rows = []
    for case in cases:
        for lengths in lengths_modes:
            big = case == "b"
            rep = 2 if (quick or big) else 10
            fns = {p: make_workload(case, p, lengths, device) for p in ("fastmtl", "reference")}
            load0 = os.getloadavg()[0]
            stats = _interleaved(fns, warmup=1 if big else 3, repeat=rep * rounds, device=device)
            ms = {p: v["median_ms"] for p, v in stats.items()}
            load = "%.1f-%.1f" % (load0, os.getloadavg()[0])  # 1-minute load average before and after
            row = {
                "case": case, "tasks": "+".join("%s:%d" % (n, C) for n, _, C in CASES[case]), "lengths": lengths,
                "fastmtl_ms": ms["fastmtl"], "reference_ms": ms["reference"],
                "speedup": ms["reference"] / ms["fastmtl"],
                "fastmtl_p25_p75_ms": "%.1f-%.1f" % (stats["fastmtl"]["p25_ms"], stats["fastmtl"]["p75_ms"]),
                "reference_p25_p75_ms": "%.1f-%.1f" % (stats["reference"]["p25_ms"], stats["reference"]["p75_ms"]),
                "fastmtl_gflops": _gemm_flops(case, lengths) / (ms["fastmtl"] / 1e3) / 1e9,
                "gemm_peak_gflops": peak_rate, "load_avg": load, "threads": torch.get_num_threads(),
            }
            if memory:
                mem = {p: peak_memory_mb("fastmtl.bench.heads", "make_workload",
                                         dict(case=case, provider=p, lengths=lengths, device=device), device=device,
                                         threads=threads)
                       for p in fns}
                row.update(fastmtl_peak_mb=mem["fastmtl"], reference_peak_mb=mem["reference"],
                           # RSS growth below ~1 MiB is within the allocator's cached pages: no ratio
                           memory_ratio=mem["fastmtl"] / mem["reference"] if mem["reference"] >= 1.0 else None)
            rows.append(row)
            print_table([row], _COLUMNS)
            del fns
    print()
    print_table(rows, _COLUMNS)
    return rows


_COLUMNS = ["case", "tasks", "lengths", "fastmtl_ms", "reference_ms", "speedup", "fastmtl_p25_p75_ms",
            "reference_p25_p75_ms", "fastmtl_gflops",
            "gemm_peak_gflops", "load_avg", "threads", "fastmtl_peak_mb", "reference_peak_mb", "memory_ratio"]
