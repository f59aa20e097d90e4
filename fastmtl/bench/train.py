"""Training throughput (tokens/s) of the model ``fastmtl train`` builds (MultiTaskLSTM: fastmtl.nn.LSTM +
fastmtl.nn.MultiTaskHeads) against the same model in plain PyTorch (torch.nn.LSTM with pack_padded_sequence,
one nn.Linear per task, summed F.cross_entropy), on the ATIS training batches, measured in one run.

One "pass" = forward + backward + Adam step over the same ``--batches`` length-bucketed batches (the trainer's
batching); the two providers alternate pass by pass and the median pass time is reported.
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .common import print_table

COLUMNS = ["provider", "batch_size", "hidden_size", "batches", "tokens", "median_ms", "tokens_per_s", "speedup"]


def add_arguments(p):
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--embedding-dim", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--batches", type=int, default=60, help="batches per pass (0: the whole epoch)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)


class PlainMultiTaskLSTM(torch.nn.Module):
    """The baseline: what a user would write in plain PyTorch."""

    def __init__(self, vocab_size, embedding_dim, hidden_size, n_intents, n_slots, dropout):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = torch.nn.LSTM(embedding_dim, hidden_size, batch_first=True, bidirectional=True)
        self.intent = torch.nn.Linear(2 * hidden_size, n_intents)
        self.slots = torch.nn.Linear(2 * hidden_size, n_slots)
        self.dropout, self.H = dropout, hidden_size

    def forward(self, ids, lengths, intent, slots):
        x = F.dropout(self.embedding(ids), self.dropout, self.training)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        out = F.dropout(out, self.dropout, self.training)
        pooled = F.dropout(torch.cat([h[0], h[1]], -1), self.dropout, self.training)  # fwd last, bwd first
        return F.cross_entropy(self.intent(pooled), intent) + F.cross_entropy(
            self.slots(out).flatten(0, 1), slots.flatten(), ignore_index=-100)


def run(args):
    from .. import data as D
    from ..train import TrainConfig, build_tasks
    from ..model import MultiTaskLSTM

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    E = args.embedding_dim or cfg.embedding_dim
    H = args.hidden_size or cfg.hidden_size
    device = torch.device(args.device)
    train_ex = D.load_atis("train")
    specs = [D.TaskSpec(*t) for t in D.atis.ATIS_TASKS]
    vocab = D.Vocab.build([e["tokens"] for e in train_ex])
    lvs = D.build_label_vocabs(train_ex, specs)
    enc = D.encode_examples(train_ex, vocab, lvs, specs)
    idx = D.bucket_batches([len(x[0]) for x in enc], args.batch_size, True, 0)
    nb = args.batches if args.batches and not args.quick else len(idx)
    if args.quick:
        nb = min(nb, 10)
    batches = [D.collate(enc, i, specs).to(device) for i in idx[:nb]]
    tokens = sum(b.num_tokens for b in batches)

    torch.manual_seed(0)
    fm = MultiTaskLSTM(len(vocab), E, H, build_tasks(specs, lvs), dropout=cfg.dropout).to(device)
    pm = PlainMultiTaskLSTM(len(vocab), E, H, len(lvs["intent"]), len(lvs["slots"]), cfg.dropout).to(device)
    fo = torch.optim.Adam(fm.parameters(), lr=1e-3)
    po = torch.optim.Adam(pm.parameters(), lr=1e-3)

    def fast_pass():
        for b in batches:
            fo.zero_grad(set_to_none=True)
            fm(b.ids, b.lengths, b.targets).loss.backward()
            fo.step()

    def plain_pass():
        for b in batches:
            po.zero_grad(set_to_none=True)
            pm(b.ids, b.lengths.cpu(), b.targets["intent"], b.targets["slots"]).backward()
            po.step()

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    fm.train()
    pm.train()
    fast_pass()
    plain_pass()  # warm-up
    tf, tp = [], []
    for _ in range(1 if args.quick else args.repeat):  # alternate so both see the same machine load
        tf.append(timed(fast_pass))
        tp.append(timed(plain_pass))
    mf, mp = sorted(tf)[len(tf) // 2], sorted(tp)[len(tp) // 2]
    common = {"batch_size": args.batch_size, "hidden_size": H, "embedding_dim": E, "batches": nb, "tokens": tokens,
              "threads": torch.get_num_threads()}
    rows = [dict(common, provider="fastmtl (MultiTaskLSTM)", median_ms=mf, tokens_per_s=tokens / (mf / 1e3),
                 speedup=mp / mf),
            dict(common, provider="plain PyTorch (nn.LSTM+pack, Linear, CE)", median_ms=mp,
                 tokens_per_s=tokens / (mp / 1e3), speedup=1.0)]
    print_table(rows, COLUMNS)
    return rows
