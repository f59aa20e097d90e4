"""The ``fastmtl`` command: ``train``, ``evaluate``, ``predict``, ``export`` and ``bench``.

``fastmtl train`` with no arguments trains the default joint BiLSTM (intent + slots) on ATIS and prints the test
metrics. See ``fastmtl train --help``.

Exit codes: 0 done; 2 a usage error (argparse) or an expected error (a bad option, file, data or checkpoint, a non-empty
``--output-dir`` without ``--resume``/``--overwrite``, a loss that turned nan/inf), reported as one line on stderr;
130 interrupted (Ctrl-C). Anything else is a bug and shows its traceback.
"""
import argparse
import dataclasses
import json
import os
import sys

__all__ = ["main", "build_parser"]


def _kv(text, what, conv=float):
    out = {}
    for item in text.split(","):
        k, sep, v = item.partition(":" if ":" in item else "=")
        if not sep or not k:
            raise argparse.ArgumentTypeError("%s must be NAME:VALUE[,NAME:VALUE...], got %r" % (what, text))
        try:
            out[k] = conv(v)
        except ValueError:
            raise argparse.ArgumentTypeError("%s: bad value %r for %r" % (what, v, k)) from None
    return out


def _bool(text):
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("expected true/false, got %r" % text)


_PARSERS = {"bool": _bool, "kv_float": lambda s: _kv(s, "--task-weights"), "kv_int": lambda s: _kv(s, "--task-layers", int),
            "columns": lambda s: _columns(s)}


def _default_text(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return "%g" % v if isinstance(v, float) else str(v)


def _add_train_args(p):
    """The options of ``fastmtl train``, generated from :class:`~fastmtl.training.config.TrainConfig` (each field's
    help, group, choices and spelling are declared once, in its metadata; defaults shown from the dataclass).
    Options not given stay out of the namespace, so a ``--config`` file's values apply unless overridden."""
    from .training.config import TrainConfig, option_name

    p.add_argument("--config", metavar="RUN.toml",
                   help="read the run from a TOML file: top-level keys are these options with underscores (epochs = 10, "
                        "hidden_size = 256), plus [[datasets]], [[tasks]] and [sampling] tables for several datasets; "
                        "options given here override the file")
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if "help" not in meta or ("flag" in meta and meta["flag"] is None):
            continue
        g = groups.get(meta["group"])
        if g is None:
            g = groups[meta["group"]] = p.add_argument_group(meta["group"])
        kw = {"dest": f.name, "default": argparse.SUPPRESS}
        help_text = meta["help"]
        action = meta.get("action")
        if action == "flag":
            kw["action"] = argparse.BooleanOptionalAction
            help_text += " (default: %s)" % ("on" if f.default else "off")
        else:
            if action == "append":
                kw["action"] = "append"
            parse = meta.get("parse")
            kw["type"] = _PARSERS[parse] if parse else f.type if f.type in (int, float) else None
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
            if meta.get("metavar") or parse == "bool":
                kw["metavar"] = meta.get("metavar") or "{true,false}"
            if f.default is not None and action != "append":
                help_text += " (default: %s)" % _default_text(f.default)
        g.add_argument(option_name(f.name), help=help_text.replace("%", "%%"), **kw)


def build_parser():
    p = argparse.ArgumentParser(prog="fastmtl", description="Fast multi-task learning for NLP.")
    sub = p.add_subparsers(dest="command", metavar="{train,evaluate,predict,export,bench}")
    t = sub.add_parser("train", help="train a multi-task model (default: joint intent + slots BiLSTM on ATIS)")
    _add_train_args(t)
    e = sub.add_parser("evaluate", help="evaluate a checkpoint on a data file (default: the test sets of its run)")
    e.add_argument("checkpoint")
    e.add_argument("file", nargs="?", help="data file (default: the test set of every dataset the model was trained on)")
    e.add_argument("--format", choices=["atis", "conllu", "conll", "jsonl"],
                   help="data format (default: the training format)")
    e.add_argument("--columns", type=_columns)
    e.add_argument("--dataset", help="a model trained on several datasets: score only this dataset's tasks (on FILE, "
                   "or on its test set)")
    e.add_argument("--stored-test", action="store_true",
                   help="without FILE: read the test files that the checkpoint names (never read unless asked: a "
                        "checkpoint can name any file); built-in test sets need no confirmation")
    e.add_argument("--device", default="cpu")
    e.add_argument("--output", help="also write the metrics JSON here")
    e.add_argument("--report", metavar="FILE",
                   help="write per-class precision/recall/F1/support of every task (per span type for BIO/IOBES tags, "
                        "per label otherwise) with micro/macro/weighted averages: JSON if FILE ends in .json, else "
                        "text tables")
    e.add_argument("--predictions", metavar="FILE",
                   help="write the predictions as JSON lines, one per example: tokens, gold and predicted labels of "
                        "every task")
    r = sub.add_parser("predict", help="predict every task for raw sentences (one per line) -> JSON lines")
    r.add_argument("checkpoint")
    r.add_argument("sentences", nargs="*", help="sentences (default: read lines from --input or stdin)")
    r.add_argument("--input", help="file with one sentence per line")
    r.add_argument("--details", action="store_true",
                   help="per task the label with its confidence and probabilities, per token task the spans with "
                        "confidences (fastmtl.load(...).predict); default: the labels only")
    r.add_argument("--top-k", type=int, help="with --details: keep the K most probable labels of each distribution")
    r.add_argument("--device", default="cpu")
    x = sub.add_parser("export", help="write a checkpoint as a self-contained bundle: model.onnx (standard ONNX), "
                       "meta.json and runtime.py (NumPy + ONNX Runtime only), or TorchScript / torch.export")
    x.add_argument("checkpoint", help="the model: a best.pt written by fastmtl train")
    x.add_argument("directory", help="the bundle folder to create (new, or empty)")
    x.add_argument("--format", choices=["onnx", "torchscript", "pt2"], default="onnx",
                   help="onnx: model.onnx for ONNX Runtime (and any ONNX runtime); torchscript: model.pt for "
                        "torch.jit.load (Python or libtorch C++); pt2: model.pt2, a torch.export program that calls "
                        "fastmtl's ops (default: onnx)")
    x.add_argument("--opset", type=int, help="onnx: the ONNX opset (default: 17)")
    x.add_argument("--lstm", choices=["torch", "fastmtl"],
                   help="torchscript: run the LSTM as torch.nn.LSTM (standard torch, default) or through fastmtl's "
                        "fused op (the loading process must load fastmtl's extension)")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier bundle in DIRECTORY")
    x.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="run the written bundle on example sentences and compare its scores with the model's before "
                        "it is put in place (default: on)")
    b = sub.add_parser("bench", help="run a benchmark: python -m fastmtl.bench NAME ...")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _train(ns):
    from .train import TrainConfig, train
    from .training.config import read_toml

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    from_file = read_toml(ns.config) if ns.config else {}
    given = {k: v for k, v in vars(ns).items() if k in fields}
    cfg = TrainConfig(**{**from_file, **given})  # the command line overrides the file
    try:
        cfg.validate()
    except ValueError as e:  # a bad value from the run file: say where it is
        raise ValueError(_in_file(str(e), ns.config, set(from_file) - set(given))) from None
    if cfg.epochs == 0:  # train(epochs=0) from Python returns the untrained model; a command line run must train
        raise ValueError("fastmtl: --epochs must be an integer >= 1, got 0")
    main_rank = os.environ.get("RANK", "0") == "0"
    if cfg.output_dir is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the ranks would each pick another folder
            raise ValueError("fastmtl: a torchrun run needs --output-dir (one folder that every rank names)")
        cfg.output_dir = new_run_dir()
        if not cfg.quiet:
            print("fastmtl: the run is saved in %s" % cfg.output_dir, file=sys.stderr, flush=True)
    try:
        res = train(cfg)
    except KeyboardInterrupt:
        return 130
    if res["test"] is not None and main_rank:
        print(json.dumps(res["test"], indent=2))
    if main_rank and not cfg.quiet:
        print("fastmtl: the model is %s (fastmtl predict %s \"a sentence\")"
              % (os.path.join(cfg.output_dir, "best.pt"), os.path.join(cfg.output_dir, "best.pt")),
              file=sys.stderr, flush=True)
    return 0


def new_run_dir(parent=None, now=None):
    """A new, empty folder ``<parent>/<date>-<time>`` (``-2``, ``-3``, ... after it when that one exists), made here
    so that two runs started in the same second get two folders. ``parent``: by default ``$FASTMTL_RUNS_DIR``, else
    ``runs`` in the current folder."""
    import time

    parent = parent or os.environ.get("FASTMTL_RUNS_DIR") or "runs"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    os.makedirs(parent, exist_ok=True)
    for i in range(1, 10000):
        path = os.path.join(parent, stamp if i == 1 else "%s-%d" % (stamp, i))
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise ValueError("fastmtl: %s has no free folder name for %s; give --output-dir" % (parent, stamp))


def _in_file(msg, path, keys):
    """``msg`` (a TrainConfig check naming an option, ``--epochs``) with the run file and key that set the value."""
    from .training.config import option_name

    for k in sorted(keys, key=lambda k: -len(option_name(k))):
        if option_name(k) + " " in msg + " ":
            key = "[sampling] %s" % {"sampling": "strategy", "sampling_temperature": "temperature"}[k] \
                if k.startswith("sampling") else k
            return "%s (%s in %s)" % (msg, key, path)
    return msg


def _evaluate(ns):
    from . import data as D
    from .train import check_device, evaluate_examples, load_checkpoint
    from .training.evaluation import evaluation_sets, frame_key

    device = check_device(ns.device)
    model, vocab, lvs, specs, cfg = load_checkpoint(ns.checkpoint, device)
    sets = evaluation_sets(cfg, specs, ns.file, ns.format, ",".join(ns.columns) if ns.columns else None, ns.dataset,
                           stored_paths=ns.stored_test)
    several = len({s.dataset for s in specs}) > 1
    m, reports, records = {}, {}, []
    for name, tasks, examples, path in sets:
        D.check_tasks(examples, tasks, path)
        mm, preds = evaluate_examples(model, vocab, lvs, tasks, examples, device,
                                      frame_key=frame_key(name, several and name is not None))
        m.update(mm)
        if ns.report:
            from .reports import task_reports

            reports.update(task_reports(tasks, examples, preds))
        if ns.predictions:
            from .reports import prediction_records

            recs = prediction_records(tasks, examples, preds)
            if several and name is not None:
                recs = [{"dataset": name, **r} for r in recs]
            records += recs
    text = json.dumps(m, indent=2) + "\n"
    from .fileio import atomic_write

    if ns.report:
        from .reports import format_report

        atomic_write(ns.report, json.dumps(reports, indent=2, ensure_ascii=False) + "\n"
                     if ns.report.lower().endswith(".json") else format_report(reports))
    if ns.predictions:
        from .reports import dumps_records

        atomic_write(ns.predictions, dumps_records(records))
    if ns.output:
        atomic_write(ns.output, text)
    sys.stdout.write(text)
    return 0


def _columns(s):
    """--columns: comma-separated, distinct, non-empty column names (argparse shows the message)."""
    from . import data as D

    try:
        return D.parse_columns(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _predict(ns):
    from . import data as D
    from .fileio import open_regular
    from .predictor import load
    from .train import check_device

    check_device(ns.device)
    if ns.top_k is not None and not ns.details:
        raise ValueError("fastmtl predict: --top-k needs --details")
    predictor = load(ns.checkpoint, ns.device, batch_size=PREDICT_BATCH)
    if ns.details:
        run = lambda lines: predictor.predict(lines, top_k=ns.top_k)  # noqa: E731
    else:
        run = predictor.predict_labels
    # streamed: each block of lines is answered (and flushed) before the next is read, so the first records come
    # out while a long input is still being read, memory stays one block, and a writer feeding one line at a time
    # gets each answer at once; lines end at '\n' only, invalid UTF-8 is a one-line error naming the line
    if ns.sentences:
        blocks = [ns.sentences]
        source = None
    elif ns.input:
        source = open_regular(ns.input, "--input")
        blocks = D.iter_line_blocks(source, ns.input, PREDICT_BLOCK, max_line_bytes=PREDICT_MAX_LINE)
    else:
        source = None
        buf = getattr(sys.stdin, "buffer", None)  # (a text stream without bytes underneath: already decoded)
        blocks = (D.iter_line_blocks(buf, "<stdin>", PREDICT_BLOCK, max_line_bytes=PREDICT_MAX_LINE)
                  if buf is not None else [D.split_lines(sys.stdin.read())])
    try:
        for lines in blocks:
            sys.stdout.write("".join(json.dumps(p) + "\n" for p in run(lines)))
            sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`fastmtl predict ... | head`): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (Python's flush at exit would fail on the closed pipe again)
        os.close(devnull)
        return 0
    finally:
        if source is not None:
            source.close()
    return 0


def _export(ns):
    from .export import MODEL_FILES, export

    path = export(ns.checkpoint, ns.directory, format=ns.format, opset=ns.opset, lstm=ns.lstm,
                  overwrite=ns.overwrite, verify=ns.verify)
    files = [MODEL_FILES[ns.format], "meta.json", "runtime.py"]
    print("fastmtl: wrote the %s bundle %s (%s)%s" % (ns.format, path, ", ".join(files),
                                                     "" if ns.verify else "; not verified"), file=sys.stderr)
    print(path)
    return 0


# fastmtl predict: sentences per forward pass, and lines read (at most) before their records are written
PREDICT_BATCH = 64
PREDICT_BLOCK = 1024
PREDICT_MAX_LINE = 1 << 20  # bytes: no sentence is longer; a stream without newlines (/dev/zero) stops here


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    ns, extra = p.parse_known_args(argv)
    if extra:
        # predict's sentences may also follow its options (argparse binds a "*" positional at its first chance)
        if ns.command == "predict" and not any(e.startswith("-") for e in extra):
            ns.sentences = list(ns.sentences) + extra
        else:
            ns = p.parse_args(argv)  # the usual usage error for what is unknown
    if ns.command is None:
        p.print_help()
        return 2
    if ns.command == "bench":
        import runpy

        sys.argv = ["fastmtl.bench"] + ns.args
        runpy.run_module("fastmtl.bench", run_name="__main__")
        return 0
    try:
        return {"train": _train, "evaluate": _evaluate, "predict": _predict, "export": _export}[ns.command](ns)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        # expected errors (bad options, data, checkpoints, files, a missing data package, a diverged run): one
        # line and exit code 2, like argparse's usage errors; anything else is a bug and keeps its traceback
        print(_one_line(e), file=sys.stderr)
        return EXIT_USAGE


EXIT_USAGE = 2


def _one_line(e):
    if isinstance(e, OSError) and e.strerror and not str(e).startswith("fastmtl"):
        msg = "%s: %s" % (e.filename, e.strerror) if e.filename is not None else e.strerror
    else:
        msg = str(e) or type(e).__name__
    msg = " ".join(l.strip() for l in msg.splitlines() if l.strip())
    return msg if msg.startswith("fastmtl") else "fastmtl: " + msg


if __name__ == "__main__":
    sys.exit(main())
