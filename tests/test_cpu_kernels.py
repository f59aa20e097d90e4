"""The CPU kernels under every instruction set this machine can run (scalar always, AVX2 and AVX-512 where the CPU
has them), so that a machine with AVX-512 also tests what an AVX2-only or aarch64 user runs; the run-time choice
and its one override (FASTMTL_CPU_KERNEL / fastmtl.set_cpu_kernel)."""
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import fastmtl
import test_heads
import test_lstm

ISAS = fastmtl.cpu_kernels()


@pytest.fixture(params=ISAS)
def isa(request):
    with fastmtl.use_cpu_kernel(request.param):
        assert fastmtl.cpu_kernel() == request.param
        yield request.param


def test_choice_follows_the_cpu():
    if os.environ.get("FASTMTL_CPU_KERNEL", "auto").strip().lower() != "auto":
        pytest.skip("FASTMTL_CPU_KERNEL overrides the automatic choice in this run")
    assert ISAS[0] == "scalar"
    assert set(ISAS) <= {"scalar", "avx2", "avx512"}
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    if flags:  # Linux x86-64: what /proc/cpuinfo reports must match the run-time detection
        have = set(flags.split(":", 1)[1].split())
        assert ("avx2" in ISAS) == ({"avx2", "fma"} <= have)
        assert ("avx512" in ISAS) == ({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"} <= have)
    assert fastmtl.cpu_kernel() == ISAS[-1]  # the best one by default
    assert set(fastmtl.build_info()["cpu_kernels_compiled"]) >= set(ISAS)


@pytest.mark.parametrize("case", test_lstm.GRID, ids=lambda c: "L%d-%s-B%d-%s" % (
    c[0], "bi" if c[1] else "uni", c[6], c[8]))
def test_lstm_parity_with_torch(isa, case):
    test_lstm.test_parity_with_torch(case, torch.float32, "cpu")


# The step kernels vectorise along the hidden units (4, 8, 16 floats per vector; forward tiles of one vector per
# gate, backward tiles of four vectors) and block the batch rows (3 or 6 per register tile): hidden sizes around
# every width (partial vectors and tiles) and batch sizes around every row block.
@pytest.mark.parametrize("B,H", [(B, 7) for B in (1, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 33)]
                         + [(5, H) for H in (1, 2, 4, 8, 15, 16, 17, 31, 33, 64, 65)]
                         + [(1, H) for H in (1, 2, 5, 16, 17, 33, 64, 70)])
def test_lstm_isas_agree(B, H):
    if len(ISAS) < 2:
        pytest.skip("this CPU runs only the scalar kernels: nothing to compare")
    T, E = 6, 5
    m = fastmtl.nn.LSTM(E, H, bidirectional=True)
    x = torch.randn(T, B, E) * 3  # large pre-activations reach the saturated ranges of sigmoid/tanh
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    results = {}
    for name in ISAS:
        with fastmtl.use_cpu_kernel(name):
            xx = x.clone().requires_grad_(True)
            out, (h, c) = m(xx, lengths=lengths)
            grads = torch.autograd.grad((out.sin().sum() + h.sum() + c.cos().sum()), [xx] + list(m.parameters()))
            results[name] = [out, h, c] + list(grads)
    for name in ISAS[1:]:
        for a, b in zip(results["scalar"], results[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda s: "%s vs scalar: %s" % (name, s))
    # and all of them against torch.nn.LSTM over the packed batch
    ref = torch.nn.LSTM(E, H, bidirectional=True)
    ref.load_state_dict(m.state_dict())
    xx = x.clone().requires_grad_(True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(xx, lengths, enforce_sorted=False)
    out_p, (h, c) = ref(packed)
    out = torch.nn.utils.rnn.pad_packed_sequence(out_p, total_length=T)[0]
    grads = torch.autograd.grad((out.sin().sum() + h.sum() + c.cos().sum()), [xx] + list(ref.parameters()))
    for a, b in zip(results["scalar"], [out, h, c] + list(grads)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H", [3, 16, 37, 64, 96])
def test_lstm_one_sequence_matches_batched(isa, dtype, H):
    # One sequence runs the step kernel on W_hh as it is (no packing); in a batch the tile kernel on packed W_hh:
    # the same sequence's outputs and states agree, in both directions, with and without an initial state.
    T, E, B = 7, 11, 5
    torch.manual_seed(H)
    ws = []
    for _ in range(2):
        ws += [torch.randn(4 * H, E, dtype=dtype) * 0.3, torch.randn(4 * H, H, dtype=dtype) * 0.3,
               torch.randn(4 * H, dtype=dtype) * 0.1, torch.randn(4 * H, dtype=dtype) * 0.1]
    x = torch.randn(T, B, E, dtype=dtype) * 2
    hx, cx = torch.randn(2, B, H, dtype=dtype), torch.randn(2, B, H, dtype=dtype)
    L = torch.full((B,), T, dtype=torch.long)
    ops = torch.ops.fastmtl
    out, hy, cy, res = ops.lstm_layer_forward(x, L, hx, cx, ws, True, True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for b in (0, 3):
        for need_reserve in (True, False):
            o1, h1, c1, r1 = ops.lstm_layer_forward(x[:, b:b + 1], L[:1], hx[:, b:b + 1].contiguous(),
                                                    cx[:, b:b + 1].contiguous(), ws, True, need_reserve)
            torch.testing.assert_close(o1[:, 0], out[:, b], **tol)
            torch.testing.assert_close(h1[:, 0], hy[:, b], **tol)
            torch.testing.assert_close(c1[:, 0], cy[:, b], **tol)
            if need_reserve:
                torch.testing.assert_close(r1[:, :, 0], res[:, :, b], **tol)


@pytest.mark.parametrize("I", [1, 3, 5, 16, 17, 35, 64])
@pytest.mark.parametrize("T,B", [(1, 1), (2, 1), (15, 1), (16, 1), (17, 1), (33, 1), (4, 4), (11, 3)])
def test_lstm_input_projection_few_rows(isa, I, T, B):
    # Up to 16 active rows the float32 input projection is the unpacked dot-product kernel (DotRows) inside the time
    # loop's workers, above that a GEMM: both against torch.nn.LSTM, for input sizes around every vector width and
    # hidden units that leave a partial block.
    H = 21
    torch.manual_seed(I * 100 + T)
    ref = torch.nn.LSTM(I, H, bidirectional=True)
    x = torch.randn(T, B, I)
    lengths = torch.full((B,), T, dtype=torch.long)
    lengths[1:] = torch.randint(1, T + 1, (B - 1,)).sort(descending=True).values
    w = list(ref._flat_weights)
    h0 = torch.zeros(2, B, H)
    out = torch.ops.fastmtl.lstm_layer_forward(x, lengths, h0, h0, w, True, False)[0]
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
    expect = torch.nn.utils.rnn.pad_packed_sequence(ref(packed)[0], total_length=T)[0]
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_lstm_float64_every_isa(isa):
    test_lstm.test_gradcheck_float64("cpu")


@pytest.mark.parametrize("case", sorted(test_heads.CASES))
def test_heads_match_reference_float64(isa, case):
    test_heads.test_matches_reference_float64("cpu", case)


def test_heads_float32(isa):
    test_heads.test_float32_noncontiguous_mixed_bias("cpu")


# Class counts around every vector width, with and without class weights and label smoothing.
@pytest.mark.parametrize("C", [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100])
def test_heads_isas_agree(C):
    if len(ISAS) < 2:
        pytest.skip("this CPU runs only the scalar kernels: nothing to compare")
    tasks = [dict(C=C, level="token", label_smoothing=0.1, class_weights=True), dict(C=C + 2, level="token"),
             dict(C=C, level="sequence", pooling="max")]
    hidden, weights, targets, levels, kw = test_heads.make_problem("cpu", torch.float32, 5, 7, 6, tasks)
    with torch.no_grad():
        hidden.mul_(4)  # a wide spread of logits
    results = {}
    for name in ISAS:
        with fastmtl.use_cpu_kernel(name):
            total, losses = fastmtl.functional.multitask_cross_entropy(hidden, weights, targets, levels, **kw)
            grads = torch.autograd.grad(total, test_heads.params_of(hidden, weights, kw))
            results[name] = [total, losses] + list(grads)
    for name in ISAS[1:]:
        for a, b in zip(results["scalar"], results[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda s: "%s vs scalar: %s" % (name, s))


def test_set_cpu_kernel_errors():
    with pytest.raises(ValueError, match="not a CPU kernel name"):
        fastmtl.set_cpu_kernel("sse9")
    with pytest.raises(TypeError, match="must be a str"):
        fastmtl.set_cpu_kernel(2)
    before = fastmtl.cpu_kernel()
    for name in ("avx2", "avx512"):
        if name not in ISAS:
            with pytest.raises(ValueError, match="not available"):
                fastmtl.set_cpu_kernel(name)
    assert fastmtl.cpu_kernel() == before
    with fastmtl.use_cpu_kernel("scalar"):
        with pytest.raises(ValueError):
            fastmtl.set_cpu_kernel("nope")
        assert fastmtl.cpu_kernel() == "scalar"
    assert fastmtl.cpu_kernel() == before
    # the context manager restores "auto" as automatic, not as the ISA it resolved to
    fastmtl.set_cpu_kernel("auto")
    with fastmtl.use_cpu_kernel("scalar"):
        assert fastmtl._C.cpu_kernel_override() == "scalar"
    assert fastmtl._C.cpu_kernel_override() == "auto"
    fastmtl.set_cpu_kernel("Scalar ")  # case and blanks do not matter
    assert fastmtl.cpu_kernel() == "scalar"
    fastmtl.set_cpu_kernel("auto")


def _run_with_env(value, code):
    env = dict(os.environ, FASTMTL_CPU_KERNEL=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_override():
    r = _run_with_env("scalar", "import fastmtl; print(fastmtl.cpu_kernel())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "scalar"
    r = _run_with_env("auto", "import fastmtl; print(fastmtl.cpu_kernel())")
    assert r.stdout.strip() == ISAS[-1], r.stderr
    # An unknown or unsupported ISA is a clear error on the first op, never an illegal instruction.
    code = ("import torch, fastmtl\n"
            "try:\n"
            "    fastmtl.nn.LSTM(3, 4)(torch.randn(2, 1, 3))\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    r = _run_with_env("avx1024", code)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "FASTMTL_CPU_KERNEL=avx1024" in r.stdout, r.stdout
    missing = [n for n in ("avx2", "avx512") if n not in ISAS]
    if missing:
        r = _run_with_env(missing[0], code)
        assert "ERR" in r.stdout and "supported here" in r.stdout, r.stdout


# The regression this design prevents: the extension crashed on CPUs without AVX-512. Where qemu's user-mode
# emulator exists, the installed build runs on emulated older CPUs: Haswell (AVX2 + FMA, no AVX-512) must choose the
# avx2 kernels and SandyBridge (AVX, no AVX2/FMA: torch's own baseline) the scalar ones, and both must match
# torch.nn.LSTM and run the heads. (Nehalem, without AVX, cannot run torch itself.)
_EMULATED = [("Haswell", ["scalar", "avx2"]), ("SandyBridge", ["scalar"])]
_SMOKE = r"""
import json, torch, fastmtl
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from fastmtl.functional import multitask_cross_entropy
from fastmtl.reference.heads import multitask_cross_entropy_reference
torch.manual_seed(0)
ref = torch.nn.LSTM(5, 7, bidirectional=True)
m = fastmtl.nn.LSTM(5, 7, bidirectional=True)
m.load_state_dict(ref.state_dict())
x = torch.randn(6, 9, 5, requires_grad=True)
lens = torch.tensor([6, 5, 5, 4, 3, 3, 2, 1, 6])
out, (h, c) = m(x, lengths=lens)
(out.sum() + h.sum()).backward()
gx = x.grad.clone()
x.grad = None
po, (rh, rc) = ref(pack_padded_sequence(x, lens, enforce_sorted=False))
ro, _ = pad_packed_sequence(po, total_length=6)
(ro.sum() + rh.sum()).backward()
hid = torch.randn(4, 6, 14)
W = [torch.randn(26, 14), torch.randn(33, 14)]
args = (hid, W, [torch.randint(0, 26, (4,)), torch.randint(0, 33, (4, 6))], ["sequence", "token"])
tot = multitask_cross_entropy(*args)[0]
tot_ref = multitask_cross_entropy_reference(*args)[0]
ga, gb, gc = torch.randn(37, 29), torch.randn(45, 29), torch.empty(37, 45)
fastmtl._C._gemm_f32_for_tests(ga, gb, False, True, 0.0, gc)  # the own GEMM of the active ISA, directly
print(json.dumps({"isas": fastmtl.cpu_kernels(), "active": fastmtl.cpu_kernel(),
                  "out": (out - ro).abs().max().item(), "grad": (gx - x.grad).abs().max().item(),
                  "heads": abs(float(tot) - float(tot_ref)),
                  "gemm": (gc.double() - ga.double() @ gb.double().t()).abs().max().item()}))
"""


def _emulated_torch_capability(cpu):
    """torch's CPU capability in a process that qemu's user-mode emulator runs on ``cpu`` (qemu before 7.2 drops
    AVX/AVX2 silently), or None when it cannot be read."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    try:
        r = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="needs qemu-x86_64 (Debian: qemu-user) on an x86-64 host")
@pytest.mark.parametrize("cpu,expected", _EMULATED, ids=[c for c, _ in _EMULATED])
def test_runs_on_emulated_older_cpus(cpu, expected):
    # torch's own view of the emulated CPU must be the one the test is about (AVX2 on Haswell, DEFAULT on
    # SandyBridge); an emulator that cannot emulate AVX2 makes the case meaningless, not failed.
    want = {"Haswell": "AVX2", "SandyBridge": "DEFAULT"}[cpu]
    got = _emulated_torch_capability(cpu)
    if got != want:
        pytest.skip("qemu-x86_64 -cpu %s gives torch CPU capability %r, not %r (qemu older than 7.2?)"
                    % (cpu, got, want))
    env = {k: v for k, v in os.environ.items() if k != "FASTMTL_CPU_KERNEL"}
    r = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", _SMOKE], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["isas"] == expected and res["active"] == expected[-1], res
    assert res["out"] < 1e-5 and res["grad"] < 1e-5 and res["heads"] < 1e-4 and res["gemm"] < 1e-4, res
