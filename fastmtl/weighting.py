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
"""
import math

import torch

__all__ = ["TaskWeighting", "StaticWeighting", "UncertaintyWeighting", "DWAWeighting", "GradNormWeighting",
           "make_weighting", "dwa_weights", "gradnorm_loss", "uncertainty_loss", "STRATEGIES"]

STRATEGIES = ("static", "uncertainty", "dwa", "gradnorm")


def uncertainty_loss(losses, log_vars):
    r""":math:`\sum_t e^{-s_t} L_t + \tfrac12 s_t` for tensors ``losses`` and ``log_vars`` (s) of equal shape."""
    return (torch.exp(-log_vars) * losses + 0.5 * log_vars).sum()


def dwa_weights(prev, prev2, temperature=2.0):
    r"""DWA weights from the mean task losses of the last two epochs (lists of K floats):
    :math:`K \operatorname{softmax}_t(r_t / T)` with :math:`r_t = prev_t / prev2_t`."""
    K = len(prev)
    r = [a / b if b > 0 else 1.0 for a, b in zip(prev, prev2)]
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

    def regularizer(self):
        return None

    def epoch_end(self, mean_losses):
        """Called with ``{task: mean training loss of the epoch}``."""

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

    def regularizer(self):
        return 0.5 * self.log_vars.sum()

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
        self.history.append([float(mean_losses[t]) for t in self.tasks])
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


def make_weighting(strategy, tasks, base=None, **kwargs):
    """Builds the strategy named ``strategy`` (one of :data:`STRATEGIES`)."""
    classes = {"static": StaticWeighting, "uncertainty": UncertaintyWeighting, "dwa": DWAWeighting,
               "gradnorm": GradNormWeighting}
    if strategy not in classes:
        raise ValueError("fastmtl: unknown weighting %r (expected one of %s)" % (strategy, ", ".join(STRATEGIES)))
    return classes[strategy](tasks, base, **kwargs)
