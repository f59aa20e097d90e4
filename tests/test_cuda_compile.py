"""Compile checks for the CUDA sources, GPU or not.

Wherever nvcc exists, every csrc/cuda/*.cu is compiled for sm_80 and sm_90 with the flags torch's
CUDAExtension adds (one nvcc call per file with two -gencode targets, all files in parallel, warnings are
errors), and every launcher declared in csrc/include/fastmtl/cuda_*.h must be defined by the objects (a missing
one would otherwise only show up as a link error in a CUDA build). Wherever torch's CUDA headers and the CUDA runtime headers exist, every
csrc/cuda/*_glue.cpp is syntax-checked with the host compiler as a CUDA build would compile it.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
GLUE_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_glue.cpp")))
LAUNCHER_HEADERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "include", "fastmtl", "cuda_*.h")))
ARCHS = ("80", "90")
TIMEOUT = 900


def _cuda_home():
    """The CUDA toolkit root holding the runtime headers (nvcc itself may be a wrapper script elsewhere)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME as torch_cuda_home

        cands.append(torch_cuda_home)
    except Exception:  # torch missing or broken: the .cu checks do not need it
        pass
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h")):
            return c
    return None


CUDA_HOME = _cuda_home()
NVCC = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _rel(p):
    return os.path.relpath(p, ROOT)


def _torch_nvcc_flags():
    """The flags torch's CUDAExtension adds to every nvcc call (no implicit half/bf16 conversions, ...)."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        return list(COMMON_NVCC_FLAGS)
    except Exception:
        return ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


@pytest.fixture(scope="module")
def nvcc_results():
    """Compile every .cu in parallel once; map file -> (returncode, output, object path)."""
    outdir = tempfile.mkdtemp(prefix="fastmtl_nvcc_")
    procs = {}
    for f in CU_FILES:
        obj = os.path.join(outdir, os.path.basename(f) + ".o")
        cmd = [NVCC, "-std=c++17", "-O3", "--Werror", "all-warnings"] + _torch_nvcc_flags() + [
            "-I" + os.path.join(ROOT, "csrc", "include"), "-c", f, "-o", obj]
        for a in ARCHS:
            cmd += ["-gencode", "arch=compute_%s,code=sm_%s" % (a, a)]
        procs[f] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd, obj)
    results = {}
    for f, (p, cmd, obj) in procs.items():
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            out = "TIMEOUT after %ds\n%s" % (TIMEOUT, out)
        results[f] = (p.returncode, " ".join(cmd) + "\n" + out, obj)
    yield results
    shutil.rmtree(outdir, ignore_errors=True)


def test_cuda_sources_exist():
    assert CU_FILES, "no csrc/cuda/*.cu files found"
    assert GLUE_FILES, "no csrc/cuda/*_glue.cpp files found"


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_nvcc_compiles(cu, nvcc_results):
    rc, out, _ = nvcc_results[cu]
    assert rc == 0, "nvcc failed on %s (sm_%s):\n%s" % (_rel(cu), "/sm_".join(ARCHS), out[-8000:])


@needs_nvcc
@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not found")
def test_launchers_defined(nvcc_results):
    """Every launcher declared in fastmtl/cuda_*.h is defined by some compiled .cu."""
    declared = set()
    for h in LAUNCHER_HEADERS:
        text = open(h).read()
        declared |= set(re.findall(r"^const char\* (\w+)\(", text, flags=re.M))
    assert declared, "no launchers found in %s" % [_rel(h) for h in LAUNCHER_HEADERS]
    objs = [obj for rc, _, obj in nvcc_results.values() if rc == 0]
    if len(objs) != len(nvcc_results):
        pytest.fail("some .cu files did not compile (see test_nvcc_compiles)")
    nm = subprocess.run(["nm", "-C", "--defined-only"] + objs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=120)
    assert nm.returncode == 0, nm.stdout
    defined = set(re.findall(r"fastmtl::cuda::(\w+)\(", nm.stdout))
    missing = sorted(declared - defined)
    assert not missing, "launchers declared but not defined by any csrc/cuda/*.cu: %s" % missing


def _glue_flags():
    """Host-compiler flags of a CUDA build of the glue, or a reason to skip."""
    try:
        import torch
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None, "torch is not installed"
    incs = include_paths()
    if not any(os.path.exists(os.path.join(i, "c10", "cuda", "CUDAStream.h")) for i in incs):
        return None, "torch's c10/cuda headers are not installed"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        return None, "CUDA runtime headers not found"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no host C++ compiler"
    flags = [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-DFASTMTL_WITH_CUDA",
             "-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI)]
    # CPU-only torch wheels ship c10/cuda headers without the generated cuda_cmake_macros.h.
    if not any(os.path.exists(os.path.join(i, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for i in incs):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for i in incs:
        flags += ["-isystem", i]
    flags += ["-isystem", os.path.join(CUDA_HOME, "include"), "-I" + os.path.join(ROOT, "csrc", "include")]
    return flags, None


@pytest.mark.parametrize("glue", GLUE_FILES, ids=[os.path.basename(f) for f in GLUE_FILES])
def test_glue_syntax(glue):
    flags, why = _glue_flags()
    if flags is None:
        pytest.skip(why)
    p = subprocess.run(flags + [glue], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, "host compiler failed on %s:\n%s\n%s" % (_rel(glue), " ".join(flags), p.stdout[-8000:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
