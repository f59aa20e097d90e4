"""The full training step of ``fastmtl.MultiTaskLSTM`` against the same model in plain PyTorch.

Model: word embeddings -> 2-layer BiLSTM (H = 512 per direction) -> intent head (sequence level, C = 26, on the
final state of each direction) + slot head (token level, C = 130, on every real token); variable lengths; loss =
intent cross-entropy + slot cross-entropy; Adam step. Plain PyTorch: ``nn.Embedding``, ``nn.LSTM`` with
``pack_padded_sequence`` (cuDNN on the GPU, oneDNN on the CPU), ``nn.Linear`` heads, ``F.cross_entropy`` per task,
summed. Both sides: same sizes, same optimizer, dropout 0 (so both do the same work), float32 or bfloat16 autocast.

A step is ``zero_grad; forward (loss); backward; optimizer.step``, timed with ``fastmtl.bench.common.measure``
(CUDA events on the GPU) over batches rotated from a small pool. Reported: ms per step, tokens/s (real tokens, i.e.
the sum of the lengths) and the speed-up of fastmtl over plain PyTorch measured in the same run.

    python -m fastmtl.bench train_step --device cuda            # B = 32 and 128, float32 and bf16 autocast
    python -m fastmtl.bench train_step --device cpu --quick     # small shapes, float32 (runs anywhere)

With a CRF slot head (providers ``fastmtl_crf``: ``TokenTask("slots", 130, crf=True)``, and ``pytorch_crf``: the
plain model with a ``torchcrf.CRF`` (pytorch-crf 0.7.2) on the slot scores), the slot loss is the CRF's negative
log-likelihood per real token on both sides; ``crf_step_ratio`` is the step time of ``fastmtl_crf`` over that of
``fastmtl`` (the same model without the CRF), measured in the same run:

    python -m fastmtl.bench train_step --providers fastmtl,fastmtl_crf,pytorch,pytorch_crf
"""
import contextlib

import torch
import torch.nn.functional as F

from .common import measure, print_table

__all__ = ["add_arguments", "run", "build_fastmtl_model", "PlainMultiTaskLSTM"]

INTENTS, SLOTS = 26, 130


def add_arguments(parser):
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 32,128; --quick: 8,32)")
    parser.add_argument("--seq-len", type=int, default=None, help="padded length T (default 32; --quick 16)")
    parser.add_argument("--hidden-size", type=int, default=None, help="per direction (default 512; --quick 64)")
    parser.add_argument("--embedding-dim", type=int, default=None, help="default 300 (--quick 32)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 10000 (--quick 500)")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated from float32,bf16 (default: both on cuda, float32 on cpu)")
    parser.add_argument("--providers", default="fastmtl,pytorch")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)


# --------------------------------------------------------------------------------------------------- models
def build_fastmtl_model(vocab_size, embedding_dim, hidden_size, num_layers, intents=INTENTS, slots=SLOTS, crf=False):
    """fastmtl's model (the one place to adapt if the MultiTaskLSTM API changes)."""
    import fastmtl

    tasks = [fastmtl.nn.SequenceTask("intent", intents), fastmtl.nn.TokenTask("slots", slots, crf=crf)]
    return fastmtl.MultiTaskLSTM(vocab_size, embedding_dim, hidden_size, tasks, num_layers=num_layers,
                                 bidirectional=True, dropout=0.0)


def fastmtl_loss(model, ids, lengths, targets):
    return model(ids, lengths, targets=targets).loss


class PlainMultiTaskLSTM(torch.nn.Module):
    """The same model in plain PyTorch (what a user writes without fastmtl)."""

    def __init__(self, vocab_size, embedding_dim, hidden_size, num_layers, intents=INTENTS, slots=SLOTS, crf=False):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = torch.nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True, bidirectional=True)
        self.intent = torch.nn.Linear(2 * hidden_size, intents)
        self.slots = torch.nn.Linear(2 * hidden_size, slots)
        self.crf = None
        if crf:
            import torchcrf

            self.crf = torchcrf.CRF(slots, batch_first=True)

    def forward(self, ids, lengths, targets):
        B, T = ids.shape
        x = self.embedding(ids)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        sentence = torch.cat([h[-2], h[-1]], dim=1)  # final state of each direction of the top layer
        intent_loss = F.cross_entropy(self.intent(sentence), targets["intent"])
        slot_logits = self.slots(out)
        if self.crf is not None:
            mask = torch.arange(T, device=ids.device)[None] < lengths.to(ids.device)[:, None]
            nll = -self.crf(slot_logits, targets["slots"], mask=mask, reduction="sum")
            return intent_loss + nll / lengths.sum().to(nll.device)
        slot_loss = F.cross_entropy(slot_logits.reshape(B * T, -1), targets["slots_padded"].reshape(B * T),
                                    ignore_index=-100)
        return intent_loss + slot_loss


def plain_loss(model, ids, lengths, targets):
    return model(ids, lengths, targets)


# --------------------------------------------------------------------------------------------------- data
def make_batches(n, B, T, vocab_size, device, generator):
    batches = []
    for _ in range(n):
        lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=generator)
        lengths[0] = T
        ids = torch.randint(1, vocab_size, (B, T), generator=generator)
        pad = torch.arange(T)[None, :] >= lengths[:, None]
        ids[pad] = 0
        slots = torch.randint(0, SLOTS, (B, T), generator=generator)
        targets = {
            "intent": torch.randint(0, INTENTS, (B,), generator=generator).to(device),
            "slots": slots.to(device),
            "slots_padded": slots.masked_fill(pad, -100).to(device),
        }
        batches.append((ids.to(device), lengths, targets, int(lengths.sum())))
    return batches


# --------------------------------------------------------------------------------------------------- run
def _step_fn(model, loss_fn, batches, device, amp_dtype):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    state = {"i": 0}
    dev_type = torch.device(device).type

    def step():
        ids, lengths, targets, _ = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(dev_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(model, ids, lengths, targets)
        loss.backward()
        opt.step()
        return loss

    return step


def _ints(text, default):
    return [int(x) for x in text.split(",")] if text else list(default)


def run(args):
    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    cuda = str(device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("fastmtl.bench train_step: --device cuda but no CUDA device is available")
    batch_sizes = _ints(getattr(args, "batch_sizes", None), (8, 32) if quick else (32, 128))
    T = getattr(args, "seq_len", None) or (16 if quick else 32)
    H = getattr(args, "hidden_size", None) or (64 if quick else 512)
    E = getattr(args, "embedding_dim", None) or (32 if quick else 300)
    V = getattr(args, "vocab_size", None) or (500 if quick else 10000)
    L = getattr(args, "num_layers", 2)
    dtypes = (getattr(args, "dtypes", None) or ("float32,bf16" if cuda else "float32")).split(",")
    providers = (getattr(args, "providers", None) or "fastmtl,pytorch").split(",")
    warmup = getattr(args, "warmup", None) or (1 if quick else 5)
    repeat = getattr(args, "repeat", None) or (3 if quick else 20)

    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype_name in dtypes:
        amp = {"float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype_name]
        for B in batch_sizes:
            batches = make_batches(4, B, T, V, device, gen)
            tokens = sum(b[3] for b in batches) / len(batches)
            timing = {}
            for prov in providers:
                torch.manual_seed(0)
                if prov in ("fastmtl", "fastmtl_crf"):
                    model = build_fastmtl_model(V, E, H, L, crf=prov == "fastmtl_crf").to(device)
                    loss_fn = fastmtl_loss
                elif prov in ("pytorch", "pytorch_crf"):
                    model, loss_fn = PlainMultiTaskLSTM(V, E, H, L, crf=prov == "pytorch_crf").to(device), plain_loss
                else:
                    raise SystemExit("unknown provider %r (fastmtl, fastmtl_crf, pytorch, pytorch_crf)" % prov)
                model.train()
                step = _step_fn(model, loss_fn, batches, device, amp)
                row = {"device": str(device), "dtype": dtype_name, "B": B, "T": T, "H": H, "layers": L,
                       "provider": prov}
                try:
                    t = measure(step, warmup=warmup, repeat=repeat, device=device)
                except Exception as e:  # a provider that cannot run this configuration: report it, keep going
                    row["error"] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                    print("train_step: %s %s B=%d failed: %s" % (prov, dtype_name, B, row["error"]), flush=True)
                    rows.append(row)
                    continue
                timing[prov] = t["median_ms"]
                row.update({"median_ms": t["median_ms"], "p25_ms": t["p25_ms"], "p75_ms": t["p75_ms"],
                            "tokens_per_s": tokens / (t["median_ms"] / 1e3)})
                rows.append(row)
                del model, step
                if cuda:
                    torch.cuda.empty_cache()
            for r in rows[-len(providers):]:
                crf = r["provider"].endswith("_crf")
                mine, base = ("fastmtl_crf", "pytorch_crf") if crf else ("fastmtl", "pytorch")
                if r["provider"] in (mine, base) and mine in timing and base in timing:
                    r["speedup_vs_pytorch"] = timing[base] / timing[mine]
                if crf and "fastmtl" in timing and "fastmtl_crf" in timing:
                    r["crf_step_ratio"] = timing["fastmtl_crf"] / timing["fastmtl"]
    if cuda:
        name = torch.cuda.get_device_name()
        for r in rows:
            r["gpu"] = name
    cols = ["dtype", "B", "T", "H", "provider", "median_ms", "tokens_per_s", "speedup_vs_pytorch"]
    if any("crf_step_ratio" in r for r in rows):
        cols.append("crf_step_ratio")
    print_table(rows, cols + (["error"] if any("error" in r for r in rows) else []))
    return rows
