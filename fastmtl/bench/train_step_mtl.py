"""One training step with the gradient-based multi-task methods: fastmtl's per-task backward against K separate
backward passes (LibMTL's way), beside the static-weighting step, with K = 2, 3 and 5 tasks, in one run.

Model: the ``train_step`` benchmark's (word embeddings -> 2-layer BiLSTM, H = 512 per direction -> heads), with K
tasks: intent (sequence, 26 classes), slots (token, 130) and for K > 2 further token tasks (45, 9, 23 classes);
variable lengths; dropout 0; Adam. Providers per K:

* ``static``: ``zero_grad; loss = sum_k L_k; backward; step`` (the plain fastmtl step);
* ``<method>/fused``: :func:`fastmtl.gradients.gradient_method_step` with ``mode="vmap"``: one encoder forward,
  the heads once per task, the K encoder backwards as one ``lstm_layer_backward_multi`` call per LSTM layer (the K
  cotangents against the one saved forward, reached through ``torch.func.vmap`` of the encoder's vjp), the method on
  the Gram matrix, the combination into ``.grad``, and the step;
* ``<method>/loop``: the same with ``mode="loop"``: K backward passes over the one saved forward (one fused
  ``lstm_layer_backward`` per layer and pass);
* ``<method>/separate``: what LibMTL does: one forward of the model, K ``torch.autograd.grad(L_k, shared + head k,
  retain_graph=True)`` passes, the K gradients flattened into a (K, P) matrix, the same method's coefficients from
  its Gram matrix, the combination written into ``.grad`` and the step (for ``mgda_ub``: K passes to the
  representation, then one backward);
* ``famo``: FAMO's step (the weighted loss, one backward, the step, the losses again without grad).

Reported: ms per step (median), the ratio to ``static`` and the speed-up of ``fused`` over ``separate`` measured in
the same run. The results go to ``benchmarks/results/<machine>-mtl.json`` (``--out`` to change).

    python -m fastmtl.bench.train_step_mtl --device cpu --threads 1               # default model, K = 2, 3, 5
    python -m fastmtl.bench.train_step_mtl --device cpu --quick                    # H = 64 (runs anywhere)
"""
import argparse
import os
import sys

import torch

from .common import print_table

__all__ = ["run", "add_arguments", "main"]

EXTRA = [("pos", 45), ("ner", 9), ("chunk", 23)]
METHODS = ("pcgrad", "cagrad", "mgda", "mgda_ub", "imtl", "aligned_mtl", "nash_mtl")


def add_arguments(parser):
    parser.add_argument("--ks", default="2,3,5", help="numbers of tasks (comma-separated)")
    parser.add_argument("--methods", default=",".join(METHODS) + ",famo")
    parser.add_argument("--modes", default="fused,loop,separate",
                        help="fused (the multi-cotangent LSTM backward), loop (K backwards over one forward), "
                             "separate (LibMTL's K autograd passes)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (--quick: 32)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 32 (--quick 16)")
    parser.add_argument("--hidden-size", type=int, default=None, help="per direction (default 512; --quick 64)")
    parser.add_argument("--embedding-dim", type=int, default=None, help="default 300 (--quick 32)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 10000 (--quick 500)")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)


def _model(K, V, E, H, L, device):
    import fastmtl

    tasks = [fastmtl.nn.SequenceTask("intent", 26), fastmtl.nn.TokenTask("slots", 130)]
    tasks += [fastmtl.nn.TokenTask(n, c) for n, c in EXTRA[:K - 2]]
    return fastmtl.MultiTaskLSTM(V, E, H, tasks, num_layers=L, bidirectional=True, dropout=0.0).to(device)


def _batches(n, K, B, T, V, device, gen):
    out = []
    classes = [26, 130] + [c for _, c in EXTRA]
    names = ["intent", "slots"] + [n for n, _ in EXTRA]
    for _ in range(n):
        lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=gen)
        lengths[0] = T
        ids = torch.randint(1, V, (B, T), generator=gen)
        ids[torch.arange(T)[None, :] >= lengths[:, None]] = 0
        tg = {"intent": torch.randint(0, 26, (B,), generator=gen)}
        for name, c in zip(names[1:K], classes[1:K]):
            tg[name] = torch.randint(0, c, (B, T), generator=gen)
        out.append((ids.to(device), lengths, {k: v.to(device) for k, v in tg.items()}))
    return out


def _static_step(model, opt, batches):
    state = {"i": 0}

    def step():
        ids, lengths, tg = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        model(ids, lengths, tg).loss.backward()
        opt.step()
    return step


def _fused_step(model, opt, batches, method, mode):
    from fastmtl.gradients import gradient_method_step

    state = {"i": 0}

    def step():
        ids, lengths, tg = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        gradient_method_step(model, method, ids, lengths, tg, mode=mode)
        opt.step()
    return step


def _separate_step(model, opt, batches, method):
    """LibMTL's schedule: K autograd passes with retain_graph, gradients flattened into a (K, P) matrix."""
    shared = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    state = {"i": 0}

    def step():
        ids, lengths, tg = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        tasks = [n for n in model.task_names if n in tg]
        if method.level == "rep":
            hidden = model.encode(ids, lengths)["top"]
            h = hidden.detach().requires_grad_()
            out = model.heads["top"](h, lengths=lengths, targets=tg)
            zs = []
            for k, n in enumerate(tasks):
                head = list(model.heads["top"][n].parameters())
                g = torch.autograd.grad(out.losses[n], [h] + head, retain_graph=k < len(tasks) - 1)
                zs.append(g[0].reshape(-1))
                for p, gp in zip(head, g[1:]):
                    p.grad = gp
            z = torch.stack(zs)
            c = method(z @ z.t(), tasks).to(z.dtype)
            hidden.backward(torch.tensordot(c, z, dims=1).view_as(hidden))
        else:
            out = model(ids, lengths, tg)
            flat = []
            for k, n in enumerate(tasks):
                head = list(model.heads["top"][n].parameters())
                g = torch.autograd.grad(out.losses[n], shared + head, retain_graph=k < len(tasks) - 1)
                flat.append(torch.cat([x.reshape(-1) for x in g[:len(shared)]]))
                for p, gp in zip(head, g[len(shared):]):
                    p.grad = gp
            grads = torch.stack(flat)
            c = method(grads @ grads.t(), tasks).to(grads.dtype)
            d = c @ grads
            off = 0
            for p in shared:
                p.grad = d[off:off + p.numel()].view_as(p)
                off += p.numel()
        opt.step()
    return step


def _famo_step(model, opt, batches, famo):
    state = {"i": 0}

    def step():
        ids, lengths, tg = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        out = model(ids, lengths, tg)
        lam = famo.task_weights(out.losses)
        sum(lam[n] * out.losses[n] for n in lam).backward()
        opt.step()
        with torch.no_grad():
            again = model(ids, lengths, tg)
        famo.update(again.losses)
    return step


def _ints(text):
    return [int(x) for x in str(text).split(",") if x]


def _time_interleaved(steps, warmup, repeat, device):
    """Median ms of each step function, the functions taking turns (one call each per round), so that a change
    in the machine's load during the run affects every provider alike."""
    import statistics
    import time

    times = {name: [] for name in steps}
    for r in range(warmup + repeat):
        for name, fn in steps.items():
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {"median_ms": statistics.median(ts), "p25_ms": q[0], "p75_ms": q[2], "repeat": len(ts)}
    return out


def run(args):
    from fastmtl.weighting import make_weighting

    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    B = getattr(args, "batch_size", None) or 32
    T = getattr(args, "seq_len", None) or (16 if quick else 32)
    H = getattr(args, "hidden_size", None) or (64 if quick else 512)
    E = getattr(args, "embedding_dim", None) or (32 if quick else 300)
    V = getattr(args, "vocab_size", None) or (500 if quick else 10000)
    L = getattr(args, "num_layers", 2)
    warmup = getattr(args, "warmup", None) or 1
    repeat = getattr(args, "repeat", None) or (7 if quick else 3)
    methods = [m for m in getattr(args, "methods", ",".join(METHODS) + ",famo").split(",") if m]
    modes = [m for m in getattr(args, "modes", "fused,loop,separate").split(",") if m]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for K in _ints(getattr(args, "ks", "2,3,5")):
        batches = _batches(3, K, B, T, V, device, gen)
        base = {"device": str(device), "K": K, "B": B, "T": T, "H": H, "layers": L, "threads": torch.get_num_threads()}
        torch.manual_seed(0)
        # one model and optimiser for every provider (the values do not change the work of a step)
        model = _model(K, V, E, H, L, device)
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        tasks = list(model.task_names)
        steps = {"static": _static_step(model, opt, batches)}
        for m in methods:
            if m == "famo":
                steps["famo"] = _famo_step(model, opt, batches, make_weighting("famo", tasks).to(device))
                continue
            for mode in modes:
                if mode == "separate":
                    steps[m + "/separate"] = _separate_step(model, opt, batches, make_weighting(m, tasks))
                elif mode in ("fused", "loop"):
                    tb = "vmap" if mode == "fused" else "loop"
                    steps["%s/%s" % (m, mode)] = _fused_step(model, opt, batches, make_weighting(m, tasks), tb)
                else:
                    raise SystemExit("unknown mode %r (fused, loop, separate)" % mode)
        timing = _time_interleaved(steps, warmup, repeat, device)
        for name, t in timing.items():
            rows.append({**base, "provider": name, **t})
            print("K=%d %-22s %9.1f ms" % (K, name, t["median_ms"]), flush=True)
        static = timing["static"]["median_ms"]
        for r in rows:
            if r["K"] != K:
                continue
            r["vs_static"] = r["median_ms"] / static
            m, _, mode = r["provider"].partition("/")
            if mode in ("fused", "loop") and m + "/separate" in timing:
                r["speedup_vs_separate"] = timing[m + "/separate"]["median_ms"] / r["median_ms"]
        del model, opt, steps
    print_table(rows, ["K", "H", "provider", "median_ms", "vs_static", "speedup_vs_separate"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastmtl.bench.train_step_mtl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<machine>-mtl.json)")
    p.add_argument("--no-save", action="store_true")
    add_arguments(p)
    args = p.parse_args(argv)
    rows = run(args)
    if not args.no_save and rows:
        from .common import default_results_path, save_section

        path = args.out
        if path is None:
            stem, ext = os.path.splitext(default_results_path(args.device))
            path = stem + "-mtl" + ext
        print("saved to %s" % save_section("train_step_mtl%s" % ("_quick" if args.quick else ""), rows, path=path,
                                           device=args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
