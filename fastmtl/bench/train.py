"""Training throughput (tokens/s) of the model ``fastmtl train`` builds (MultiTaskLSTM: fastmtl.nn.LSTM +
fastmtl.nn.MultiTaskHeads) against the same model in plain PyTorch (torch.nn.LSTM with pack_padded_sequence,
one nn.Linear per task, summed F.cross_entropy), on the ATIS training batches, measured in one run.

One "pass" = forward + backward + Adam step over the same ``--batches`` length-bucketed batches (the trainer's
batching); the two providers alternate pass by pass and the median pass time is reported. The models: ``default``
is the model ``fastmtl train`` builds with softmax slots (character CNN word features, max-pooled intent, label
smoothing 0.1; the plain side uses the same CharCNN module and a masked max over the padded LSTM output), ``crf``
the same with a CRF on the slots (``fastmtl train``'s default; the plain side scores the slots with pytorch-crf
0.7.2, its NLL per real token) and ``basic`` the bare BiLSTM (word embeddings only, intent on each direction's
final state).
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..model import _masked_max
from .common import print_table

COLUMNS = ["model", "provider", "batch_size", "hidden_size", "batches", "tokens", "median_ms", "tokens_per_s",
           "speedup"]


def add_arguments(p):
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--embedding-dim", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--batches", type=int, default=60, help="batches per pass (0: the whole epoch)")
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", choices=["default", "basic", "crf", "both", "all"], default="both",
                   help="default: the model of fastmtl train with softmax slots (char CNN, max pooling, label "
                        "smoothing); crf: the same with a CRF on the slots (fastmtl train's default; the plain side "
                        "uses pytorch-crf); basic: word embeddings + BiLSTM, intent on the final states; both: "
                        "default and basic; all: the three")


class PlainMultiTaskLSTM(torch.nn.Module):
    """The baseline: what a user would write in plain PyTorch. ``char_cnn`` (a :class:`fastmtl.model.CharCNN`, plain
    PyTorch) adds character features to the embeddings; ``pooling`` is ``"last"`` (each direction's final state,
    ``h_n``) or ``"max"`` (masked max over time)."""

    def __init__(self, vocab_size, embedding_dim, hidden_size, n_intents, n_slots, dropout, char_cnn=None,
                 pooling="last", label_smoothing=0.0, crf=False):
        super().__init__()
        self.crf = None
        if crf:  # the slots as a linear-chain CRF (pytorch-crf), its NLL per real token, no label smoothing
            import torchcrf

            self.crf = torchcrf.CRF(n_slots, batch_first=True)
        self.embedding = torch.nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.char_cnn = char_cnn
        in_size = embedding_dim + (char_cnn.output_size if char_cnn is not None else 0)
        self.lstm = torch.nn.LSTM(in_size, hidden_size, batch_first=True, bidirectional=True)
        self.intent = torch.nn.Linear(2 * hidden_size, n_intents)
        self.slots = torch.nn.Linear(2 * hidden_size, n_slots)
        self.dropout, self.H, self.pooling, self.ls = dropout, hidden_size, pooling, label_smoothing

    def forward(self, ids, lengths, intent, slots):
        x = self.embedding(ids)
        if self.char_cnn is not None:
            x = torch.cat([x, self.char_cnn(ids)], dim=2)
        x = F.dropout(x, self.dropout, self.training)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        out = F.dropout(out, self.dropout, self.training)
        if self.pooling == "max":
            pooled = _masked_max(out, lengths)
        else:
            pooled = F.dropout(torch.cat([h[0], h[1]], -1), self.dropout, self.training)  # fwd last, bwd first
        intent_loss = F.cross_entropy(self.intent(pooled), intent, label_smoothing=self.ls)
        if self.crf is not None:
            mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths.to(ids.device)[:, None]
            nll = -self.crf(self.slots(out), slots.clamp_min(0), mask=mask, reduction="sum")
            return intent_loss + nll / mask.sum()
        return intent_loss + F.cross_entropy(
            self.slots(out).flatten(0, 1), slots.flatten(), ignore_index=-100, label_smoothing=self.ls)


def run(args):
    from .. import data as D
    from ..train import TrainConfig

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

    rows = []
    models = {"both": ["default", "basic"], "all": ["default", "crf", "basic"]}.get(args.model, [args.model])
    for model in models:
        rows += _measure(args, model, cfg, E, H, device, vocab, lvs, specs, batches, nb, tokens)
    print_table(rows, COLUMNS)
    return rows


def _measure(args, model, cfg, E, H, device, vocab, lvs, specs, batches, nb, tokens):
    from .. import data as D
    from ..train import build_tasks
    from ..model import CharCNN, MultiTaskLSTM

    torch.manual_seed(0)
    crf = model == "crf"
    if crf:
        specs = [D.TaskSpec(s.name, s.level, s.source, s.dataset, s.level == "token") for s in specs]
    if model in ("default", "crf"):
        pooling, ls = cfg.pooling, cfg.label_smoothing
        char = dict(char_words=vocab.itos, char_dim=cfg.char_dim, char_filters=cfg.char_filters,
                    char_kernel=cfg.char_kernel)
        plain_char = CharCNN(vocab.itos, cfg.char_dim, cfg.char_filters, cfg.char_kernel)
    else:
        pooling, ls, char, plain_char = "last", 0.0, {}, None
    fm = MultiTaskLSTM(len(vocab), E, H, build_tasks(specs, lvs, pooling, ls), dropout=cfg.dropout, **char).to(device)
    pm = PlainMultiTaskLSTM(len(vocab), E, H, len(lvs["intent"]), len(lvs["slots"]), cfg.dropout, plain_char,
                            pooling, ls, crf=crf).to(device)
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
    common = {"model": model, "batch_size": args.batch_size, "hidden_size": H, "embedding_dim": E, "batches": nb,
              "tokens": tokens, "threads": torch.get_num_threads()}
    rows = [dict(common, provider="fastmtl (MultiTaskLSTM)", median_ms=mf, tokens_per_s=tokens / (mf / 1e3),
                 speedup=mp / mf),
            dict(common, provider="plain PyTorch (nn.LSTM+pack, Linear, %s)" % ("CE + pytorch-crf" if crf else "CE"),
                 median_ms=mp,
                 tokens_per_s=tokens / (mp / 1e3), speedup=1.0)]
    return rows
