"""Every private torch API that fastmtl uses, in one place, keyed by torch version.

fastmtl uses public torch APIs everywhere else (``torch.library``, ``torch.autograd.Function``, ``torch.func``,
``torch.nn.utils.rnn``, ``torch.backends``); tests/test_torch_support.py fails when a private torch name
(``torch._C``, ``torch._functorch``, ``torch._VF``, ``torch.utils._pytree``, ...) appears in any other file.
(fastmtl.nn.LSTM, a torch.nn.RNNBase subclass, also reads RNNBase's own state, ``_flat_weights`` and
``_flat_weights_names``, as torch.nn.LSTM itself does; the drop-in tests check it on every release.)
What is here has no public equivalent on the supported releases (fastmtl._support: torch 2.8-2.15):

=====================================  ==========================================================================
``AutoDispatchBelowAutograd``,         the ops' Python autograd kernels (fastmtl/ops/_transforms.py) run the op
``after_autograd_keyset``              below autograd, as torch.library.register_autograd's generated kernel does;
                                       that public function builds an autograd.Function without ``setup_context``,
                                       which torch.func (grad, vjp, jacrev, vmap of those) refuses, so fastmtl
                                       registers its own kernel with the same private pieces
``SingleLevelFunction``,              applying that Function at the transform level whose tensors the kernel
``are_transforms_active``,             sees, as torch.func's own grad rule for autograd.Function does
``unwrap_dead_wrappers``,              (torch.autograd.Function.apply re-enters torch.func's dispatcher through
``enable_single_level_autograd_function``  the custom_function_call higher-order op, which cannot be dispatched
                                       from inside a kernel; from torch 2.15 that routing is in the C++ apply of
                                       every torch.autograd.Function subclass, so the Function derives from the
                                       single-level base class that torch.func's generated Functions use;
``compiled_autograd_key``              torch.autograd.Function's key, which compiled autograd asks of it)
``is_functorch_wrapped_tensor``        the LSTM backward's vmap rule folds samples into one call only for plain
                                       tensors
``forward_ad_level``,                  forward-mode AD: a clear error instead of a silently dropped tangent, and
``set_fwd_grad_enabled``               forward AD kept enabled for the levels below the op
``legacy_vmap``                        the legacy vmap of ``gradcheck(check_batched_grad=True)``: its for-loop
                                       fallback cannot run ops returning Tensor[] (optional: without it only
                                       that check loses support, with a warning)
``overload_method``                    TorchScript overloads of ``fastmtl.nn.LSTM.forward`` (Tensor and
                                       PackedSequence input), exactly as torch.nn.LSTM declares its own
``has_kernel``                         build truth: which backends have a kernel registered for an op
``qconfig_propagation_spec``           a warning when torch.ao.quantization is asked to quantize torch.nn.LSTM
                                       and skips a fastmtl.nn.LSTM (reads the propagating frame; best effort)
``mkldnn_linear``                      benchmarks only: oneDNN's linear as one of the GEMM baselines
``global_forward_hooks``               whether global module forward hooks are registered: the whole-model
                                       inference op (MultiTaskLSTM.scores) calls no module, so it stands aside
=====================================  ==========================================================================

Each entry names where it lives per torch release (``_API``: the newest entry whose first release is not newer
than the running torch wins), is resolved once at import, and is exercised by tests/test_torch_support.py, so a
torch where one moved or changed fails that test by name. A required entry that cannot be resolved makes
``import fastmtl`` fail with a message naming it; an optional one warns when first needed.
"""
import importlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from ._support import parse_version

TORCH = parse_version(torch.__version__)

# name -> (((first torch release, dotted path), ...) oldest first, required)
_API: Dict[str, Tuple[Tuple[Tuple[Tuple[int, int], str], ...], bool]] = {
    "AutoDispatchBelowAutograd": ((((2, 8), "torch._C._AutoDispatchBelowAutograd"),), True),
    "after_autograd_keyset": ((((2, 8), "torch._C._after_autograd_keyset"),), True),
    "SingleLevelFunction": ((((2, 8), "torch.autograd.function._SingleLevelFunction"),), True),
    "compiled_autograd_key": ((((2, 8), "torch.autograd.Function._compiled_autograd_key"),), True),
    "are_transforms_active": ((((2, 8), "torch._C._are_functorch_transforms_active"),), True),
    "is_functorch_wrapped_tensor": ((((2, 8), "torch._C._functorch.is_functorch_wrapped_tensor"),), True),
    "unwrap_dead_wrappers": ((((2, 8), "torch._functorch.utils.unwrap_dead_wrappers"),), True),
    "enable_single_level_autograd_function": (
        (((2, 8), "torch._functorch.utils.enable_single_level_autograd_function"),), True),
    "set_fwd_grad_enabled": ((((2, 8), "torch.autograd.forward_ad._set_fwd_grad_enabled"),), True),
    "_forward_ad_module": ((((2, 8), "torch.autograd.forward_ad"),), True),  # holds _current_level (a global)
    "overload_method": ((((2, 8), "torch._jit_internal._overload_method"),), True),
    "has_kernel": ((((2, 8), "torch._C._dispatch_has_kernel_for_dispatch_key"),), True),
    "is_legacy_batchedtensor": ((((2, 8), "torch._C._functorch.is_legacy_batchedtensor"),), False),
    "vmapmode_increment_nesting": ((((2, 8), "torch._C._vmapmode_increment_nesting"),), False),
    "vmapmode_decrement_nesting": ((((2, 8), "torch._C._vmapmode_decrement_nesting"),), False),
    "add_batch_dim": ((((2, 8), "torch._add_batch_dim"),), False),
    "remove_batch_dim": ((((2, 8), "torch._remove_batch_dim"),), False),
    "mkldnn_linear": ((((2, 8), "torch._C._nn.mkldnn_linear"),), False),
    "_nn_module_module": ((((2, 8), "torch.nn.modules.module"),), True),  # holds the global hook registries
}

# The frame of torch.ao.quantization that propagates a qconfig spec to the modules, and its local holding the spec.
_QCONFIG_PROPAGATION = {(2, 8): ("_propagate_qconfig_helper", "qconfig_dict")}
_QCONFIG_FRAME = _QCONFIG_PROPAGATION[max((v for v in _QCONFIG_PROPAGATION if v <= TORCH),
                                          default=min(_QCONFIG_PROPAGATION))]


def path_for(name: str, version: Tuple[int, int] = TORCH) -> str:
    """The dotted path of private API ``name`` on torch ``version``."""
    entries, _ = _API[name]
    chosen = entries[0][1]
    for first, path in entries:
        if first <= version:
            chosen = path
    return chosen


def _resolve(path: str) -> Any:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


_resolved: Dict[str, Any] = {}
_missing: Dict[str, str] = {}
for _name, (_entries, _required) in _API.items():
    _path = path_for(_name)
    try:
        _resolved[_name] = _resolve(_path)
    except (ImportError, AttributeError) as _e:
        _missing[_name] = "%s (%s: %s)" % (_path, type(_e).__name__, _e)
        if _required:
            raise ImportError(
                "fastmtl needs the private torch API %s, which torch %s does not have: this torch is not supported "
                "by this fastmtl (see fastmtl/_torch_private.py)" % (_missing[_name], torch.__version__)) from _e


def missing() -> List[str]:
    """The optional private APIs this torch lacks (each with its path and the error); [] on supported releases."""
    return sorted(_missing.values())


def get(name: str) -> Optional[Any]:
    """The resolved private API ``name``, or None for an optional one this torch lacks."""
    return _resolved.get(name)


# --------------------------------------------------------------------------------------------------- the API
AutoDispatchBelowAutograd = _resolved["AutoDispatchBelowAutograd"]
after_autograd_keyset = _resolved["after_autograd_keyset"]
SingleLevelFunction = _resolved["SingleLevelFunction"]
compiled_autograd_key = _resolved["compiled_autograd_key"]
are_transforms_active = _resolved["are_transforms_active"]
is_functorch_wrapped_tensor = _resolved["is_functorch_wrapped_tensor"]
unwrap_dead_wrappers = _resolved["unwrap_dead_wrappers"]
enable_single_level_autograd_function = _resolved["enable_single_level_autograd_function"]
set_fwd_grad_enabled = _resolved["set_fwd_grad_enabled"]
overload_method = _resolved["overload_method"]


def forward_ad_level() -> int:
    """The innermost active forward-AD level (-1: none). A module global that torch rebinds, so read at each call."""
    return getattr(_resolved["_forward_ad_module"], "_current_level")


def global_forward_hooks() -> bool:
    """Whether global module forward hooks or pre-hooks are registered (``register_module_forward_hook``,
    ``register_module_forward_pre_hook``; their registries are module globals with private names, read at each
    call). True where this torch keeps them elsewhere: a caller that would skip hooks then assumes there are some."""
    mod = _resolved["_nn_module_module"]
    hooks, pre = getattr(mod, "_global_forward_hooks", None), getattr(mod, "_global_forward_pre_hooks", None)
    if hooks is None or pre is None:
        return True
    return bool(hooks or pre)


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether op ``qualname`` (``"fastmtl::lstm_layer_forward"``) has a kernel for ``dispatch_key`` (``"CPU"``)."""
    return bool(_resolved["has_kernel"](qualname, dispatch_key))


class _LegacyVmap:
    """The legacy (torch._vmap_internals) batching API, or None where this torch lacks a piece of it."""

    def __init__(self):
        names = ("is_legacy_batchedtensor", "vmapmode_increment_nesting", "vmapmode_decrement_nesting",
                 "add_batch_dim", "remove_batch_dim")
        self.available = all(n in _resolved for n in names)
        if self.available:
            self.is_batched = _resolved["is_legacy_batchedtensor"]
            self.increment_nesting = _resolved["vmapmode_increment_nesting"]
            self.decrement_nesting = _resolved["vmapmode_decrement_nesting"]
            self.add_batch_dim = _resolved["add_batch_dim"]
            self.remove_batch_dim = _resolved["remove_batch_dim"]


legacy_vmap = _LegacyVmap()


def mkldnn_linear():
    """oneDNN's linear op (benchmarks' GEMM baselines), or None where this torch lacks it."""
    return _resolved.get("mkldnn_linear")


def qconfig_propagation_spec(frame) -> Optional[dict]:
    """The qconfig spec that torch.ao.quantization is propagating when ``frame`` (or one of its two callers) is its
    propagation helper, else None. Best effort: another torch layout gives None, never an error."""
    fn_name, local = _QCONFIG_FRAME
    try:
        for _ in range(3):  # the setter may be reached through nn.Module.__setattr__
            if frame is None:
                return None
            if frame.f_code.co_name == fn_name:
                spec = frame.f_locals.get(local)
                return spec if isinstance(spec, dict) else None
            frame = frame.f_back
        return None
    except Exception:  # pragma: no cover
        return None
