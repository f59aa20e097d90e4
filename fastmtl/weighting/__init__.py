r"""Task weighting methods: how the per-task losses :math:`L_t` (or the tasks' gradients) are combined into one
update. A package: :mod:`.registry` (every method declared once: name, class, level, options),
:mod:`.loss` (the loss-based methods and the base class), :mod:`.gradient` (the gradient-based methods) and
:mod:`.solvers` (their coefficient solvers).

Every method is a :class:`TaskWeighting`: :meth:`TaskWeighting.weights` (the :math:`\lambda_t` passed to the heads,
floats or 0-d tensors that require grad), :meth:`TaskWeighting.regularizer` (added to the loss), and the hooks the
trainer calls: :meth:`TaskWeighting.train_step` (one optimisation step on a batch: the only per-batch hook; the
default is the weighted loss's backward, GradNorm, FAMO and the gradient methods have their own),
:meth:`TaskWeighting.epoch_end` (DWA), :meth:`TaskWeighting.check_model` and ``every_task_every_step``.

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
from . import registry
from . import torchjd as _torchjd
from .gradient import (AlignedMTLWeighting, CAGradWeighting, GradientMethod, IMTLGWeighting, MGDAUBWeighting,
                       MGDAWeighting, NashMTLWeighting, PCGradWeighting)
from .loss import (DWAWeighting, FAMOWeighting, GradNormWeighting, StaticWeighting, TaskWeighting,
                   UncertaintyWeighting, dwa_weights, gradnorm_loss, uncertainty_loss)
from .registry import METHODS, Option, register
from .solvers import (aligned_mtl_coefficients, cagrad_coefficients, imtl_g_coefficients, min_norm_coefficients,
                      nash_mtl_coefficients, pcgrad_coefficients)

__all__ = ["TaskWeighting", "StaticWeighting", "UncertaintyWeighting", "DWAWeighting", "GradNormWeighting",
           "make_weighting", "dwa_weights", "gradnorm_loss", "uncertainty_loss", "STRATEGIES", "GRADIENT_METHODS",
           "GradientMethod", "PCGradWeighting", "CAGradWeighting", "MGDAWeighting", "MGDAUBWeighting",
           "IMTLGWeighting", "AlignedMTLWeighting", "NashMTLWeighting", "FAMOWeighting", "pcgrad_coefficients",
           "cagrad_coefficients", "min_norm_coefficients", "imtl_g_coefficients", "aligned_mtl_coefficients",
           "nash_mtl_coefficients", "register", "registry", "Option", "METHODS"]

# -- the methods ------------------------------------------------------------------------------------------------
register("static", StaticWeighting, "loss", "fixed weights (`--task-weights`, default 1 each)")
register("uncertainty", UncertaintyWeighting, "loss",
         "learned homoscedastic-uncertainty weights (Kendall, Gal & Cipolla 2018)")
register("dwa", DWAWeighting, "loss", "Dynamic Weight Average from the loss ratios of the last two epochs "
         "(Liu, Johns & Davison 2019)",
         [Option("temperature", "dwa_temperature", float, 2.0, "DWA temperature", low=0.0, low_ok=False)])
register("gradnorm", GradNormWeighting, "loss", "learned weights that balance the tasks' gradient norms on the last "
         "shared layer (Chen et al. 2018)",
         [Option("alpha", "gradnorm_alpha", float, 1.5, "GradNorm restoring-force strength", low=0.0)])
register("famo", FAMOWeighting, "loss", "Fast Adaptive Multitask Optimization: weights from the losses and learned "
         "logits (Liu et al. 2023)",
         [Option("lr", "famo_lr", float, 0.025, "FAMO: learning rate of the task logits", low=0.0, low_ok=False,
                 high=1e3),  # (the bound of --lr: far above any rate that trains)
          Option("gamma", "famo_gamma", float, 0.01, "FAMO: weight decay of the task logits", low=0.0)])
register("pcgrad", PCGradWeighting, "param", "projects away conflicting gradient components (Yu et al. 2020)",
         [Option("seed", run_key="seed", type=int)])
register("cagrad", CAGradWeighting, "param", "Conflict-Averse Gradient descent (Liu et al. 2021)",
         [Option("c", "cagrad_c", float, 0.4, "CAGrad conflict-averse radius c", low=0.0)])
register("mgda", MGDAWeighting, "param", "the min-norm combination of the gradients (Sener & Koltun 2018)")
register("mgda_ub", MGDAUBWeighting, "rep", "MGDA on the shared representation's gradients (Sener & Koltun 2018)")
register("imtl", IMTLGWeighting, "param", "IMTL-G: equal projections of the update on every gradient "
         "(Liu et al. 2021)")
register("aligned_mtl", AlignedMTLWeighting, "param", "Aligned-MTL: the gradients' condition number made 1 "
         "(Senushkin et al. 2023)")
register("nash_mtl", NashMTLWeighting, "param", "Nash bargaining over the gradients (Navon et al. 2022)",
         [Option("update_every", "nash_update_every", int, 1,
                 "Nash-MTL: solve for the task weights every N steps (reuse them in between)", low=1)])

# TorchJD's Gramian weightings, as torchjd:<name> (the optional extra fastmtl[torchjd]; imported when built)
for _name, _cls in _torchjd.method_classes().items():
    _options = [Option("alpha", "torchjd_fairgrad_alpha", float, 1.0, "torchjd:fairgrad: the alpha of alpha-fairness",
                       low=0.0, low_ok=False)] if _name == "torchjd:fairgrad" else []
    register(_name, _cls, "param", _torchjd.TORCHJD_METHODS[_name[len("torchjd:"):]][1], _options,
             extra="torchjd")
del _name, _cls, _options

STRATEGIES = tuple(METHODS)
# fastmtl's own gradient methods (the torchjd: ones are gradient methods too, from an optional extra)
GRADIENT_METHODS = tuple(n for n, m in METHODS.items() if m.level != "loss" and m.extra is None)


def make_weighting(strategy, tasks, base=None, **kwargs):
    """Builds the method named ``strategy`` (one of :data:`STRATEGIES`) for the task names ``tasks`` with static
    weights ``base``; ``kwargs``: its options (:func:`registry.method_kwargs` reads them from a configuration)."""
    return registry.method(strategy).cls(tasks, base, **kwargs)
