"""The linear-chain CRF ops (fastmtl.functional.crf_nll / crf_decode / crf_marginals) against pytorch-crf 0.7.2, the
pure-PyTorch reference (fastmtl.reference.crf) and brute-force enumeration of every path; every CPU instruction set
this machine runs; constraints; bad input; the transforms (gradcheck, double backward, opcheck, compile, vmap)."""
import itertools
import math

import pytest
import torch

import fastmtl
from fastmtl.functional import crf_decode, crf_marginals, crf_nll
from fastmtl.reference import crf as R

torchcrf = pytest.importorskip("torchcrf")

ISAS = fastmtl.cpu_kernels()


@pytest.fixture(params=ISAS)
def isa(request):
    with fastmtl.use_cpu_kernel(request.param):
        assert fastmtl.cpu_kernel() == request.param
        yield request.param


def problem(B, T, C, dtype=torch.float64, lengths="random", device="cpu", scale=1.0):
    em = (torch.randn(B, T, C, dtype=torch.float64) * 2 * scale).to(dtype).to(device)
    tags = torch.randint(0, C, (B, T), device=device)
    if lengths == "random":
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        if B > 1:
            lengths[-1] = 1
    elif lengths == "full":
        lengths = torch.full((B,), T)
    lengths = lengths.to(device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    # padding tags need not be valid
    tags = torch.where(mask, tags, torch.full_like(tags, -7))
    tr = (torch.randn(C, C, dtype=torch.float64) * scale).to(dtype).to(device)
    st = (torch.randn(C, dtype=torch.float64) * scale).to(dtype).to(device)
    en = (torch.randn(C, dtype=torch.float64) * scale).to(dtype).to(device)
    return em, tags, lengths, mask, tr, st, en


def torchcrf_model(tr, st, en):
    C = tr.shape[0]
    crf = torchcrf.CRF(C, batch_first=True).to(dtype=tr.dtype, device=tr.device)
    with torch.no_grad():
        crf.transitions.copy_(tr)
        crf.start_transitions.copy_(st)
        crf.end_transitions.copy_(en)
    return crf


def grads_fastmtl(em, tags, lengths, tr, st, en, reduction="sum", **kw):
    ps = [x.detach().clone().requires_grad_() for x in (em, tr, st, en)]
    loss = crf_nll(ps[0], tags, lengths, ps[1], ps[2], ps[3], reduction=reduction, **kw)
    w = torch.randn_like(loss) if reduction == "none" else torch.ones_like(loss)
    return loss.detach(), torch.autograd.grad((loss * w).sum(), ps), w


def grads_torchcrf(em, tags, mask, tr, st, en, reduction, w):
    crf = torchcrf_model(tr, st, en)
    e = em.detach().clone().requires_grad_()
    safe_tags = torch.where(mask, tags, torch.zeros_like(tags))  # pytorch-crf reads the padding tags
    loss = -crf(e, safe_tags, mask, reduction=reduction)
    ps = [e, crf.transitions, crf.start_transitions, crf.end_transitions]
    g = torch.autograd.grad((loss * w).sum(), ps, allow_unused=True)  # T = 1: no transition is used
    return loss.detach(), [torch.zeros_like(p) if x is None else x for x, p in zip(g, ps)]


SHAPES = [(1, 1, 1), (5, 7, 3), (7, 11, 9), (4, 33, 17), (3, 5, 97), (2, 9, 130)]


@pytest.mark.parametrize("B,T,C", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "token_mean", "none"])
def test_matches_pytorch_crf_float64(B, T, C, reduction):
    em, tags, lengths, mask, tr, st, en = problem(B, T, C)
    loss, g, w = grads_fastmtl(em, tags, lengths, tr, st, en, reduction)
    ref, gref = grads_torchcrf(em, tags, mask, tr, st, en, reduction, w)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("emissions", "transitions", "start", "end"), g, gref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: "d/d %s: %s" % (name, m))
    paths = crf_decode(em, lengths, tr, st, en)
    ref_paths = torchcrf_model(tr, st, en).decode(em, mask)
    for b in range(B):
        L = int(lengths[b])
        assert paths[b, :L].tolist() == ref_paths[b]
        assert (paths[b, L:] == -1).all()


def test_isas(isa):
    for B, T, C in [(9, 13, 5), (6, 20, 16), (5, 8, 17), (4, 6, 33), (3, 7, 130)]:
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
            em, tags, lengths, mask, tr, st, en = problem(B, T, C, dtype)
            loss, g, w = grads_fastmtl(em, tags, lengths, tr, st, en, "none")
            ref, gref = grads_torchcrf(em.double(), tags, mask, tr.double(), st.double(), en.double(), "none",
                                       w.double())
            torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol * 10)
            for a, b in zip(g, gref):
                torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
            paths = crf_decode(em, lengths, tr, st, en)
            ref_paths = torchcrf_model(tr, st, en).decode(em, mask)
            assert [paths[b, :int(lengths[b])].tolist() for b in range(B)] == ref_paths
            m = crf_marginals(em, lengths, tr, st, en)
            mref = R.crf_marginals_reference(em.double(), lengths, tr.double(), st.double(), en.double())
            torch.testing.assert_close(m.double(), mref, rtol=tol, atol=tol)


def test_isas_agree_on_ties():
    """Integer-valued scores make ties common: every ISA picks the same (first maximal) index as pytorch-crf."""
    B, T, C = 6, 12, 21
    em = torch.randint(-2, 3, (B, T, C)).float()
    tr = torch.randint(-1, 2, (C, C)).float()
    st, en = torch.randint(-1, 2, (C,)).float(), torch.randint(-1, 2, (C,)).float()
    lengths = torch.randint(1, T + 1, (B,))
    mask = torch.arange(T)[None] < lengths[:, None]
    ref = torchcrf_model(tr, st, en).decode(em, mask)
    for name in ISAS:
        with fastmtl.use_cpu_kernel(name):
            paths = crf_decode(em, lengths, tr, st, en)
        assert [paths[b, :int(lengths[b])].tolist() for b in range(B)] == ref, name


def test_float32_loose():
    em, tags, lengths, mask, tr, st, en = problem(16, 40, 50, torch.float32)
    loss, g, w = grads_fastmtl(em, tags, lengths, tr, st, en, "sum")
    ref, gref = grads_torchcrf(em, tags, mask, tr, st, en, "sum", w)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-3)
    for a, b in zip(g, gref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------- brute force
def path_score(em, y, tr, st, en):
    s = st[y[0]] + em[0, y[0]]
    for t in range(1, len(y)):
        s = s + tr[y[t - 1], y[t]] + em[t, y[t]]
    return s + en[y[-1]]


def brute_force(em, L, tr, st, en, allowed=None):
    """log Z, marginals (L, C) and the best path of one sequence by enumerating every allowed path."""
    C = em.shape[1]
    scores, paths = [], []
    for y in itertools.product(range(C), repeat=L):
        if allowed is not None and not all(allowed[y[t - 1], y[t]] for t in range(1, L)):
            continue
        scores.append(path_score(em, y, tr, st, en))
        paths.append(y)
    scores = torch.stack(scores)
    lz = torch.logsumexp(scores, 0)
    p = torch.exp(scores - lz)
    marg = torch.zeros(L, C, dtype=em.dtype)
    for prob, y in zip(p, paths):
        for t in range(L):
            marg[t, y[t]] += prob
    return lz, marg, list(paths[int(torch.argmax(scores))])


@pytest.mark.parametrize("C,T", [(1, 4), (2, 6), (3, 5), (4, 4)])
def test_brute_force(C, T):
    B = 5
    em, tags, lengths, mask, tr, st, en = problem(B, T, C)
    lengths = torch.tensor([T, 1, 2, T - 1, T])[:B].clamp(min=1)
    nll = crf_nll(em, tags.clamp(min=0), lengths, tr, st, en, reduction="none")
    marg = crf_marginals(em, lengths, tr, st, en)
    paths = crf_decode(em, lengths, tr, st, en)
    for b in range(B):
        L = int(lengths[b])
        lz, m, best = brute_force(em[b], L, tr, st, en)
        gold = path_score(em[b], tags[b, :L].clamp(min=0).tolist(), tr, st, en)
        torch.testing.assert_close(nll[b], lz - gold, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(marg[b, :L], m, rtol=1e-12, atol=1e-12)
        assert (marg[b, L:] == 0).all()
        assert paths[b, :L].tolist() == best


def random_allowed(C, p=0.5):
    allowed = torch.rand(C, C) < p
    allowed |= torch.eye(C, dtype=torch.bool)  # every state may stay: some path always exists
    return allowed


@pytest.mark.parametrize("C,T", [(3, 5), (4, 4)])
def test_constraints_brute_force(C, T):
    B = 4
    em, tags, lengths, mask, tr, st, en = problem(B, T, C)
    lengths = torch.tensor([T, 1, 3, T])
    allowed = random_allowed(C)
    marg = crf_marginals(em, lengths, tr, st, en, allowed=allowed)
    paths = crf_decode(em, lengths, tr, st, en, allowed=allowed)
    for b in range(B):
        L = int(lengths[b])
        lz, m, best = brute_force(em[b], L, tr, st, en, allowed)
        torch.testing.assert_close(marg[b, :L], m, rtol=1e-12, atol=1e-12)
        assert paths[b, :L].tolist() == best
        # a gold path: the decoded one (allowed), its NLL against the brute-force partition
        nll = crf_nll(em[b:b + 1], paths[b:b + 1].clamp(min=0), lengths[b:b + 1], tr, st, en, allowed=allowed)
        torch.testing.assert_close(nll, lz - path_score(em[b], best, tr, st, en), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_constraints(dtype):
    B, T, C = 12, 15, 9
    em, tags, lengths, mask, tr, st, en = problem(B, T, C, dtype, scale=3.0)
    allowed = random_allowed(C, 0.4)
    allowed_start = torch.rand(C) < 0.6
    allowed_start[0] = True
    allowed_end = torch.rand(C) < 0.6
    allowed_end[0] = True
    allowed[:, 0] = True
    kw = dict(allowed=allowed, allowed_start=allowed_start, allowed_end=allowed_end)
    paths = crf_decode(em, lengths, tr, st, en, **kw)
    for b in range(B):
        y = paths[b, :int(lengths[b])].tolist()
        assert allowed_start[y[0]] and allowed_end[y[-1]]
        assert all(allowed[y[t - 1], y[t]] for t in range(1, len(y)))
    # the same as pytorch-crf with -inf parameters (its decode handles them)
    ninf = float("-inf")
    ref_paths = torchcrf_model(tr.masked_fill(~allowed, ninf), st.masked_fill(~allowed_start, ninf),
                               en.masked_fill(~allowed_end, ninf)).decode(em, mask)
    assert [paths[b, :int(lengths[b])].tolist() for b in range(B)] == ref_paths
    # NLL and gradients against the reference on feasible gold paths (the decoded ones)
    gold = paths.clamp(min=0)
    loss, g, w = grads_fastmtl(em, gold, lengths, tr, st, en, "none", **kw)
    ps = [x.detach().clone().requires_grad_() for x in (em, tr, st, en)]
    ref = R.crf_nll_reference(*[p.double() for p in ps[:1]], gold, lengths, *[p.double() for p in ps[1:]], "none",
                              **kw)
    gref = torch.autograd.grad((ref * w.double()).sum(), ps)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    for a, b in zip(g, gref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert (g[1][~allowed] == 0).all() and (g[2][~allowed_start] == 0).all() and (g[3][~allowed_end] == 0).all()
    # forbidden tokens get zero marginals: a state that can never start a path has marginal 0 at t = 0
    m = crf_marginals(em, lengths, tr, st, en, **kw)
    assert (m[:, 0, ~allowed_start] == 0).all()
    torch.testing.assert_close(m.sum(-1), mask.to(m.dtype), rtol=tol, atol=tol)


def test_infeasible_gold_path_is_inf_with_zero_gradient():
    B, T, C = 3, 6, 4
    em, tags, lengths, mask, tr, st, en = problem(B, T, C, lengths="full")
    allowed = torch.ones(C, C, dtype=torch.bool)
    allowed[1, 2] = False
    tags = torch.tensor([[0, 1, 2, 3, 0, 0], [0, 0, 0, 0, 0, 0], [3, 3, 1, 1, 2, 0]])
    loss, g, w = grads_fastmtl(em, tags, lengths, tr, st, en, "none", allowed=allowed)
    assert math.isinf(loss[0]) and loss[0] > 0 and math.isinf(loss[2]) and math.isfinite(loss[1])
    assert all(torch.isfinite(x).all() for x in g)
    assert (g[0][0] == 0).all() and (g[0][2] == 0).all() and g[0][1].abs().sum() > 0


# ----------------------------------------------------------------------------------------------- edges
def test_lengths_zero_one_and_full():
    B, T, C = 6, 8, 5
    em, tags, lengths, _, tr, st, en = problem(B, T, C, lengths=torch.tensor([0, 1, T, 1, 0, T]))
    loss, g, _ = grads_fastmtl(em, tags, lengths, tr, st, en, "none")
    assert loss[0] == 0 and loss[4] == 0 and (g[0][0] == 0).all() and (g[0][4] == 0).all()
    keep = lengths > 0
    mask = torch.arange(T)[None] < lengths[:, None]
    ref, gref = grads_torchcrf(em[keep], tags[keep], mask[keep], tr, st, en, "none", torch.ones(int(keep.sum()),
                                                                                                 dtype=em.dtype))
    torch.testing.assert_close(loss[keep], ref, rtol=1e-10, atol=1e-10)
    paths = crf_decode(em, lengths, tr, st, en)
    assert (paths[0] == -1).all() and (paths[1, 1:] == -1).all() and (paths[5] >= 0).all()
    m = crf_marginals(em, lengths, tr, st, en)
    assert (m[0] == 0).all() and (m[4] == 0).all()
    # an empty batch
    e0 = em[:0]
    assert crf_nll(e0, tags[:0], lengths[:0], tr, st, en, reduction="none").shape == (0,)
    assert crf_decode(e0, lengths[:0], tr, st, en).shape == (0, T)


def test_noncontiguous_inputs():
    B, T, C = 5, 9, 7
    em, tags, lengths, mask, tr, st, en = problem(B, T, C)
    em_nc = em.transpose(0, 1).contiguous().transpose(0, 1)
    tr_nc = tr.t().contiguous().t()
    tags_nc = tags.t().contiguous().t()
    assert not em_nc.is_contiguous() and not tr_nc.is_contiguous() and not tags_nc.is_contiguous()
    a = crf_nll(em_nc, tags_nc, lengths, tr_nc, st, en, reduction="none")
    b = crf_nll(em, tags, lengths, tr, st, en, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(crf_decode(em_nc, lengths, tr_nc, st, en), crf_decode(em, lengths, tr, st, en))


def test_extreme_scores_float32():
    """Very negative transitions (soft constraints written as -1e4) and large emissions: the scaled recursions fall
    back to exact log-sum-exps where sums underflow, so float32 stays accurate (no -inf, no NaN)."""
    B, T, C = 6, 30, 20
    em, tags, lengths, mask, tr, st, en = problem(B, T, C, torch.float64, scale=1.0)
    em = em * 10
    tr = tr.masked_fill(torch.rand(C, C) < 0.7, -1e4)
    tr.fill_diagonal_(0.5)
    tags = crf_decode(em, lengths, tr, st, en).clamp(min=0)
    ref = R.crf_nll_reference(em, tags, lengths, tr, st, en, "none")
    mref = R.crf_marginals_reference(em, lengths, tr, st, en)
    # float32 cannot do better than PyTorch's own float32 recursion: error at most twice its error (both against
    # float64), plus a small absolute slack
    f32 = [x.float() for x in (em, tr, st, en)]
    err_loss = (R.crf_nll_reference(f32[0], tags, lengths, *f32[1:], "none").double() - ref).abs().max()
    err_marg = (R.crf_marginals_reference(f32[0], lengths, *f32[1:]).double() - mref).abs().max()
    lz = float(R.crf_log_partition_reference(em, lengths, tr, st, en).abs().max())
    for name in ISAS:
        with fastmtl.use_cpu_kernel(name):
            loss, g, w = grads_fastmtl(*f32[:1], tags, lengths, *f32[1:], "none")
            m = crf_marginals(f32[0], lengths, *f32[1:])
        assert torch.isfinite(loss).all() and all(torch.isfinite(x).all() for x in g), name
        assert (loss.double() - ref).abs().max() <= 2 * err_loss + 1e-3, name
        # alpha + beta - log Z is a difference of large log-scores, rounded in float32 (unlike autograd through the
        # recursion): the marginals' error grows with the magnitude of the log-scores, a few float32 ulps of log Z
        # (fastmtl/functional/crf.py, "Precision"); here |log Z| ~ 1e3, so up to ~5e-4
        assert (m.double() - mref).abs().max() <= 2 * err_marg + 2e-4 + 8 * 2.0 ** -24 * lz, name


def test_bfloat16_runs_in_float32():
    B, T, C = 8, 16, 12
    em, tags, lengths, mask, tr, st, en = problem(B, T, C, torch.bfloat16)
    loss, g, w = grads_fastmtl(em, tags, lengths, tr, st, en, "none")
    assert loss.dtype == torch.float32 and g[0].dtype == torch.bfloat16 and g[1].dtype == torch.bfloat16
    ref = R.crf_nll_reference(em.double(), tags, lengths, tr.double(), st.double(), en.double(), "none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)  # float32 math, not bfloat16's
    m = crf_marginals(em, lengths, tr, st, en)
    assert m.dtype == torch.float32
    # bfloat16 emissions with float32 parameters: promoted to float32
    loss2 = crf_nll(em, tags, lengths, tr.float(), st.float(), en.float(), reduction="none")
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------- bad input
def test_errors_name_the_argument():
    B, T, C = 3, 5, 4
    em, tags, lengths, mask, tr, st, en = problem(B, T, C, lengths="full")
    bad = tags.clone()
    bad[1, 2] = C
    with pytest.raises(IndexError, match=r"tags\[1, 2\] = 4"):
        crf_nll(em, bad, lengths, tr, st, en)
    bad[1, 2] = -1
    with pytest.raises(IndexError, match="tags"):
        crf_nll(em, bad, lengths, tr, st, en)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 6"):
        crf_nll(em, tags, torch.tensor([T + 1, 1, 1]), tr, st, en)
    with pytest.raises(ValueError, match="lengths"):
        crf_decode(em, torch.tensor([-1, 1, 1]), tr, st, en)
    with pytest.raises(ValueError, match="transitions must have shape"):
        crf_nll(em, tags, lengths, tr[:, :3], st, en)
    with pytest.raises(ValueError, match="start must have shape"):
        crf_marginals(em, lengths, tr, st[:3], en)
    with pytest.raises(ValueError, match="end must have shape"):
        crf_decode(em, lengths, tr, st, en[None])
    with pytest.raises(ValueError, match="tags must have shape"):
        crf_nll(em, tags[:, :2], lengths, tr, st, en)
    with pytest.raises(ValueError, match="lengths must have shape"):
        crf_nll(em, tags, lengths[:2], tr, st, en)
    with pytest.raises(ValueError, match="emissions must have shape"):
        crf_nll(em[0], tags, lengths, tr, st, en)
    with pytest.raises(ValueError, match="allowed must have shape"):
        crf_decode(em, lengths, tr, st, en, allowed=torch.ones(C, C + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="allowed must be a bool mask"):
        crf_decode(em, lengths, tr, st, en, allowed=torch.ones(C, C))
    with pytest.raises(TypeError, match="tags must hold integers"):
        crf_nll(em, tags.float(), lengths, tr, st, en)
    with pytest.raises(ValueError, match="reduction"):
        crf_nll(em, tags, lengths, tr, st, en, reduction="avg")
    # the op itself: dtype mismatch
    with pytest.raises(TypeError, match="transitions has dtype"):
        torch.ops.fastmtl.crf_decode(em, lengths, tr.float(), st, en, None, None, None)


# ----------------------------------------------------------------------------------------------- transforms
def test_gradcheck_and_gradgradcheck():
    B, T, C = 3, 4, 3
    em, tags, lengths, mask, tr, st, en = problem(B, T, C)
    allowed = random_allowed(C, 0.6)
    gold = crf_decode(em, lengths, tr, st, en, allowed=allowed).clamp(min=0)
    for kw, y in ((dict(), tags.clamp(min=0)), (dict(allowed=allowed), gold)):
        inputs = [x.detach().clone().requires_grad_() for x in (em, tr, st, en)]

        def f(e, a, s, n):
            return crf_nll(e, y, lengths, a, s, n, reduction="none", **kw)

        assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)
        assert torch.autograd.gradgradcheck(f, inputs)


def test_double_backward_matches_reference():
    B, T, C = 4, 6, 5
    em, tags, lengths, mask, tr, st, en = problem(B, T, C)
    tags = tags.clamp(min=0)

    def hvp(fn):
        ps = [x.detach().clone().requires_grad_() for x in (em, tr, st, en)]
        g = torch.autograd.grad(fn(*ps).sum(), ps, create_graph=True)
        pen = sum((x ** 2).sum() for x in g)
        return torch.autograd.grad(pen, ps)

    a = hvp(lambda e, t, s, n: crf_nll(e, tags, lengths, t, s, n, reduction="none"))
    b = hvp(lambda e, t, s, n: R.crf_nll_reference(e, tags, lengths, t, s, n, "none"))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_opcheck():
    B, T, C = 4, 5, 6
    for dtype in (torch.float64, torch.float32):
        em, tags, lengths, mask, tr, st, en = problem(B, T, C, dtype)
        tags = tags.clamp(min=0)
        allowed = random_allowed(C, 0.7)
        for masks in ((None, None, None), (allowed, torch.ones(C, dtype=torch.bool), None)):
            ps = [x.clone().requires_grad_() for x in (em, tr, st, en)]
            torch.library.opcheck(torch.ops.fastmtl.crf_nll_fwd.default,
                                  (ps[0], tags, lengths, ps[1], ps[2], ps[3], *masks))
            nll, lz, al = torch.ops.fastmtl.crf_nll_fwd(em, tags, lengths, tr, st, en, *masks)
            torch.library.opcheck(torch.ops.fastmtl.crf_nll_bwd.default,
                                  (torch.randn(B, dtype=nll.dtype), em, tags, lengths, tr, st, en, *masks, lz, al))
            torch.library.opcheck(torch.ops.fastmtl.crf_decode.default, (em, lengths, tr, st, en, *masks))
            torch.library.opcheck(torch.ops.fastmtl.crf_marginals.default, (em, lengths, tr, st, en, *masks))


def test_compile_fullgraph():
    torch.compiler.reset()
    B, T, C = 5, 7, 6
    em, tags, lengths, mask, tr, st, en = problem(B, T, C, torch.float32)
    tags = tags.clamp(min=0)
    params = [x.clone().requires_grad_() for x in (em, tr, st, en)]

    def step(e, a, s, n):
        return crf_nll(e, tags, lengths, a, s, n, reduction="mean")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*params), params)
    want = torch.autograd.grad(step(*params), params)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    dec = torch.compile(lambda e: crf_decode(e, lengths, tr, st, en), fullgraph=True, backend="aot_eager")
    assert torch.equal(dec(em), crf_decode(em, lengths, tr, st, en))


def test_vmap_and_per_sample_grads():
    N, B, T, C = 3, 4, 6, 5
    em = torch.randn(N, B, T, C, dtype=torch.float64)
    tags = torch.randint(0, C, (N, B, T))
    lengths = torch.randint(1, T + 1, (N, B))
    _, _, _, _, tr, st, en = problem(B, T, C)

    def f(e, y, L, a):
        return crf_nll(e, y, L, a, st, en, reduction="sum")

    got = torch.func.vmap(f, in_dims=(0, 0, 0, None))(em, tags, lengths, tr)
    want = torch.stack([f(em[i], tags[i], lengths[i], tr) for i in range(N)])
    torch.testing.assert_close(got, want)
    # per-sample gradients (the parameter gradient per vmapped sample)
    g = torch.func.vmap(torch.func.grad(f, argnums=(0, 3)), in_dims=(0, 0, 0, None))(em, tags, lengths, tr)
    for i in range(N):
        ge, gt = torch.func.grad(f, argnums=(0, 3))(em[i], tags[i], lengths[i], tr)
        torch.testing.assert_close(g[0][i], ge)
        torch.testing.assert_close(g[1][i], gt)
    # vmapped transitions: the loop rule
    trs = torch.randn(N, C, C, dtype=torch.float64)
    got = torch.func.vmap(f, in_dims=(0, 0, 0, 0))(em, tags, lengths, trs)
    torch.testing.assert_close(got, torch.stack([f(em[i], tags[i], lengths[i], trs[i]) for i in range(N)]))
    # decode / marginals
    dec = torch.func.vmap(lambda e, L: crf_decode(e, L, tr, st, en))(em, lengths)
    assert torch.equal(dec, torch.stack([crf_decode(em[i], lengths[i], tr, st, en) for i in range(N)]))
    mar = torch.func.vmap(lambda e, L: crf_marginals(e, L, tr, st, en))(em, lengths)
    torch.testing.assert_close(mar, torch.stack([crf_marginals(em[i], lengths[i], tr, st, en) for i in range(N)]))
