"""Multi-task heads ops: fake (meta) kernels and autograd over ``torch.ops.fastmtl.multitask_loss`` / ``_predict``.

Autograd of ``multitask_loss`` (outputs ``total`` and the per-task ``losses``):

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
* The gradient outputs of the op are not differentiable (no double backward).
"""
import torch

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
    saved = list(ctx.saved_tensors)
    hidden, lengths, task_weights, losses, gh = saved[:5]
    pos = 5
    weights = saved[pos:pos + K]
    pos += K
    biases = []
    for hb in ctx.has_bias:
        biases.append(saved[pos] if hb else None)
        pos += int(hb)
    targets = saved[pos:pos + K]
    pos += K
    class_weights = []
    for hc in ctx.has_cw:
        class_weights.append(saved[pos] if hc else None)
        pos += int(hc)
    gw = saved[pos:pos + K]
    pos += K
    gb = saved[pos:pos + K]

    grad_tw = None
    if g_total is not None:
        grad_tw = (g_total * losses.detach()).to(task_weights.dtype)

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
            lam = task_weights.detach().to(torch.float64)
            lam_eff = g_losses.to(torch.float64)
            if g_total is not None:
                lam_eff = lam_eff + g_total.to(torch.float64) * lam
            levels, poolings, ignore_indices, label_smoothings = ctx.attrs
            _, _, grad_hidden, grad_weights, grad_biases = _loss(
                hidden, lengths if ctx.has_lengths else None, weights, biases, targets, class_weights,
                lam_eff.to(task_weights.dtype), levels, poolings, ignore_indices, label_smoothings, True)
            grad_weights = list(grad_weights)
            grad_biases = [g if hb else None for g, hb in zip(grad_biases, ctx.has_bias)]
    # torch.library flattens a list argument only when it holds tensors and no None: a list with a None is one
    # opaque argument and gets a single None gradient (the functional layer never passes a mixed bias list).
    grad_biases = grad_biases if all(ctx.has_bias) else None
    grad_cw = [None] * K if all(ctx.has_cw) else None
    return (grad_hidden, None, grad_weights, grad_biases, [None] * K, grad_cw, grad_tw, None, None, None, None,
            None)


torch.library.register_autograd("fastmtl::multitask_loss", _backward, setup_context=_setup_context)
