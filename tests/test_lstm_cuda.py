"""CUDA-only checks of the LSTM ops (skipped without a GPU; the device-parametrised LSTM tests cover the rest).

* float64 / float32 on CUDA against the CPU op at float64 (outputs and every gradient);
* bfloat16 / float16: error against a float64 reference no more than twice PyTorch's own (torch.nn.LSTM, cuDNN)
  error in the same precision;
* the persistent kernel against the standard path (FASTMTL_LSTM_CUDA_PATH forces one);
* no host synchronisation (torch.cuda.set_sync_debug_mode("error"));
* CUDA-graph capture/replay of forward+backward and torch.compile(mode="reduce-overhead");
* lstm_layer_backward_multi (K cotangents in one backward, always the standard path) against K
  lstm_layer_backward calls, and the vmap-of-vjp path of fastmtl.nn.LSTM that calls it.
"""
import contextlib
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

if torch.cuda.is_available():
    import fastmtl  # noqa: F401  (loads fastmtl._C and registers the ops)

    if not fastmtl.build_info().get("cuda", False):
        pytestmark = pytest.mark.skip(reason="fastmtl was built without its CUDA kernels")

FWD = torch.ops.fastmtl.lstm_layer_forward if torch.cuda.is_available() else None
BWD = torch.ops.fastmtl.lstm_layer_backward if torch.cuda.is_available() else None
BWD_MULTI = torch.ops.fastmtl.lstm_layer_backward_multi if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------------------------------------------
# helpers
@contextlib.contextmanager
def tf32(enabled):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def lstm_path(path):
    old = os.environ.get("FASTMTL_LSTM_CUDA_PATH")
    os.environ["FASTMTL_LSTM_CUDA_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTMTL_LSTM_CUDA_PATH"]
        else:
            os.environ["FASTMTL_LSTM_CUDA_PATH"] = old


def make_case(T, B, I, H, D, bias, varlen, scale=0.5):
    """Random float64 CPU inputs for one layer: x, lengths (CPU int64 or None), hx, cx, weights, output grads."""
    x = torch.randn(T, B, I, dtype=torch.float64)
    if varlen:
        lengths = torch.randint(1, T + 1, (B,), dtype=torch.int64).sort(descending=True).values
        lengths[0] = T
    else:
        lengths = None
    hx = torch.randn(D, B, H, dtype=torch.float64) * scale
    cx = torch.randn(D, B, H, dtype=torch.float64) * scale
    k = 1.0 / H ** 0.5
    weights = []
    for _ in range(D):
        weights += [torch.empty(4 * H, I, dtype=torch.float64).uniform_(-k, k),
                    torch.empty(4 * H, H, dtype=torch.float64).uniform_(-k, k)]
        if bias:
            weights += [torch.empty(4 * H, dtype=torch.float64).uniform_(-k, k),
                        torch.empty(4 * H, dtype=torch.float64).uniform_(-k, k)]
    go = torch.randn(T, B, D * H, dtype=torch.float64)  # random at padding too: the ops must ignore it there
    ghy = torch.randn(D, B, H, dtype=torch.float64)
    gcy = torch.randn(D, B, H, dtype=torch.float64)
    return x, lengths, hx, cx, weights, go, ghy, gcy


def run_op(case, D, device, dtype):
    """Forward + backward through the fastmtl ops; returns [output, hy, cy, grad_x, grad_hx, grad_cx, *grad_w]."""
    x, lengths, hx, cx, weights, go, ghy, gcy = case

    def cv(t):
        return t.to(device, dtype)

    x, hx, cx, go, ghy, gcy = cv(x), cv(hx), cv(cx), cv(go), cv(ghy), cv(gcy)
    weights = [cv(w) for w in weights]
    out, hy, cy, res = FWD(x, lengths, hx, cx, weights, D == 2, True)
    gx, ghx, gcx, gw = BWD(go, ghy, gcy, x, lengths, hx, cx, weights, D == 2, out, res)
    return [out, hy, cy, gx, ghx, gcx] + list(gw)


NAMES = ["output", "hy", "cy", "grad_input", "grad_hx", "grad_cx"]


def names_for(n_w):
    return NAMES + ["grad_weights[%d]" % i for i in range(n_w)]


def rel_err(a, ref):
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cudnn_run(case, D, dtype):
    """torch.nn.LSTM (cuDNN) in `dtype` on the same case, with pack_padded_sequence for variable lengths."""
    x, lengths, hx, cx, weights, go, ghy, gcy = case
    T, B, I = x.shape
    H = hx.shape[2]
    bias = len(weights) == 4 * D
    m = torch.nn.LSTM(I, H, bias=bias, bidirectional=D == 2).to("cuda", dtype)
    with torch.no_grad():
        for p, w in zip(m._flat_weights, weights):
            p.copy_(w)
    xd = x.to("cuda", dtype).requires_grad_(True)
    hxd = hx.to("cuda", dtype).requires_grad_(True)
    cxd = cx.to("cuda", dtype).requires_grad_(True)
    if lengths is None:
        out, (hy, cy) = m(xd, (hxd, cxd))
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xd, lengths, enforce_sorted=True)
        out, (hy, cy) = m(packed, (hxd, cxd))
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    loss = (out * go.to("cuda", dtype)).sum() + (hy * ghy.to("cuda", dtype)).sum() + (cy * gcy.to("cuda", dtype)).sum()
    grads = torch.autograd.grad(loss, [xd, hxd, cxd] + list(m._flat_weights))
    return [out, hy, cy] + list(grads)


# ----------------------------------------------------------------------------------------------------------------
# exactness against the CPU op
SHAPES = [  # T, B, I, H
    (1, 1, 1, 1),
    (7, 3, 5, 4),
    (11, 33, 7, 16),
    (6, 70, 9, 24),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("varlen", [False, True])
def test_float64_matches_cpu_op(shape, D, bias, varlen):
    case = make_case(*shape, D, bias, varlen)
    ref = run_op(case, D, "cpu", torch.float64)
    got = run_op(case, D, "cuda", torch.float64)
    for name, a, r in zip(names_for(len(case[4])), got, ref):
        assert a.shape == r.shape, name
        torch.testing.assert_close(a.cpu(), r, rtol=1e-9, atol=1e-10, msg=lambda m: "%s: %s" % (name, m))


@pytest.mark.parametrize("shape", [(9, 5, 6, 8), (13, 40, 12, 32), (5, 80, 3, 20)], ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("varlen", [False, True])
def test_float32_no_tf32_close_to_float64(shape, D, varlen):
    case = make_case(*shape, D, True, varlen)
    ref = run_op(case, D, "cpu", torch.float64)
    with tf32(False):
        got = run_op(case, D, "cuda", torch.float32)
    for name, a, r in zip(names_for(len(case[4])), got, ref):
        assert a.dtype == torch.float32, name
        assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))


# ----------------------------------------------------------------------------------------------------------------
# low precision: no more than twice PyTorch's own error against float64
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B", [8, 29, 96])  # persistent-eligible and standard-path batch sizes
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("varlen", [False, True])
def test_low_precision_vs_cudnn(dtype, B, D, varlen):
    T, I, H = 24, 40, 64
    case = make_case(T, B, I, H, D, True, varlen)
    ref = run_op(case, D, "cpu", torch.float64)
    with tf32(True):  # float32: TF32 on both sides (cuDNN's default for RNNs)
        got = run_op(case, D, "cuda", dtype)
        theirs = cudnn_run(case, D, dtype)
    # float32 runs TF32 (~3e-4 relative per product): cuDNN may keep some of its GEMMs in full float32, so the
    # float32 bound has a TF32 floor; bf16/fp16 follow the plain 2x rule.
    floor = 2e-3 if dtype == torch.float32 else 1e-6
    for name, a, t, r in zip(names_for(len(case[4])), got, theirs, ref):
        assert a.dtype == dtype, name
        e_ours, e_torch = rel_err(a, r), rel_err(t, r)
        assert e_ours <= max(2.0 * e_torch, floor), "%s: fastmtl error %.3g > 2 x torch.nn.LSTM error %.3g" % (
            name, e_ours, e_torch)


# ----------------------------------------------------------------------------------------------------------------
# persistent kernel vs standard path
def _persistent_capable():
    major, _ = torch.cuda.get_device_capability()
    return major >= 8


@pytest.mark.skipif(torch.cuda.is_available() and not _persistent_capable(),
                    reason="the persistent kernel needs compute capability >= 8.0")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(17, 5, 12, 40), (9, 32, 30, 128), (6, 64, 8, 264), (3, 1, 4, 8)],
                         ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("varlen", [False, True])
def test_persistent_matches_standard(dtype, shape, D, varlen):
    T, B, I, H = shape
    case = make_case(T, B, I, H, D, True, varlen)
    ref = run_op(case, D, "cpu", torch.float64)
    with tf32(True):
        with lstm_path("standard"):
            std = run_op(case, D, "cuda", dtype)
        with lstm_path("persistent"):
            per = run_op(case, D, "cuda", dtype)
            per2 = run_op(case, D, "cuda", dtype)
    # Deterministic (no atomics in the kernel's math): two persistent forwards agree bit for bit.
    for name, a, b in zip(NAMES[:3], per[:3], per2[:3]):
        assert torch.equal(a, b), "%s: persistent kernel is not deterministic" % name
    # Both paths are within the same error band against float64, and close to each other (gradients too: the
    # backward is shared but reads the reserve written by the persistent forward).
    for name, p, s, r in zip(names_for(len(case[4])), per, std, ref):
        e_p, e_s = rel_err(p, r), rel_err(s, r)
        assert e_p <= 2.0 * e_s + 2e-3, "%s: persistent error %.3g vs standard %.3g" % (name, e_p, e_s)
        assert rel_err(p, s) < 3e-2, "%s: persistent and standard differ by %.3g" % (name, rel_err(p, s))
    # Padding positions are exactly zero on both paths.
    if case[1] is not None:
        mask = torch.arange(T).unsqueeze(1) >= case[1].unsqueeze(0)
        assert (per[0].cpu()[mask] == 0).all() and (std[0].cpu()[mask] == 0).all()


def test_forced_persistent_raises_when_not_applicable():
    case = make_case(4, 3, 5, 6, 1, True, False)  # H % 8 != 0
    with lstm_path("persistent"):
        with pytest.raises(RuntimeError, match="persistent"):
            run_op(case, 1, "cuda", torch.bfloat16)
    with lstm_path("bogus"):
        with pytest.raises(ValueError, match="FASTMTL_LSTM_CUDA_PATH"):
            run_op(case, 1, "cuda", torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# no host synchronisation, bad input
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_host_sync(varlen, dtype):
    case = make_case(8, 16, 12, 32, 2, True, varlen)
    run_op(case, 2, "cuda", dtype)  # warm up (plans, cuBLAS handles)
    x, lengths, hx, cx, weights, go, ghy, gcy = case
    x, hx, cx, go, ghy, gcy = [t.to("cuda", dtype) for t in (x, hx, cx, go, ghy, gcy)]
    weights = [w.to("cuda", dtype) for w in weights]
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, hy, cy, res = FWD(x, lengths, hx, cx, weights, True, True)
        BWD(go, ghy, gcy, x, lengths, hx, cx, weights, True, out, res)
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()


def test_bad_input_cuda():
    x, lengths, hx, cx, weights, go, ghy, gcy = make_case(5, 4, 3, 8, 1, True, True)
    xd, hxd, cxd = x.cuda(), hx.cuda(), cx.cuda()
    wd = [w.cuda() for w in weights]
    with pytest.raises(ValueError, match="lengths"):
        FWD(xd, lengths.cuda(), hxd, cxd, wd, False, True)
    with pytest.raises(ValueError, match="lengths"):
        FWD(xd, torch.tensor([1, 2, 3, 5]), hxd, cxd, wd, False, True)
    with pytest.raises(ValueError, match="lengths"):
        FWD(xd, torch.tensor([5, 3, 0, 0]), hxd, cxd, wd, False, True)
    with pytest.raises(ValueError, match="hx"):
        FWD(xd, None, hxd[:, :2], cxd, wd, False, True)
    with pytest.raises(ValueError, match="weight"):
        FWD(xd, None, hxd, cxd, wd[:3], False, True)
    with pytest.raises(TypeError):
        FWD(xd.float(), None, hxd, cxd, wd, False, True)
    out, hy, cy, res = FWD(xd, None, hxd, cxd, wd, False, False)
    assert res.numel() == 0
    with pytest.raises(ValueError, match="reserve"):
        BWD(go.cuda(), ghy.cuda(), gcy.cuda(), xd, None, hxd, cxd, wd, False, out, res)


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile(mode="reduce-overhead") through the drop-in module
def _replay_tol(dtype):
    # Same kernels in the same order; cuBLAS may still pick another algorithm on the capture stream.
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _module(I, H, D, dtype):
    from fastmtl.nn import LSTM

    return LSTM(I, H, num_layers=2, bidirectional=D == 2).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [4, 96])
def test_cuda_graph_capture_replay(dtype, B):
    T, I, H, D = 10, 16, 32, 2
    m = _module(I, H, D, dtype)
    static_x = torch.randn(T, B, I, device="cuda", dtype=dtype)
    static_g = torch.randn(T, B, D * H, device="cuda", dtype=dtype)

    def step():
        out, (h, c) = m(static_x)
        loss = (out * static_g).sum() + h.float().sum() + c.float().sum()
        loss.backward()
        return out

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up on a side stream (as torch.cuda.graph's documentation asks)
            m.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(s)
    m.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = step()
    static_grads = [p.grad for p in m.parameters()]

    for _ in range(2):
        x = torch.randn(T, B, I, device="cuda", dtype=dtype)
        static_x.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        got_out = static_out.clone()
        got_grads = [gr.clone() for gr in static_grads]
        m.zero_grad(set_to_none=True)
        eager_out = step()
        eager_grads = [p.grad for p in m.parameters()]
        tol = _replay_tol(dtype)
        torch.testing.assert_close(got_out, eager_out, **tol)
        for a, b in zip(got_grads, eager_grads):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_reduce_overhead(dtype):
    T, B, I, H, D = 9, 6, 12, 16, 2
    m = _module(I, H, D, dtype)
    compiled = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    tol = _replay_tol(dtype)
    for _ in range(4):  # the first calls record, the later ones replay the CUDA graph
        x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
        out_c, (h_c, c_c) = compiled(x)
        (out_c.float().square().sum() + h_c.float().sum()).backward()
        out_c = out_c.detach().clone()
        gx_c = x.grad.clone()
        gw_c = [p.grad.clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        x.grad = None
        out_e, (h_e, c_e) = m(x)
        (out_e.float().square().sum() + h_e.float().sum()).backward()
        torch.testing.assert_close(out_c, out_e.detach(), **tol)
        torch.testing.assert_close(gx_c, x.grad, **tol)
        for a, p in zip(gw_c, m.parameters()):
            torch.testing.assert_close(a, p.grad, **tol)
        m.zero_grad(set_to_none=True)


def test_cuda_graph_with_fixed_lengths():
    """With lengths inside a capture the batch sizes are frozen into the graph (warned); replays with new data and
    the same lengths equal eager runs (the persistent-eligible shape falls back to the standard path)."""
    T, B, I, H, D = 7, 6, 5, 16, 2
    case = make_case(T, B, I, H, D, True, True)
    x, lengths, hx, cx, weights = case[0].cuda().float(), case[1], case[2].cuda().float(), case[3].cuda().float(), [
        w.cuda().float() for w in case[4]]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        FWD(x, lengths, hx, cx, weights, True, False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with pytest.warns(UserWarning, match="CUDA graph"):
        with torch.cuda.graph(g):
            static_out = FWD(x, lengths, hx, cx, weights, True, False)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        eager = FWD(x, lengths, hx, cx, weights, True, False)
        for a, b in zip(static_out[:3], eager[:3]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# lstm_layer_backward_multi: K cotangents against one saved forward == K lstm_layer_backward calls
def _multi_vs_single(case, D, dtype, K, multi_path="standard"):
    """One CUDA forward, then lstm_layer_backward_multi on K random cotangents (under FASTMTL_LSTM_CUDA_PATH =
    multi_path) and K lstm_layer_backward calls (on the standard path, which the multi op always takes). Returns
    (multi, singles stacked at dim 0, float64 CPU singles stacked), each [grad_input, grad_hx, grad_cx, *grad_w]."""
    x, lengths, hx, cx, weights = case[:5]
    T, B, _ = x.shape
    H = hx.shape[2]
    GO = torch.randn(K, T, B, D * H, dtype=torch.float64)
    GH, GC = torch.randn(K, D, B, H, dtype=torch.float64), torch.randn(K, D, B, H, dtype=torch.float64)

    def run(device, dt, multi):
        cv = lambda t: t.to(device, dt)  # noqa: E731
        xd, hxd, cxd, wd = cv(x), cv(hx), cv(cx), [cv(w) for w in weights]
        out, _, _, res = FWD(xd, lengths, hxd, cxd, wd, D == 2, True)
        if multi:
            with lstm_path(multi_path):
                gx, ghx, gcx, gw = BWD_MULTI(cv(GO), cv(GH), cv(GC), xd, lengths, hxd, cxd, wd, D == 2, out, res)
            return [gx, ghx, gcx] + list(gw)
        per_k = [BWD(cv(GO[k]), cv(GH[k]), cv(GC[k]), xd, lengths, hxd, cxd, wd, D == 2, out, res) for k in range(K)]
        flat = [[p[0], p[1], p[2]] + list(p[3]) for p in per_k]
        return [torch.stack([f[i] for f in flat]) if K else None for i in range(3 + len(weights))]

    with tf32(False), lstm_path("standard"):
        got = run("cuda", dtype, True)
        singles = run("cuda", dtype, False)
    ref = run("cpu", torch.float64, False)
    return got, singles, ref


MULTI_SHAPES = [(1, 1, 1, 1), (7, 3, 5, 4), (9, 33, 7, 16)]  # T, B, I, H


@pytest.mark.parametrize("shape", MULTI_SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("K", [1, 3, 5])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backward_multi_matches_single_calls(shape, K, D, varlen, dtype):
    bias = K != 3  # both weight layouts
    case = make_case(*shape, D, bias, varlen)
    got, singles, ref = _multi_vs_single(case, D, dtype, K)
    n_w = len(case[4])
    names = NAMES[3:] + ["grad_weights[%d]" % i for i in range(n_w)]
    for name, a, s, r in zip(names, got, singles, ref):
        assert a.dtype == dtype and a.device.type == "cuda", name
        assert a.shape == s.shape == r.shape, (name, a.shape, s.shape, r.shape)
        assert a.is_contiguous(), name
        if dtype == torch.float64:
            torch.testing.assert_close(a, s, rtol=1e-10, atol=1e-11, msg=lambda m: "%s vs single calls: %s" % (name, m))
            torch.testing.assert_close(a.cpu(), r, rtol=1e-9, atol=1e-10, msg=lambda m: "%s vs CPU: %s" % (name, m))
        else:  # the same math; the GEMMs see other row counts (cuBLAS may sum in another order)
            assert rel_err(a, s) < 1e-5, (name, rel_err(a, s))
            assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("varlen", [False, True])
def test_backward_multi_low_precision(dtype, D, varlen):
    # Same kernels and GEMMs as the single backward on the standard path (row counts differ, so cuBLAS may pick
    # another algorithm): close to it, and no less accurate against float64.
    case = make_case(13, 29, 12, 32, D, True, varlen)
    got, singles, ref = _multi_vs_single(case, D, dtype, 3)
    names = NAMES[3:] + ["grad_weights[%d]" % i for i in range(len(case[4]))]
    for name, a, s, r in zip(names, got, singles, ref):
        assert a.dtype == dtype and a.shape == s.shape, name
        e_m, e_s = rel_err(a, r), rel_err(s, r)
        assert e_m <= 2.0 * e_s + 1e-3, "%s: multi error %.3g vs single calls %.3g" % (name, e_m, e_s)
        assert rel_err(a, s) < 2e-2, (name, rel_err(a, s))


def test_backward_multi_forced_path_and_empty():
    # FASTMTL_LSTM_CUDA_PATH=persistent does not apply to the multi op (always the standard path): it runs a layer
    # the persistent rule would refuse (float64) and gives the result of the default setting.
    case = make_case(6, 4, 8, 16, 2, True, True)
    forced, singles, ref = _multi_vs_single(case, 2, torch.float64, 2, multi_path="persistent")
    for a, s, r in zip(forced, singles, ref):
        torch.testing.assert_close(a, s, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(a.cpu(), r, rtol=1e-9, atol=1e-10)
    # K = 0: empty results with the leading 0
    x, lengths, hx, cx, weights = case[:5]
    x, hx, cx, weights = x.cuda(), hx.cuda(), cx.cuda(), [w.cuda() for w in weights]
    out, _, _, res = FWD(x, lengths, hx, cx, weights, True, True)
    gx, ghx, gcx, gw = BWD_MULTI(out.new_empty(0, *out.shape), hx.new_empty(0, *hx.shape),
                                 cx.new_empty(0, *cx.shape), x, lengths, hx, cx, weights, True, out, res)
    assert gx.shape == (0, *x.shape) and ghx.shape == (0, *hx.shape) and gcx.shape == (0, *cx.shape)
    assert [tuple(g.shape) for g in gw] == [(0, *w.shape) for w in weights]
    with pytest.raises(ValueError, match="grad_output"):
        BWD_MULTI(out, hx.unsqueeze(0), cx.unsqueeze(0), x, lengths, hx, cx, weights, True, out, res)


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("K", [1, 3, 5])
def test_vmap_of_vjp_uses_backward_multi(monkeypatch, D, varlen, K):
    """torch.func.vmap over the vjp of fastmtl.nn.LSTM (K cotangents against one forward, e.g. per-task
    gradients) on CUDA: one lstm_layer_backward_multi call per layer, equal to the per-cotangent vjp."""
    import fastmtl.ops.lstm as ops_lstm
    from fastmtl.nn import LSTM

    T, B, I, H = 8, 6, 5, 8
    m = LSTM(I, H, num_layers=2, bidirectional=D == 2).to("cuda", torch.float64)
    params = {n: p.detach() for n, p in m.named_parameters()}
    x = torch.randn(T, B, I, device="cuda", dtype=torch.float64)
    lengths = None
    if varlen:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T

    def f(p, xx):
        out, (h, c) = torch.func.functional_call(m, p, (xx,), {"lengths": lengths})
        return out, h, c

    primals, vjp_fn = torch.func.vjp(f, params, x)
    cots = tuple(torch.randn(K, *t.shape, device="cuda", dtype=torch.float64) for t in primals)
    calls = []
    real = ops_lstm._call_backward_multi
    monkeypatch.setattr(ops_lstm, "_call_backward_multi",
                        lambda *a: calls.append((a[0].shape[0], a[0].device.type)) or real(*a))
    got_p, got_x = torch.func.vmap(vjp_fn)(cots)
    assert calls and all(c == (K, "cuda") for c in calls), calls
    monkeypatch.setattr(ops_lstm, "_call_backward_multi", real)
    for k in range(K):
        want_p, want_x = vjp_fn(tuple(c[k] for c in cots))
        torch.testing.assert_close(got_x[k], want_x, rtol=1e-9, atol=1e-10)
        assert set(got_p) == set(want_p)
        for n in want_p:
            torch.testing.assert_close(got_p[n][k], want_p[n], rtol=1e-9, atol=1e-10, msg=lambda s: "%s: %s" % (n, s))
