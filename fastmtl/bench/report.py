"""Markdown tables for the README from a results JSON: ``python -m fastmtl.bench.report [PATH ...]``.

Default PATH: every ``benchmarks/results/*.json``. Each section prints its machine line and one table.
"""
import glob
import json
import os
import sys

from .common import RESULTS_DIR, format_table


def _x(v):
    return "%.2fx" % v if isinstance(v, (int, float)) else ""


def lstm_table(rows):
    out = []
    # forward+backward rows (the forward-only rows of the same run are in the JSON); a run of other modes (e.g.
    # --modes infer) shows its own
    modes = {"fwd+bwd"} if any(r.get("mode") == "fwd+bwd" for r in rows) else {r.get("mode") for r in rows}
    for r in rows:
        if r.get("mode") not in modes:
            continue
        out.append({
            "shape": "%d,%d,%d,%d" % (r["B"], r["T"], r["E"], r["H"]), "mode": r["mode"], "dtype": r["dtype"],
            "dir": r["dir"],
            "lengths": r["lengths"], "fastmtl ms": r["fastmtl_ms"], "torch ms": r["torch_ms"],
            "vs torch": _x(r["speedup_vs_torch"]),
            "torch packed ms": r.get("torch_packed_ms", ""), "vs packed": _x(r.get("speedup_vs_packed")),
            "GFLOP/s": r.get("fastmtl_gflops", ""), "GEMM GFLOP/s": r.get("gemm_gflops", "")})
    return format_table(out, ["shape", "mode", "dtype", "dir", "lengths", "fastmtl ms", "torch ms", "vs torch",
                              "torch packed ms", "vs packed", "GFLOP/s", "GEMM GFLOP/s"])


def heads_table(rows):
    out = [{"case": r["case"], "tasks": r["tasks"], "lengths": r["lengths"], "fastmtl ms": r["fastmtl_ms"],
            "reference ms": r["reference_ms"], "speedup": _x(r["speedup"]),
            "peak MiB fastmtl / ref": "%s / %s" % (_fmt(r.get("fastmtl_peak_mb")), _fmt(r.get("reference_peak_mb"))),
            "memory ratio": r.get("memory_ratio", "")} for r in rows]
    return format_table(out, ["case", "tasks", "lengths", "fastmtl ms", "reference ms", "speedup",
                              "peak MiB fastmtl / ref", "memory ratio"])


def _fmt(v):
    return "%.1f" % v if isinstance(v, (int, float)) else "-"


def generic_table(rows):
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    return format_table(rows, keys)


def mtl_table(rows):
    """train_step_mtl: per K and method, ms per step of each schedule with its ratio to the static step."""
    static = {r["K"]: r["median_ms"] for r in rows if r["provider"] == "static"}
    by = {}
    for r in rows:
        m, _, mode = r["provider"].partition("/")
        if m != "static":
            by.setdefault((r["K"], m), {})[mode or "step"] = r["median_ms"]
    out = []
    for (K, m), t in by.items():
        cell = lambda v: "%.0f (%.2fx)" % (v, v / static[K]) if v is not None and K in static else ""  # noqa: E731
        row = {"K": K, "method": m, "static ms": "%.0f" % static[K] if K in static else ""}
        row["fused ms (x static)"] = cell(t.get("fused", t.get("step")))
        row["loop ms"] = cell(t.get("loop"))
        row["separate ms (LibMTL)"] = cell(t.get("separate"))
        best = t.get("fused", t.get("step"))
        row["separate / fused"] = _x(t["separate"] / best) if best and t.get("separate") else ""
        out.append(row)
    return format_table(out, ["K", "method", "static ms", "fused ms (x static)", "loop ms", "separate ms (LibMTL)",
                              "separate / fused"])


def infer_table(rows):
    from .infer import infer_table as table

    return table(rows)


TABLES = {"lstm": lstm_table, "lstm_infer": lstm_table, "lstm_one_sentence": lstm_table, "heads": heads_table,
          "train_step_mtl": mtl_table, "train_step_mtl_quick": mtl_table, "infer": infer_table}


def render(path):
    with open(path) as f:
        data = json.load(f)
    parts = []
    for name, sec in data.get("sections", {}).items():
        m = sec.get("machine", {})
        command = sec.get("command") or "python -m fastmtl.bench " + (
            name[:-len("_quick")] + " --quick" if name.endswith("_quick") else name)
        where = (m.get("cpu") or "?") if m.get("device") == "cpu" else m.get("device")
        if m.get("device") == "cpu" and m.get("cpu_isa"):
            where += " (%s; fastmtl %s kernels)" % (", ".join(m["cpu_isa"]), m.get("fastmtl_cpu_kernel", "?"))
        if m.get("isa_caps"):
            where += ", capped: " + " ".join("%s=%s" % kv for kv in sorted(m["isa_caps"].items()))
        parts.append("#### %s (`%s`, %s, %s, %s threads, torch %s, %s)\n"
                     % (name, command, m.get("device"), where, m.get("torch_threads"), m.get("torch"), m.get("date")))
        parts.append(TABLES.get(name, generic_table)(sec.get("rows", [])) + "\n")
    return "\n".join(parts)


def main(argv=None):
    paths = (argv if argv is not None else sys.argv[1:]) or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json")))
    for p in paths:
        print("### %s\n" % os.path.basename(p))
        print(render(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
