"""Transform support shared by the fastmtl ops: autograd registration that works under ``torch.func``, the helpers
of the vmap rules (``torch.library.register_vmap``) and the kernel for the legacy vmap of ``gradcheck``.

Autograd (:func:`register_autograd`): in torch 2.13 ``torch.library.register_autograd`` builds an old-style
``autograd.Function`` (no ``setup_context``), which ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, and
``vmap`` of those) reject. :func:`register_autograd` registers the same kind of Python ``Autograd`` kernel around a
new-style Function (``setup_context``, ``backward``) that takes the op's arguments flattened (a ``Tensor[]``
argument becomes one Function input per tensor). The kernel applies it the way a built-in op's autograd kernel
records: at the transform level whose tensors it sees, with the forward
redispatched below autograd and grad mode left on for the levels underneath. So one registration serves plain
autograd (also ``create_graph``), ``torch.func`` (nested too) and ``torch.compile``. Forward-mode AD raises a
clear RuntimeError: without a jvp rule the tangents would otherwise be dropped silently. The op's
``setup_context``/``backward`` see arguments, outputs and gradients in the schema's structure (lists as lists);
``backward`` returns one gradient per argument (a list, or None, for a list argument).

vmap:

A rule receives the arguments with the vmapped dimension unwrapped (``in_dims[i]`` is its position in argument
``i``, None when that argument is not vmapped; a list argument has a list of dims) and returns ``(outputs,
out_dims)``. :func:`loop` is the general rule (one op call per vmapped index, results stacked at dim 0);
:func:`fold` / :func:`unfold` merge the vmapped dimension into the op's own batch dimension for the rules that can
run as one call.
"""
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import _torch_private as _priv
from . import _tree as pytree


def all_none(dims) -> bool:
    """True when no (possibly nested) entry of ``dims`` is vmapped."""
    return all(d is None for d in pytree.tree_leaves(dims))


def sample_shape(t: Tensor, dim: Optional[int]):
    """The shape of one sample of ``t`` (its vmapped dim ``dim`` removed)."""
    return tuple(t.shape) if dim is None else tuple(t.shape[:dim]) + tuple(t.shape[dim + 1:])


def _take(arg: Any, dim: Any, n: int) -> Any:
    if isinstance(arg, (list, tuple)):
        dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(arg)
        return type(arg)(_take(a, d, n) for a, d in zip(arg, dims))
    if dim is None or not isinstance(arg, Tensor):
        return arg
    return arg.select(dim, n)


def loop(op: Callable, batch_size: int, in_dims: Sequence[Any], args: Sequence[Any]):
    """Runs ``op`` once per vmapped index and stacks every tensor output at dim 0 (out_dims all 0)."""
    if batch_size == 0:
        raise RuntimeError("fastmtl: vmap over a dimension of size 0 is not supported by the fastmtl ops")
    results = [op(*[_take(a, d, n) for a, d in zip(args, in_dims)]) for n in range(batch_size)]
    flats = [pytree.tree_flatten(r) for r in results]
    spec = flats[0][1]
    stacked = [torch.stack([f[0][i] for f in flats]) for i in range(len(flats[0][0]))]
    return pytree.tree_unflatten(stacked, spec), pytree.tree_unflatten([0] * len(stacked), spec)


def stack_at_0(t: Tensor, dim: Optional[int], n: int) -> Tensor:
    """``t`` with its vmapped dim moved to dim 0 (None: not vmapped, expanded to ``n`` copies)."""
    return t.unsqueeze(0).expand(n, *t.shape) if dim is None else t.movedim(dim, 0)


def fold(t: Tensor, dim: Optional[int], pos: int, n: int) -> Tensor:
    """Merges the vmapped dim of ``t`` (None: not vmapped, broadcast) into dimension ``pos`` of the per-sample
    layout, as index ``b * n + j`` (sample j of the vmapped dim, row b of the op's batch), contiguous."""
    if dim is None:
        t = t.unsqueeze(pos + 1)
        t = t.expand(*t.shape[:pos + 1], n, *t.shape[pos + 2:])
    else:
        t = t.movedim(dim, pos + 1)
    return t.reshape(*t.shape[:pos], -1, *t.shape[pos + 2:]).contiguous()


def unfold(t: Tensor, pos: int, n: int) -> Tensor:
    """Inverse of :func:`fold`: splits dimension ``pos`` (``b * n + j``) into (B, n); the vmapped dim is pos + 1."""
    return t.unflatten(pos, (-1, n))


# ---------------------------------------------------------------------------------------------------------------
# Legacy vmap (torch._vmap_internals, what torch.autograd.gradcheck(check_batched_grad=True) uses). Its generic
# for-loop fallback cannot handle ops that return a Tensor[]; this kernel for the legacy "Batched" dispatch key is
# the same loop for any return type. It peels the innermost legacy vmap level, calls the op once per index with that
# level's vmap mode left (so tensors batched at outer levels come back here, one level down), and re-adds the level.
# ---------------------------------------------------------------------------------------------------------------
_lv = _priv.legacy_vmap


def _is_legacy_batched(t: Any) -> bool:
    return isinstance(t, Tensor) and _lv.is_batched(t)


def legacy_batched_kernel(op: Callable) -> Callable:
    def kernel(*args):
        level = _lv.increment_nesting() - 1
        _lv.decrement_nesting()
        flat, spec = pytree.tree_flatten(list(args))
        # The batch size: a tensor batched at this level shows it; remove_batch_dim expands the others.
        probes = [_lv.remove_batch_dim(t, level, 1, 0).shape[0] for t in flat if _is_legacy_batched(t)]
        N = max(probes)
        unwrapped = [_lv.remove_batch_dim(t, level, N, 0) if _is_legacy_batched(t) else t for t in flat]
        batched = [_is_legacy_batched(t) for t in flat]
        results = []
        _lv.decrement_nesting()
        try:
            for n in range(N):
                a = [u[n] if b else u for u, b in zip(unwrapped, batched)]
                results.append(op(*pytree.tree_unflatten(a, spec)))
        finally:
            _lv.increment_nesting()
        flats = [pytree.tree_flatten(r) for r in results]
        out = [_lv.add_batch_dim(torch.stack([f[0][i] for f in flats]), 0, level)
               for i in range(len(flats[0][0]))]
        return pytree.tree_unflatten(out, flats[0][1])
    return kernel


_legacy_lib = None


def register_legacy_batched(opname: str) -> None:
    """Registers :func:`legacy_batched_kernel` for ``fastmtl::<opname>`` (default overload). The legacy vmap is a
    private, deprecated part of torch: where this torch lacks what the kernel needs, only gradcheck's batched-grad
    check loses its support (a warning), never ``import fastmtl``."""
    global _legacy_lib
    if not _lv.available:
        warnings.warn("fastmtl: this torch (%s) lacks the legacy vmap internals (%s); "
                      "gradcheck(check_batched_grad=True) over fastmtl ops is unsupported"
                      % (torch.__version__, "; ".join(_priv.missing())))
        return
    try:
        if _legacy_lib is None:
            _legacy_lib = torch.library.Library("fastmtl", "IMPL")
        op = getattr(torch.ops.fastmtl, opname).default
        _legacy_lib.impl(opname, legacy_batched_kernel(op), "Batched")
    except Exception as e:  # pragma: no cover - other torch versions
        warnings.warn("fastmtl: could not register the legacy batched kernel of %s (%s); "
                      "gradcheck(check_batched_grad=True) over it is unsupported" % (opname, e))



# ---------------------------------------------------------------------------------------------------------------
# Autograd that works with torch.func.
# ---------------------------------------------------------------------------------------------------------------
_autograd_lib = None


def any_requires_grad(args) -> bool:
    return any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(list(args)))


def _plain_apply(cls, *args):
    # ``cls`` is a single-level Function (see _priv.SingleLevelFunction): its apply records at the current level
    # and never re-enters torch.func's dispatcher (torch.autograd.Function.apply would, through the
    # custom_function_call higher-order op, which cannot be dispatched from inside an Autograd kernel).
    if not _priv.are_transforms_active():
        # as Function.apply does (torch's NOTE [functorch vjp and autograd interaction]): a vjp_fn called after
        # its torch.func.vjp has exited may hand us dead functorch wrappers
        return cls.apply(*_priv.unwrap_dead_wrappers(args))
    with _priv.enable_single_level_autograd_function():
        return cls.apply(*args)


def has_tangent(args) -> bool:
    """Whether a tensor in ``args`` carries a forward-mode tangent (forward AD, torch.func.jvp/jacfwd)."""
    if _priv.forward_ad_level() < 0:
        return False
    return any(isinstance(t, Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
               for t in pytree.tree_leaves(list(args)))


def register_autograd(opname: str, backward: Callable, setup_context: Callable, out_spec: Callable) -> None:
    """Makes ``fastmtl::<opname>`` differentiable (reverse mode). ``out_spec(args)`` gives the pytree spec of the
    op's outputs for these arguments (e.g. how many tensors a ``Tensor[]`` output holds). Forward-mode AD raises a
    clear error."""
    global _autograd_lib
    if _autograd_lib is None:
        _autograd_lib = torch.library.Library("fastmtl", "IMPL")
    op = getattr(torch.ops.fastmtl, opname).default

    class Function(_priv.SingleLevelFunction):
        @staticmethod
        def forward(in_spec, *flat):
            # Below this autograd level only, with grad modes back on: a transform level underneath (an outer
            # torch.func.grad/vjp/jvp) sees the op too, as it does for any built-in op's autograd kernel.
            with torch.enable_grad(), _priv.set_fwd_grad_enabled(True), _priv.AutoDispatchBelowAutograd():
                out = op(*pytree.tree_unflatten(list(flat), in_spec))
            return tuple(pytree.tree_leaves(out))

        @staticmethod
        def setup_context(ctx, inputs, output):
            in_spec, *flat = inputs
            args = pytree.tree_unflatten(list(flat), in_spec)
            ctx._fastmtl_specs = (in_spec, out_spec(args))
            setup_context(ctx, args, pytree.tree_unflatten(list(output), ctx._fastmtl_specs[1]))

        @staticmethod
        def backward(ctx, *grads):
            in_spec, o_spec = ctx._fastmtl_specs
            result = backward(ctx, *pytree.tree_unflatten(list(grads), o_spec))
            flat = []
            for child, g in zip(in_spec.children(), result):
                n = child.num_leaves
                if g is None:
                    flat += [None] * n
                elif isinstance(g, (list, tuple)):
                    if len(g) != n:
                        raise RuntimeError("fastmtl: internal error: %s backward returned %d gradients for a list "
                                           "argument of %d" % (opname, len(g), n))
                    flat += list(g)
                else:
                    flat.append(g)
            return (None, *flat)

        # compiled autograd asks every Function for it; torch.autograd.Function defines it, the single-level base not
        _compiled_autograd_key = staticmethod(_priv.compiled_autograd_key)

    Function.__name__ = Function.__qualname__ = "FastmtlBackward_" + opname

    def autograd_kernel(keyset, *args):
        if has_tangent(args):
            raise RuntimeError(
                "fastmtl: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not "
                "supported by fastmtl::%s; use reverse mode (torch.func.vjp, grad, jacrev; jacrev(jacrev(f)) for "
                "a Hessian)" % opname)
        if torch.is_grad_enabled() and any_requires_grad(args):
            flat, in_spec = pytree.tree_flatten(list(args))
            # The plain (C++) apply, also under torch.func: this kernel runs at the transform level whose tensors
            # it records on, like any op's autograd kernel (Function.apply would re-enter the torch.func machinery
            # through a higher-order op that cannot be dispatched from inside an Autograd kernel).
            out = _plain_apply(Function, in_spec, *flat)
            return pytree.tree_unflatten(list(out), out_spec(args))
        with _priv.AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _priv.after_autograd_keyset, *args)

    _autograd_lib.impl(opname, autograd_kernel, "Autograd", with_keyset=True)
