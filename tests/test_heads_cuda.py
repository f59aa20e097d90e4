"""CUDA multi-task heads (csrc/cuda/heads.cu) through the op schema ``torch.ops.fastmtl.multitask_loss`` /
``multitask_predict``: against a float64 reference (Linear + pooling + F.cross_entropy per task, summed), against
the CPU op, bfloat16 / float16 by the "at most twice PyTorch's own error" rule, determinism, large C.

Backends:
  cuda      the real kernels (needs a GPU and a CUDA build; skipped otherwise).
  emulated  the same kernel source compiled for the host by tests/cuda_emulation/heads_emu.cpp (every block runs as
            256 threads with real barriers; the FMA tile path instead of wmma, synchronous copies instead of
            cp.async), so CPU-only CI tests the kernels' logic. Runs wherever the CUDA runtime headers are found
            (build ~20-60 s, once, cached under build/cuda_emulation); FASTMTL_EMULATE_CUDA=0 turns it off,
            FASTMTL_EMULATE_CUDA=1 makes missing headers an error instead of a skip.
"""
import os

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EMU = {}


def _cuda_available():
    if not torch.cuda.is_available():
        return False
    try:
        import fastmtl
    except ImportError:
        return False
    return bool(fastmtl.build_info().get("cuda", False))


def _emulator():
    """Builds (once) and loads the host emulation of the CUDA kernels; returns torch.ops.fastmtl_emu."""
    if "ops" not in _EMU:
        import importlib.util

        from torch.utils.cpp_extension import load

        # the toolkit the build uses (setup.py's find_cuda_home; importing setup.py builds nothing)
        spec = importlib.util.spec_from_file_location("fastmtl_setup", os.path.join(ROOT, "setup.py"))
        setup_py = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(setup_py)
        cuda_home = setup_py.find_cuda_home()
        inc = [os.path.join(ROOT, "csrc", "include")]
        if cuda_home is not None:
            inc.append(os.path.join(cuda_home, "include"))
        else:
            if os.environ.get("FASTMTL_EMULATE_CUDA") == "1":
                pytest.fail("FASTMTL_EMULATE_CUDA=1 but no CUDA headers (cuda_runtime_api.h) were found")
            pytest.skip("host emulation of the CUDA kernels needs the CUDA runtime headers (cuda_runtime_api.h)")
        build = os.path.join(ROOT, "build", "cuda_emulation")
        os.makedirs(build, exist_ok=True)
        load("fastmtl_heads_emu", [os.path.join(ROOT, "tests", "cuda_emulation", "heads_emu.cpp")],
             extra_include_paths=inc, extra_cflags=["-std=c++20", "-O1", "-Wno-unknown-pragmas"],
             build_directory=build, is_python_module=False, verbose=False)
        _EMU["ops"] = torch.ops.fastmtl_emu
    return _EMU["ops"]


class Backend:
    def __init__(self, name, ops, device):
        self.name, self.ops, self.device = name, ops, device


@pytest.fixture(params=["cuda", "emulated"])
def backend(request):
    if request.param == "cuda":
        if not _cuda_available():
            pytest.skip("needs a CUDA device and a CUDA build of fastmtl")
        return Backend("cuda", torch.ops.fastmtl, "cuda")
    if os.environ.get("FASTMTL_EMULATE_CUDA", "") == "0":
        pytest.skip("host emulation of the CUDA kernels turned off (FASTMTL_EMULATE_CUDA=0)")
    return Backend("emulated", _emulator(), "cpu")


@pytest.fixture
def cuda_backend():
    if not _cuda_available():
        pytest.skip("needs a CUDA device and a CUDA build of fastmtl")
    return Backend("cuda", torch.ops.fastmtl, "cuda")


IGNORE = -100
LAST, FIRST, MEAN, MAX, LAST_FIRST = range(5)


# ------------------------------------------------------------------------------------------------ problem generator
def make_problem(B, T, D, tasks, dtype=torch.float32, device="cuda", lengths=True, bias=True, seed_ignore=0.2):
    """tasks: list of dicts(level=0|1, C=int, pooling=int, smoothing=float, class_weight=bool, all_ignored=bool)."""
    hidden = torch.randn(B, T, D, device=device, dtype=torch.float32).to(dtype)
    if lengths:
        lens = torch.randint(1, T + 1, (B,), device=device)
        lens[0] = 1  # a one-token sequence
        if B > 1:
            lens[1] = T
    else:
        lens = None
    weights, biases, targets, cws, levels, pools, ignores, smooth = [], [], [], [], [], [], [], []
    for t in tasks:
        C = t["C"]
        weights.append((torch.randn(C, D, device=device) / D**0.5).to(dtype))
        biases.append((0.1 * torch.randn(C, device=device)).to(dtype) if bias else None)
        shape = (B,) if t["level"] == 0 else (B, T)
        y = torch.randint(0, C, shape, device=device)
        drop = torch.rand(shape, device=device) < seed_ignore
        y[drop] = IGNORE
        if t.get("all_ignored"):
            y[...] = IGNORE
        targets.append(y)
        cws.append((0.5 + torch.rand(C, device=device)).to(dtype) if t.get("class_weight") else None)
        levels.append(t["level"])
        pools.append(t.get("pooling", LAST))
        ignores.append(IGNORE)
        smooth.append(float(t.get("smoothing", 0.0)))
    lam = (0.5 + torch.rand(len(tasks), device=device)).float()
    return dict(
        hidden=hidden, lengths=lens, weights=weights, biases=biases, targets=targets, class_weights=cws,
        task_weights=lam, levels=levels, poolings=pools, ignore_indices=ignores, label_smoothings=smooth,
    )


def to(problem, device=None, dtype=None):
    out = {}
    for k, v in problem.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device) if device else v
            if dtype is not None and v.is_floating_point() and k != "task_weights":
                v = v.to(dtype)
            out[k] = v
        elif isinstance(v, list) and v and any(isinstance(x, torch.Tensor) for x in v):
            out[k] = [
                None if x is None else (
                    (x.to(device) if device else x).to(dtype) if (dtype is not None and x.is_floating_point())
                    else (x.to(device) if device else x)
                )
                for x in v
            ]
        else:
            out[k] = v
    return out


def op_loss(p, compute_grad=True, ops=None):
    ops = ops if ops is not None else torch.ops.fastmtl
    return ops.multitask_loss(
        p["hidden"], p["lengths"], p["weights"], p["biases"], p["targets"], p["class_weights"], p["task_weights"],
        p["levels"], p["poolings"], p["ignore_indices"], p["label_smoothings"], compute_grad,
    )


# ------------------------------------------------------------------------------------------------ reference
def _pool(h, lens, pooling):
    B, T, D = h.shape
    mask = torch.arange(T, device=h.device)[None, :] < lens[:, None]
    last = h[torch.arange(B, device=h.device), lens - 1]
    first = h[:, 0]
    if pooling == LAST:
        return last
    if pooling == FIRST:
        return first
    if pooling == MEAN:
        return (h * mask[..., None].to(h.dtype)).sum(1) / lens[:, None].to(h.dtype)
    if pooling == MAX:
        # max(dim).values: the gradient goes to the first maximal time step (ties are common in bf16)
        return h.masked_fill(~mask[..., None], float("-inf")).max(dim=1).values
    return torch.cat([last[:, : D // 2], first[:, D // 2:]], dim=1)


try:  # the project's reference (fastmtl/reference/heads.py), when it is there
    from fastmtl.reference.heads import multitask_cross_entropy_reference as _project_reference
except ImportError:  # pragma: no cover
    _project_reference = None


def reference(p, dtype=torch.float64):
    """Linear + pooling + F.cross_entropy per task, summed; autograd in `dtype`. Returns (total, losses, grads)."""
    B, T, D = p["hidden"].shape
    dev = p["hidden"].device
    h = p["hidden"].detach().to(dtype).requires_grad_()
    Ws = [w.detach().to(dtype).requires_grad_() for w in p["weights"]]
    bs = [None if b is None else b.detach().to(dtype).requires_grad_() for b in p["biases"]]
    if _project_reference is not None:
        total, losses = _project_reference(
            h, Ws, p["targets"], list(p["levels"]), biases=bs, lengths=p["lengths"], poolings=list(p["poolings"]),
            task_weights=[p["task_weights"][k].to(dtype) for k in range(len(Ws))],
            ignore_index=list(p["ignore_indices"]), label_smoothing=list(p["label_smoothings"]),
            class_weights=[None if c is None else c.to(dtype) for c in p["class_weights"]])
        total.backward()
        grads = [h.grad] + [w.grad for w in Ws] + [b.grad for b in bs if b is not None]
        return total.detach(), losses.detach(), grads
    lens = p["lengths"] if p["lengths"] is not None else torch.full((B,), T, device=dev, dtype=torch.long)
    mask = torch.arange(T, device=dev)[None, :] < lens[:, None]
    total = torch.zeros((), device=dev, dtype=dtype)
    losses = []
    for k in range(len(Ws)):
        ign = p["ignore_indices"][k]
        if p["levels"][k] == 0:
            X = _pool(h, lens, p["poolings"][k])
            y = p["targets"][k]
        else:
            X = h.reshape(B * T, D)
            y = p["targets"][k].reshape(-1).clone()
            y[~mask.reshape(-1)] = ign
        z = F.linear(X, Ws[k], bs[k])
        cw = p["class_weights"][k]
        if (y != ign).any():
            L = F.cross_entropy(z, y, weight=None if cw is None else cw.to(dtype), ignore_index=ign,
                                label_smoothing=p["label_smoothings"][k])
        else:
            L = z.sum() * 0
        losses.append(L)
        total = total + p["task_weights"][k].to(dtype) * L
    total.backward()
    grads = [h.grad] + [w.grad for w in Ws] + [b.grad for b in bs if b is not None]
    return total.detach(), torch.stack([x.detach() for x in losses]), grads


def op_grads(p, out):
    total, losses, gh, gws, gbs = out
    return [gh] + list(gws) + [g for g, b in zip(gbs, p["biases"]) if b is not None]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_f32(out, ref, p):
    total, losses = out[0], out[1]
    rt, rl, rg = ref
    torch.testing.assert_close(total.double(), rt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses.double(), rl, rtol=1e-4, atol=1e-5)
    for g, r in zip(op_grads(p, out), rg):
        scale = max(r.abs().max().item(), 1e-6)
        assert max_err(g, r) <= 2e-4 * scale + 1e-6, (max_err(g, r), scale)  # exact-zero grads (C = 1)


MIXED = [
    dict(level=0, C=26, pooling=LAST),
    dict(level=1, C=130, smoothing=0.1, class_weight=True),
    dict(level=0, C=7, pooling=MEAN, class_weight=True, smoothing=0.2),
    dict(level=0, C=3, pooling=MAX),
    dict(level=0, C=70, pooling=FIRST),
    dict(level=0, C=5, pooling=LAST_FIRST, smoothing=0.05),
    dict(level=1, C=2),
]




def mixed(D):
    """MIXED for hidden size D: pooling last_first needs an even D (every backend raises otherwise)."""
    return MIXED if D % 2 == 0 else [dict(t, pooling=LAST) if t.get("pooling") == LAST_FIRST else t for t in MIXED]


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("shape", [(4, 9, 33), (7, 1, 64), (1, 33, 97), (16, 32, 128)])
def test_float32_against_reference(backend, shape):
    B, T, D = shape
    p = make_problem(B, T, D, mixed(D), device=backend.device)
    out = op_loss(p, ops=backend.ops)
    assert_close_f32(out, reference(p), p)


def test_float32_against_cpu_op(backend):
    import fastmtl  # noqa: F401  (registers the CPU op)

    p = make_problem(6, 11, 40, MIXED, device=backend.device)
    out = op_loss(p, ops=backend.ops)
    cpu = op_loss(to(p, "cpu"))
    torch.testing.assert_close(out[0].cpu(), cpu[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1].cpu(), cpu[1], rtol=1e-4, atol=1e-5)
    for g, c in zip(op_grads(p, out), op_grads(p, cpu)):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 200, 90])  # one feature chunk; four (double-buffered loads); unaligned rows
def test_half_types_twice_pytorch_error(backend, dtype, D):
    p = make_problem(8, 16, D, MIXED, dtype=dtype, device=backend.device)
    out = op_loss(p, ops=backend.ops)
    r64 = reference(p, torch.float64)
    rlo = reference(p, dtype)
    pairs = [(out[0], rlo[0], r64[0]), (out[1], rlo[1], r64[1])]
    pairs += list(zip(op_grads(p, out), rlo[2], r64[2]))
    for ours, torch_lo, exact in pairs:
        floor = 2.0**-8 * max(exact.abs().max().item(), 1e-6)
        assert max_err(ours, exact) <= 2 * max_err(torch_lo, exact) + floor, (
            max_err(ours, exact), max_err(torch_lo, exact))


def test_float64_composite_path(cuda_backend):
    p = make_problem(5, 7, 12, MIXED, dtype=torch.float64)
    out = op_loss(p)
    rt, rl, rg = reference(p)
    torch.testing.assert_close(out[0], rt)
    torch.testing.assert_close(out[1], rl)
    for g, r in zip(op_grads(p, out), rg):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(backend, dtype):
    B, T, D = (32, 24, 96) if backend.name == "cuda" else (8, 20, 72)
    p = make_problem(B, T, D, MIXED, dtype=dtype, device=backend.device)
    a = op_loss(p, ops=backend.ops)
    b = op_loss(p, ops=backend.ops)
    for x, y in zip([a[0], a[1], a[2]] + list(a[3]) + list(a[4]), [b[0], b[1], b[2]] + list(b[3]) + list(b[4])):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabulary(backend, dtype):
    C = 20000 if backend.name == "cuda" else 3000  # many class tiles either way (the emulation is slow)
    tasks = [dict(level=0, C=26), dict(level=1, C=C, smoothing=0.1)]
    p = make_problem(4, 24 if backend.name == "cuda" else 8, 136, tasks, dtype=dtype, device=backend.device)
    out = op_loss(p, ops=backend.ops)
    if dtype == torch.float32:
        assert_close_f32(out, reference(p), p)
    else:
        r64, rlo = reference(p), reference(p, dtype)
        for ours, lo, ex in zip(op_grads(p, out) + [out[0]], rlo[2] + [rlo[0]], r64[2] + [r64[0]]):
            assert max_err(ours, ex) <= 2 * max_err(lo, ex) + 2.0**-8 * ex.abs().max().item()


def test_all_ignored_task_and_no_lengths(backend):
    tasks = [dict(level=1, C=9, all_ignored=True), dict(level=0, C=4, pooling=MEAN)]
    p = make_problem(3, 5, 16, tasks, lengths=False, bias=False, device=backend.device)
    out = op_loss(p, ops=backend.ops)
    assert out[1][0].item() == 0.0 and torch.isfinite(out[0])
    assert torch.count_nonzero(out[3][0]) == 0
    assert out[4][0].numel() == 0
    assert_close_f32(out, reference(p), p)


def test_no_grad_outputs_are_empty(backend):
    p = make_problem(3, 5, 16, MIXED[:2], device=backend.device)
    total, losses, gh, gws, gbs = op_loss(p, compute_grad=False, ops=backend.ops)
    assert gh.numel() == 0 and all(g.numel() == 0 for g in gws) and all(g.numel() == 0 for g in gbs)
    torch.testing.assert_close(total.double(), reference(p)[0], rtol=1e-4, atol=1e-5)


def test_empty_batch(backend):
    p = make_problem(2, 4, 8, MIXED[:2], device=backend.device)
    p["hidden"] = p["hidden"][:0]
    p["lengths"] = p["lengths"][:0]
    p["targets"] = [t[:0] for t in p["targets"]]
    total, losses, gh, gws, gbs = op_loss(p, ops=backend.ops)
    assert total.item() == 0.0 and gh.shape == (0, 4, 8) and all(torch.count_nonzero(g) == 0 for g in gws)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_predict(backend, dtype):
    p = make_problem(5, 9, 48, MIXED, dtype=dtype, device=backend.device)
    preds = backend.ops.multitask_predict(p["hidden"], p["lengths"], p["weights"], p["biases"], p["levels"],
                                          p["poolings"])
    B, T, D = p["hidden"].shape
    for k, pr in enumerate(preds):
        h = p["hidden"].float()
        X = _pool(h, p["lengths"], p["poolings"][k]) if p["levels"][k] == 0 else h
        z = F.linear(X, p["weights"][k].float(), p["biases"][k].float())
        top2 = z.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-2  # ignore near-ties (rounding of the pooled rows)
        expected = z.argmax(-1)
        if p["levels"][k] == 1:  # padded positions predict -1
            pad = torch.arange(T, device=pr.device)[None, :] >= p["lengths"][:, None]
            expected = expected.masked_fill(pad, -1)
            clear = clear | pad
            assert torch.all(pr[pad] == -1)
        assert pr.shape == z.shape[:-1] and pr.dtype == torch.long
        assert torch.equal(pr[clear], expected[clear])


def test_bad_input(cuda_backend):
    """Shapes / dtypes raise at once; bad target and length *values* (on the device) are recorded by the kernels and
    raised by check_input_errors() (no host synchronisation on the loss path), or at once with FASTMTL_SYNC_CHECKS=1."""
    from fastmtl.functional import check_input_errors

    check_input_errors()  # nothing pending from earlier tests
    p = make_problem(3, 5, 16, MIXED[:2])
    bad = dict(p, targets=[p["targets"][0], p["targets"][1].clone()])
    bad["targets"][1][0, 0] = 130  # class out of range, at a real position
    op_loss(bad)  # no error yet: validated lazily
    with pytest.raises(ValueError, match="targets\\[1\\] \\(task 1\\) has value 130 at \\(b=0, t=0\\)"):
        check_input_errors()
    check_input_errors()  # the record was cleared
    bad = dict(p, lengths=p["lengths"].clone())
    bad["lengths"][2] = 6
    op_loss(bad)
    with pytest.raises(ValueError, match="lengths\\[2\\] = 6"):
        check_input_errors()
    bad = dict(p, weights=[p["weights"][0][:, :15], p["weights"][1]])
    with pytest.raises(ValueError, match="weights\\[0\\]"):
        op_loss(bad)
    bad = dict(p, targets=[p["targets"][0], p["targets"][1][:, :3]])
    with pytest.raises(ValueError, match="targets\\[1\\]"):
        op_loss(bad)
    p64 = to(p, dtype=torch.float64)  # the float64 (composite) path checks at once
    p64["targets"][1][0, 0] = 130
    with pytest.raises(ValueError, match="targets\\[1\\]"):
        op_loss(p64)


def test_bad_input_sync_checks(cuda_backend, monkeypatch):
    monkeypatch.setenv("FASTMTL_SYNC_CHECKS", "1")
    p = make_problem(3, 5, 16, MIXED[:1])
    p["targets"][0][1] = -3
    with pytest.raises(ValueError, match="targets\\[0\\] \\(task 0\\) has value -3 at b=1"):
        op_loss(p)


def test_no_host_sync_and_cuda_graph(cuda_backend):
    """The loss and predict calls never synchronise with the host (torch's sync debug mode turns any sync into an
    error), and a captured CUDA graph replays them with new data."""
    p = make_problem(8, 12, 64, MIXED)
    op_loss(p)  # warm-up (allocates the per-device error record)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        op_loss(p)
        torch.ops.fastmtl.multitask_predict(p["hidden"], p["lengths"], p["weights"], p["biases"], p["levels"],
                                            p["poolings"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            op_loss(static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = op_loss(static)
    for _ in range(2):
        fresh = make_problem(8, 12, 64, MIXED)
        static["hidden"].copy_(fresh["hidden"])
        for a, b in zip(static["targets"], fresh["targets"]):
            a.copy_(b)
        static["lengths"].copy_(fresh["lengths"])
        g.replay()
        torch.cuda.synchronize()
        eager = op_loss(static)
        torch.testing.assert_close(out[0], eager[0], rtol=0, atol=0)
        torch.testing.assert_close(out[2], eager[2], rtol=0, atol=0)


def test_many_tasks_table_upload(backend):
    """More tasks than fit in the kernel parameters (16): the table goes through device memory."""
    tasks = [dict(level=k % 2, C=3 + k, pooling=k % 5) for k in range(17)]
    p = make_problem(3, 4, 16, tasks, device=backend.device)
    assert_close_f32(op_loss(p, ops=backend.ops), reference(p), p)


def test_bad_target_emulated_prep_kernel(backend):
    """The prep kernel flags a target outside [0, C) at a real position (the glue turns it into a ValueError)."""
    if backend.name != "emulated":
        pytest.skip("the CUDA glue's message is checked by test_bad_input")
    p = make_problem(3, 5, 16, MIXED[:2], device=backend.device)
    p["targets"][1][0, 0] = 130
    with pytest.raises(RuntimeError, match="error code 2 task 1 index 0 value 130"):
        op_loss(p, ops=backend.ops)
