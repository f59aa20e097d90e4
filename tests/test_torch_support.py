"""The torch support window: private torch APIs only in fastmtl/_torch_private.py (each checked here on the running
torch), the window declared once (fastmtl/_support.py) and stated truly by pyproject.toml, setup.py and the README,
the C++ standard read from torch's headers, and a clear refusal of a torch outside the window."""
import ast
import os
import re
import subprocess
import sys

import pytest
import torch

import fastmtl
from fastmtl import _support
from fastmtl import _torch_private as priv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIVATE_MODULE = os.path.join("fastmtl", "_torch_private.py")


def _load_setup():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastmtl_setup", os.path.join(ROOT, "setup.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


# ------------------------------------------------------------------------------------------- private names
def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _is_private(part):
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_torch_names(source, filename="<src>"):
    """(line, name) of every private torch name in ``source``: ``torch.<..._x...>`` attribute chains (also through an
    alias of torch or of a torch submodule), ``import torch._x`` / ``from torch._x import ...`` and
    ``from torch(.y) import _x``."""
    tree = ast.parse(source, filename)
    aliases = {"torch": "torch"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    if any(_is_private(p) for p in a.name.split(".")):
                        found.append((node.lineno, a.name))
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            if any(_is_private(p) for p in node.module.split(".")):
                found.append((node.lineno, node.module))
            for a in node.names:
                if _is_private(a.name):
                    found.append((node.lineno, node.module + "." + a.name))
                else:
                    aliases[a.asname or a.name] = node.module + "." + a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name is None:
                continue
            head, _, rest = name.partition(".")
            if head in aliases and rest and any(_is_private(p) for p in rest.split(".")):
                full = aliases[head] + "." + rest
                # report each chain once, at its shortest private prefix
                parts = full.split(".")
                cut = next(i for i, p in enumerate(parts) if i > 0 and _is_private(p))
                found.append((node.lineno, ".".join(parts[:cut + 1])))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _is_private(node.args[1].value):
            base = _dotted(node.args[0])
            if base and base.split(".")[0] in aliases:
                found.append((node.lineno, base + "." + node.args[1].value))
    return sorted(set(found))


def _python_files():
    for top in ("fastmtl", "tests", "benchmarks", "examples", "setup.py"):
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            yield top
            continue
        for dirpath, _, files in os.walk(path):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.relpath(os.path.join(dirpath, f), ROOT)


def test_the_private_name_scanner_finds_every_form():
    src = "\n".join([
        "import torch", "import torch._dynamo", "from torch import _VF", "from torch._functorch.utils import x",
        "from torch.utils import _pytree as p", "import torch.nn as nn", "from torch import autograd as ag",
        "torch._C._foo()", "nn._reduction", "ag.forward_ad._current_level", "getattr(torch._C, '_x')",
        "torch.nn.Module.__init__", "torch.__version__", "torch.ops.fastmtl.lstm_layer_forward",
    ])
    names = {n for _, n in private_torch_names(src)}
    assert names == {"torch._dynamo", "torch._VF", "torch._functorch.utils", "torch.utils._pytree", "torch._C",
                     "torch.nn._reduction", "torch.autograd.forward_ad._current_level", "torch._C._x"}, names


def test_no_private_torch_name_outside_the_one_module():
    offenders = []
    for rel in _python_files():
        if rel == PRIVATE_MODULE:
            continue
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            src = f.read()
        offenders += ["%s:%d %s" % (rel, line, name) for line, name in private_torch_names(src, rel)]
    assert not offenders, "private torch names outside %s:\n  %s" % (PRIVATE_MODULE, "\n  ".join(offenders))


# ------------------------------------------------------------------------------------------- each private API
def test_every_private_api_resolves_on_this_torch():
    # optional ones too: on a supported torch nothing may be missing (a warning would hide a lost capability)
    assert priv.missing() == []
    for name in priv._API:
        assert priv.get(name) is not None, name
        assert priv.path_for(name).startswith("torch."), name
    assert priv.legacy_vmap.available


def test_auto_dispatch_below_autograd_and_keyset():
    x = torch.randn(3, requires_grad=True)
    with priv.AutoDispatchBelowAutograd():
        y = x * 2
    assert y.grad_fn is None and not y.requires_grad
    assert (x * 2).grad_fn is not None
    # the keyset an Autograd kernel redispatches with, below autograd
    assert hasattr(priv.after_autograd_keyset, "has")


def test_transform_state_queries():
    assert priv.are_transforms_active() is False
    assert not priv.is_functorch_wrapped_tensor(torch.randn(2))
    seen = []

    def f(x):
        seen.append((priv.are_transforms_active(), priv.is_functorch_wrapped_tensor(x)))
        return x * 2

    torch.func.vmap(f)(torch.randn(3, 2))
    torch.func.grad(lambda x: f(x).sum())(torch.randn(2))
    assert seen == [(True, True), (True, True)]
    t = torch.randn(2)
    out = priv.unwrap_dead_wrappers((t, 1))
    assert out[0] is t and out[1] == 1
    with priv.enable_single_level_autograd_function():
        pass


def test_forward_ad_level_and_switch():
    assert priv.forward_ad_level() == -1
    with torch.autograd.forward_ad.dual_level():
        assert priv.forward_ad_level() >= 0
        with priv.set_fwd_grad_enabled(False):
            x = torch.autograd.forward_ad.make_dual(torch.randn(2), torch.randn(2))
            assert torch.autograd.forward_ad.unpack_dual(x * 2).tangent is None
    assert priv.forward_ad_level() == -1


def test_has_kernel():
    assert priv.has_kernel("fastmtl::lstm_layer_forward", "CPU")
    assert priv.has_kernel("fastmtl::lstm_layer_forward", "Meta") in (True, False)
    assert not priv.has_kernel("fastmtl::lstm_layer_forward", "XLA")


def test_legacy_vmap_round_trip():
    lv = priv.legacy_vmap
    x = torch.randn(4, 3)
    level = lv.increment_nesting()
    try:
        b = lv.add_batch_dim(x, 0, level)
        assert lv.is_batched(b) and not lv.is_batched(x)
        assert tuple(b.shape) == (3,)
        back = lv.remove_batch_dim(b * 2, level, 4, 0)
    finally:
        lv.decrement_nesting()
    torch.testing.assert_close(back, x * 2)


def test_gradcheck_batched_grad_through_the_ops():
    # what the legacy vmap kernels are for: gradcheck(check_batched_grad=True) over the LSTM and the heads
    lstm = fastmtl.nn.LSTM(3, 2, bidirectional=True).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2])
    assert torch.autograd.gradcheck(lambda x: lstm(x, lengths=lengths)[0], (x,), check_batched_grad=True)
    heads = fastmtl.nn.MultiTaskHeads(4, [fastmtl.nn.TokenTask("t", 3), fastmtl.nn.SequenceTask("s", 2)]).double()
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    targets = {"t": torch.randint(0, 3, (2, 3)), "s": torch.randint(0, 2, (2,))}
    assert torch.autograd.gradcheck(lambda h: heads(h, targets=targets).loss, (h,), check_batched_grad=True)


def test_overload_method_scripts_both_forwards():
    from torch.nn.utils.rnn import pack_padded_sequence

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = fastmtl.nn.LSTM(3, 2)

        def forward(self, x: torch.Tensor, packed: torch.nn.utils.rnn.PackedSequence):
            return self.lstm(x)[0], self.lstm(packed)[0].data

    m = M()
    s = torch.jit.script(m)
    x = torch.randn(5, 2, 3)
    p = pack_padded_sequence(x, torch.tensor([5, 3]))
    for a, b in zip(s(x, p), m(x, p)):
        torch.testing.assert_close(a, b)


def test_qconfig_propagation_frame_is_found():
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    model = torch.nn.Sequential(fastmtl.nn.LSTM(3, 2))
    with pytest.warns(UserWarning, match="matches exact types"):
        quantize_dynamic(model, {torch.nn.LSTM: default_dynamic_qconfig})


def test_mkldnn_linear_when_available():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    a, b = torch.randn(5, 4), torch.randn(3, 4)
    out = priv.mkldnn_linear()(a.to_mkldnn(), b.to_mkldnn())
    torch.testing.assert_close(out.to_dense(), a @ b.t(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- the window
def test_running_torch_is_inside_the_window():
    assert _support.unsupported_reason(torch.__version__) is None
    assert sys.version_info[:2] >= _support.PYTHON_MIN


def test_window_is_stated_truly_everywhere():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        pyproject = f.read()
    lo, hi = _support.TORCH_MIN, _support.TORCH_MAX
    assert '"torch>=%d.%d,<%d.%d"' % (lo[0], lo[1], hi[0], hi[1] + 1) in pyproject
    assert 'requires-python = ">=%d.%d"' % _support.PYTHON_MIN in pyproject
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    # the README's support table has one row per supported release, oldest to newest
    rows = re.findall(r"^\| (2\.\d+)(?:\.\d+)? ", readme, re.M)
    assert rows and rows[0] == "%d.%d" % lo and rows[-1] == "%d.%d" % hi, rows
    assert ["%d.%d" % (2, m) for m in range(lo[1], hi[1] + 1)] == sorted(set(rows), key=lambda v: int(v[2:])), rows


@pytest.mark.parametrize("version,ok", [("2.7.1", False), ("2.8.0", True), ("2.13.0+cpu", True),
                                        ("2.15.0", True), ("2.15.3a0+git12", True), ("2.16.0", False),
                                        ("3.0.0", False)])
def test_window_check(version, ok, monkeypatch):
    monkeypatch.delenv(_support.ALLOW_ENV, raising=False)
    if ok:
        _support.check(version, "import", error=ImportError)
        return
    with pytest.raises(ImportError, match=r"torch %s is (older|newer) .* \(torch 2\.8-2\.15\)" % re.escape(version)):
        _support.check(version, "import", error=ImportError)
    monkeypatch.setenv(_support.ALLOW_ENV, "1")
    with pytest.warns(RuntimeWarning, match="torch 2.8-2.15"):
        _support.check(version, "import", error=ImportError)


def _run(code, **env):
    e = dict(os.environ)
    e.pop(_support.ALLOW_ENV, None)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def test_import_outside_the_window_is_one_clear_error():
    r = _run("import torch; torch.__version__ = '2.7.1'; import fastmtl")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastmtl import: torch 2.7.1 is older than the oldest"), r.stderr[-2000:]


def test_build_outside_the_window_is_one_clear_error():
    code = ("import sys, runpy, torch; torch.__version__ = '2.16.0'; sys.argv = ['setup.py', 'build_ext']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    r = _run(code, FASTMTL_CUDA="0")
    assert r.returncode != 0
    assert "fastmtl setup.py: error: fastmtl setup.py: torch 2.16.0 is newer than the newest" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------- the C++ standard
@pytest.mark.parametrize("text,want", [
    ("#if !defined(_MSC_VER) && __cplusplus < 201703L\n#error C++17 or later compatible compiler", 17),
    ("#if (defined(_MSVC_LANG) && _MSVC_LANG < 202002L) || \\\n    (!defined(_MSVC_LANG) && __cplusplus < 202002L)\n"
     "#error C++20 or later compatible compiler is required to use ATen.", 20),
    ("#pragma once\n", 17),
])
def test_cxx_standard_read_from_the_headers(tmp_path, text, want):
    (tmp_path / "ATen").mkdir()
    (tmp_path / "ATen" / "ATen.h").write_text(text)
    assert _load_setup().torch_cxx_standard([str(tmp_path)], str(tmp_path / "no_cmake")) == want


@pytest.mark.parametrize("line,want", [("    CXX_STANDARD 20\n", 20), ("    CXX_STANDARD 17\n", 17), ("", 17)])
def test_cxx_standard_follows_torchs_cmake_target(tmp_path, line, want):
    # torch 2.12 and 2.13 build their users with C++20 (their headers use C++20 features) though they require 17
    (tmp_path / "TorchConfig.cmake").write_text("set_target_properties(torch PROPERTIES\n" + line + ")\n")
    assert _load_setup().torch_cxx_standard([], str(tmp_path)) == want


def test_build_used_the_standard_of_this_torch():
    want = _load_setup().torch_cxx_standard()
    flags = fastmtl.build_info()["flags"]
    assert "-std=c++%d" % want in flags.split(), flags
    if _support.parse_version(torch.__version__) >= (2, 12):
        assert want >= 20  # torch 2.12's TorchConfig.cmake, 2.14's ATen.h: C++20


def test_ci_checks_both_ends_of_the_window():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    window = re.search(r"FASTMTL_WINDOW_TORCH:-([\d. ]+)\}", ci).group(1).split()
    assert {_support.parse_version(v) for v in window} == {_support.TORCH_MIN, _support.TORCH_MAX}, window
    assert "bash .ci/torch_window.sh" in ci
    cuda = re.search(r"FASTMTL_CUDA_CHECK_TORCHES:-([\d. ]+)\}", ci).group(1).split()
    assert _support.TORCH_MAX in {_support.parse_version(v) for v in cuda}, cuda


def test_compiled_autograd_key_of_the_ops_function():
    # compiled autograd asks each Function of the graph for this key; the ops' Function has torch.autograd.Function's
    x = torch.randn(3, 2, 4, requires_grad=True)
    out, _ = fastmtl.nn.LSTM(4, 3)(x)
    node = out.grad_fn  # the backward node of the ops' Function (lstm_layer_forward's autograd)
    key = node._forward_cls._compiled_autograd_key(node)
    assert isinstance(key, tuple) and len(key) == 1
