"""LSTM benchmark: fastmtl.nn.LSTM vs torch.nn.LSTM (oneDNN on the CPU, cuDNN on CUDA), measured in one run.

For every shape (B, T, E, H), direction (uni/bi) and lengths case:
  * equal lengths: fastmtl vs torch.nn.LSTM on the batch;
  * variable lengths (uniform in [T/4, T]): fastmtl with ``lengths=`` vs torch.nn.LSTM over
    ``pack_padded_sequence`` (what a user writes) and vs torch.nn.LSTM on the padded batch (ignoring lengths),
modes forward (no grad) and forward+backward (input and all parameters require grad). Providers are timed
round-robin (so a load change on the machine hits all of them alike); medians after warm-up. Achieved GFLOP/s
counts the GEMM FLOPs of the real (unpadded) tokens, 2 * tokens * 4H * (E + H) per direction forward and twice
that backward, against a square-GEMM rate measured in the same run.

    python -m fastmtl.bench lstm [--device cpu|cuda] [--quick] [--shapes 64,32,128,256;...] [--dtypes float32,bfloat16]
    python -m fastmtl.bench lstm --threads 1 --clock process   # CPU-time comparison, robust on a busy machine
"""
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .common import gemm_gflops, measure, peak_memory_mb, print_table

CPU_SHAPES = [(64, 32, 128, 256), (32, 64, 300, 512), (128, 24, 100, 128)]
# the CUDA grid: B in {8, 32, 128}, T in {32, 128}, E = 300, H in {256, 512, 1024}
CUDA_SHAPES = [(B, T, 300, H) for B in (8, 32, 128) for T in (32, 128) for H in (256, 512, 1024)]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def add_arguments(p):
    p.add_argument("--shapes", default=None, help="B,T,E,H;B,T,E,H;... (default: the grid of each device)")
    p.add_argument("--dtypes", default=None, help="comma list (default float32 on cpu, float32,bfloat16 on cuda)")
    p.add_argument("--directions", default="uni,bi")
    p.add_argument("--lengths", default="equal,var", help="equal and/or var (uniform in [T/4, T])")
    p.add_argument("--modes", default="fwd,fwd+bwd",
                   help="fwd (no_grad), infer (inference_mode), fwd+bwd; e.g. --shapes 1,20,300,256 --modes infer "
                        "for the one-sentence latency")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (cpu)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (fresh subprocesses, slow)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process: CPU time of this process (robust on a shared, loaded machine; meaningful with "
                        "--threads 1 only)")


def _lengths(B, T, generator):
    lo = max(1, T // 4)
    return torch.randint(lo, T + 1, (B,), generator=generator)


def make_workload(provider, B, T, E, H, bidirectional, lengths, mode, device="cpu", dtype="float32", seed=0):
    """A zero-argument callable running one workload (also the factory used for peak-memory subprocesses).

    provider: "fastmtl" (lengths= fast path), "torch" (padded batch, lengths ignored) or "torch_packed"
    (pack_padded_sequence -> torch.nn.LSTM -> pad_packed_sequence). lengths: "equal" or "var".
    mode: "fwd" (no grad), "infer" (torch.inference_mode) or "fwd+bwd".
    """
    import fastmtl  # noqa: F401

    dt = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if provider == "fastmtl":
        from fastmtl.nn import LSTM

        m = LSTM(E, H, bidirectional=bidirectional, device=device, dtype=dt)
    else:
        m = torch.nn.LSTM(E, H, bidirectional=bidirectional, device=device, dtype=dt)
    x = torch.randn(T, B, E, generator=g).to(device=device, dtype=dt)
    lens = _lengths(B, T, g) if lengths == "var" else None
    train = mode == "fwd+bwd"
    if train:
        x.requires_grad_(True)

    if provider == "fastmtl":
        def fwd():
            return m(x, lengths=lens)[0]
    elif provider == "torch_packed" and lens is not None:
        def fwd():
            p = pack_padded_sequence(x, lens, enforce_sorted=False)
            out, _ = m(p)
            return pad_packed_sequence(out, total_length=T)[0]
    else:
        def fwd():
            return m(x)[0]

    if mode == "infer":
        def run():
            with torch.inference_mode():
                return fwd()
    elif not train:
        def run():
            with torch.no_grad():
                return fwd()
    else:
        def run():
            for p in m.parameters():
                p.grad = None
            x.grad = None
            out = fwd()
            out.sum().backward()
    return run


def _flops(B, T, E, H, D, tokens, mode):
    f = 2.0 * tokens * 4 * H * (E + H) * D
    return f * (3.0 if mode == "fwd+bwd" else 1.0)


def _process_ms(fn):
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) * 1e3


def _interleaved(fns, device, warmup, repeat, clock="wall"):
    """Round-robin timing of several callables; returns {name: measure()-style dict}."""
    for fn in fns.values():
        measure(fn, warmup=warmup, repeat=1, device=device)
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            if clock == "process":
                times[k].append(_process_ms(fn))
            else:
                times[k].append(measure(fn, warmup=0, repeat=1, device=device)["median_ms"])
    out = {}
    for k, ts in times.items():
        ts = sorted(ts)
        q = lambda p: ts[min(len(ts) - 1, int(round(p * (len(ts) - 1))))]  # noqa: E731
        out[k] = {"median_ms": q(0.5), "p25_ms": q(0.25), "p75_ms": q(0.75), "repeat": len(ts)}
    return out


def run(args):
    import fastmtl  # noqa: F401

    device = getattr(args, "device", "cpu") or "cpu"
    quick = getattr(args, "quick", False)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    cuda = str(device).startswith("cuda")
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s.strip()]
    else:
        shapes = CUDA_SHAPES if cuda else CPU_SHAPES
        if quick:
            shapes = shapes[:1]
    dtypes = (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    directions = [d.strip() for d in args.directions.split(",")]
    lcases = [c.strip() for c in args.lengths.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    repeat = args.repeat or (3 if quick else (20 if cuda else 9))
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)

    rows = []
    for dtype in dtypes:
        peak = gemm_gflops(device, _DTYPES[dtype])
        print("GEMM reference rate (%s, %s): %.1f GFLOP/s" % (device, dtype, peak), flush=True)
        for (B, T, E, H) in shapes:
            for dname in directions:
                bi = dname == "bi"
                D = 2 if bi else 1
                for lc in lcases:
                    for mode in modes:
                        provs = ["fastmtl", "torch"] + (["torch_packed"] if lc == "var" else [])
                        kw = dict(B=B, T=T, E=E, H=H, bidirectional=bi, lengths=lc, mode=mode, device=device,
                                  dtype=dtype)
                        fns = {p: make_workload(p, **kw) for p in provs}
                        res = _interleaved(fns, device, warmup, repeat, getattr(args, "clock", "wall"))
                        g = torch.Generator().manual_seed(0)
                        torch.randn(T, B, E, generator=g)
                        tokens = int(_lengths(B, T, g).sum()) if lc == "var" else B * T
                        fl = _flops(B, T, E, H, D, tokens, mode)
                        f_ms = res["fastmtl"]["median_ms"]
                        row = {
                            "device": device, "dtype": dtype, "B": B, "T": T, "E": E, "H": H, "dir": dname,
                            "lengths": lc, "mode": mode,
                            "fastmtl_ms": f_ms, "fastmtl_p25_ms": res["fastmtl"]["p25_ms"],
                            "fastmtl_p75_ms": res["fastmtl"]["p75_ms"],
                            "torch_ms": res["torch"]["median_ms"],
                            "speedup_vs_torch": res["torch"]["median_ms"] / f_ms,
                            "fastmtl_gflops": fl / (f_ms / 1e3) / 1e9,
                            "gemm_gflops": peak,
                            "repeat": repeat, "threads": torch.get_num_threads(),
                            "clock": getattr(args, "clock", "wall"),
                        }
                        row["pct_of_gemm"] = 100.0 * row["fastmtl_gflops"] / peak
                        if lc == "var":
                            row["torch_packed_ms"] = res["torch_packed"]["median_ms"]
                            row["speedup_vs_packed"] = res["torch_packed"]["median_ms"] / f_ms
                            row["tokens"] = tokens
                        if getattr(args, "memory", False) and mode == "fwd+bwd":
                            for p in provs:
                                row[p + "_peak_mb"] = peak_memory_mb("fastmtl.bench.lstm", "make_workload",
                                                                     dict(provider=p, **kw), device=device)
                        rows.append(row)
                        print_row(row)
                        del fns
    print()
    print_table(rows, [("dtype", "dtype"), ("B", "B"), ("T", "T"), ("E", "E"), ("H", "H"), ("dir", "dir"),
                       ("lengths", "lengths"), ("mode", "mode"), ("fastmtl_ms", "fastmtl ms"),
                       ("torch_ms", "torch ms"), ("speedup_vs_torch", "x vs torch"),
                       ("torch_packed_ms", "torch packed ms"), ("speedup_vs_packed", "x vs packed"),
                       ("fastmtl_gflops", "GFLOP/s"), ("pct_of_gemm", "% GEMM")])
    return rows


def print_row(r):
    extra = ""
    if "torch_packed_ms" in r:
        extra = " | packed %.2f ms (%.2fx)" % (r["torch_packed_ms"], r["speedup_vs_packed"])
    print("%s B=%d T=%d E=%d H=%d %s %s %s: fastmtl %.2f ms, torch %.2f ms (%.2fx)%s, %.1f GFLOP/s (%.0f%% of GEMM)"
          % (r["dtype"], r["B"], r["T"], r["E"], r["H"], r["dir"], r["lengths"], r["mode"], r["fastmtl_ms"],
             r["torch_ms"], r["speedup_vs_torch"], extra, r["fastmtl_gflops"], r["pct_of_gemm"]), flush=True)


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    add_arguments(ap)
    run(ap.parse_args())
