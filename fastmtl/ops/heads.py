"""Multi-task heads ops: fake (meta) kernels and autograd over ``torch.ops.fastmtl.multitask_loss`` / ``_predict``.

Autograd of ``multitask_loss`` (outputs ``total`` and the per-task ``losses``), registered with
:func:`fastmtl.ops._transforms.register_autograd` (plain autograd, ``torch.func`` and ``torch.compile``):

* The kernel forms d total / d (hidden, W_k, b_k) in the forward pass when ``compute_grad`` is set (the task
  weights lambda_k are already folded in), so the usual backward only multiplies those by ``grad_total``.
* d total / d lambda_k = grad_total * L_k (the per-task losses do not depend on lambda).
* The per-task ``losses`` are differentiable too (GradNorm-like weighting strategies need it). When ``losses``
  receives a gradient, the gradient with respect to (hidden, W, b) is
  ``sum_k (grad_total * lambda_k + grad_losses_k) * dL_k/d(.)``, which is exactly what the kernel computes with
  effective task weights ``lambda_eff = grad_total * lambda + grad_losses``; backward then re-runs the op with
  ``lambda_eff`` and ``compute_grad=True`` (exact, at the cost of one more forward of the heads). This happens
  only when ``losses`` is part of the differentiated graph (grads of unused outputs are not materialised). Under
  ``torch.compile`` the same holds inside the compiled region, but a ``losses`` tensor returned from the compiled
  function gets a tangent whether used or not: return ``losses.detach()`` for logging.
* The kernel's precomputed gradients are held from forward to backward (they replace the saved activations). On
  the first backward with ``grad_total == 1`` (``loss.backward()``) on the CPU they are handed over without a copy;
  a repeated backward (``retain_graph=True``) recomputes them.
* Double backward: the gradient outputs (grad_hidden, grad_weights, grad_biases) are differentiable too, so
  ``create_graph=True``, gradient penalties, ``jacrev(jacrev(...))`` etc. are exact. The usual backward stays as
  above; only when a gradient it returned is differentiated again does the backward receive cotangents for those
  outputs, and then it adds their vector-Hessian product, computed by recomputing the heads in differentiable
  pure-PyTorch ops (:func:`_reference_losses`, ``F.cross_entropy`` semantics) and differentiating twice with
  ``torch.func.vjp`` (itself differentiable, so any order works). ``class_weights`` and ``targets`` get no
  gradient. A bias list mixing tensors and None gets gradients for the biases it holds.
* Forward-mode AD (``torch.func.jvp``/``jacfwd``/``hessian``, ``torch.autograd.forward_ad``) is not supported:
  a clear RuntimeError (never a silently zero tangent); ``jacrev(jacrev(f))`` gives Hessians.
* vmap (``torch.library.register_vmap``): ``multitask_loss`` runs once per vmapped index (each loss is a mean over
  its own batch, so samples cannot share one call); ``multitask_predict`` folds the vmapped dimension into the
  batch (one call) when no weight or bias is vmapped, and loops otherwise. Legacy vmap (``gradcheck`` with
  ``check_batched_grad=True``) loops too.
"""
import torch
import torch.nn.functional as F

from .. import _torch_private as _priv
from ..reference.heads import pool_hidden_reference
from . import _transforms as _tr
from . import _tree as pytree

__all__ = []

_loss = torch.ops.fastmtl.multitask_loss
_predict = torch.ops.fastmtl.multitask_predict


@torch.library.register_fake("fastmtl::multitask_loss")
def _multitask_loss_fake(hidden, lengths, weights, biases, targets, class_weights, task_weights, levels, poolings,
                         ignore_indices, label_smoothings, compute_grad):
    K = len(weights)
    total = hidden.new_empty(())
    losses = hidden.new_empty((K,))
    if compute_grad:
        gh = hidden.new_empty(hidden.shape)
        gw = [w.new_empty(w.shape) for w in weights]
        gb = [b.new_empty(b.shape) if b is not None else hidden.new_empty((0,)) for b in biases]
    else:
        gh = hidden.new_empty((0,))
        gw = [hidden.new_empty((0,)) for _ in weights]
        gb = [hidden.new_empty((0,)) for _ in weights]
    return total, losses, gh, gw, gb


@torch.library.register_fake("fastmtl::multitask_predict")
def _multitask_predict_fake(hidden, lengths, weights, biases, levels, poolings):
    B, T = hidden.shape[0], hidden.shape[1]
    return [hidden.new_empty((B, T) if lv == 1 else (B,), dtype=torch.long) for lv in levels]


def _setup_context(ctx, inputs, output):
    (hidden, lengths, weights, biases, targets, class_weights, task_weights, levels, poolings, ignore_indices,
     label_smoothings, compute_grad) = inputs
    total, losses, gh, gw, gb = output
    ctx.set_materialize_grads(False)
    K = len(weights)
    ctx.K = K
    ctx.has_bias = [b is not None for b in biases]
    ctx.has_cw = [c is not None for c in class_weights]
    ctx.attrs = (list(levels), list(poolings), list(ignore_indices), list(label_smoothings))
    ctx.compute_grad = compute_grad
    ctx.consumed = False
    ctx.has_lengths = lengths is not None
    saved = [hidden, lengths if lengths is not None else hidden.new_empty((0,)), task_weights, losses, gh]
    saved += list(weights) + [b for b in biases if b is not None] + list(targets)
    saved += [c for c in class_weights if c is not None] + list(gw) + list(gb)
    ctx.save_for_backward(*saved)


def _is_one(g):
    # Only a cheap host check in eager mode on the CPU; compiled graphs and GPUs always scale.
    if torch.compiler.is_compiling() or g.device.type != "cpu" or g.numel() != 1:
        return False
    try:
        return float(g) == 1.0
    except Exception:  # traced (fake/functional) tensors have no value
        return False


def _backward(ctx, g_total, g_losses, g_gh, g_gw, g_gb):
    K = ctx.K
    saved = iter(ctx.saved_tensors)
    hidden, lengths, task_weights, losses, gh = (next(saved) for _ in range(5))
    weights = [next(saved) for _ in range(K)]
    biases = [next(saved) if hb else None for hb in ctx.has_bias]
    targets = [next(saved) for _ in range(K)]
    class_weights = [next(saved) if hc else None for hc in ctx.has_cw]
    gw = [next(saved) for _ in range(K)]
    gb = [next(saved) for _ in range(K)]

    grad_tw = None
    if g_total is not None:
        grad_tw = (g_total * losses).to(task_weights.dtype)

    grad_hidden = None
    grad_weights = [None] * K
    grad_biases = [None] * K
    if ctx.compute_grad and (g_total is not None or g_losses is not None):
        if g_losses is None and not ctx.consumed and _is_one(g_total):
            # loss.backward(): hand the precomputed gradients over as they are (no copy). They may be
            # accumulated into in place afterwards, so a second backward (retain_graph) recomputes instead.
            ctx.consumed = True
            grad_hidden = gh
            grad_weights = list(gw)
            grad_biases = [g if hb else None for g, hb in zip(gb, ctx.has_bias)]
        elif g_losses is None and not ctx.consumed:
            s = g_total.to(gh.dtype)
            grad_hidden = gh * s
            grad_weights = [g * s for g in gw]
            grad_biases = [g * s if hb else None for g, hb in zip(gb, ctx.has_bias)]
        else:
            if g_losses is None:
                g_losses = torch.zeros_like(losses)
            lam = task_weights.to(torch.float64)
            lam_eff = g_losses.to(torch.float64)
            if g_total is not None:
                lam_eff = lam_eff + g_total.to(torch.float64) * lam
            levels, poolings, ignore_indices, label_smoothings = ctx.attrs
            _, _, grad_hidden, grad_weights, grad_biases = _loss(
                hidden, lengths if ctx.has_lengths else None, weights, biases, targets, class_weights,
                lam_eff.to(task_weights.dtype), levels, poolings, ignore_indices, label_smoothings, True)
            grad_weights = list(grad_weights)
            grad_biases = [g if hb else None for g, hb in zip(grad_biases, ctx.has_bias)]
    g_gw = list(g_gw) if g_gw is not None else [None] * K
    g_gb = list(g_gb) if g_gb is not None else [None] * K
    if ctx.compute_grad and any(g is not None for g in [g_gh] + g_gw + g_gb):
        # A returned gradient is being differentiated (double backward): add its vector-Hessian product.
        levels, poolings, ignore_indices, label_smoothings = ctx.attrs
        v_h = g_gh if g_gh is not None else torch.zeros_like(hidden)
        v_w = [g if g is not None else torch.zeros_like(w) for g, w in zip(g_gw, weights)]
        v_b = [g if g is not None else torch.zeros_like(b) for g, b in zip(g_gb, biases) if b is not None]
        d_h, d_w, d_b, d_tw = _hessian_vector_product(
            hidden, lengths if ctx.has_lengths else None, weights, biases, targets, class_weights, task_weights,
            levels, poolings, ignore_indices, label_smoothings, v_h, v_w, v_b)
        add = lambda a, b: b if a is None else a + b  # noqa: E731
        grad_hidden = add(grad_hidden, d_h)
        grad_weights = [add(a, b) for a, b in zip(grad_weights, d_w)]
        it = iter(d_b)
        grad_biases = [add(a, next(it)) if hb else None for a, hb in zip(grad_biases, ctx.has_bias)]
        grad_tw = add(grad_tw, d_tw)
    return (grad_hidden, None, grad_weights, grad_biases, None, None, grad_tw, None, None, None, None, None)


_tr.register_autograd("multitask_loss", _backward, _setup_context,
                      lambda args: pytree.tree_structure((0, 0, 0, [0] * len(args[2]), [0] * len(args[2]))))


# ---------------------------------------------------------------------------------------------------------------
# Double backward: a differentiable pure-PyTorch recomputation of the heads (no host synchronisation, vmap-safe).
# ---------------------------------------------------------------------------------------------------------------
def _reference_losses(hidden, lengths, weights, biases, targets, class_weights, task_weights, levels, poolings,
                      ignore_indices, label_smoothings):
    """(total, losses): total = sum_k lambda_k L_k with F.cross_entropy semantics (a task with every item ignored:
    L_k = 0), in differentiable pure-PyTorch ops without data-dependent control flow."""
    B, T, _ = hidden.shape
    total = hidden.new_zeros(())
    losses = []
    for k in range(len(weights)):
        y = targets[k]
        ign = ignore_indices[k]
        if levels[k] == 0:
            pooled = pool_hidden_reference(hidden, lengths, poolings[k], max_ties="first")
            logits = F.linear(pooled, weights[k], biases[k])
        else:
            logits = F.linear(hidden, weights[k], biases[k]).reshape(B * T, -1)
            if lengths is not None:
                mask = torch.arange(T, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
                y = y.masked_fill(~mask, ign)
            y = y.reshape(B * T)
        cw = class_weights[k]
        cw = cw.to(logits.dtype) if cw is not None else None
        valid = y != ign
        s = F.cross_entropy(logits, y, weight=cw, ignore_index=ign, label_smoothing=label_smoothings[k],
                            reduction="sum")
        if cw is None:
            norm = valid.sum().to(logits.dtype)
        else:
            norm = (cw.gather(0, y.masked_fill(~valid, 0)) * valid.to(logits.dtype)).sum()
        loss = s / torch.where(norm > 0, norm, torch.ones_like(norm))
        losses.append(loss)
        total = total + task_weights[k].to(logits.dtype) * loss
    return total, torch.stack(losses)


def _hessian_vector_product(hidden, lengths, weights, biases, targets, class_weights, task_weights, levels,
                            poolings, ignore_indices, label_smoothings, v_h, v_w, v_b):
    """d <v, d total / d(hidden, W, b)> / d(hidden, W, b, task_weights): the vector-Hessian product of the heads
    (``v_b`` and the returned bias part hold the tasks with a bias only), computed in float32 (float64 for float64
    hidden)."""
    has_bias = [b is not None for b in biases]
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def total_fn(h, ws, bs, lam):
        it = iter(bs)
        full_b = [next(it).to(cdt) if hb else None for hb in has_bias]
        return _reference_losses(h.to(cdt), lengths, [w.to(cdt) for w in ws], full_b, targets, class_weights,
                                 lam, levels, poolings, ignore_indices, label_smoothings)[0]

    def grads(h, ws, bs, lam):
        tot, vjp_fn = torch.func.vjp(lambda h, ws, bs: total_fn(h, ws, bs, lam), h, ws, bs)
        return vjp_fn(torch.ones_like(tot))

    bs = [b for b in biases if b is not None]
    if not _priv.are_transforms_active():
        return _hessian_vector_product_autograd(total_fn, hidden, weights, bs, task_weights, v_h, v_w, v_b)
    _, vjp2 = torch.func.vjp(grads, hidden, list(weights), bs, task_weights)
    d_h, d_w, d_b, d_tw = vjp2((v_h, list(v_w), list(v_b)))
    return d_h, list(d_w), list(d_b), d_tw


def _hessian_vector_product_autograd(total_fn, hidden, weights, bs, task_weights, v_h, v_w, v_b):
    """The same product with torch.autograd.grad, where no torch.func transform is active (plain autograd, and
    torch.compile's AOT tracing of a double backward: on torch 2.8-2.10 that tracing fails inside torch for a
    torch.func.vjp nested in a backward). Tensors that do not require grad are differentiated through detached
    copies, the others through a view each; the result is differentiable when the backward runs with
    create_graph."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # one alias per position: a tensor passed twice (tied heads) gets one partial derivative per position, as
        # torch.func.vjp gives
        prims = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
                 for t in (hidden, *weights, *bs, task_weights)]
        h, ws, b_, lam = prims[0], prims[1:1 + len(weights)], prims[1 + len(weights):-1], prims[-1]
        tot = total_fn(h, ws, b_, lam)
        first = torch.autograd.grad(tot, prims[:-1], create_graph=True)
        dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(first, (v_h, *v_w, *v_b)))
        second = torch.autograd.grad(dot, prims, create_graph=create_graph, allow_unused=True)
    d = [torch.zeros_like(p) if g is None else g for g, p in zip(second, prims)]
    nw = len(weights)
    return d[0], d[1:1 + nw], d[1 + nw:-1], d[-1]


# ---------------------------------------------------------------------------------------------------------------
# vmap rules.
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_vmap("fastmtl::multitask_loss")
def _multitask_loss_vmap(info, in_dims, *args):
    # Each L_k is a mean over its own batch: one call per vmapped index.
    return _tr.loop(_loss, info.batch_size, in_dims, args)


@torch.library.register_vmap("fastmtl::multitask_predict")
def _multitask_predict_vmap(info, in_dims, hidden, lengths, weights, biases, levels, poolings):
    N = info.batch_size
    h_d, len_d, w_d, b_d = in_dims[:4]
    if N == 0 or not _tr.all_none(w_d) or not _tr.all_none(b_d):
        return _tr.loop(_predict, N, in_dims, (hidden, lengths, weights, biases, levels, poolings))
    # Rows are independent (lengths may be in any order): row b * N + j of one call is row b of sample j.
    if lengths is not None:
        lengths = lengths.repeat_interleave(N) if len_d is None else _tr.fold(lengths, len_d, 0, N)
    out = _predict(_tr.fold(hidden, h_d, 0, N), lengths, weights, biases, levels, poolings)
    return [_tr.unfold(o, 0, N) for o in out], [1] * len(out)


# Legacy vmap (gradcheck's check_batched_grad): one call per index.
_tr.register_legacy_batched("multitask_loss")
_tr.register_legacy_batched("multitask_predict")
