"""TorchJD's Gramian weightings as fastmtl gradient methods (``pip install "fastmtl[torchjd]"``: TorchJD 0.18 with
its quadprog projector).

TorchJD (https://github.com/TorchJD/torchjd) implements Jacobian-descent aggregators; those that read only the
Gramian of the tasks' Jacobian (``torchjd.aggregation.<X>Weighting``) map the K x K Gram matrix to K weights, which
is exactly what a fastmtl gradient method's solver does. ``--weighting torchjd:upgrad`` (and the other names of
:data:`TORCHJD_METHODS`) runs that weighting on the Gram matrix of fastmtl's per-task gradients of the shared
encoder (one forward, the fused multi-cotangent backward, :mod:`fastmtl.gradients`), with everything the trainer
does for its own methods (tasks without labels left out, DDP, non-finite checks, resume). The weights multiply the
task gradients as TorchJD's own aggregator does (``aggregation = weights @ J``); the heads keep their own task's
gradient.

TorchJD is imported when such a method is built, not before: the names are registered without it, and a run that
names one without TorchJD installed stops with the command that installs it.
"""
import torch

from .gradient import GradientMethod

__all__ = ["TorchJDWeighting", "TORCHJD_METHODS"]

# fastmtl name -> (TorchJD weighting class, summary). Stateless weightings only: a stateful one (GradVac keeps an
# EMA per task pair) would need its state saved for --resume and kept per task while the tasks present in a batch
# change (several datasets), which TorchJD's state, indexed by position, does not do.
TORCHJD_METHODS = {
    "upgrad": ("UPGradWeighting", "UPGrad: each gradient projected onto the dual cone of all (Quinton & Rey 2024)"),
    "dualproj": ("DualProjWeighting", "DualProj: the mean gradient projected onto the dual cone (Quinton & Rey "
                 "2024)"),
    "aligned_mtl": ("AlignedMTLWeighting", "TorchJD's Aligned-MTL (Senushkin et al. 2023)"),
    "imtl_g": ("IMTLGWeighting", "TorchJD's IMTL-G (Liu et al. 2021)"),
    "mgda": ("MGDAWeighting", "TorchJD's MGDA (Sener & Koltun 2018)"),
    "pcgrad": ("PCGradWeighting", "TorchJD's PCGrad (Yu et al. 2020)"),
    "pcd": ("PCDWeighting", "TorchJD's PCD"),
    "fairgrad": ("FairGradWeighting", "FairGrad, alpha-fair weights (Ban & Ji 2024)"),
}


def _import_torchjd(name):
    try:
        import torchjd.aggregation as aggregation
    except ImportError as e:
        raise ModuleNotFoundError("fastmtl: --weighting torchjd:%s needs TorchJD: pip install \"fastmtl[torchjd]\" "
                                  "(%s)" % (name, e)) from None
    return aggregation


class TorchJDWeighting(GradientMethod):
    """A TorchJD Gramian weighting (``torchjd_name``, a class of ``torchjd.aggregation``) as a fastmtl gradient
    method: :meth:`coefficients` is the weighting applied to the Gram matrix of the present tasks."""

    torchjd_name = None
    name = None

    def __init__(self, tasks, base=None, **options):
        super().__init__(tasks, base)
        aggregation = _import_torchjd(self.name[len("torchjd:"):])
        self.weighting = getattr(aggregation, self.torchjd_name)(**options)

    def coefficients(self, G, tasks):
        try:
            w = self.weighting(G.to(torch.float64))
        except ImportError as e:  # an optional solver of TorchJD (quadprog for UPGrad and DualProj)
            raise ModuleNotFoundError("fastmtl: --weighting %s: %s; pip install \"fastmtl[torchjd]\"" % (self.name, e)) \
                from None
        return w.detach().to(torch.float64).cpu()


def method_classes():
    """``{fastmtl name: TorchJDWeighting subclass}`` for :data:`TORCHJD_METHODS` (no TorchJD import)."""
    out = {}
    for short, (cls_name, _) in TORCHJD_METHODS.items():
        name = "torchjd:" + short
        out[name] = type("TorchJD" + cls_name, (TorchJDWeighting,), {"name": name, "torchjd_name": cls_name})
    return out
