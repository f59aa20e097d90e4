"""fastmtl's own float32 GEMM (``csrc/cpu/kernels/gemm_*.cpp``) against ``torch.mm`` (torch's BLAS) on the shapes of
the LSTM's large GEMMs, per CPU kernel set this CPU runs and per thread count, timed in turns in one run. CPU only.

    python -m fastmtl.bench gemm [--threads-list 1,2]

The own GEMM is called directly (``fastmtl._C._gemm_f32_for_tests``) whatever the op's choice; ``used_by_ops``
says whether the LSTM and heads ops take it for this shape under this kernel set (``cpu::use_own_gemm_f32``).
"""
import torch

from .common import measure, print_table

__all__ = ["run", "add_arguments"]

# (what, m, n, k, trans_a, trans_b): B*T = 1024 rows, H = 512 (4H = 2048), I = 256
SHAPES = [("gx = X @ W_ih^T", 1024, 2048, 256, False, True),
          ("dW_ih = dG^T @ X", 2048, 256, 1024, True, False),
          ("dW_hh = dG^T @ H", 2048, 512, 1024, True, False),
          ("grad_in = dG @ W_ih", 1024, 256, 2048, False, False)]


def add_arguments(p):
    p.add_argument("--threads-list", default="1,2", help="thread counts (comma-separated)")
    p.add_argument("--repeat", type=int, default=None)


def _operands(m, n, k, ta, tb, gen):
    a = torch.randn((k, m) if ta else (m, k), generator=gen)
    b = torch.randn((n, k) if tb else (k, n), generator=gen)
    return a, b, (a.t() if ta else a), (b.t() if tb else b)


def run(args):
    import fastmtl
    from fastmtl import _C

    if str(getattr(args, "device", "cpu")) != "cpu":
        raise SystemExit("the gemm benchmark is CPU only")
    quick = getattr(args, "quick", False)
    repeat = getattr(args, "repeat", None) or (3 if quick else 9)
    threads_list = [int(x) for x in getattr(args, "threads_list", "1,2").split(",") if x]
    shapes = SHAPES[:1] if quick else SHAPES
    gen = torch.Generator().manual_seed(0)
    old_threads = torch.get_num_threads()
    rows = []
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for what, m, n, k, ta, tb in shapes:
                a, b, opa, opb = _operands(m, n, k, ta, tb, gen)
                c = torch.empty(m, n)
                ref = torch.empty(m, n)
                torch_ms = measure(lambda: torch.mm(opa, opb, out=ref), warmup=2, repeat=repeat)["median_ms"]
                for isa in fastmtl.cpu_kernels():
                    with fastmtl.use_cpu_kernel(isa):
                        own_ms = measure(lambda: _C._gemm_f32_for_tests(a, b, ta, tb, 0.0, c), warmup=2,
                                         repeat=repeat)["median_ms"]
                        used = bool(_C._gemm_f32_used_by_lstm(m, n, k))
                    gf = lambda ms: round(2.0 * m * n * k / (ms / 1e3) / 1e9, 1)  # noqa: E731
                    rows.append({"shape": "%dx%dx%d" % (m, n, k), "what": what, "threads": threads, "isa": isa,
                                 "own_ms": round(own_ms, 3), "torch_ms": round(torch_ms, 3), "own_gflops": gf(own_ms),
                                 "torch_gflops": gf(torch_ms), "speedup": round(torch_ms / own_ms, 2),
                                 "used_by_ops": used})
                    print("%s t=%d %-6s own %.1f GFLOP/s, torch.mm %.1f GFLOP/s (%.2fx)%s"
                          % (what, threads, isa, rows[-1]["own_gflops"], rows[-1]["torch_gflops"],
                             rows[-1]["speedup"], "" if used else " (ops keep torch's)"), flush=True)
    finally:
        torch.set_num_threads(old_threads)
    print_table(rows, ["what", "shape", "threads", "isa", "own_gflops", "torch_gflops", "speedup", "used_by_ops"])
    return rows
