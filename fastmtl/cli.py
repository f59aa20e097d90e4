"""The ``fastmtl`` command: ``train``, ``evaluate``, ``predict`` and ``bench``.

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


def _add_train_args(p):
    from .train import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--format", default=d.format, choices=["atis", "conllu", "conll", "jsonl"],
                   help="data format (default: atis; without --train the built-in ATIS data is used)")
    g.add_argument("--train", help="training file")
    g.add_argument("--dev", help="development file (early stopping and model selection)")
    g.add_argument("--test", help="test file (metrics.json)")
    g.add_argument("--columns", type=_columns, help="column names of a CoNLL column file, first is "
                   "the word, e.g. word,pos,chunk,ner")
    g.add_argument("--task", dest="tasks", action="append", metavar="NAME:LEVEL:SOURCE",
                   help="a task: LEVEL is token or sequence, SOURCE the field/column (repeatable); e.g. "
                        "--task upos:token:upos --task intent:sequence:intent")
    g.add_argument("--max-train", type=int, help="use only the first N training examples")
    g = p.add_argument_group("vocabulary")
    g.add_argument("--min-count", type=int, default=d.min_count)
    g.add_argument("--unk-alpha", type=float, default=d.unk_alpha,
                   help="replace a training word by <unk> with probability alpha/(alpha+count) (0: never)")
    g.add_argument("--lower", type=_bool, default=d.lower)
    g.add_argument("--normalize-digits", type=_bool, default=d.normalize_digits)
    g.add_argument("--pretrained", help="word2vec/GloVe text file of word vectors")
    g.add_argument("--freeze-embeddings", action="store_true")
    g = p.add_argument_group("model")
    g.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    g.add_argument("--hidden-size", type=int, default=d.hidden_size)
    g.add_argument("--num-layers", type=int, default=d.num_layers)
    g.add_argument("--bidirectional", type=_bool, default=d.bidirectional)
    g.add_argument("--dropout", type=float, default=d.dropout)
    g.add_argument("--pooling", default=d.pooling, choices=["last", "first", "mean", "max"],
                   help="how sequence tasks read the encoder (default: max over time; last = each direction's final "
                        "state on a BiLSTM)")
    g.add_argument("--char-dim", type=int, default=d.char_dim,
                   help="character CNN word features with this char embedding size (default 32; 0: off)")
    g.add_argument("--char-filters", type=int, default=d.char_filters, help="character CNN output size")
    g.add_argument("--char-kernel", type=int, default=d.char_kernel, help="character CNN kernel width (odd)")
    g.add_argument("--token-context", type=_bool, default=d.token_context,
                   help="token tasks also read the max-pooled sentence vector (intent-conditioned slots)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--constrained-decoding", type=_bool, default=d.constrained_decoding,
                   help="token tasks with BIO/IOBES tags: predict the best valid tag sequence (Viterbi), not the "
                        "per-token argmax")
    g.add_argument("--sequence-aux", type=float, default=d.sequence_aux,
                   help="also train every sentence label on every token as an auxiliary task with this weight")
    g.add_argument("--sharing", default=d.sharing, choices=["hard", "soft", "hierarchical"])
    g.add_argument("--task-layers", type=lambda s: _kv(s, "--task-layers", int),
                   help="hierarchical sharing: which layer each task reads, e.g. slots:1,intent:2")
    g.add_argument("--soft-lambda", type=float, default=d.soft_lambda)
    g.add_argument("--init-encoder", help="transfer: start the encoder (and vocabulary) from this checkpoint (a "
                   "best.pt of an earlier run)")
    g.add_argument("--freeze-encoder", action="store_true", help="with --init-encoder: train only the new heads")
    g = p.add_argument_group("task weighting")
    g.add_argument("--weighting", default=d.weighting, choices=["static", "uncertainty", "dwa", "gradnorm"])
    g.add_argument("--task-weights", type=lambda s: _kv(s, "--task-weights"), help="static weights, e.g. intent:2")
    g.add_argument("--dwa-temperature", type=float, default=d.dwa_temperature)
    g.add_argument("--gradnorm-alpha", type=float, default=d.gradnorm_alpha)
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=d.optimizer, choices=["adam", "adamw", "sgd"])
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", default=d.schedule, choices=["linear", "constant"])
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--ema", type=float, default=d.ema, help="keep an exponential moving average of the weights with this decay (e.g. 0.999) and evaluate it")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (split over DDP ranks)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--patience", type=int, default=d.patience, help="early stopping: epochs without dev improvement")
    g.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="best.pt, last.pt, log.jsonl, learning_curve.png, metrics.json")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --output-dir")
    g.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty --output-dir: remove the earlier run's files (best.pt, last.pt, log.jsonl, "
                        "metrics.json, learning_curve.png) before training; other files stay")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--quiet", action="store_true")


def build_parser():
    p = argparse.ArgumentParser(prog="fastmtl", description="Fast multi-task learning for NLP.")
    sub = p.add_subparsers(dest="command", metavar="{train,evaluate,predict,bench}")
    t = sub.add_parser("train", help="train a multi-task model (default: joint intent + slots BiLSTM on ATIS)")
    _add_train_args(t)
    e = sub.add_parser("evaluate", help="evaluate a checkpoint on a data file (default: the ATIS test set)")
    e.add_argument("checkpoint")
    e.add_argument("file", nargs="?", help="data file (default: ATIS test when the model was trained on ATIS)")
    e.add_argument("--format", choices=["atis", "conllu", "conll", "jsonl"],
                   help="data format (default: the training format)")
    e.add_argument("--columns", type=_columns)
    e.add_argument("--device", default="cpu")
    e.add_argument("--output", help="also write the metrics JSON here")
    r = sub.add_parser("predict", help="predict every task for raw sentences (one per line) -> JSON lines")
    r.add_argument("checkpoint")
    r.add_argument("sentences", nargs="*", help="sentences (default: read lines from --input or stdin)")
    r.add_argument("--input", help="file with one sentence per line")
    r.add_argument("--device", default="cpu")
    b = sub.add_parser("bench", help="run a benchmark: python -m fastmtl.bench NAME ...")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _train(ns):
    from .train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(ns).items() if k in fields})
    if cfg.epochs == 0:  # train(epochs=0) from Python returns the untrained model; a command line run must train
        raise ValueError("fastmtl: --epochs must be an integer >= 1, got 0")
    try:
        res = train(cfg)
    except KeyboardInterrupt:
        return 130
    if res["test"] is not None and os.environ.get("RANK", "0") == "0":
        print(json.dumps(res["test"], indent=2))
    return 0


def _evaluate(ns):
    from . import data as D
    from .train import check_device, evaluate_examples, load_checkpoint

    device = check_device(ns.device)
    model, vocab, lvs, specs, cfg = load_checkpoint(ns.checkpoint, device)
    fmt = ns.format or cfg.format
    if ns.file is None:
        if fmt != "atis":
            raise ValueError("fastmtl evaluate: give a data file (the model was not trained on ATIS)")
        examples, path = D.load_atis("test"), "ATIS/test"
    else:
        examples, path = D.read_examples(ns.file, fmt, ns.columns or cfg.columns), ns.file
    D.check_tasks(examples, specs, path)
    m, _ = evaluate_examples(model, vocab, lvs, specs, examples, device)
    text = json.dumps(m, indent=2) + "\n"
    if ns.output:
        from .fileio import atomic_write

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
    from .train import check_device, predict_sentences

    check_device(ns.device)

    if ns.sentences:
        lines = ns.sentences
    elif ns.input:
        lines = D.read_lines(ns.input)  # lines end at '\n' only: one record per line of the file
    else:
        lines = D.split_lines(sys.stdin.read())
    for p in predict_sentences(ns.checkpoint, lines, ns.device):
        print(json.dumps(p))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.command is None:
        p.print_help()
        return 2
    if ns.command == "bench":
        import runpy

        sys.argv = ["fastmtl.bench"] + ns.args
        runpy.run_module("fastmtl.bench", run_name="__main__")
        return 0
    try:
        return {"train": _train, "evaluate": _evaluate, "predict": _predict}[ns.command](ns)
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
