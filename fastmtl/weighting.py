r"""Task weighting strategies: how the per-task losses :math:`L_t` are combined into one training loss.

Every strategy exposes :meth:`TaskWeighting.weights` (the :math:`\lambda_t` passed to the heads, floats or 0-d
tensors that require grad), :meth:`TaskWeighting.regularizer` (added to the loss), and hooks the trainer calls:
:meth:`TaskWeighting.epoch_end` (DWA) and :meth:`TaskWeighting.after_backward` (GradNorm).

* ``static``      :math:`L = \sum_t w_t L_t` with fixed :math:`w_t` (default 1).
* ``uncertainty`` Kendall, Gal & Cipolla 2018 (classification form), learned :math:`s_t = \log\sigma_t^2`:
  :math:`L = \sum_t e^{-s_t} L_t + \tfrac12 s_t`.
* ``dwa``         Liu, Johns & Davison 2019, Dynamic Weight Average:
  :math:`\lambda_t(k) = K \exp(r_t(k-1)/T) / \sum_i \exp(r_i(k-1)/T)`, :math:`r_t(k-1) = \bar L_t(k-1)/\bar L_t(k-2)`
  with :math:`\bar L_t(k)` the mean training loss of task t in epoch k; :math:`\lambda_t = 1` in the first two epochs.
* ``gradnorm``    Chen et al. 2018: learned :math:`w_t`, :math:`G_t = \|\nabla_W w_t L_t\|_2 = w_t \|\nabla_W L_t\|_2` on
  the last shared layer's weights W, :math:`\bar G = \frac1K \sum_t G_t`, :math:`\tilde L_t = L_t / L_t(0)`,
  :math:`r_t = \tilde L_t / \frac1K\sum_i \tilde L_i`, and
  :math:`L_{grad} = \sum_t |G_t - \mathrm{sg}[\bar G\, r_t^{\alpha}]|`; :math:`w` follows :math:`\partial L_{grad}/\partial w`
  and is renormalised to :math:`\sum_t w_t = K` after each step.
* ``famo``        Liu et al. 2023 (:class:`FAMOWeighting`): task weights from the current losses and learned logits.

Gradient-based methods (:data:`GRADIENT_METHODS`, :class:`GradientMethod`): ``pcgrad``, ``cagrad``, ``mgda``,
``mgda_ub``, ``imtl``, ``aligned_mtl``, ``nash_mtl``. They read the K tasks' gradients of the shared parameters (of
the shared representation for ``mgda_ub``) as their K x K Gram matrix and return coefficients c: the shared
parameters' update is :math:`\sum_k c_k g_k`; every task head keeps its own task's gradient. The per-task
gradients come from :mod:`fastmtl.gradients` (:func:`fastmtl.gradients.gradient_method_step`).

A task absent from a batch takes no part in a gradient method's step: a task with no label in the batch (every
target ``ignore_index``, e.g. a batch of another dataset) is left out before its gradient is computed, and a task
whose gradient is exactly zero is left out of the solver (coefficient 0); the method combines the remaining tasks as
if they were all there is (its K is theirs). A batch without any such task makes no update. This matters for the
methods whose solution a zero gradient would otherwise decide: the min-norm point of MGDA / MGDA-UB is 0 when one
gradient is 0, IMTL-G and Aligned-MTL would divide by its norm, Nash-MTL's weight of a zero gradient is unbounded.
Non-finite coefficients (or a solver overflow) raise FloatingPointError, which the trainer turns into a stop
before anything is saved.
"""
import math

import torch

__all__ = ["TaskWeighting", "StaticWeighting", "UncertaintyWeighting", "DWAWeighting", "GradNormWeighting",
           "make_weighting", "dwa_weights", "gradnorm_loss", "uncertainty_loss", "STRATEGIES", "GRADIENT_METHODS",
           "GradientMethod", "PCGradWeighting", "CAGradWeighting", "MGDAWeighting", "MGDAUBWeighting",
           "IMTLGWeighting", "AlignedMTLWeighting", "NashMTLWeighting", "FAMOWeighting", "pcgrad_coefficients",
           "cagrad_coefficients", "min_norm_coefficients", "imtl_g_coefficients", "aligned_mtl_coefficients",
           "nash_mtl_coefficients"]

STRATEGIES = ("static", "uncertainty", "dwa", "gradnorm", "famo", "pcgrad", "cagrad", "mgda", "mgda_ub", "imtl",
              "aligned_mtl", "nash_mtl")


def uncertainty_loss(losses, log_vars):
    r""":math:`\sum_t e^{-s_t} L_t + \tfrac12 s_t` for tensors ``losses`` and ``log_vars`` (s) of equal shape."""
    return (torch.exp(-log_vars) * losses + 0.5 * log_vars).sum()


def dwa_weights(prev, prev2, temperature=2.0):
    r"""DWA weights from the mean task losses of the last two epochs (lists of K floats):
    :math:`K \operatorname{softmax}_t(r_t / T)` with :math:`r_t = prev_t / prev2_t`."""
    K = len(prev)
    r = [a / b if b > 0 and a == a else 1.0 for a, b in zip(prev, prev2)]  # nan (no batch): ratio 1
    e = [math.exp(x / temperature) for x in r]
    s = sum(e)
    return [K * x / s for x in e]


def gradnorm_loss(w, grad_norms, loss_ratios, alpha):
    r"""GradNorm's :math:`L_{grad} = \sum_t |w_t g_t - \mathrm{sg}[\bar G r_t^\alpha]|` where ``grad_norms`` are
    :math:`g_t = \|\nabla_W L_t\|`, ``loss_ratios`` :math:`\tilde L_t = L_t/L_t(0)`, :math:`\bar G = mean(w_t g_t)` and
    :math:`r_t = \tilde L_t / mean(\tilde L)`. ``w`` is a tensor (may require grad); others are tensors or lists."""
    g = torch.as_tensor(grad_norms, dtype=w.dtype, device=w.device)
    lr_ = torch.as_tensor(loss_ratios, dtype=w.dtype, device=w.device)
    G = w * g
    r = lr_ / lr_.mean()
    target = (G.mean() * r.pow(alpha)).detach()
    return (G - target).abs().sum()


class TaskWeighting(torch.nn.Module):
    """Base class: static weights. ``tasks`` is a list of task names, ``base`` their static weights."""

    name = "static"

    def __init__(self, tasks, base=None):
        super().__init__()
        self.tasks = list(tasks)
        self.base = {t: float((base or {}).get(t, 1.0)) for t in self.tasks}

    def weights(self):
        return dict(self.base)

    def regularizer(self, tasks=None):
        """A term added to the loss (None: none); ``tasks``: the tasks with labels in this batch (None: all)."""
        return None

    def epoch_end(self, mean_losses):
        """Called with ``{task: mean training loss of the epoch}`` (a task that had no batch in the epoch, which
        several datasets with a sampling strategy can give, is left out)."""

    def after_backward(self, losses, shared_params):
        """Called after the main backward with the per-task loss tensors (graph retained) and the shared weights."""

    def describe(self):
        return {t: float(v) for t, v in self.weights().items()}

    def extra_state(self):
        return {}

    def load_extra_state(self, d):
        pass


class StaticWeighting(TaskWeighting):
    name = "static"


class UncertaintyWeighting(TaskWeighting):
    r"""Kendall et al. 2018: :math:`\lambda_t = e^{-s_t}` and regulariser :math:`\tfrac12\sum_t s_t`, s learned."""

    name = "uncertainty"

    def __init__(self, tasks, base=None, init=0.0):
        super().__init__(tasks, base)
        self.log_vars = torch.nn.Parameter(torch.full((len(self.tasks),), float(init)))

    def weights(self):
        return {t: torch.exp(-self.log_vars[i]) * self.base[t] for i, t in enumerate(self.tasks)}

    def regularizer(self, tasks=None):
        # only the tasks of this batch: a task without labels here has no loss term, and its s must not drift
        if tasks is None:
            return 0.5 * self.log_vars.sum()
        tasks = set(tasks)
        idx = [i for i, t in enumerate(self.tasks) if t in tasks]
        return 0.5 * self.log_vars[idx].sum()

    def describe(self):
        return {t: float(torch.exp(-self.log_vars[i].detach())) for i, t in enumerate(self.tasks)}


class DWAWeighting(TaskWeighting):
    """Liu et al. 2019 (see the module docstring); ``temperature`` T (2 in the paper)."""

    name = "dwa"

    def __init__(self, tasks, base=None, temperature=2.0):
        super().__init__(tasks, base)
        self.temperature = temperature
        self.history = []
        self.current = {t: 1.0 for t in self.tasks}

    def weights(self):
        return {t: self.current[t] * self.base[t] for t in self.tasks}

    def epoch_end(self, mean_losses):
        # a task without a batch in this epoch keeps its weight (ratio 1)
        self.history.append([float(mean_losses[t]) if t in mean_losses else float("nan") for t in self.tasks])
        if len(self.history) >= 2:
            w = dwa_weights(self.history[-1], self.history[-2], self.temperature)
            self.current = dict(zip(self.tasks, w))

    def extra_state(self):
        return {"history": self.history, "current": self.current}

    def load_extra_state(self, d):
        self.history = d.get("history", [])
        self.current = d.get("current", self.current)


class GradNormWeighting(TaskWeighting):
    """Chen et al. 2018 (see the module docstring); ``alpha`` the restoring-force strength, ``lr`` for w."""

    name = "gradnorm"

    def __init__(self, tasks, base=None, alpha=1.5, lr=0.025):
        super().__init__(tasks, base)
        self.alpha = alpha
        self.w = torch.nn.Parameter(torch.ones(len(self.tasks)))
        self.opt = torch.optim.Adam([self.w], lr=lr)
        self.register_buffer("initial_losses", torch.zeros(len(self.tasks)))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def weights(self):
        return {t: float(self.w[i].detach()) * self.base[t] for i, t in enumerate(self.tasks)}

    def after_backward(self, losses, shared_params, all_reduce=None):
        shared_params = [p for p in shared_params if p.requires_grad]
        L = torch.stack([losses[t].detach().float() for t in self.tasks])
        if not bool(self.initialised):
            self.initial_losses.copy_(L.clamp_min(1e-12))
            self.initialised.fill_(True)
        norms = []
        for t in self.tasks:
            gs = torch.autograd.grad(losses[t], shared_params, retain_graph=True, allow_unused=True)
            sq = sum((g.float() ** 2).sum() for g in gs if g is not None)
            norms.append(torch.sqrt(torch.as_tensor(sq, dtype=torch.float32)))
        g = torch.stack(norms).to(self.w.device)
        ratios = L.to(self.w.device) / self.initial_losses
        self.opt.zero_grad()
        loss = gradnorm_loss(self.w, g, ratios, self.alpha)
        loss.backward()
        if all_reduce is not None:
            all_reduce(self.w.grad)
        self.opt.step()
        with torch.no_grad():
            self.w.clamp_(min=1e-4)
            self.w.mul_(len(self.tasks) / self.w.sum())
        return float(loss.detach())

    def extra_state(self):
        return {"opt": self.opt.state_dict()}

    def load_extra_state(self, d):
        if "opt" in d:
            self.opt.load_state_dict(d["opt"])


# ---------------------------------------------------------------------------------------------------------------
# Gradient-based methods: they combine the K tasks' gradients of the shared parameters (or of the shared
# representation) into one. Each is written on the K x K Gram matrix G_ij = <g_i, g_j> and returns coefficients c
# with the combined shared gradient d = sum_k c_k g_k (every method's result is such a combination), so the
# per-task gradients are never flattened or copied: fastmtl.gradients computes them, the trainer forms d.
# ---------------------------------------------------------------------------------------------------------------
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


GRADIENT_METHODS = ("pcgrad", "cagrad", "mgda", "mgda_ub", "imtl", "aligned_mtl", "nash_mtl")


class GradientMethod(TaskWeighting):
    r"""Base of the gradient-based methods. ``level``: ``"param"`` (the method reads the K gradients of the shared
    parameters) or ``"rep"`` (the K gradients of the shared representation, the encoder output; then the shared
    parameters get :math:`\sum_k c_k g_k` through one backward). :meth:`coefficients` maps the K x K Gram matrix of
    the present tasks to c. Task heads always get their own task's gradient (of :math:`w_k L_k`, w the static
    weights); only the shared parameters' gradient is manipulated."""

    level = "param"

    def __init__(self, tasks, base=None):
        super().__init__(tasks, base)
        self.last = {t: 1.0 for t in self.tasks}

    def coefficients(self, G, tasks):
        raise NotImplementedError

    def __call__(self, G, tasks):
        """Coefficients (float64, one per task of ``tasks``) from the Gram matrix ``G``; tasks with a zero gradient
        get 0 and are left out of :meth:`coefficients` (see the module docstring)."""
        tasks = list(tasks)
        G = torch.as_tensor(G, dtype=torch.float64).detach().cpu()  # K x K (the solvers run on the host anyway)
        if not bool(torch.isfinite(G).all()):
            raise FloatingPointError("fastmtl: %s: the tasks' gradients hold nan or inf values (Gram matrix %s)"
                                     % (self.name, G.tolist()))
        live = [i for i in range(len(tasks)) if float(G[i, i]) > 0.0]
        c = torch.zeros(len(tasks), dtype=torch.float64)
        if live:
            idx = torch.tensor(live)
            try:
                sub = self.coefficients(G.index_select(0, idx).index_select(1, idx), [tasks[i] for i in live])
            except (OverflowError, ZeroDivisionError, FloatingPointError) as e:
                raise FloatingPointError("fastmtl: %s: the solver failed on the Gram matrix %s (%s: %s)"
                                         % (self.name, G.tolist(), type(e).__name__, e)) from e
            c[idx] = torch.as_tensor(sub, dtype=torch.float64).reshape(-1)
        if not bool(torch.isfinite(c).all()):
            raise FloatingPointError("fastmtl: %s gave non-finite coefficients %s for the tasks %s (Gram matrix %s)"
                                     % (self.name, c.tolist(), tasks, G.tolist()))
        self.last.update({t: float(v) for t, v in zip(tasks, c)})
        return c

    def describe(self):
        return dict(self.last)


class PCGradWeighting(GradientMethod):
    """PCGrad (:func:`pcgrad_coefficients`) on the shared parameters; the task order of each projection is drawn
    from a generator seeded with ``seed`` (its state is in :meth:`extra_state`, so a resumed run draws on)."""

    name = "pcgrad"

    def __init__(self, tasks, base=None, seed=0):
        super().__init__(tasks, base)
        self.generator = torch.Generator().manual_seed(int(seed))

    def coefficients(self, G, tasks):
        K = len(tasks)
        orders = []
        for i in range(K):
            others = [j for j in range(K) if j != i]
            perm = torch.randperm(len(others), generator=self.generator).tolist() if others else []
            orders.append([others[p] for p in perm])
        return pcgrad_coefficients(G, orders)

    def extra_state(self):
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, d):
        if "generator" in d:
            self.generator.set_state(torch.as_tensor(d["generator"], dtype=torch.uint8).cpu())


class CAGradWeighting(GradientMethod):
    """CAGrad (:func:`cagrad_coefficients`) on the shared parameters; ``c`` the conflict-averse radius."""

    name = "cagrad"

    def __init__(self, tasks, base=None, c=0.4, rescale=1):
        super().__init__(tasks, base)
        self.c, self.rescale = float(c), int(rescale)

    def coefficients(self, G, tasks):
        return cagrad_coefficients(G, self.c, self.rescale)


class MGDAWeighting(GradientMethod):
    """MGDA (Sener & Koltun 2018): the min-norm combination (:func:`min_norm_coefficients`) of the gradients of
    the shared parameters."""

    name = "mgda"

    def coefficients(self, G, tasks):
        return min_norm_coefficients(G)


class MGDAUBWeighting(MGDAWeighting):
    """MGDA-UB (Sener & Koltun 2018): the min-norm weights of the gradients of the shared representation (the
    encoder output), then one backward of :math:`\\sum_k \\alpha_k w_k L_k` through the encoder."""

    name = "mgda_ub"
    level = "rep"


class IMTLGWeighting(GradientMethod):
    """IMTL-G (:func:`imtl_g_coefficients`) on the shared parameters."""

    name = "imtl"

    def coefficients(self, G, tasks):
        return imtl_g_coefficients(G)


class AlignedMTLWeighting(GradientMethod):
    """Aligned-MTL (:func:`aligned_mtl_coefficients`) on the shared parameters."""

    name = "aligned_mtl"

    def coefficients(self, G, tasks):
        return aligned_mtl_coefficients(G)


class NashMTLWeighting(GradientMethod):
    """Nash-MTL (:func:`nash_mtl_coefficients`) on the shared parameters; ``update_every``: solve every n-th step
    and reuse the weights in between (the authors' option; 1: every step)."""

    name = "nash_mtl"

    def __init__(self, tasks, base=None, update_every=1):
        super().__init__(tasks, base)
        self.update_every = max(1, int(update_every))
        self.calls = 0
        self.alpha = {}

    def coefficients(self, G, tasks):
        fresh = self.calls % self.update_every == 0 or any(t not in self.alpha for t in tasks)
        self.calls += 1
        if fresh:
            a = nash_mtl_coefficients(G)
            self.alpha.update({t: float(v) for t, v in zip(tasks, a)})
            return a
        return _out([self.alpha[t] for t in tasks])

    def extra_state(self):
        return {"calls": self.calls, "alpha": self.alpha}

    def load_extra_state(self, d):
        self.calls = int(d.get("calls", 0))
        self.alpha = {k: float(v) for k, v in (d.get("alpha") or {}).items()}


class FAMOWeighting(TaskWeighting):
    r"""FAMO (Liu et al. 2023), as the authors' code: task logits :math:`\xi` (zeros), :math:`z =
    \mathrm{softmax}(\xi)`; the model descends :math:`\sum_k \frac{z_k}{c} \log(L_k - L_k^* + \epsilon)` with
    :math:`c = \sum_k z_k/(L_k - L_k^* + \epsilon)` held constant, i.e. task weights :math:`\lambda_k =
    z_k / (c (L_k - L_k^* + \epsilon))` (:math:`L^* = 0`, :math:`\epsilon = 10^{-8}`); after the optimiser step the
    losses are measured again on the same batch and :math:`\xi` takes an Adam step (``lr``, weight decay
    ``gamma``) along :math:`\partial z/\partial\xi^T \delta`, :math:`\delta_k = \log(L_k^{before}) -
    \log(L_k^{after})`. No per-task gradients; the weights apply to the whole loss (heads included)."""

    name = "famo"

    def __init__(self, tasks, base=None, lr=0.025, gamma=0.01, eps=1e-8):
        super().__init__(tasks, base)
        # the logits: a buffer (saved with the model, moved by .to) stepped by their own Adam, not by the model's
        # optimiser and not by a DDP backward
        self.register_buffer("w", torch.zeros(len(self.tasks)))
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)
        self.eps = eps
        self.prev = None

    def task_weights(self, losses):
        """``{task: lambda_k}`` (floats) for ``losses`` ``{task: L_k}`` (the tasks present); remembers them for
        :meth:`update`."""
        names = [t for t in self.tasks if t in losses]
        idx = [self.tasks.index(t) for t in names]
        L = torch.stack([losses[t].detach().float().reshape(()) for t in names]).to(self.w.device)
        z = torch.softmax(self.w.detach(), -1)[idx]
        D = L + self.eps
        c = (z / D).sum()
        lam = z / (c * D)
        self.prev = (names, idx, L)
        return {t: float(v) * self.base[t] for t, v in zip(names, lam)}

    def update(self, losses):
        """The logits' step from the losses ``{task: L_k}`` measured after the model's step."""
        if self.prev is None:
            return
        names, idx, before = self.prev
        after = torch.stack([losses[t].detach().float().reshape(()) for t in names]).to(self.w.device)
        delta = torch.zeros(len(self.tasks), device=self.w.device)
        delta[idx] = (before + self.eps).log() - (after + self.eps).log()
        with torch.enable_grad():
            xi = self.w.detach().requires_grad_()
            d = torch.autograd.grad(torch.softmax(xi, -1), xi, grad_outputs=delta)[0]
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()
        self.prev = None

    def describe(self):
        return {t: float(v) for t, v in zip(self.tasks, torch.softmax(self.w.detach(), -1))}

    def extra_state(self):
        return {"opt": self.opt.state_dict()}

    def load_extra_state(self, d):
        if "opt" in d:
            self.opt.load_state_dict(d["opt"])


def make_weighting(strategy, tasks, base=None, **kwargs):
    """Builds the strategy named ``strategy`` (one of :data:`STRATEGIES`)."""
    classes = {"static": StaticWeighting, "uncertainty": UncertaintyWeighting, "dwa": DWAWeighting,
               "gradnorm": GradNormWeighting, "famo": FAMOWeighting, "pcgrad": PCGradWeighting,
               "cagrad": CAGradWeighting, "mgda": MGDAWeighting, "mgda_ub": MGDAUBWeighting, "imtl": IMTLGWeighting,
               "aligned_mtl": AlignedMTLWeighting, "nash_mtl": NashMTLWeighting}
    if strategy not in classes:
        raise ValueError("fastmtl: unknown weighting %r (expected one of %s)" % (strategy, ", ".join(STRATEGIES)))
    return classes[strategy](tasks, base, **kwargs)
