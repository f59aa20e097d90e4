"""Jacobian descent with TorchJD (``torchjd.autojac.mtl_backward`` + UPGrad, ``examples/torchjd_mtl.py``) on the
same joint model built on ``fastmtl.nn.LSTM`` and on ``torch.nn.LSTM``: one step (forward, the 2-task Jacobian of
the shared encoder through ``torch.vmap``, UPGrad aggregation, Adam) timed for each, in turns. Needs the
``[torchjd]`` extra. ATIS-sized by default: B = 32, T = 24, vocabulary 1,000, E = 128, H = 256, intent C = 26,
slots C = 130.
"""
import importlib.util
import os
import warnings

import torch

from .common import print_table
from .heads import _interleaved

_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                        "torchjd_mtl.py")


def add_arguments(p):
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=15)


def _example():
    if not os.path.exists(_EXAMPLE):
        raise SystemExit("fastmtl.bench torchjd: needs the repository's examples/torchjd_mtl.py (%s)" % _EXAMPLE)
    spec = importlib.util.spec_from_file_location("torchjd_mtl", _EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(args):
    import fastmtl

    ex = _example()
    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    B, T, H = args.batch_size, args.seq_len, (64 if quick else args.hidden_size)
    repeat = 3 if quick else args.repeat
    g = torch.Generator().manual_seed(0)
    ids, lengths, intent, slots = ex.random_batch(B, T, 1000, 26, 130, g)
    batch = [ids.to(device), lengths, intent.to(device), slots.to(device)]  # lengths on the host (packing)
    steps = {}
    for name, lstm in (("fastmtl", fastmtl.nn.LSTM), ("torch", torch.nn.LSTM)):
        torch.manual_seed(0)
        model = ex.JointModel(1000, 128, H, 26, 130, lstm=lstm).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        steps[name] = (lambda m=model, o=opt: ex.jacobian_step(m, o, *batch))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        stats = _interleaved(steps, warmup=1 if quick else 3, repeat=repeat, device=device)
    tokens = int(batch[1].sum())
    rows = []
    for name in steps:
        ms = stats[name]["median_ms"]
        rows.append({"lstm": name, "B": B, "T": T, "H": H, "median_ms": ms,
                     "p25_p75_ms": "%.1f-%.1f" % (stats[name]["p25_ms"], stats[name]["p75_ms"]),
                     "tokens_per_s": tokens / (ms / 1e3),
                     "speedup_vs_torch": stats["torch"]["median_ms"] / ms, "threads": torch.get_num_threads()})
    print_table(rows, ["lstm", "B", "T", "H", "median_ms", "p25_p75_ms", "tokens_per_s", "speedup_vs_torch",
                       "threads"])
    return rows
