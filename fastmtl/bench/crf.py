"""Linear-chain CRF benchmark: fastmtl's native CRF ops against pytorch-crf 0.7.2 (``torchcrf.CRF``) and against a
well-vectorised PyTorch CRF (the log-sum-exp recursion over a (B, C, C) tensor per time step, as AllenNLP's
``ConditionalRandomField`` writes it; Viterbi the same way with a max).

For each shape (B = 32, T in {20, 50}, C in {9, 130, 500}; variable lengths uniform in [T/2, T], the first sequence
full) it times the loss forward + backward (gradients for the emissions, the transitions and the start/end scores)
and the Viterbi decoding. The providers run in turns, call by call, so that all see the same machine load; each
side's median is reported with its quartiles. ``--quick``: T = 20 and C in {9, 130}, fewer calls.
"""
import os

import torch

from .common import print_table
from .heads import _interleaved

B = 32
SHAPES = [(20, 9), (20, 130), (20, 500), (50, 9), (50, 130), (50, 500)]
PROVIDERS = ("fastmtl", "vectorised", "pytorch_crf")


def _inputs(T, C, device, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    em = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
    tags = torch.randint(0, C, (B, T), generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths = lengths.to(device)
    params = [(torch.randn(*shape, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_()
              for shape in ((C, C), (C,), (C,))]
    return em, tags, lengths, params


def vectorised_nll(em, tags, mask, transitions, start, end):
    """Summed CRF negative log-likelihood in plain PyTorch ops: the forward algorithm as one log-sum-exp over a
    (B, C, C) tensor per time step and the gold path score gathered for all positions at once."""
    B_, T, C = em.shape
    alpha = start + em[:, 0]
    for t in range(1, T):
        nxt = torch.logsumexp(alpha.unsqueeze(2) + transitions.unsqueeze(0) + em[:, t].unsqueeze(1), dim=1)
        alpha = torch.where(mask[:, t:t + 1], nxt, alpha)
    log_z = torch.logsumexp(alpha + end, dim=1)
    m = mask.to(em.dtype)
    emit = em.gather(2, tags.unsqueeze(2)).squeeze(2)
    trans = transitions[tags[:, :-1], tags[:, 1:]]
    last = tags.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
    score = start[tags[:, 0]] + (emit * m).sum(1) + (trans * m[:, 1:]).sum(1) + end[last]
    return (log_z - score).sum()


def vectorised_decode(em, mask, transitions, start, end):
    """Viterbi in plain PyTorch ops: one (B, C, C) max per time step, the back-pointers followed on the device."""
    B_, T, C = em.shape
    score = start + em[:, 0]
    back = []
    for t in range(1, T):
        best, arg = (score.unsqueeze(2) + transitions.unsqueeze(0)).max(dim=1)
        back.append(arg)
        score = torch.where(mask[:, t:t + 1], best + em[:, t], score)
    score = score + end
    lengths = mask.sum(1)
    tag = score.argmax(dim=1)
    out = torch.full((B_, T), -1, dtype=torch.long, device=em.device)
    ar = torch.arange(B_, device=em.device)
    for t in range(T - 1, -1, -1):
        inside = lengths - 1 > t
        if t < T - 1:
            tag = torch.where(inside, back[t][ar, tag], tag)
        out[:, t] = torch.where(lengths - 1 >= t, tag, out[:, t])
    return out


def make_workloads(T, C, device="cpu"):
    """{provider: (loss forward + backward callable, decode callable)} on the same inputs."""
    from ..functional import crf_decode, crf_nll

    em, tags, lengths, (tr, st, en) = _inputs(T, C, device)
    mask = torch.arange(T, device=device)[None] < lengths[:, None]
    grads = [em, tr, st, en]

    def zero():
        for p in grads:
            p.grad = None

    def fast_loss():
        zero()
        crf_nll(em, tags, lengths, tr, st, en, reduction="sum").backward()

    def fast_decode():
        crf_decode(em.detach(), lengths, tr.detach(), st.detach(), en.detach())

    def vec_loss():
        zero()
        vectorised_nll(em, tags, mask, tr, st, en).backward()

    def vec_decode():
        with torch.no_grad():
            vectorised_decode(em, mask, tr, st, en)

    out = {"fastmtl": (fast_loss, fast_decode), "vectorised": (vec_loss, vec_decode)}
    try:
        import torchcrf
    except ImportError:
        return out
    crf = torchcrf.CRF(C, batch_first=True).to(device)
    with torch.no_grad():
        crf.transitions.copy_(tr)
        crf.start_transitions.copy_(st)
        crf.end_transitions.copy_(en)
    ref_grads = [em] + list(crf.parameters())

    def ref_loss():
        for p in ref_grads:
            p.grad = None
        (-crf(em, tags, mask=mask, reduction="sum")).backward()

    def ref_decode():
        with torch.no_grad():
            crf.decode(em, mask)

    out["pytorch_crf"] = (ref_loss, ref_decode)
    return out


def add_arguments(p):
    p.add_argument("--shapes", default=None, help="comma-separated TxC pairs (default: all of %s)"
                   % ",".join("%dx%d" % s for s in SHAPES))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")


def run(args):
    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    shapes = SHAPES
    if getattr(args, "shapes", None):
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    elif quick:
        shapes = [(20, 9), (20, 130)]
    rows = []
    for T, C in shapes:
        work = make_workloads(T, C, device)
        big = C >= 500
        rep = 3 if quick else (6 if big else 15)
        load0 = os.getloadavg()[0]
        loss = _interleaved({p: w[0] for p, w in work.items()}, warmup=1 if big else 2, repeat=rep, device=device)
        dec = _interleaved({p: w[1] for p, w in work.items()}, warmup=1 if big else 2, repeat=rep, device=device)
        row = {"B": B, "T": T, "C": C}
        for p in PROVIDERS:
            if p in loss:
                row["%s_loss_ms" % p] = loss[p]["median_ms"]
                row["%s_decode_ms" % p] = dec[p]["median_ms"]
        for p in PROVIDERS[1:]:
            if p in loss:
                row["loss_speedup_vs_%s" % p] = loss[p]["median_ms"] / loss["fastmtl"]["median_ms"]
                row["decode_speedup_vs_%s" % p] = dec[p]["median_ms"] / dec["fastmtl"]["median_ms"]
        row["fastmtl_loss_p25_p75_ms"] = "%.2f-%.2f" % (loss["fastmtl"]["p25_ms"], loss["fastmtl"]["p75_ms"])
        row["load_avg"] = "%.1f-%.1f" % (load0, os.getloadavg()[0])
        row["threads"] = torch.get_num_threads()
        rows.append(row)
        print_table([row], _COLUMNS)
    print()
    print_table(rows, _COLUMNS)
    return rows


_COLUMNS = ["B", "T", "C", "fastmtl_loss_ms", "vectorised_loss_ms", "pytorch_crf_loss_ms", "loss_speedup_vs_vectorised",
            "loss_speedup_vs_pytorch_crf", "fastmtl_decode_ms", "vectorised_decode_ms", "pytorch_crf_decode_ms",
            "decode_speedup_vs_vectorised", "decode_speedup_vs_pytorch_crf", "fastmtl_loss_p25_p75_ms", "load_avg",
            "threads"]
