r"""The loss-based weightings: the per-task losses :math:`L_t` are combined into one training loss with task weights
:math:`\lambda_t` that the method sets (``static``, ``uncertainty``, ``dwa``, ``gradnorm``, ``famo``), and the base
class :class:`TaskWeighting` of every method (see :mod:`fastmtl.weighting` for the hooks)."""
import math

import torch

__all__ = ["TaskWeighting", "StaticWeighting", "UncertaintyWeighting", "DWAWeighting", "GradNormWeighting",
           "FAMOWeighting", "uncertainty_loss", "dwa_weights", "gradnorm_loss"]


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

    # -- the trainer's hooks ------------------------------------------------------------------------------------
    # the method reads every task on every step (every head must be in every step's graph)
    every_task_every_step = False

    def check_model(self, model):
        """Called once with the model before training: a ``ValueError`` for a model the method cannot train."""

    def train_step(self, step):
        """One optimisation step, the one hook the trainer calls per batch. ``step`` is the trainer's
        :class:`fastmtl.training.trainer.StepContext` (the batch, the forward of the weighted loss, the optimiser
        step). The default: the loss weighted by :meth:`weights` plus :meth:`regularizer`, one backward, one step.
        Returns ``(model output, loss value)``."""
        out, loss = step.forward()
        step.zero_grad()
        loss.backward()
        step.finish()
        return out, float(loss.detach())

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

    every_task_every_step = True  # the norms of every task's gradient, every step

    def weights(self):
        return {t: float(self.w[i].detach()) * self.base[t] for i, t in enumerate(self.tasks)}

    def train_step(self, step):
        out, loss = step.forward()
        step.zero_grad()
        loss.backward(retain_graph=True)
        self.after_backward(out.losses, step.model.shared_parameters(), step.ddp_reduce)
        step.finish()
        return out, float(loss.detach())

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

    def train_step(self, step):
        # task weights from this batch's losses (DDP: the global batch's), applied to the whole loss; after the step
        # the losses of the same batch are measured again for the logits' update
        out, _ = step.forward()
        step.zero_grad()
        lam = self.task_weights(step.global_losses(out.losses))
        w = step.scale(lam) if step.scale is not None else lam  # lambda_k, the static weights included
        loss = sum(w[n] * out.losses[n] for n in w)
        loss.backward()
        step.finish()
        with torch.no_grad():
            again, _ = step.forward(wrapped=False)
        self.update(step.global_losses(again.losses))
        return out, float(loss.detach())

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
