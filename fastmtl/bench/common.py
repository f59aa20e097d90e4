"""Shared benchmark helpers: timing, a GEMM reference rate, peak memory, result files and tables.

Timing: medians of ``repeat`` runs after ``warmup`` runs; CUDA runs are timed with events on the current
stream after a synchronisation. Peak memory: on CUDA the caching allocator's peak; on the CPU the growth of the
peak resident set (VmHWM, reset through /proc/self/clear_refs) while the workload runs once, measured in a fresh
subprocess so both sides are measured the same way from the same starting point.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "benchmarks", "results")


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, warmup=3, repeat=10, device="cpu", min_time_s=0.0):
    """Time ``fn()``; returns ``{"median_ms", "p25_ms", "p75_ms", "repeat"}``.

    ``min_time_s`` raises ``repeat`` until the timed runs take at least that long in total (for tiny workloads).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    cuda = str(device).startswith("cuda")
    total = 0.0
    i = 0
    while i < repeat or total < min_time_s:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        total += ms / 1e3
        i += 1
        if i >= 10 * repeat:
            break
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "repeat": len(times)}


def gemm_gflops(device="cpu", dtype=torch.float32, n=1024, repeat=10):
    """Achieved GFLOP/s of the fastest square GEMM (n x n x n) on ``device`` (torch.mm, and oneDNN on the CPU): the
    reference rate for 'achieved / peak'."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    candidates = [lambda: torch.mm(a, b)]
    if str(device) == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        # On the CPU the fastest GEMM is often oneDNN's (MKL is slow on some AMD parts): the rate is the best of both.
        from .. import _torch_private

        mkldnn_linear = _torch_private.mkldnn_linear()
        try:
            am, bm = a.to_mkldnn(), b.to_mkldnn()
            mkldnn_linear(am, bm)
            candidates.append(lambda: mkldnn_linear(am, bm))
        except (RuntimeError, TypeError):  # TypeError: this torch has no mkldnn_linear (None)
            pass
    best = min(measure(f, warmup=3, repeat=repeat, device=device)["median_ms"] for f in candidates)
    return 2.0 * n ** 3 / (best / 1e3) / 1e9


_PEAK_CHILD = r"""
import importlib, json, sys, gc
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
mod = importlib.import_module(spec["module"])
fn = getattr(mod, spec["factory"])(**spec.get("kwargs", {}))
fn()  # warm-up: lazy initialisation, thread pools, allocator caches
gc.collect()
dev = spec.get("device", "cpu")
if dev.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    fn()
    peak = status("VmHWM") - base
print("FASTMTL_PEAK", json.dumps({"peak_bytes": peak}))
"""


def peak_memory_mb(module, factory, kwargs=None, device="cpu", threads=None, timeout=600):
    """Peak memory (MiB) that one call of a workload adds, measured in a fresh subprocess.

    ``module.factory(**kwargs)`` must build the inputs and return a zero-argument callable running the workload
    (e.g. forward + backward). Both sides of a comparison use this same function.
    """
    spec = {"module": module, "factory": factory, "kwargs": kwargs or {}, "device": device, "threads": threads}
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, json.dumps(spec)], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError("peak-memory subprocess failed:\n" + out.stderr[-4000:])
    for line in out.stdout.splitlines():
        if line.startswith("FASTMTL_PEAK "):
            return json.loads(line[len("FASTMTL_PEAK "):])["peak_bytes"] / 2 ** 20
    raise RuntimeError("peak-memory subprocess printed no result:\n" + out.stdout[-2000:])


def machine_info(device="cpu"):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # the instruction sets: what this CPU offers, the kernel set fastmtl runs on it, torch's own dispatch level
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith(("flags", "Features"))), [])
        wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "asimd", "sve")
        info["cpu_isa"] = [x for x in wanted if x in flags]
    except OSError:
        pass
    try:
        from .._native import cpu_kernel
        info["fastmtl_cpu_kernel"] = cpu_kernel()
    except Exception:  # an extension without CPU kernel selection
        pass
    if hasattr(torch.backends, "cpu"):
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    # instruction-set caps in force (e.g. an AVX2-only run on an AVX-512 CPU: torch, oneDNN, MKL and fastmtl capped)
    caps = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                       "FASTMTL_CPU_KERNEL") if os.environ.get(k)}
    if caps:
        info["isa_caps"] = caps
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device"] = "cpu"
    return info


def default_results_path(device="cpu"):
    if str(device).startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        tag = "h200" if "h200" in name else "h100" if "h100" in name else name.replace(" ", "-")
    else:
        tag = "cpu-%dcore" % (os.cpu_count() or 1)
    return os.path.join(RESULTS_DIR, tag + ".json")


def atomic_write_json(path, obj):
    """Write JSON to ``path`` atomically (:func:`fastmtl.fileio.atomic_write`: a mkstemp file in the same folder,
    fsync, rename, folder fsync)."""
    from ..fileio import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_section(name, rows, path=None, device="cpu", extra=None):
    """Merge one benchmark section (a list of row dicts) into the machine's results JSON, atomically."""
    path = path or default_results_path(device)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.setdefault("sections", {})
    section = {"machine": machine_info(device), "rows": rows}
    if extra:
        section.update(extra)
    data["sections"][name] = section
    atomic_write_json(path, data)
    return path


def _fmt(v):
    if isinstance(v, float):
        if abs(v) >= 100:
            return "%.0f" % v
        if abs(v) >= 10:
            return "%.1f" % v
        return "%.2f" % v
    return str(v)


def format_table(rows, columns):
    """A Markdown table of ``rows`` (dicts) restricted to ``columns`` (keys, or (key, header) pairs)."""
    cols = [(c, c) if isinstance(c, str) else c for c in columns]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k, _ in cols) + " |")
    return "\n".join(lines)


def print_table(rows, columns):
    print(format_table(rows, columns), flush=True)
