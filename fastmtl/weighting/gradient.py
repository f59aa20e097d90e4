"""The gradient-based methods: they read the K tasks' gradients of the shared parameters (of the shared
representation for ``mgda_ub``) as their Gram matrix and combine them with coefficients from
:mod:`fastmtl.weighting.solvers`; every task head keeps its own task's gradient."""
import torch

from .loss import TaskWeighting
from .solvers import (_out, aligned_mtl_coefficients, cagrad_coefficients, imtl_g_coefficients,
                      min_norm_coefficients, nash_mtl_coefficients, pcgrad_coefficients)

__all__ = ["GradientMethod", "PCGradWeighting", "CAGradWeighting", "MGDAWeighting", "MGDAUBWeighting",
           "IMTLGWeighting", "AlignedMTLWeighting", "NashMTLWeighting"]


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

    def check_model(self, model):
        from ..gradients import shared_named_parameters

        shared_named_parameters(model)  # a clear error for a model without one shared encoder (sharing='soft')

    def train_step(self, step):
        # per-task gradients of the shared encoder (one forward; DDP: reduced before the method reads them, the
        # methods not being linear) and the combined gradient in .grad; the DDP wrapper, which would average one
        # already combined gradient, is bypassed
        from ..gradients import gradient_method_step
        from ..model import ModelOutput

        step.zero_grad()
        base = self.weights()
        w = step.scale(base) if step.scale is not None else base
        b = step.batch
        try:
            tg, _ = gradient_method_step(step.model, self, b.ids, b.lengths, b.targets,
                                         {n: v for n, v in w.items() if n in b.targets}, step.chars,
                                         step.task_backward, step.ddp_reduce, step.world)
        except FloatingPointError as e:
            raise step.stop(e) from e
        if tg is None:  # no task has a label in this batch: no update (and no optimiser step)
            return ModelOutput(torch.zeros(()), {}), 0.0
        total = sum(base[n] * tg.losses[n] for n in tg.tasks)
        step.finish()
        return ModelOutput(total, dict(tg.losses)), float(total)

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
