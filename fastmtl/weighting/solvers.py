r"""The solvers of the gradient-based methods: each maps the K x K Gram matrix of the tasks' gradients
(:math:`G_{ij} = \langle g_i, g_j \rangle`) to coefficients c, the shared gradient being :math:`\sum_k c_k g_k`
(every method's result is such a combination, so the per-task gradients are never flattened or copied:
:mod:`fastmtl.gradients` computes them, the trainer forms the combination). Float64, on the host."""
import math

import torch

__all__ = ["pcgrad_coefficients", "cagrad_coefficients", "min_norm_coefficients", "imtl_g_coefficients",
           "aligned_mtl_coefficients", "nash_mtl_coefficients"]


def _np(G):
    import numpy as np

    return np.asarray(G.detach().double().cpu() if isinstance(G, torch.Tensor) else G, dtype=np.float64)


def _out(c, like=None):
    return torch.as_tensor(c, dtype=torch.float64)


def pcgrad_coefficients(G, orders):
    r"""PCGrad (Yu et al. 2020, Algorithm 1): for each task i, :math:`g_i^{PC} = g_i`, and for every other task j in
    the order ``orders[i]`` (a permutation of the tasks other than i), if :math:`g_i^{PC} \cdot g_j < 0`,
    :math:`g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j`; the update is
    :math:`\sum_i g_i^{PC}`. Each :math:`g_i^{PC}` is tracked as coefficients over the original gradients, so
    only the Gram matrix ``G`` is needed. Returns c (K,)."""
    import numpy as np

    G = _np(G)
    K = G.shape[0]
    total = np.zeros(K)
    for i in range(K):
        a = np.zeros(K)
        a[i] = 1.0
        for j in orders[i]:
            if j == i:
                continue
            dot = a @ G[:, j]
            if dot < 0 and G[j, j] > 0:
                a[j] -= dot / G[j, j]
        total += a
    return _out(total)


def _project_simplex(v):
    import numpy as np

    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / ind > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _simplex_minimize(f, grad, K, iters=5000, tol=1e-12):
    """Accelerated projected gradient (FISTA with backtracking and restarts) for a convex f on the simplex."""
    import numpy as np

    x = np.full(K, 1.0 / K)
    y, t, L = x.copy(), 1.0, 1.0
    fx = f(x)
    for _ in range(iters):
        g = grad(y)
        fy = f(y)
        while True:
            xn = _project_simplex(y - g / L)
            d = xn - y
            if f(xn) <= fy + g @ d + 0.5 * L * (d @ d) + 1e-15 or L > 1e20:
                break
            L *= 2.0
        fn = f(xn)
        if fn > fx:  # restart the momentum
            y, t = x.copy(), 1.0
            continue
        tn = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = xn + ((t - 1.0) / tn) * (xn - x)
        step = np.abs(xn - x).max()
        x, fx, t = xn, fn, tn
        if step < tol:
            break
    return x


def min_norm_coefficients(G):
    r"""The min-norm point of the convex hull of the gradients (MGDA, Sener & Koltun 2018):
    :math:`\alpha = \arg\min_{\alpha \in \Delta} \alpha^T G \alpha`. K = 1, 2: closed form
    (:math:`\alpha_1 = \mathrm{clip}(\frac{(g_2 - g_1) \cdot g_2}{\|g_1 - g_2\|^2}, 0, 1)`); otherwise a primal
    active-set method (:func:`_active_set`, to the KKT conditions), falling back to the best KKT point over all
    supports (K <= 8) or accelerated projected gradient."""
    import itertools

    import numpy as np

    G = _np(G)
    K = G.shape[0]
    if K == 1:
        return _out([1.0])
    if K == 2:
        den = G[0, 0] + G[1, 1] - 2 * G[0, 1]
        a = 0.5 if den <= 0 else min(1.0, max(0.0, (G[1, 1] - G[0, 1]) / den))
        return _out([a, 1.0 - a])
    scale = max(np.abs(np.diag(G)).max(), 1e-300)
    Gs = G / scale
    w = _active_set(lambda x: (x @ Gs @ x, 2 * Gs @ x, 2 * Gs), K)
    if w is not None:
        return _out(w)
    if K <= 8:
        best, best_v = None, math.inf
        for r in range(1, K + 1):
            for S in itertools.combinations(range(K), r):
                S = list(S)
                A = np.zeros((r + 1, r + 1))
                A[:r, :r] = 2 * Gs[np.ix_(S, S)]
                A[:r, r] = 1.0
                A[r, :r] = 1.0
                rhs = np.zeros(r + 1)
                rhs[r] = 1.0
                sol = np.linalg.lstsq(A, rhs, rcond=None)[0]
                w = np.zeros(K)
                w[S] = sol[:r]
                if w.min() < -1e-12 or abs(w.sum() - 1.0) > 1e-9:
                    continue
                w = np.maximum(w, 0.0)
                w /= w.sum()
                g = 2 * Gs @ w
                if (g - g @ w).min() < -1e-9:  # a coordinate outside S would descend: not optimal
                    continue
                v = w @ Gs @ w
                if v < best_v - 1e-15:
                    best, best_v = w, v
        if best is not None:
            return _out(best)
    w = _simplex_minimize(lambda x: x @ Gs @ x, lambda x: 2 * Gs @ x, K)
    return _out(w)


def _cagrad_active_set(G, Gb, a, eps, iters=100):
    """min over the simplex of w.Gb + a sqrt(w'Gw + eps) (:func:`_active_set`)."""
    import numpy as np

    def fgh(w):
        Gw = G @ w
        s = math.sqrt(max(w @ Gw, 0.0) + eps)
        return w @ Gb + a * s, Gb + a * Gw / s, a * (G / s - np.outer(Gw, Gw) / s ** 3)

    return _active_set(fgh, G.shape[0], iters)


def _active_set(fgh, K, iters=100):
    """min over the simplex of a smooth convex f (``fgh(w)``: value, gradient, Hessian) by a primal active-set
    method: Newton's method for the
    smooth convex problem on the current face (support S, sum(w_S) = 1), a step towards that face's optimum
    stopped by the first coordinate reaching 0 (which then leaves S; by convexity f does not increase), and, at a
    feasible face optimum, the coordinate outside S whose partial derivative is lowest below the face's multiplier
    enters S; done when none is (the KKT conditions hold). Returns None if it does not finish."""
    import numpy as np

    def face_optimum(w, S):
        r = len(S)
        if r == 1:
            return w
        Z = np.zeros((K, r - 1))  # directions within the face: e_S[i] - e_S[-1]
        for i in range(r - 1):
            Z[S[i], i], Z[S[-1], i] = 1.0, -1.0
        f, g, H = fgh(w)
        for _ in range(60):
            gz = Z.T @ g
            if np.abs(gz).max() <= 1e-13 * (1.0 + np.abs(g).max()):
                break
            Hz = Z.T @ H @ Z
            step = np.linalg.solve(Hz + np.eye(r - 1) * (1e-12 * max(np.trace(Hz), 0.0) + 1e-300), gz)
            if not np.isfinite(step).all():
                break
            t = 1.0
            while True:
                wn = w - t * (Z @ step)
                fn, gn, Hn = fgh(wn)
                if fn <= f - 1e-4 * t * (gz @ step) or t < 1e-12:
                    break
                t *= 0.5
            if not fn < f:
                break
            w, f, g, H = wn, fn, gn, Hn
            if np.abs(w).max() > 1e6:  # unbounded along the face: the bound stops the step
                break
        return w

    w = np.full(K, 1.0 / K)
    S = list(range(K))
    for _ in range(iters):
        p = face_optimum(w.copy(), S)
        d = p - w
        alpha, block = 1.0, None
        for i in S:
            if d[i] < 0 and -w[i] / d[i] < alpha:
                alpha, block = -w[i] / d[i], i
        w = w + alpha * d
        if block is not None:
            w[block] = 0.0
            S.remove(block)
            w = np.maximum(w, 0.0)
            w /= w.sum()
            continue
        _, g, _ = fgh(w)
        mu = g[S].mean()
        out = [i for i in range(K) if i not in S]
        if not out:
            return w
        j = min(out, key=lambda i: g[i])
        if g[j] - mu >= -1e-10 * (1.0 + abs(mu)):
            return w
        S = sorted(S + [j])
    return None


def cagrad_coefficients(G, c=0.4, rescale=1):
    r"""CAGrad (Liu et al. 2021) as in the authors' code: :math:`g_0 = \frac1K\sum_i g_i`,
    :math:`w = \arg\min_{w \in \Delta} g_w^T g_0 + c\|g_0\| \sqrt{\|g_w\|^2 + 10^{-8}}`,
    :math:`d = g_0 + \frac{c\|g_0\|}{\|g_w\|} g_w`, divided by :math:`1 + c^2` (``rescale=1``), :math:`1 + c`
    (``rescale=2``) or not at all (``rescale=0``). The small convex problem is solved to its KKT conditions by a
    primal active-set method with Newton steps on each face (the authors use SciPy's SLSQP); accelerated projected
    gradient if that does not finish. Returns the coefficients of d over the g_i."""
    import numpy as np

    G = _np(G)
    K = G.shape[0]
    b = np.full(K, 1.0 / K)
    g0_norm = math.sqrt(max(b @ G @ b, 0.0))
    a = c * g0_norm + 1e-8
    scale = max(np.abs(np.diag(G)).max(), 1e-300)
    Gs, as_ = G / scale, a / math.sqrt(scale)
    Gb = Gs @ b
    f = lambda w: w @ Gb + as_ * math.sqrt(max(w @ Gs @ w, 0.0) + 1e-8 / scale)  # noqa: E731
    grad = lambda w: Gb + as_ * (Gs @ w) / math.sqrt(max(w @ Gs @ w, 0.0) + 1e-8 / scale)  # noqa: E731
    if K == 1:
        w = np.ones(1)
    else:
        w = _cagrad_active_set(Gs, Gb, as_, 1e-8 / scale)
        if w is None:
            w = _simplex_minimize(f, grad, K)
    gw_norm = math.sqrt(max(w @ G @ w, 0.0))
    coef = b + (a / (gw_norm + 1e-8)) * w
    if rescale == 1:
        coef = coef / (1 + c ** 2)
    elif rescale == 2:
        coef = coef / (1 + c)
    return _out(coef)


def imtl_g_coefficients(G):
    r"""IMTL-G (Liu et al. 2021): with :math:`u_i = g_i/\|g_i\|`, :math:`D = [g_1 - g_i]_{i \ge 2}`,
    :math:`U = [u_1 - u_i]_{i \ge 2}`: :math:`\alpha_{2:K} = g_1 U^T (D U^T)^{-1}`, :math:`\alpha_1 = 1 -
    \sum_{i \ge 2} \alpha_i`, so the combined gradient has equal projections on every :math:`u_i`. Written on the
    Gram matrix (:math:`g_a \cdot u_b = G_{ab}/\|g_b\|`)."""
    import numpy as np

    G = _np(G)
    K = G.shape[0]
    if K == 1:
        return _out([1.0])
    n = np.sqrt(np.maximum(np.diag(G), 1e-300))
    GU = G / n[None, :]  # (a, b) -> g_a . u_b
    idx = np.arange(1, K)
    # (D U^T)_{ij} = (g_1 - g_i).(u_1 - u_j), i, j >= 2
    DU = GU[0, 0] - GU[0][None, idx] - GU[idx, 0][:, None] + GU[np.ix_(idx, idx)]
    g1U = GU[0, 0] - GU[0, idx]
    alpha = g1U @ np.linalg.pinv(DU)
    return _out(np.concatenate([[1.0 - alpha.sum()], alpha]))


def aligned_mtl_coefficients(G, eps=None):
    r"""Aligned-MTL (Senushkin et al. 2023), as LibMTL: :math:`G = V \Lambda V^T` (the Gram matrix of the task
    gradients), the eigenpairs above :math:`\lambda_{max} K \epsilon` kept, :math:`B = \sqrt{\lambda_{min}}\,
    V \Lambda^{-1/2} V^T` and :math:`\alpha = B \mathbf 1`: the combined gradient :math:`\sum_i \alpha_i g_i` is
    the sum of the rows of the aligned (equal singular value) gradient matrix. ``eps``: machine epsilon of the
    gradients (default float32's)."""
    import numpy as np

    G = _np(G)
    K = G.shape[0]
    lam, V = np.linalg.eigh(G)
    eps = np.finfo(np.float32).eps if eps is None else eps
    tol = lam.max() * K * eps
    keep = lam > tol
    if not keep.any():
        return _out(np.zeros(K))
    order = np.argsort(-lam[keep])
    lam, V = lam[keep][order], V[:, keep][:, order]
    B = math.sqrt(lam[-1]) * (V / np.sqrt(lam)[None, :]) @ V.T
    return _out(B.sum(0))


def nash_mtl_coefficients(G, normalize=True, tol=1e-10, iters=100):
    r"""Nash-MTL (Navon et al. 2022): the Nash bargaining weights :math:`\alpha > 0` with
    :math:`G \alpha = 1/\alpha` (elementwise). They are the minimiser of the strictly convex
    :math:`\tfrac12 \alpha^T G \alpha - \sum_i \log \alpha_i`, found here by damped Newton steps to a residual
    below ``tol`` (the authors approximate the same point with a few concave-convex iterations of cvxpy and stop at
    a residual of 1e-3). As the authors' code, G is first divided by its Frobenius norm (``normalize``). A tiny
    ridge (1e-10 of the mean diagonal) keeps the problem bounded when gradients are linearly dependent."""
    import numpy as np

    G = _np(G)
    K = G.shape[0]
    if normalize:
        G = G / max(np.linalg.norm(G), 1e-300)
    G = G + np.eye(K) * 1e-10 * max(np.trace(G) / K, 1e-300)
    a = 1.0 / np.sqrt(np.maximum(np.diag(G), 1e-300))
    phi = lambda x: 0.5 * x @ G @ x - np.log(x).sum()  # noqa: E731
    for _ in range(iters):
        g = G @ a - 1.0 / a
        if np.abs(g * a).max() < tol:
            break
        H = G + np.diag(1.0 / (a * a))
        step = np.linalg.solve(H, g)
        s, f0 = 1.0, phi(a)
        while True:
            an = a - s * step
            if an.min() > 0 and phi(an) <= f0 - 1e-4 * s * (g @ step):
                break
            s *= 0.5
            if s < 1e-12:
                an = a
                break
        a = an
    return _out(a)
