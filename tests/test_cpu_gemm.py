"""fastmtl's own float32 GEMM (csrc/cpu/kernels/gemm_*.cpp) under every instruction set this machine runs: directly
through the test entry fastmtl._C._gemm_f32_for_tests against torch.mm in float64 (edge sizes around the register
tiles and cache blocks, transposed and strided operands, beta 0 / 1, one and two threads), and through the LSTM op,
whose large float32 GEMMs (input projection, weight and input gradients) it runs where it beats torch's BLAS."""
import itertools
import math

import pytest
import torch

import fastmtl
import test_lstm
from fastmtl import _C

ISAS = fastmtl.cpu_kernels()
SIZES = (1, 7, 17, 33, 100, 257)


@pytest.fixture(params=ISAS)
def isa(request):
    with fastmtl.use_cpu_kernel(request.param):
        assert fastmtl.cpu_kernel() == request.param
        yield request.param


def _matrix(rows, cols, strided):
    """A (rows, cols) float32 matrix with unit column stride; strided: a window of a wider, offset buffer."""
    if not strided:
        return torch.randn(rows, cols)
    return torch.randn(rows + 2, cols + 13)[1:rows + 1, 5:cols + 5]


def _check(m, n, k, ta, tb, beta, strided):
    a = _matrix(k, m, strided) if ta else _matrix(m, k, strided)
    b = _matrix(n, k, strided) if tb else _matrix(k, n, strided)
    c = _matrix(m, n, strided)
    if beta == 0:
        c.fill_(float("nan"))  # beta = 0 must overwrite C without reading it
    opa = a.double().t() if ta else a.double()
    opb = b.double().t() if tb else b.double()
    c0 = c.double().clone()
    ref = opa @ opb + (c0 if beta else 0)
    scale = opa.abs() @ opb.abs() + (c0.abs() if beta else 0)
    if strided:  # C is a window of a larger buffer: everything outside the window must stay as it was
        base = torch.as_strided(c, (c.shape[0] + 2, c.stride(0)), (c.stride(0), 1),
                                c.storage_offset() - c.stride(0) - 5)
        outside = torch.ones_like(base, dtype=torch.bool)
        outside[1:c.shape[0] + 1, 5:c.shape[1] + 5] = False
        before = base[outside].clone()
    _C._gemm_f32_for_tests(a, b, ta, tb, float(beta), c)
    err = (c.double() - ref).abs()
    tol = 1e-5 * math.sqrt(k) * scale + 1e-30
    what = "m=%d n=%d k=%d trans_a=%s trans_b=%s beta=%d strided=%s" % (m, n, k, ta, tb, beta, strided)
    assert bool(torch.isfinite(c).all()), what + ": non-finite result"
    assert bool((err <= tol).all()), "%s: max err %.3g (scale %.3g)" % (what, err.max().item(), scale.max().item())
    if strided:
        assert torch.equal(base[outside], before), what + ": wrote outside C"


@pytest.mark.parametrize("ta,tb", list(itertools.product((False, True), repeat=2)))
def test_gemm_edge_sizes(isa, ta, tb):
    for i, (m, n, k) in enumerate(itertools.product(SIZES, repeat=3)):
        _check(m, n, k, ta, tb, beta=i % 2, strided=(i // 2) % 2 == 1)


# Sizes just around the register tiles (MR = 4 / 6 / 14 rows, NR = 8 / 16 / 32 columns) and across the cache blocks
# (KC = 256, MC = 128..336), on one and two threads (the split of C over the threads along m or n).
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n,k", [(13, 31, 5), (14, 32, 256), (15, 33, 257), (29, 65, 513), (337, 40, 300),
                                   (40, 337, 300), (700, 100, 40), (60, 2100, 20), (1, 1000, 600), (1000, 1, 600)])
def test_gemm_blocks_and_threads(isa, m, n, k, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for ta, tb in itertools.product((False, True), repeat=2):
            _check(m, n, k, ta, tb, beta=int(ta), strided=tb)
    finally:
        torch.set_num_threads(old)


def test_gemm_k_zero_and_bad_arguments():
    c = torch.randn(3, 4)
    kept = c.clone()
    _C._gemm_f32_for_tests(torch.empty(3, 0), torch.empty(0, 4), False, False, 1.0, kept)
    assert torch.equal(kept, c)  # k = 0, beta = 1: C unchanged
    out = c.clone()
    _C._gemm_f32_for_tests(torch.empty(3, 0), torch.empty(0, 4), False, False, 0.0, out)
    assert bool((out == 0).all())
    with pytest.raises(RuntimeError, match="float32"):
        _C._gemm_f32_for_tests(torch.randn(3, 2).double(), torch.randn(2, 4), False, False, 0.0, c)
    with pytest.raises(RuntimeError, match="shapes"):
        _C._gemm_f32_for_tests(torch.randn(3, 2), torch.randn(3, 4), False, False, 0.0, c)
    with pytest.raises(RuntimeError, match="contiguous"):
        _C._gemm_f32_for_tests(torch.randn(2, 3).t(), torch.randn(2, 4), False, False, 0.0, c)
    with pytest.raises(RuntimeError, match="beta"):
        _C._gemm_f32_for_tests(torch.randn(3, 2), torch.randn(2, 4), False, False, 0.5, c)


def test_lstm_uses_own_gemm_where_it_is_faster(isa):
    # The LSTM op runs its large float32 GEMMs on fastmtl's kernel for AVX-512 and AVX2 (measured faster than
    # torch's BLAS), through ATen for the baseline ISA; below one register tile of rows ATen keeps them (and the
    # input projection below 256 rows: csrc/cpu/matmul.h).
    own = isa in ("avx2", "avx512")
    assert _C._gemm_f32_used_by_lstm(1024, 2048, 256) == own
    assert _C._gemm_f32_used_by_lstm(100, 180, 37) == own
    assert not _C._gemm_f32_used_by_lstm(1, 2048, 256)


# LSTM sizes whose GEMMs (N active rows = sum of lengths, 4H, I) cross the register tiles of every ISA.
LSTM_CASES = [
    # L, bi,   bf,    bias,  E,  H,  B,  T,  lengths, how,     init
    (2, True, False, True, 37, 45, 20, 9, "var", "kw", True),
    (1, False, True, False, 70, 33, 17, 12, "full", "kw", False),
    (1, True, False, True, 300, 20, 40, 8, "var", "packed", True),
    # 324 rows: the input projection also runs on the own GEMM (from 256 rows, csrc/cpu/matmul.h)
    (1, True, False, True, 45, 70, 36, 9, "full", "kw", True),
]


@pytest.mark.parametrize("case", LSTM_CASES, ids=lambda c: "L%d-%s-E%dH%dB%dT%d" % (
    c[0], "bi" if c[1] else "uni", *c[4:8]))
def test_lstm_parity_with_torch(isa, case):
    test_lstm.test_parity_with_torch(case, torch.float32, "cpu")


@pytest.mark.parametrize("bi", [True, False])
def test_lstm_backward_multi_matches_float64(isa, bi):
    # K cotangents against one saved forward: the weight gradients of cotangent k take dG's rows k, k+K, ... (a
    # strided row view of the packed gate gradients, transposed) through the GEMM.
    T, B, I, H, K = 7, 19, 41, 29, 3
    D = 2 if bi else 1
    lengths = torch.sort(torch.randint(1, T + 1, (B,)), descending=True).values
    lengths[0] = T
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = torch.randn(D, B, H, dtype=torch.float64)
    cx = torch.randn(D, B, H, dtype=torch.float64)
    ws = []
    for _ in range(D):
        ws += [torch.randn(4 * H, I, dtype=torch.float64) * 0.2,
               torch.randn(4 * H, H, dtype=torch.float64) * 0.2,
               torch.randn(4 * H, dtype=torch.float64) * 0.1,
               torch.randn(4 * H, dtype=torch.float64) * 0.1]
    go = torch.randn(K, T, B, D * H, dtype=torch.float64)
    ghy = torch.randn(K, D, B, H, dtype=torch.float64)
    gcy = torch.randn(K, D, B, H, dtype=torch.float64)
    ops = torch.ops.fastmtl
    f = lambda t: t.float()  # noqa: E731
    out, _, _, res = ops.lstm_layer_forward(f(x), lengths, f(hx), f(cx), [f(w) for w in ws], bi, True)
    got = ops.lstm_layer_backward_multi(f(go), f(ghy), f(gcy), f(x), lengths, f(hx), f(cx), [f(w) for w in ws], bi,
                                        out, res)
    out64, _, _, res64 = ops.lstm_layer_forward(x, lengths, hx, cx, ws, bi, True)
    for k in range(K):
        ref = ops.lstm_layer_backward(go[k], ghy[k], gcy[k], x, lengths, hx, cx, ws, bi, out64, res64)
        pairs = [(got[0][k], ref[0], "grad_input"), (got[1][k], ref[1], "grad_hx"), (got[2][k], ref[2], "grad_cx")]
        pairs += [(g[k], r, "grad_weights[%d]" % i) for i, (g, r) in enumerate(zip(got[3], ref[3]))]
        for g, r, name in pairs:
            test_lstm._check_close(g, r, (1e-4, 1e-3), "cotangent %d: %s" % (k, name))
