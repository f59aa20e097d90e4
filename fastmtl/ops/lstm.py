"""LSTM ops: fake (meta) kernels, autograd and vmap rules over ``torch.ops.fastmtl.lstm_layer_forward/backward``.

The schema and tensor layouts are documented in ``csrc/fastmtl.cpp``.

* Autograd: ``lstm_layer_forward`` is differentiable with respect to ``input``, ``hx``, ``cx`` and every weight
  (:func:`fastmtl.ops._transforms.register_autograd`: plain autograd, ``torch.func`` and ``torch.compile``); its
  backward is one fused ``lstm_layer_backward`` call per layer.
* Double backward: ``lstm_layer_backward`` is differentiable too, so ``create_graph=True``, ``torch.func.grad``
  of a gradient, ``jacrev(jacrev(...))`` etc. work and are exact. The first backward always stays the fused kernel;
  only when its result is differentiated again does the backward of ``lstm_layer_backward`` recompute the layer
  with the pure-PyTorch reference (:func:`fastmtl.reference.lstm.lstm_reference`) and take the vector-Jacobian
  product of its vector-Jacobian product (``torch.func.vjp`` twice, itself differentiable: any order). The
  ``output`` and ``reserve`` arguments of ``lstm_layer_backward`` are treated as the functions of
  (input, hx, cx, weights) that the forward op made them: their whole influence is attributed to those inputs and
  they get no gradient of their own (calling the backward op directly with an unrelated ``reserve`` and
  differentiating it is not meaningful).
* vmap (``torch.library.register_vmap``): ``lstm_layer_forward`` folds the vmapped dimension into the batch
  (one call; row ``b * N + j`` is row b of sample j, so lengths stay non-increasing) when neither ``lengths`` nor
  any weight is vmapped, and runs once per vmapped index otherwise. ``lstm_layer_backward``: when only the
  incoming gradients are vmapped (vmap of a vjp: K cotangents against one saved forward) it is one
  ``lstm_layer_backward_multi`` call on the saved activations (the time loop on K*B rows, per-cotangent weight
  gradients); otherwise it folds the same way as the forward when neither ``lengths`` nor any weight is vmapped
  (float32/float64, plain tensors) and computes the per-sample weight gradients from the gate gradients
  (:func:`_backward_vmap_fold`); otherwise it loops. The reserve is the
  backend's own memory layout, so under vmap the forward returns a zero-memory placeholder for it and the vmapped
  backward recomputes the reserve it needs with one fused forward (fold) or one per sample (loop; a loop with an
  unvmapped reserve, i.e. only the incoming gradients vmapped, uses it as it is). So
  ``torch.func.vmap``, ``jacrev``, ``vmap(grad(...))`` (per-sample gradients), nested vmaps and
  ``gradcheck(check_batched_grad=True)`` (legacy vmap: one call per index) work.
* Forward-mode AD (``torch.func.jvp``/``jacfwd``/``hessian``, ``torch.autograd.forward_ad``) is not supported:
  a clear RuntimeError (never a silently zero tangent); ``jacrev(jacrev(f))`` gives Hessians.
* Both ops have fake kernels, so ``torch.compile(fullgraph=True)`` traces through them.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _torch_private as _priv
from . import _transforms as _tr
from . import _tree as pytree

__all__ = ["lstm_layer"]

_FWD = "fastmtl::lstm_layer_forward"
_BWD = "fastmtl::lstm_layer_backward"


@torch.library.register_fake(_FWD)
def _lstm_layer_forward_fake(input, lengths, hx, cx, weights, bidirectional, need_reserve):
    T, B, _ = input.shape
    D = 2 if bidirectional else 1
    H = hx.shape[-1]
    output = input.new_empty((T, B, D * H))
    hy = hx.new_empty((D, B, H))
    cy = cx.new_empty((D, B, H))
    reserve = input.new_empty((D, T, B, 5 * H)) if need_reserve else input.new_empty((0,))
    return output, hy, cy, reserve


@torch.library.register_fake(_BWD)
def _lstm_layer_backward_fake(grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights, bidirectional,
                              output, reserve):
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(cx),
            [torch.empty_like(w) for w in weights])


@torch.library.register_fake("fastmtl::lstm_layer_backward_multi")
def _lstm_layer_backward_multi_fake(grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights, bidirectional,
                                    output, reserve):
    K = grad_output.shape[0]
    return (input.new_empty((K, *input.shape)), hx.new_empty((K, *hx.shape)), cx.new_empty((K, *cx.shape)),
            [w.new_empty((K, *w.shape)) for w in weights])


def _setup_context(ctx, inputs, output):
    input, lengths, hx, cx, weights, bidirectional, need_reserve = inputs
    out, _, _, reserve = output
    ctx.bidirectional = bidirectional
    ctx.need_reserve = need_reserve
    ctx.num_weights = len(weights)
    ctx.save_for_backward(input, lengths, hx, cx, out, reserve, *weights)


def _backward(ctx, grad_output, grad_hy, grad_cy, grad_reserve):
    input, lengths, hx, cx, out, reserve, *weights = ctx.saved_tensors
    if not ctx.need_reserve:
        raise RuntimeError(
            "fastmtl: lstm_layer_forward ran with need_reserve=False, so it cannot be differentiated; "
            "call it with need_reserve=True when gradients are needed")
    if grad_output is None:
        grad_output = torch.zeros_like(out)
    if grad_hy is None:
        grad_hy = torch.zeros_like(hx)
    if grad_cy is None:
        grad_cy = torch.zeros_like(cx)
    gi, ghx, gcx, gw = torch.ops.fastmtl.lstm_layer_backward(
        grad_output.contiguous(), grad_hy.contiguous(), grad_cy.contiguous(), input, lengths, hx, cx, weights,
        ctx.bidirectional, out, reserve)
    return gi, None, ghx, gcx, list(gw), None, None


_tr.register_autograd("lstm_layer_forward", _backward, _setup_context,
                      lambda args: pytree.tree_structure((0, 0, 0, 0)))


# ---------------------------------------------------------------------------------------------------------------
# Double backward: lstm_layer_backward is differentiable through a pure-PyTorch recomputation.
# ---------------------------------------------------------------------------------------------------------------
def _reference_layer(input, lengths, hx, cx, weights, bidirectional):
    """The semantics of lstm_layer_forward (output, hy, cy) in differentiable pure-PyTorch ops."""
    from ..reference.lstm import lstm_reference
    out, (hy, cy) = lstm_reference(input, (hx, cx), list(weights), 1, bidirectional, False, lengths)
    return out, hy, cy


def _reference_layer_vjp(grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights, bidirectional):
    """(grad_input, grad_hx, grad_cx, grad_weights) of the reference layer: what lstm_layer_backward computes,
    as a differentiable function of the incoming gradients and of (input, hx, cx, weights)."""
    _, vjp_fn = torch.func.vjp(lambda x, h, c, ws: _reference_layer(x, lengths, h, c, ws, bidirectional),
                               input, hx, cx, list(weights))
    return vjp_fn((grad_output, grad_hy, grad_cy))


def _bwd_setup_context(ctx, inputs, output):
    grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights, bidirectional, out, reserve = inputs
    ctx.bidirectional = bidirectional
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_output, grad_hy, grad_cy, input, lengths, hx, cx, *weights)


def _double_vjp(go, ghy, gcy, x, lengths, hx, cx, ws, bi, g_gi, g_ghx, g_gcx, g_gw):
    """The vjp of lstm_layer_backward (one cotangent) through the reference: (d_go, d_ghy, d_gcy, d_x, d_hx, d_cx,
    d_ws)."""
    g_gw = list(g_gw) if g_gw is not None else [None] * len(ws)
    cot = (g_gi if g_gi is not None else torch.zeros_like(x),
           g_ghx if g_ghx is not None else torch.zeros_like(hx),
           g_gcx if g_gcx is not None else torch.zeros_like(cx),
           [g if g is not None else torch.zeros_like(w) for g, w in zip(g_gw, ws)])
    _, vjp2 = torch.func.vjp(
        lambda go_, gh_, gc_, x_, h_, c_, ws_: _reference_layer_vjp(go_, gh_, gc_, x_, lengths, h_, c_, ws_, bi),
        go, ghy, gcy, x, hx, cx, list(ws))
    return vjp2(cot)


def _bwd_backward(ctx, g_gi, g_ghx, g_gcx, g_gw):
    go, ghy, gcy, x, lengths, hx, cx, *ws = ctx.saved_tensors
    d_go, d_ghy, d_gcy, d_x, d_hx, d_cx, d_ws = _double_vjp(go, ghy, gcy, x, lengths, hx, cx, ws, ctx.bidirectional,
                                                            g_gi, g_ghx, g_gcx, g_gw)
    # output and reserve are functions of (input, hx, cx, weights): their influence is already in d_x ... d_ws.
    return d_go, d_ghy, d_gcy, d_x, None, d_hx, d_cx, list(d_ws), None, None, None


_tr.register_autograd("lstm_layer_backward", _bwd_backward, _bwd_setup_context,
                      lambda args: pytree.tree_structure((0, 0, 0, [0] * len(args[7]))))


def _bwd_multi_backward(ctx, g_gi, g_ghx, g_gcx, g_gw):
    # lstm_layer_backward_multi is K lstm_layer_backward calls: its vjp is theirs, summed over k for the shared
    # forward arguments (rarely needed: double backward through a vmapped vjp).
    go, ghy, gcy, x, lengths, hx, cx, *ws = ctx.saved_tensors
    at = lambda g, k: None if g is None else g[k]  # noqa: E731
    parts = [_double_vjp(go[k], ghy[k], gcy[k], x, lengths, hx, cx, ws, ctx.bidirectional, at(g_gi, k),
                         at(g_ghx, k), at(g_gcx, k), None if g_gw is None else [at(g, k) for g in g_gw])
             for k in range(go.shape[0])]
    if not parts:
        return (torch.zeros_like(go), torch.zeros_like(ghy), torch.zeros_like(gcy), None, None, None, None, None,
                None, None, None)
    stack = [torch.stack([p[i] for p in parts]) for i in range(3)]
    total = [sum(p[i] for p in parts) for i in range(3, 6)]
    d_ws = [sum(p[6][j] for p in parts) for j in range(len(ws))]
    return (*stack, total[0], None, total[1], total[2], d_ws, None, None, None)


_tr.register_autograd("lstm_layer_backward_multi", _bwd_multi_backward, _bwd_setup_context,
                      lambda args: pytree.tree_structure((0, 0, 0, [0] * len(args[7]))))


# ---------------------------------------------------------------------------------------------------------------
# vmap rules.
# ---------------------------------------------------------------------------------------------------------------
def _call_forward(input, lengths, hx, cx, weights, bidirectional, need_reserve):
    return torch.ops.fastmtl.lstm_layer_forward(input.contiguous(), lengths, hx.contiguous(), cx.contiguous(),
                                                [w.contiguous() for w in weights], bidirectional, need_reserve)


def _call_backward(go, ghy, gcy, input, lengths, hx, cx, weights, bidirectional, output, reserve, multi=False):
    op = torch.ops.fastmtl.lstm_layer_backward_multi if multi else torch.ops.fastmtl.lstm_layer_backward
    c = lambda t: t.contiguous()  # noqa: E731
    return op(c(go), c(ghy), c(gcy), c(input), lengths, c(hx), c(cx), [c(w) for w in weights], bidirectional,
              c(output), c(reserve))


def _call_backward_multi(*args):
    return _call_backward(*args, multi=True)


def _reserve_placeholder(N, T, B, H, D, like):
    # The reserve's memory layout is the backend's own (e.g. unit-major per step on the CPU), so a folded reserve
    # cannot be split into per-sample reserves. Under vmap the forward returns this zero-memory placeholder instead,
    # and the backward rule recomputes what it needs (see _backward_vmap).
    return like.new_zeros(()).expand(N, D, T, B, 5 * H)


@torch.library.register_vmap(_FWD)
def _forward_vmap(info, in_dims, input, lengths, hx, cx, weights, bidirectional, need_reserve):
    N = info.batch_size
    x_d, len_d, hx_d, cx_d, w_d = in_dims[:5]
    # The reserve returned under vmap is a placeholder (see _reserve_placeholder); the call below computes a real
    # one only for an autograd level below this vmap that records it (grad(vmap(...))).
    below = need_reserve and torch.is_grad_enabled() and _tr.any_requires_grad((input, hx, cx, weights))
    if len_d is not None or not _tr.all_none(w_d) or N == 0:
        (out, hy, cy, _), dims = _tr.loop(_call_forward, N, in_dims,
                                          (input, lengths, hx, cx, weights, bidirectional, below))
    else:
        # One call: row b * N + j of the folded batch is row b of sample j; repeat_interleave keeps the lengths
        # non-increasing.
        lens = None if lengths is None else lengths.repeat_interleave(N)
        out, hy, cy, _ = torch.ops.fastmtl.lstm_layer_forward(
            _tr.fold(input, x_d, 1, N), lens, _tr.fold(hx, hx_d, 1, N), _tr.fold(cx, cx_d, 1, N),
            [w.contiguous() for w in weights], bidirectional, below)
        out, hy, cy = _tr.unfold(out, 1, N), _tr.unfold(hy, 1, N), _tr.unfold(cy, 1, N)
        dims = (2, 2, 2, None)
    if need_reserve:
        T, B = _tr.sample_shape(input, x_d)[:2]
        H = _tr.sample_shape(hx, hx_d)[-1]
        reserve, res_d = _reserve_placeholder(N, T, B, H, 2 if bidirectional else 1, out), 0
    else:
        reserve, res_d = out.new_empty((0,)), None
    return (out, hy, cy, reserve), (dims[0], dims[1], dims[2], res_d)


def _backward_vmap_fold(N, in_dims, go, ghy, gcy, input, lengths, hx, cx, weights, bidirectional):
    """lstm_layer_backward for N samples sharing the weights and lengths, as one fused forward (recomputing the
    reserve of the folded batch) and one fused backward.

    The fused backward reads the gates from ``reserve`` and h from ``output``/``hx``; ``input`` and W_ih only enter
    grad_input = sum_d dG_d W_ih_d and dW_ih. Called with W_ih_d replaced by the selector [0 .. I .. 0] (4H, D*4H)
    and a zero input of width D*4H, its grad_input is the pre-activation gate gradients dG of both directions;
    from those come grad_input (one GEMM) and the weight gradients of each sample (batched GEMMs).
    """
    go_d, ghy_d, gcy_d, x_d, _, hx_d, cx_d = in_dims[:7]
    D = 2 if bidirectional else 1
    per = len(weights) // D
    bias = per == 4
    H = weights[1].shape[1]
    G = 4 * H
    weights = [w.contiguous() for w in weights]
    x = _tr.fold(input, x_d, 1, N)            # (T, BN, I)
    hxf = _tr.fold(hx, hx_d, 1, N)            # (D, BN, H)
    cxf = _tr.fold(cx, cx_d, 1, N)
    T, BN = x.shape[0], x.shape[1]
    B = BN // N
    lens = None if lengths is None else lengths.repeat_interleave(N)
    outf, _, _, reserve = torch.ops.fastmtl.lstm_layer_forward(x, lens, hxf, cxf, weights, bidirectional, True)
    eye = torch.eye(G, dtype=x.dtype, device=x.device)
    sel_w = []
    for d in range(D):
        w_ih = x.new_zeros((G, D * G))
        w_ih[:, d * G:(d + 1) * G] = eye
        sel_w += [w_ih] + weights[d * per + 1:(d + 1) * per]
    dG, ghx, gcx, _ = torch.ops.fastmtl.lstm_layer_backward(
        _tr.fold(go, go_d, 1, N), _tr.fold(ghy, ghy_d, 1, N), _tr.fold(gcy, gcy_d, 1, N),
        x.new_zeros((T, BN, D * G)), lens, hxf, cxf, sel_w, bidirectional, outf, reserve)
    dG = dG.view(T, B, N, D, G)  # zero at padded positions
    xs = x.view(T, B, N, -1)
    hs = outf.view(T, B, N, D, H)
    h0 = hxf.view(D, B, N, H)
    w_ih_all = torch.stack([weights[d * per] for d in range(D)])  # (D, 4H, I)
    grad_input = torch.einsum("tbndg,dgi->ntbi", dG, w_ih_all)
    grad_w = []
    for d in range(D):
        g = dG[:, :, :, d]  # (T, B, N, 4H)
        # h of the step before (forward: t - 1, hx at t = 0; reverse: t + 1, hx at each sequence's last token).
        if d == 0:
            hprev = torch.cat([h0[0].unsqueeze(0), hs[:-1, :, :, 0]], 0)
        else:
            nxt = torch.cat([hs[1:, :, :, 1], hs.new_zeros((1, B, N, H))], 0)
            lim = (torch.full((B,), T, dtype=torch.long) if lengths is None else lengths).to(x.device)
            has_next = (torch.arange(T, device=x.device)[:, None] + 1 < lim[None, :])[:, :, None, None]
            hprev = torch.where(has_next, nxt, h0[1].unsqueeze(0))
        grad_w.append(torch.einsum("tbng,tbni->ngi", g, xs))
        grad_w.append(torch.einsum("tbng,tbnh->ngh", g, hprev))
        if bias:
            db = g.sum((0, 1))
            grad_w += [db, db.clone()]
    return ((grad_input, _tr.unfold(ghx, 1, N), _tr.unfold(gcx, 1, N), grad_w),
            (0, 2, 2, [0] * len(grad_w)))


def _backward_one(go, ghy, gcy, input, lengths, hx, cx, weights, bidirectional, output, reserve, multi=False):
    """One sample of the looping rule (of lstm_layer_backward, or of the multi op); ``reserve`` None: recompute
    output and reserve with a fused forward."""
    if reserve is None:
        output, _, _, reserve = _call_forward(input, lengths, hx, cx, weights, bidirectional, True)
    return _call_backward(go, ghy, gcy, input, lengths, hx, cx, weights, bidirectional, output, reserve, multi)


@torch.library.register_vmap(_BWD)
def _backward_vmap(info, in_dims, grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights, bidirectional,
                   output, reserve):
    N = info.batch_size
    # A vmapped reserve is never read: its layout is the backend's own, and the vmapped forward returns a
    # placeholder (_reserve_placeholder). The fold recomputes the reserve of the folded batch in one fused forward;
    # the loop recomputes one per sample when any forward argument is vmapped, and otherwise (only the incoming
    # gradients vmapped) uses the unvmapped reserve, which came from an unvmapped forward, as it is.
    fwd_vmapped = not _tr.all_none([in_dims[i] for i in (3, 4, 5, 6, 7, 9, 10)])
    tensors = [grad_output, grad_hy, grad_cy, input, hx, cx, output, reserve, *weights]
    # The fold calls the backward op with selector weights and a zero input next to a reserve of the real ones: exact
    # for plain tensors, but neither differentiable for an autograd level below this vmap nor valid for an outer vmap
    # level (whose rule would recompute the reserve from those arguments). So it runs only on plain tensors that
    # nothing below needs a graph of; and for float32/float64 only (low precision keeps the kernel's accumulation of
    # the weight gradients).
    fold_ok = (N > 0 and in_dims[4] is None and _tr.all_none(in_dims[7])
               and input.dtype in (torch.float32, torch.float64)
               and not any(_priv.is_functorch_wrapped_tensor(t) for t in tensors)
               and not (torch.is_grad_enabled() and _tr.any_requires_grad(tensors)))
    if not fwd_vmapped and N > 0:
        # Only the incoming gradients are vmapped (vmap of a vjp: K cotangents against one saved forward): one
        # lstm_layer_backward_multi call on the saved activations, the cotangents stacked at dim 0 (differentiable
        # like lstm_layer_backward, for a level below that records it).
        stacked = [_tr.stack_at_0(g, d, N) for g, d in zip((grad_output, grad_hy, grad_cy), in_dims[:3])]
        res = _call_backward_multi(*stacked, input, lengths, hx, cx, weights, bidirectional, output, reserve)
        return res, (0, 0, 0, [0] * len(weights))
    if fold_ok:
        return _backward_vmap_fold(N, in_dims, grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights,
                                   bidirectional)
    if fwd_vmapped:
        output, reserve = None, None
        in_dims = in_dims[:9] + (None, None)
    return _tr.loop(_backward_one, N, in_dims, (grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights,
                                                bidirectional, output, reserve))


# Legacy vmap (gradcheck's check_batched_grad): one call per index.
_tr.register_legacy_batched("lstm_layer_forward")
_tr.register_legacy_batched("lstm_layer_backward")
_tr.register_legacy_batched("lstm_layer_backward_multi")


@torch.library.register_vmap("fastmtl::lstm_layer_backward_multi")
def _backward_multi_vmap(info, in_dims, grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights,
                         bidirectional, output, reserve):
    # As _backward_vmap's loop: a vmapped forward argument means the reserve is a placeholder (recompute it).
    args = (grad_output, grad_hy, grad_cy, input, lengths, hx, cx, weights, bidirectional, output, reserve)
    if not _tr.all_none([in_dims[i] for i in (3, 4, 5, 6, 7, 9, 10)]):
        args = args[:9] + (None, None)
        in_dims = in_dims[:9] + (None, None)
    return _tr.loop(lambda *a: _backward_one(*a, multi=True), info.batch_size, in_dims, args)


def lstm_layer(input: Tensor, lengths: Optional[Tensor], hx: Tensor, cx: Tensor, weights: Sequence[Tensor],
               bidirectional: bool, need_reserve: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer (both directions when ``bidirectional``) on time-major ``input`` (T, B, I).

    ``lengths`` (int64, CPU, non-increasing, in [1, T]) or None. Returns ``(output, hy, cy)``.
    ``need_reserve`` defaults to whether autograd will need the saved activations.
    """
    weights = list(weights)
    if need_reserve is None:
        need_reserve = torch.is_grad_enabled() and (
            input.requires_grad or hx.requires_grad or cx.requires_grad or any(w.requires_grad for w in weights))
    out, hy, cy, _ = torch.ops.fastmtl.lstm_layer_forward(input.contiguous(), lengths, hx.contiguous(),
                                                          cx.contiguous(), weights, bidirectional, need_reserve)
    return out, hy, cy
