"""Inference speed of a trained model, in every form it can be served: ``python -m fastmtl.bench infer``.

The model is the one ``fastmtl train`` builds for ATIS by default (word embeddings 128 + character CNN 64, a BiLSTM of
256 per direction, max-pooled intent, CRF slots under BIO constraints), or ``--checkpoint``'s; the inputs are the
ATIS test sentences. Providers:

* ``fastmtl`` (eager): the ``MultiTaskLSTM`` itself, ``model.scores`` (on the CPU one fused op for the whole model:
  embeddings, character CNN, the LSTM kernel, every head);
* ``plain PyTorch`` (eager): the same model in ``torch.nn.LSTM`` over packed sequences and torch ops
  (:class:`fastmtl.export.module.InferenceModule` with ``lstm="torch"``, run as Python);
* ``onnxruntime``: the exported ``model.onnx`` (``fastmtl export``) in an ONNX Runtime session;
* ``TorchScript``: the exported ``model.pt`` loaded with ``torch.jit.load`` (``--lstm torch`` and ``--lstm
  fastmtl``).

Level ``model``: prepared input tensors (word ids, lengths, characters) in, every task's scores out (the log-
probabilities, the CRF's emission scores): what the ONNX graph computes, the same work for every provider (checked:
their scores agree within 1e-4). Level ``text``: sentences in, results out (tokenising, encoding, the model, Viterbi
decoding, probabilities): ``fastmtl.load(...).predict`` against the bundle's ``runtime.py`` (NumPy + ONNX Runtime).

Level ``lstm layer``: one layer of the model's encoder alone on full-length random batches (1 and 64 sentences of 5,
11 and 20 words): fastmtl's fused op, ``torch.nn.LSTM`` and ONNX Runtime's ``LSTM`` node (checked to agree).

Batch 1: each of ``--sentences`` test sentences alone; p50 and p99 latency, and p10 (on a busy machine the
calls that no other process preempted). Batch 64: the whole test set in
length-sorted batches of 64 (as ``fastmtl predict`` groups them); sentences per second. Every provider runs in each
of ``--rounds`` rounds, in turn (so all see the same machine load); the figures are the medians over the rounds.
torch and ONNX Runtime get the same number of threads (``--threads``, default: every core). The section records the
load average before and after, and whether the targets hold: fastmtl's batch-1 model latency (p50) at most ONNX
Runtime's, and its batch-64 model throughput at least 1.3x plain PyTorch's.
"""
import os
import shutil
import statistics
import tempfile
import time

import torch


LATENCY_TARGET = 1.0      # fastmtl's batch-1 p50 / onnxruntime's: at most this
THROUGHPUT_TARGET = 1.3   # fastmtl's batch-64 sentences/s / plain PyTorch's: at least this


def add_arguments(p):
    p.add_argument("--checkpoint", help="a trained best.pt (default: the default ATIS model of fastmtl train with "
                   "random weights: the speed does not depend on them)")
    p.add_argument("--sentences", type=int, default=300, help="test sentences timed one at a time (batch 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="threads of torch and ONNX Runtime (default: all cores)")


def _default_model():
    from .. import data as D
    from ..decoding import span_constraints
    from ..train import TrainConfig
    from ..training.checkpoint_content import model_from

    cfg = TrainConfig()
    train_ex = D.load_atis("train")
    specs = [D.TaskSpec(n, lvl, src, None, lvl == "token") for n, lvl, src in D.atis.ATIS_TASKS]
    vocab = D.Vocab.build([e["tokens"] for e in train_ex])
    lvs = D.build_label_vocabs(train_ex, specs)
    torch.manual_seed(0)
    model = model_from(cfg, vocab, lvs, specs).eval()
    model.decode_constraints = {"slots": span_constraints(lvs["slots"].itos, "bio")}
    return model, vocab, lvs, specs


def _fastmtl_scores(model, names):
    """The model's own path to the scores of the exported graph: :meth:`MultiTaskLSTM.scores` (each task's log-
    probabilities, a CRF task's emission scores; on the CPU one fused op for the whole model)."""
    crf = model._crf_tasks()
    keys = {n: n + (".emissions" if n in crf else ".log_probs") for n in names}

    def run(ids, lengths, chars):
        return {keys[n]: v for n, v in model.scores(ids, lengths, chars, tasks=names).items()}
    return run


def infer_table(rows):
    """The section as one Markdown table: per level and provider, batch-1 latency and batch-64 throughput, with the
    ratios the targets compare; then the targets and the machine's load."""
    from .common import format_table

    def x(v):
        return "%.2fx" % v if isinstance(v, (int, float)) else ""

    by = {}
    for r in rows:
        if r.get("level") in ("model", "text"):
            by.setdefault((r["level"], r["provider"]), {})[r["batch"]] = r
    out = []
    for (level, prov), d in by.items():
        one, many = d.get(1, {}), d.get(64, {})
        out.append({"level": level, "provider": prov, "batch 1 p50 ms": one.get("p50_ms", ""),
                    "p99 ms": one.get("p99_ms", ""), "p10 ms": one.get("p10_ms", ""),
                    "p50 vs fastmtl": x(one.get("p50_vs_fastmtl")),
                    "batch 64 sentences/s": many.get("sentences_per_s", ""),
                    "vs fastmtl": x(many.get("throughput_vs_fastmtl")),
                    "vs plain PyTorch": x(many.get("throughput_vs_plain"))})
    table = format_table(out, ["level", "provider", "batch 1 p50 ms", "p99 ms", "p10 ms", "p50 vs fastmtl",
                               "batch 64 sentences/s", "vs fastmtl", "vs plain PyTorch"])
    layer = [{"LSTM layer": "B=%d, T=%d (E=%d, H=%d, %s)" % (r["batch"], r["T"], r["E"], r["H"],
                                                            "bidirectional" if r["directions"] == 2 else "forward"),
              "provider": r["provider"], "ms": r["median_ms"], "vs fastmtl": x(r["vs_fastmtl"])}
             for r in rows if r.get("level") == "lstm layer"]
    if layer:
        table += "\n\n" + format_table(layer, ["LSTM layer", "provider", "ms", "vs fastmtl"])
    notes = []
    for r in rows:
        if r.get("level") == "targets":
            notes.append("%s: %.2f, %s" % (r["provider"], r["ratio"], "met" if r["met"] else "not met"))
        elif r.get("level") == "load":
            notes.append("%s: %s" % (r["provider"], r["ratio"]))
    return table + ("\n\n" + "; ".join(notes) + "." if notes else "")


def _lstm_layer_rows(model, threads, rounds, quick):
    """One layer of the model's encoder alone (its input size, hidden size and directions) on full-length batches:
    fastmtl's fused op, ``torch.nn.LSTM`` and ONNX Runtime's ``LSTM`` node, median of per-round medians."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ..export.module import _stack_layers, _torch_lstm
    from ..export.onnx_graph import DEFAULT_OPSET, _Graph, _lstm_nodes

    layers = _stack_layers(model.encoder) if model.sharing != "soft" else _stack_layers(
        next(iter(model.task_encoders.values())))
    bidir = bool(model.config["bidirectional"])
    m = _torch_lstm(layers[:1], bidir).requires_grad_(False)
    E, H, D = m.input_size, m.hidden_size, 2 if bidir else 1
    G = _Graph(DEFAULT_OPSET)
    y = _lstm_nodes(G, "x", "seq_lens", m)
    G.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(G.nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", E]),
                                                helper.make_tensor_value_info("seq_lens", TensorProto.INT32, ["B"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=G.inits)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
                                .SerializeToString(), opts, providers=["CPUExecutionProvider"])
    w = list(m._flat_weights)
    rows = []
    for B in (1, 64):
        for T in ((11,) if quick else (5, 11, 20)):
            x = torch.randn(T, B, E)
            h0 = torch.zeros(D, B, H)
            L = torch.full((B,), T, dtype=torch.long)
            feed = {"x": x.numpy(), "seq_lens": np.full(B, T, dtype=np.int32)}
            fns = {"fastmtl op": lambda: torch.ops.fastmtl.lstm_layer_forward(x, L, h0, h0, w, bidir, False),
                   "torch.nn.LSTM": lambda: m(x), "onnxruntime LSTM node": lambda: sess.run(None, feed)}
            ref = fns["fastmtl op"]()[0].numpy()
            for name in ("torch.nn.LSTM", "onnxruntime LSTM node"):
                got = fns[name]()[0]
                got = got.numpy() if isinstance(got, torch.Tensor) else got
                if not float(np.abs(got - ref).max()) <= 1e-4:
                    raise RuntimeError("bench infer: %s's LSTM layer differs from fastmtl's" % name)
            times = {k: [] for k in fns}
            with torch.no_grad():
                for f in fns.values():
                    for _ in range(5):
                        f()
                for r in range(rounds):
                    for k, f in fns.items():
                        ts = []
                        for _ in range(30 if B == 1 else 8):
                            t0 = time.perf_counter()
                            f()
                            ts.append((time.perf_counter() - t0) * 1e3)
                        times[k].append(statistics.median(ts))
            base = statistics.median(times["fastmtl op"])
            for k, v in times.items():
                rows.append({"level": "lstm layer", "provider": k, "batch": B, "T": T, "E": E, "H": H,
                             "directions": D, "threads": threads, "median_ms": statistics.median(v),
                             "vs_fastmtl": statistics.median(v) / base})
    return rows


def _percentile(xs, q):
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
    return xs[k]


def run(args):
    import numpy as np

    from .. import train as T
    from ..data.builtin import load_builtin
    from ..export import export_model, runtime as rt
    from ..predictor import Predictor

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    if args.checkpoint:
        model, vocab, lvs, specs, _ = T.load_checkpoint(args.checkpoint)
        what = args.checkpoint
    else:
        model, vocab, lvs, specs = _default_model()
        what = "the default ATIS model of fastmtl train (random weights)"
    names = [s.name for s in specs]
    sents = [e["tokens"] for e in load_builtin("atis", "test")]
    n1 = min(len(sents), 20 if args.quick else args.sentences)
    rounds = 1 if args.quick else args.rounds

    tmp = tempfile.mkdtemp(prefix="fastmtl-bench-infer-")
    onnx_dir = export_model(model, vocab, lvs, specs, os.path.join(tmp, "onnx"))
    ts_dir = export_model(model, vocab, lvs, specs, os.path.join(tmp, "ts"), format="torchscript", lstm="torch")
    tsf_dir = export_model(model, vocab, lvs, specs, os.path.join(tmp, "tsf"), format="torchscript",
                           lstm="fastmtl")
    bundle = rt.load(onnx_dir, threads=threads)
    sess = bundle._engine.session
    out_names = bundle._engine.outputs
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(os.path.join(ts_dir, "model.pt"))
        tsf = torch.jit.load(os.path.join(tsf_dir, "model.pt"))
    from ..export.module import from_model

    plain = from_model(model, names, "torch")
    fast = _fastmtl_scores(model, names)
    has_chars = bool(bundle.meta["chars"])

    def prepare(batch):
        f = bundle.encode(batch)
        t = (torch.from_numpy(f["ids"]), torch.from_numpy(f["lengths"]),
             torch.from_numpy(f["chars"]) if has_chars else None)
        return f, t

    def model_providers():
        def onnx(f, t):
            return sess.run(out_names, f)

        def torch_fn(m):
            def call(f, t):
                with torch.no_grad():
                    return m(*t) if has_chars else m(t[0], t[1])
            return call

        return [("fastmtl (eager)", lambda f, t: fast(*t)), ("plain PyTorch (eager)", torch_fn(plain)),
                ("onnxruntime", onnx), ("TorchScript (torch.nn.LSTM)", torch_fn(ts)),
                ("TorchScript (fastmtl op)", torch_fn(tsf))]

    ones = [prepare([s]) for s in sents[:n1]]
    order = sorted(range(len(sents)), key=lambda i: len(sents[i]))
    batches = [prepare([sents[i] for i in order[b:b + 64]]) for b in range(0, len(order), 64)]

    # like with like: every provider's scores against fastmtl's, on the batches
    provs = model_providers()
    for f, t in batches[:3]:
        ref = fast(*t)
        valid = (np.arange(f["ids"].shape[1])[None, :] < f["lengths"][:, None])
        for name, fn in provs[1:]:
            got = fn(f, t)
            if isinstance(got, list):
                got = dict(zip(out_names, got))
            for k, v in ref.items():
                g = got[k].numpy() if isinstance(got[k], torch.Tensor) else got[k]
                d = np.abs(g - v.numpy())
                d = d[valid] if d.ndim == 3 else d
                if not float(d.max()) <= 1e-4:
                    raise RuntimeError("bench infer: %s's %s differs from fastmtl's by %.3g" % (name, k, d.max()))

    predictor = Predictor(model, vocab, lvs, specs)
    text_provs = [("fastmtl.load(...).predict", lambda batch: predictor.predict(batch)),
                  ("bundle runtime.py (onnxruntime)", lambda batch: bundle.predict(batch))]

    lat = {("model", n): [] for n, _ in provs}
    lat.update({("text", n): [] for n, _ in text_provs})
    thr = {k: [] for k in lat}
    # warm-up: every input shape once (oneDNN makes and caches a convolution primitive per shape; ONNX Runtime
    # and TorchScript specialise on first use)
    for name, fn in provs:
        for f, t in ones + batches:
            fn(f, t)
    for name, fn in text_provs:
        for s in sents[:n1]:
            fn([s])
        fn(sents)
    for r in range(rounds):
        for level, plist in (("model", provs), ("text", text_provs)):
            k = r % len(plist)
            for name, fn in plist[k:] + plist[:k]:  # rotated: no provider always runs first
                times = []
                for i in range(n1):
                    if level == "model":
                        f, t = ones[i]
                        t0 = time.perf_counter()
                        fn(f, t)
                    else:
                        s = [sents[i]]
                        t0 = time.perf_counter()
                        fn(s)
                    times.append((time.perf_counter() - t0) * 1e3)
                lat[(level, name)].append((_percentile(times, 50), _percentile(times, 99), _percentile(times, 10)))
                t0 = time.perf_counter()
                if level == "model":
                    for f, t in batches:
                        fn(f, t)
                else:
                    fn(sents)  # (predict groups them by length in batches of 64 itself)
                thr[(level, name)].append(len(sents) / (time.perf_counter() - t0))

    rows = []
    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in lat.items()}
    sps = {k: statistics.median(v) for k, v in thr.items()}
    for (level, name) in lat:
        base = "fastmtl (eager)" if level == "model" else "fastmtl.load(...).predict"
        plain_key = (level, "plain PyTorch (eager)")
        rows.append({"level": level, "provider": name, "batch": 1, "threads": threads,
                     "p50_ms": med[(level, name)][0], "p99_ms": med[(level, name)][1],
                     "p10_ms": med[(level, name)][2],
                     "sentences_per_s": 1e3 / med[(level, name)][0],
                     "p50_vs_fastmtl": med[(level, name)][0] / med[(level, base)][0]})
        row = {"level": level, "provider": name, "batch": 64, "threads": threads,
               "sentences_per_s": sps[(level, name)],
               "throughput_vs_fastmtl": sps[(level, name)] / sps[(level, base)]}
        if level == "model":
            row["throughput_vs_plain"] = sps[(level, name)] / sps[plain_key]
        rows.append(row)
    rows.sort(key=lambda r: (r["level"] != "model", r["batch"], r["provider"]))
    rows += _lstm_layer_rows(model, threads, rounds, args.quick)
    lat_ratio = med[("model", "fastmtl (eager)")][0] / med[("model", "onnxruntime")][0]
    lat_ratio10 = med[("model", "fastmtl (eager)")][2] / med[("model", "onnxruntime")][2]
    thr_ratio = sps[("model", "fastmtl (eager)")] / sps[("model", "plain PyTorch (eager)")]
    targets = {"latency_p50_fastmtl_over_onnxruntime": lat_ratio, "latency_target": "<= %g" % LATENCY_TARGET,
               "latency_target_met": lat_ratio <= LATENCY_TARGET, "latency_p10_fastmtl_over_onnxruntime": lat_ratio10,
               "throughput_fastmtl_over_plain": thr_ratio, "throughput_target": ">= %g" % THROUGHPUT_TARGET,
               "throughput_target_met": thr_ratio >= THROUGHPUT_TARGET}
    print("targets: %s" % targets)
    load_after = os.getloadavg()
    print("load average (1, 5, 15 min): before %s, after %s" % (load_before, load_after))

    shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:  # the run's facts in each row, so the saved section carries them
        r.update(rounds=rounds, sentences=n1 if r["batch"] == 1 else len(sents), model=what)
    rows.append({"level": "targets", "provider": "fastmtl model p50 / onnxruntime p50 (target <= %g)"
                 % LATENCY_TARGET, "batch": 1, "ratio": lat_ratio, "met": lat_ratio <= LATENCY_TARGET})
    rows.append({"level": "targets", "provider": "(the same at p10)", "batch": 1, "ratio": lat_ratio10,
                 "met": lat_ratio10 <= LATENCY_TARGET})
    rows.append({"level": "targets", "provider": "fastmtl model sentences/s / plain PyTorch (target >= %g)"
                 % THROUGHPUT_TARGET, "batch": 64, "ratio": thr_ratio, "met": thr_ratio >= THROUGHPUT_TARGET})
    rows.append({"level": "load", "provider": "1-min load average before / after (%d cores)" % (os.cpu_count() or 1),
                 "ratio": "%.1f / %.1f" % (load_before[0], load_after[0])})
    print(infer_table(rows), flush=True)
    return rows
