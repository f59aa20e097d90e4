"""Linear-chain CRF ops: fake (meta) kernels, autograd and vmap rules over ``torch.ops.fastmtl.crf_*``.

* ``crf_nll_fwd`` returns the per-sequence NLL plus what its backward needs (the log partition ``log_z`` and the
  forward log-scores ``alpha``, both non-differentiable). Its backward is ``crf_nll_bwd`` (exact forward-backward
  gradients of emissions, transitions, start and end, scaled per sequence by the incoming gradient), registered
  with :func:`fastmtl.ops._transforms.register_autograd` (plain autograd, ``torch.func``, ``torch.compile``).
* Double backward: ``crf_nll_bwd`` is differentiable too. When a gradient it returned is differentiated again
  (``create_graph=True``, ``jacrev(jacrev(...))``, gradient penalties), its backward computes the vector-Hessian
  product by recomputing the NLL with the pure-PyTorch reference (:mod:`fastmtl.reference.crf`) and
  differentiating it twice (``torch.autograd.grad`` without transforms, ``torch.func.vjp`` under them). First-order
  gradients always come from the kernels.
* Forward-mode AD raises a clear RuntimeError (see ``_transforms``).
* vmap: ``crf_nll_fwd``, ``crf_decode`` and ``crf_marginals`` fold the vmapped dimension into the batch (one call)
  when no parameter (transitions, start, end, masks) is vmapped, and loop otherwise; ``crf_nll_bwd`` loops (its
  parameter gradients are sums over each sample's batch). Legacy vmap (gradcheck's batched grad) loops.
* ``crf_decode`` and ``crf_marginals`` have no autograd (integer paths; marginals are for inference):
  :mod:`fastmtl.functional.crf` calls them on detached inputs.
"""
import torch

from .. import _torch_private as _priv
from . import _transforms as _tr
from . import _tree as pytree

__all__ = []

_fwd = torch.ops.fastmtl.crf_nll_fwd
_bwd = torch.ops.fastmtl.crf_nll_bwd
_decode = torch.ops.fastmtl.crf_decode
_marginals = torch.ops.fastmtl.crf_marginals


def compute_dtype(dtype):
    """The dtype of the CRF math: float64 for float64 inputs, float32 otherwise (bfloat16/float16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastmtl::crf_nll_fwd")
def _crf_nll_fwd_fake(emissions, tags, lengths, transitions, start, end, allowed, allowed_start, allowed_end):
    B, T, C = emissions.shape
    cdt = compute_dtype(emissions.dtype)
    return (emissions.new_empty((B,), dtype=cdt), emissions.new_empty((B,), dtype=cdt),
            emissions.new_empty((B, T, C), dtype=cdt))


@torch.library.register_fake("fastmtl::crf_nll_bwd")
def _crf_nll_bwd_fake(grad_nll, emissions, tags, lengths, transitions, start, end, allowed, allowed_start,
                      allowed_end, log_z, alpha):
    return (emissions.new_empty(emissions.shape), transitions.new_empty(transitions.shape),
            start.new_empty(start.shape), end.new_empty(end.shape))


@torch.library.register_fake("fastmtl::crf_decode")
def _crf_decode_fake(emissions, lengths, transitions, start, end, allowed, allowed_start, allowed_end):
    return emissions.new_empty(emissions.shape[:2], dtype=torch.long)


@torch.library.register_fake("fastmtl::crf_marginals")
def _crf_marginals_fake(emissions, lengths, transitions, start, end, allowed, allowed_start, allowed_end):
    return emissions.new_empty(emissions.shape, dtype=compute_dtype(emissions.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Autograd of crf_nll_fwd: the kernels' exact gradients.
# ---------------------------------------------------------------------------------------------------------------
_MASKS = ("allowed", "allowed_start", "allowed_end")


def _save_masks(ctx, masks, like):
    ctx.has_mask = [m is not None for m in masks]
    return [m if m is not None else like.new_empty((0,), dtype=torch.bool) for m in masks]


def _load_masks(ctx, saved):
    return [m if h else None for m, h in zip(saved, ctx.has_mask)]


def _fwd_setup_context(ctx, inputs, output):
    emissions, tags, lengths, transitions, start, end, allowed, allowed_start, allowed_end = inputs
    nll, log_z, alpha = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(log_z, alpha)
    masks = _save_masks(ctx, (allowed, allowed_start, allowed_end), tags)
    ctx.save_for_backward(emissions, tags, lengths, transitions, start, end, *masks, log_z, alpha)


def _fwd_backward(ctx, g_nll, g_log_z, g_alpha):
    if g_nll is None:
        return (None,) * 9
    emissions, tags, lengths, transitions, start, end, m0, m1, m2, log_z, alpha = ctx.saved_tensors
    allowed, allowed_start, allowed_end = _load_masks(ctx, (m0, m1, m2))
    ge, gt, gs, gn = _bwd(g_nll, emissions, tags, lengths, transitions, start, end, allowed, allowed_start,
                          allowed_end, log_z, alpha)
    return ge, None, None, gt, gs, gn, None, None, None


_tr.register_autograd("crf_nll_fwd", _fwd_backward, _fwd_setup_context,
                      lambda args: pytree.tree_structure((0, 0, 0)))


# ---------------------------------------------------------------------------------------------------------------
# Autograd of crf_nll_bwd (double backward): a differentiable recomputation with the pure-PyTorch reference.
# ---------------------------------------------------------------------------------------------------------------
def _bwd_setup_context(ctx, inputs, output):
    (grad_nll, emissions, tags, lengths, transitions, start, end, allowed, allowed_start, allowed_end, log_z,
     alpha) = inputs
    ctx.set_materialize_grads(False)
    masks = _save_masks(ctx, (allowed, allowed_start, allowed_end), tags)
    ctx.save_for_backward(grad_nll, emissions, tags, lengths, transitions, start, end, *masks)


def _first_order_reference(g, e, tr, st, en, tags, lengths, masks):
    """sum_b g_b nll_b (the reference, compute dtype); sequences with an infinite NLL get no gradient."""
    from ..reference.crf import crf_nll_reference

    cdt = compute_dtype(e.dtype)
    nll = crf_nll_reference(e.to(cdt), tags, lengths, tr.to(cdt), st.to(cdt), en.to(cdt), "none", *masks)
    geff = torch.where(torch.isfinite(nll), g.to(cdt), torch.zeros_like(nll))
    return nll, geff


def _hessian_vector_product(g, e, tr, st, en, tags, lengths, masks, v):
    """d <v, d(sum_b g_b nll_b)/d(e, tr, st, en)> / d(g, e, tr, st, en)."""
    prim_in = (g, e, tr, st, en)
    if not _priv.are_transforms_active():
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            prims = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in prim_in]
            nll, geff = _first_order_reference(*prims, tags, lengths, masks)
            first = torch.autograd.grad(nll, prims[1:], grad_outputs=geff, create_graph=True)
            dot = sum((f * x.to(f.dtype)).sum() for f, x in zip(first, v))
            second = torch.autograd.grad(dot, prims, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if s is None else s.to(p.dtype) for s, p in zip(second, prim_in)]

    def grads(g_, e_, tr_, st_, en_):
        def f(e2, tr2, st2, en2):
            return _first_order_reference(g_, e2, tr2, st2, en2, tags, lengths, masks)

        (nll, geff), vjp_fn = _vjp2(f, e_, tr_, st_, en_)
        return vjp_fn(geff)

    _, vjp2 = torch.func.vjp(grads, *prim_in)
    out = vjp2(tuple(x.to(p.dtype) for x, p in zip(v, prim_in[1:])))
    return [o.to(p.dtype) for o, p in zip(out, prim_in)]


def _vjp2(f, *args):
    # torch.func.vjp of the NLL only, with geff (which depends on g, not on the primals' gradient path) as aux
    def nll_only(*a):
        nll, geff = f(*a)
        return nll, geff

    nll, vjp_fn, geff = torch.func.vjp(nll_only, *args, has_aux=True)
    return (nll, geff), vjp_fn


def _bwd_backward(ctx, v_e, v_tr, v_st, v_en):
    if all(x is None for x in (v_e, v_tr, v_st, v_en)):
        return (None,) * 12
    g, e, tags, lengths, tr, st, en, m0, m1, m2 = ctx.saved_tensors
    masks = _load_masks(ctx, (m0, m1, m2))
    v = [x if x is not None else torch.zeros_like(p) for x, p in zip((v_e, v_tr, v_st, v_en), (e, tr, st, en))]
    d_g, d_e, d_tr, d_st, d_en = _hessian_vector_product(g, e, tr, st, en, tags, lengths, masks, v)
    return d_g, d_e, None, None, d_tr, d_st, d_en, None, None, None, None, None


_tr.register_autograd("crf_nll_bwd", _bwd_backward, _bwd_setup_context,
                      lambda args: pytree.tree_structure((0, 0, 0, 0)))


# ---------------------------------------------------------------------------------------------------------------
# vmap rules.
# ---------------------------------------------------------------------------------------------------------------
def _fold_batch(N, in_dims, args, n_batch_args):
    """Folds the vmapped dim of the first n_batch_args arguments (emissions, [tags,] lengths) into their batch."""
    out = []
    for i, (a, d) in enumerate(zip(args, in_dims)):
        out.append(_tr.fold(a, d, 0, N) if i < n_batch_args else a)
    return out


@torch.library.register_vmap("fastmtl::crf_nll_fwd")
def _crf_nll_fwd_vmap(info, in_dims, *args):
    N = info.batch_size
    if N == 0 or not _tr.all_none(in_dims[3:]):
        return _tr.loop(_fwd, N, in_dims, args)
    out = _fwd(*_fold_batch(N, in_dims, args, 3))
    return tuple(_tr.unfold(o, 0, N) for o in out), (1, 1, 1)


@torch.library.register_vmap("fastmtl::crf_nll_bwd")
def _crf_nll_bwd_vmap(info, in_dims, *args):
    return _tr.loop(_bwd, info.batch_size, in_dims, args)


def _infer_vmap(op):
    def rule(info, in_dims, *args):
        N = info.batch_size
        if N == 0 or not _tr.all_none(in_dims[2:]):
            return _tr.loop(op, N, in_dims, args)
        return _tr.unfold(op(*_fold_batch(N, in_dims, args, 2)), 0, N), 1
    return rule


torch.library.register_vmap("fastmtl::crf_decode", _infer_vmap(_decode))
torch.library.register_vmap("fastmtl::crf_marginals", _infer_vmap(_marginals))

for _name in ("crf_nll_fwd", "crf_nll_bwd", "crf_decode", "crf_marginals"):
    _tr.register_legacy_batched(_name)
