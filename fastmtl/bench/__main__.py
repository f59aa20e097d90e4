"""``python -m fastmtl.bench <name> [--device cpu|cuda] [--quick] [--out PATH]``: run one benchmark runner
(``fastmtl/bench/<name>.py``, which defines ``add_arguments(parser)`` optionally and ``run(args) -> rows``),
print its table and merge its rows into the machine's results JSON."""
import argparse
import importlib
import sys

RUNNERS = ("lstm", "heads", "crf", "train", "gemm", "train_step", "train_step_mtl", "torchjd", "infer", "flair")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastmtl.bench", description=__doc__)
    p.add_argument("name", choices=RUNNERS + ("all",))
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (smoke run)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<machine>.json)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--section", default=None,
                   help="name of the results section (default: the runner's name; e.g. lstm_infer for a second lstm "
                        "run with other options)")
    args, rest = p.parse_known_args(argv)
    if args.section and args.name == "all":
        p.error("--section names one runner's section; not with all")
    # (all: not the train_step runners, nor torchjd, which needs the [torchjd] extra, nor infer, which needs onnx,
    # nor flair, which needs the [flair] extra)
    names = [n for n in RUNNERS if n not in ("train_step", "train_step_mtl", "torchjd", "infer", "flair")
             and (n != "gemm" or args.device == "cpu")]
    if args.name != "all":
        names = [args.name]
    for name in names:
        mod = importlib.import_module("fastmtl.bench." + name)
        sub = argparse.ArgumentParser(prog="python -m fastmtl.bench " + name)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(sub)
        sub_args = sub.parse_args(rest)
        for k, v in vars(args).items():
            setattr(sub_args, k, v)
        print("== %s (%s)" % (name, args.device), flush=True)
        rows = mod.run(sub_args)
        if not args.no_save and rows:
            from .common import save_section

            cmd = " ".join(["python -m fastmtl.bench"] + list(sys.argv[1:] if argv is None else argv))
            path = save_section(args.section or name, rows, path=args.out, device=args.device,
                                extra={"command": cmd})
            print("saved to %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
