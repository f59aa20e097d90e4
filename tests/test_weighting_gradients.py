"""Gradient-based multi-task methods (fastmtl.weighting: pcgrad, cagrad, mgda, mgda_ub, imtl, aligned_mtl, nash_mtl)
and FAMO against straightforward reference implementations written from the papers' algorithms on explicit
gradient vectors (K autograd backward passes for the model-level checks), and on the papers' small worked cases."""
import math

import pytest
import torch

import fastmtl
from fastmtl import weighting as W
from fastmtl.gradients import gradient_method_step
from fastmtl.weighting import solvers

scipy_optimize = pytest.importorskip("scipy.optimize")


# ------------------------------------------------------------------------------------------------ references
def ref_pcgrad(g, orders):
    """Yu et al. 2020, Algorithm 1 on explicit vectors."""
    pc = g.clone()
    for i in range(g.shape[0]):
        for j in orders[i]:
            d = pc[i] @ g[j]
            if d < 0:
                pc[i] = pc[i] - d / (g[j] @ g[j]) * g[j]
    return pc.sum(0)


def ref_mgda(g):
    """min ||sum_i w_i g_i||^2 over the simplex with SciPy's SLSQP (tight tolerance); returns the min-norm d."""
    K = g.shape[0]
    G = (g @ g.t()).numpy()
    res = scipy_optimize.minimize(lambda w: w @ G @ w, [1.0 / K] * K, jac=lambda w: 2 * G @ w, method="SLSQP",
                                  bounds=[(0, 1)] * K, constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
                                  options={"ftol": 1e-15, "maxiter": 1000})
    return torch.as_tensor(res.x) @ g


def ref_cagrad(g, c=0.4, rescale=1):
    """The authors' cagrad() (Liu et al. 2021, official code) on explicit vectors."""
    K = g.shape[0]
    grads = g.t()  # (P, K) as in their code
    GG = grads.t().mm(grads)
    g0_norm = (GG.mean() + 1e-8).sqrt()
    x_start = [1.0 / K] * K
    A = GG.numpy()
    b = torch.full((K,), 1.0 / K).numpy()
    cc = (c * g0_norm + 1e-8).item()

    def objfn(x):
        return float(x @ A @ b + cc * math.sqrt(x @ A @ x + 1e-8))

    res = scipy_optimize.minimize(objfn, x_start, bounds=[(0, 1)] * K, method="SLSQP",
                                  constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                                  options={"ftol": 1e-14, "maxiter": 2000})
    ww = torch.as_tensor(res.x)
    gw = (grads * ww.view(1, -1)).sum(1)
    lmbda = cc / (gw.norm() + 1e-8)
    d = grads.mean(1) + lmbda * gw
    return d / (1 + c ** 2) if rescale == 1 else d / (1 + c) if rescale == 2 else d


def ref_imtl(g):
    """IMTL-G (Liu et al. 2021) as LibMTL writes it."""
    K = g.shape[0]
    u = g / g.norm(dim=1, keepdim=True)
    D = g[0:1].repeat(K - 1, 1) - g[1:]
    U = u[0:1].repeat(K - 1, 1) - u[1:]
    alpha = (g[0] @ U.t()) @ torch.inverse(D @ U.t())
    alpha = torch.cat([1 - alpha.sum().unsqueeze(0), alpha])
    return alpha @ g


def ref_aligned(g):
    """Aligned-MTL (Senushkin et al. 2023) as LibMTL writes it."""
    M = g @ g.t()
    lmbda, V = torch.linalg.eigh(M)
    tol = torch.max(lmbda) * max(M.shape[-2:]) * torch.finfo(torch.float32).eps
    rank = int((lmbda > tol).sum())
    order = torch.argsort(lmbda, descending=True)
    lmbda, V = lmbda[order][:rank], V[:, order][:, :rank]
    sigma = torch.diag(1 / lmbda.sqrt())
    B = lmbda[-1].sqrt() * ((V @ sigma) @ V.t())
    return B.sum(0) @ g


def ref_nash(g):
    """Nash-MTL (Navon et al. 2022): alpha > 0 with (GTG / ||GTG||_F) alpha = 1/alpha, by SciPy's root finder."""
    GTG = (g @ g.t()).numpy()
    GTG = GTG / (GTG ** 2).sum() ** 0.5
    K = g.shape[0]
    res = scipy_optimize.root(lambda a: GTG @ a - 1.0 / a, [1.0] * K, tol=1e-13)
    assert (res.x > 0).all() and abs(GTG @ res.x - 1.0 / res.x).max() < 1e-9
    return torch.as_tensor(res.x) @ g


def _orders(K, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(K):
        others = [j for j in range(K) if j != i]
        perm = torch.randperm(len(others), generator=gen).tolist()
        out.append([others[p] for p in perm])
    return out


def _problem(K, P, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(K, P, generator=gen, dtype=torch.float64)
    g = g * torch.rand(K, 1, generator=gen, dtype=torch.float64).add(0.2) * 3  # different norms
    if K >= 2:
        g[1] = -0.7 * g[0] + 0.5 * g[1]  # a strong conflict
    return g


def _combined(method, g, **kw):
    G = g @ g.t()
    return W.make_weighting(method, ["t%d" % i for i in range(g.shape[0])], **kw).coefficients(
        G, ["t%d" % i for i in range(g.shape[0])]) @ g


# ------------------------------------------------------------------------------------------------ worked cases
def test_pcgrad_two_gradient_projection():
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    g = torch.stack([g1, g2])
    c = W.pcgrad_coefficients(g @ g.t(), [[1], [0]])
    d = c @ g
    # g1' = g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5) (orthogonal to g2); g2' = g2 - (g2.g1)/|g1|^2 g1 = (0, 1)
    assert d.tolist() == pytest.approx([0.5, 1.5])
    # no conflict: the plain sum
    g = torch.tensor([[1.0, 0.2], [0.5, 1.0]], dtype=torch.float64)
    assert (W.pcgrad_coefficients(g @ g.t(), [[1], [0]]) @ g).tolist() == pytest.approx(g.sum(0).tolist())


def test_mgda_two_tasks_closed_form():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = torch.randn(2, 5, generator=gen, dtype=torch.float64)
        g1, g2 = g
        a = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
        a = min(1.0, max(0.0, a))
        c = W.min_norm_coefficients(g @ g.t())
        assert c.tolist() == pytest.approx([a, 1 - a], abs=1e-12)
    # the segment from (1, 0) to (2, 1): its nearest point to 0 is the end (1, 0)
    g = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    assert W.min_norm_coefficients(g @ g.t()).tolist() == [1.0, 0.0]
    assert W.min_norm_coefficients(torch.eye(3)).tolist() == pytest.approx([1 / 3] * 3)


def test_imtl_equal_projections_aligned_equal_norms_nash_orthogonal():
    g = _problem(4, 30, 1)
    d = W.imtl_g_coefficients(g @ g.t()) @ g
    proj = [float(d @ (gi / gi.norm())) for gi in g]
    assert proj == pytest.approx([proj[0]] * 4, rel=1e-9)
    # orthogonal gradients of norms n: Aligned-MTL rescales each to the smallest norm, Nash-MTL weighs 1/n
    n = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    g = torch.diag(n)
    assert (W.aligned_mtl_coefficients(g @ g.t())).tolist() == pytest.approx((1.0 / n).tolist())
    a = W.nash_mtl_coefficients(g @ g.t())
    assert (a * n).tolist() == pytest.approx([float(a[0] * n[0])] * 3, rel=1e-8)
    G = (g @ g.t()) / (g @ g.t()).norm()
    assert (G.double() @ a - 1 / a).abs().max() < 1e-8
    # CAGrad with c = 0 is the average gradient
    g = _problem(3, 10, 2)
    assert (W.cagrad_coefficients(g @ g.t(), c=0.0) @ g).tolist() == pytest.approx(g.mean(0).tolist(), abs=1e-7)


# ------------------------------------------------------------------------------------------------ random problems
@pytest.mark.parametrize("K", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_methods_match_references_on_random_problems(K, seed):
    g = _problem(K, 40, seed * 10 + K)
    scale = float(g.norm(dim=1).max())
    orders = _orders(K, seed)
    G = g @ g.t()
    torch.testing.assert_close(W.pcgrad_coefficients(G, orders) @ g, ref_pcgrad(g, orders), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(W.min_norm_coefficients(G) @ g, ref_mgda(g), rtol=0, atol=1e-6 * scale)
    for c in (0.2, 0.4, 0.8):
        torch.testing.assert_close(W.cagrad_coefficients(G, c) @ g, ref_cagrad(g, c), rtol=0, atol=2e-5 * scale)
    torch.testing.assert_close(W.imtl_g_coefficients(G) @ g, ref_imtl(g), rtol=1e-8, atol=1e-8 * scale)
    torch.testing.assert_close(W.aligned_mtl_coefficients(G) @ g, ref_aligned(g), rtol=1e-8, atol=1e-8 * scale)
    torch.testing.assert_close(W.nash_mtl_coefficients(G) @ g, ref_nash(g), rtol=1e-7, atol=1e-7 * scale)


def test_larger_K_and_the_fallback_solvers():
    g = _problem(10, 60, 3)
    G = g @ g.t()
    scale = float(g.norm(dim=1).max())
    ref = ref_mgda(g)
    torch.testing.assert_close(W.min_norm_coefficients(G) @ g, ref, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(W.cagrad_coefficients(G) @ g, ref_cagrad(g), rtol=0, atol=2e-5 * scale)
    Gn = G.numpy()
    x = solvers._simplex_minimize(lambda x: x @ Gn @ x, lambda x: 2 * Gn @ x, 10)  # accelerated projected gradient
    torch.testing.assert_close(torch.as_tensor(x) @ g, ref, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("method", W.GRADIENT_METHODS)
def test_one_task_gets_its_own_gradient(method):
    g = _problem(1, 7, 4)
    w = W.make_weighting(method, ["a", "b"])
    c = w.coefficients(g @ g.t(), ["a"])
    d = c @ g
    if method == "cagrad":
        assert d.tolist() == pytest.approx((g[0] / (1 + 0.4 ** 2) * (1 + 0.4)).tolist(), rel=1e-6)
    elif method == "nash_mtl":  # the scale of the normalised problem: alpha = 1
        assert c.tolist() == pytest.approx([1.0])
    else:
        assert d.tolist() == pytest.approx(g[0].tolist(), rel=1e-9)


def test_pcgrad_draws_are_seeded_and_resumable():
    g = _problem(4, 20, 5)
    G = g @ g.t()
    a = W.PCGradWeighting(list("abcd"), seed=3)
    b = W.PCGradWeighting(list("abcd"), seed=3)
    seq_a = [a.coefficients(G, list("abcd")) for _ in range(5)]
    assert all(torch.equal(x, b.coefficients(G, list("abcd"))) for x in seq_a)
    # the draws are the reference's: a generator seeded the same, one permutation per task
    torch.testing.assert_close(seq_a[0] @ g, ref_pcgrad(g, _orders(4, 3)))
    c = W.PCGradWeighting(list("abcd"), seed=3)
    for _ in range(2):
        c.coefficients(G, list("abcd"))
    state = c.extra_state()
    d = W.PCGradWeighting(list("abcd"), seed=99)
    d.load_extra_state(state)
    assert all(torch.equal(seq_a[i], d.coefficients(G, list("abcd"))) for i in (2, 3, 4))


def test_famo_matches_the_authors_update():
    torch.manual_seed(0)
    K = 3
    famo = W.FAMOWeighting(["a", "b", "c"], lr=0.05, gamma=0.01)
    # the authors' FAMO class, verbatim in substance
    w = torch.zeros(K, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05, weight_decay=0.01)
    for step in range(4):
        L = torch.rand(K) + 0.1
        Lv = L.clone().requires_grad_()
        z = torch.softmax(w, -1)
        D = Lv + 1e-8
        c = (z / D).sum().detach()
        loss = (D.log() * z / c).sum()
        (dL,) = torch.autograd.grad(loss, Lv)  # the task weights the authors' loss gives
        lam = famo.task_weights(dict(zip("abc", L)))
        assert [lam[t] for t in "abc"] == pytest.approx(dL.tolist(), rel=1e-6)
        after = L * (0.5 + torch.rand(K))
        delta = (L + 1e-8).log() - (after + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta.detach())[0]
        opt.zero_grad()
        w.grad = d
        opt.step()
        famo.update(dict(zip("abc", after)))
        torch.testing.assert_close(famo.w, w.detach())


# ------------------------------------------------------------------------------------------------ on a model
def _model_batch(seed=0):
    torch.manual_seed(seed)
    tasks = [fastmtl.nn.SequenceTask("intent", 5), fastmtl.nn.TokenTask("slots", 7), fastmtl.nn.TokenTask("pos", 4)]
    model = fastmtl.MultiTaskLSTM(30, 6, 5, tasks, num_layers=2, bidirectional=True, dropout=0.0).double()
    B, T = 6, 7
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    ids = torch.randint(1, 30, (B, T), generator=g)
    targets = {"intent": torch.randint(0, 5, (B,), generator=g), "slots": torch.randint(0, 7, (B, T), generator=g),
               "pos": torch.randint(0, 4, (B, T), generator=g)}
    return model, ids, lengths, targets


REFS = {"pcgrad": None, "cagrad": ref_cagrad, "mgda": ref_mgda, "imtl": ref_imtl, "aligned_mtl": ref_aligned,
        "nash_mtl": ref_nash}


@pytest.mark.parametrize("method", list(REFS) + ["mgda_ub"])
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_model_step_matches_reference_with_K_backward_passes(method, mode):
    model, ids, lengths, targets = _model_batch(seed=len(method))
    weights = {"intent": 1.0, "slots": 0.5, "pos": 2.0}
    names = list(weights)
    shared = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    heads = {n: [p for p in model.heads["top"][n].parameters()] for n in names}
    # reference: K autograd backward passes, the paper's algorithm on the flattened shared gradients
    out = model(ids, lengths, targets, weights)
    flat, head_ref = [], {}
    for n in names:
        gs = torch.autograd.grad(weights[n] * out.losses[n], shared + heads[n], retain_graph=True)
        flat.append(torch.cat([x.reshape(-1) for x in gs[:len(shared)]]))
        head_ref[n] = gs[len(shared):]
    g = torch.stack(flat)
    if method == "pcgrad":
        d = ref_pcgrad(g, _orders(3, 7))
        kw = {"seed": 7}
    elif method == "mgda_ub":
        hidden = model.encode(ids, lengths)["top"].detach()
        zs = []
        for n in names:
            h = hidden.detach().requires_grad_()
            o = model.heads["top"](h, lengths=lengths, targets={n: targets[n]}, weights={n: weights[n]})
            zs.append(torch.autograd.grad(o.loss, h)[0].detach().reshape(-1))
        z = torch.stack(zs)
        Z = z @ z.t()
        res = scipy_optimize.minimize(lambda w: w @ Z.numpy() @ w, [1 / 3] * 3, method="SLSQP", bounds=[(0, 1)] * 3,
                                      constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
                                      options={"ftol": 1e-15})
        d = torch.as_tensor(res.x) @ g
        kw = {}
    else:
        d = REFS[method](g)
        kw = {}
    model.zero_grad(set_to_none=True)
    m = W.make_weighting(method, names, weights, **kw)
    gradient_method_step(model, m, ids, lengths, targets, weights, mode=mode)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    tol = 1e-5 if method in ("mgda", "mgda_ub", "cagrad") else 1e-8
    torch.testing.assert_close(got, d, rtol=0, atol=tol * float(g.norm(dim=1).max()))
    for n in names:  # every head: its own task's gradient
        for p, r in zip(heads[n], head_ref[n]):
            torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)
    assert set(m.describe()) == set(names)
