"""Compile checks for the CUDA sources, GPU or not.

Wherever nvcc exists, every csrc/cuda/*.cu is compiled for sm_80 and sm_90 with the flags torch's
CUDAExtension adds (one nvcc call per file with two -gencode targets, all files in parallel, warnings are
errors), and every launcher declared in csrc/include/fastmtl/cuda_*.h must be defined by the objects (a missing
one would otherwise only show up as a link error in a CUDA build). Wherever torch's CUDA headers and the CUDA runtime headers exist, every
csrc/cuda/*_glue.cpp is syntax-checked with the host compiler as a CUDA build would compile it.
"""
import glob
import importlib.util
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


def _load_setup():
    """setup.py as a module (importing it builds nothing): its find_cuda_home is the one the build uses."""
    spec = importlib.util.spec_from_file_location("fastmtl_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


try:
    SETUP = _load_setup()
except BaseException:  # torch missing (setup.py exits): the .cu checks need no torch, use the same rule inline
    SETUP = None


def _cuda_home():
    """The CUDA toolkit root holding the runtime headers (nvcc itself may be a wrapper script elsewhere)."""
    if SETUP is not None:
        return SETUP.find_cuda_home()
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h")):
            return c
    return None


CUDA_HOME = _cuda_home()
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
# the C++ standard the build gives g++ and nvcc: what the installed torch's headers require (17 without torch)
STD = "-std=c++%d" % (SETUP.torch_cxx_standard() if SETUP is not None else 17)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_setup = pytest.mark.skipif(SETUP is None, reason="setup.py cannot be imported (torch missing)")


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
        cmd = [NVCC, STD, "-O3", "--Werror", "all-warnings"] + _torch_nvcc_flags() + [
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
    flags = [cxx, "-fsyntax-only", STD, "-Wall", "-DFASTMTL_WITH_CUDA",
             "-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch.compiled_with_cxx11_abi())]
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


# ------------------------------------------------------------------------------------ setup.py finds the toolkit
def _fake_toolkit(root, with_headers=True):
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "include"))
    nvcc = os.path.join(root, "bin", "nvcc")
    with open(nvcc, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(nvcc, 0o755)
    if with_headers:
        open(os.path.join(root, "include", "cuda_runtime_api.h"), "w").close()
    return root


def _isolate(monkeypatch, tmp_path, path_dirs):
    for v in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join(str(d) for d in path_dirs))
    monkeypatch.setattr(SETUP, "SYSTEM_CUDA_DIRS", ())  # not this machine's /usr/local/cuda*, /opt/cuda


@needs_setup
def test_find_cuda_home_through_wrapper_script(tmp_path, monkeypatch):
    """nvcc on PATH is a wrapper script outside the toolkit (as on the CI machines): the toolkit it runs is found."""
    kit = _fake_toolkit(str(tmp_path / "cuda-13.0"))
    wrap = tmp_path / "wrapbin"
    wrap.mkdir()
    (wrap / "nvcc").write_text('#!/bin/sh\nexec %s/bin/nvcc "$@"\n' % kit)
    (wrap / "nvcc").chmod(0o755)
    _isolate(monkeypatch, tmp_path, [wrap])
    monkeypatch.setattr(SETUP.cpp_extension, "CUDA_HOME", str(tmp_path), raising=False)  # torch's wrong guess
    assert SETUP.find_cuda_home() == kit
    # an explicit CUDA_HOME that holds the headers wins
    other = _fake_toolkit(str(tmp_path / "other"))
    monkeypatch.setenv("CUDA_HOME", other)
    assert SETUP.find_cuda_home() == other


@needs_setup
def test_setup_fails_at_once_without_toolkit(tmp_path, monkeypatch, capsys):
    """A CUDA torch with FASTMTL_CUDA=1, or with an nvcc whose toolkit has no headers, stops with a clear message;
    with nothing configured it builds CPU-only with a warning."""
    kit = _fake_toolkit(str(tmp_path / "broken"), with_headers=False)
    _isolate(monkeypatch, tmp_path, [os.path.join(kit, "bin")])
    monkeypatch.setattr(SETUP.torch.version, "cuda", "13.0")
    monkeypatch.setattr(SETUP.cpp_extension, "CUDA_HOME", kit, raising=False)
    monkeypatch.setenv("FASTMTL_CUDA", "1")
    with pytest.raises(SystemExit) as e:
        SETUP._want_cuda()
    assert "no CUDA toolkit was found" in str(e.value) and "CUDA_HOME" in str(e.value)
    monkeypatch.delenv("FASTMTL_CUDA")
    with pytest.raises(SystemExit) as e:
        SETUP._want_cuda()
    assert "FASTMTL_CUDA=0" in str(e.value)
    _isolate(monkeypatch, tmp_path, [tmp_path])  # no nvcc anywhere
    monkeypatch.setattr(SETUP.cpp_extension, "CUDA_HOME", None, raising=False)
    assert SETUP._want_cuda() is False
    assert "building the CPU kernels only" in capsys.readouterr().err
    monkeypatch.setenv("FASTMTL_CUDA", "0")
    assert SETUP._want_cuda() is False


@needs_setup
def test_setup_points_torch_at_the_toolkit(tmp_path, monkeypatch):
    kit = _fake_toolkit(str(tmp_path / "cuda-13.0"))
    _isolate(monkeypatch, tmp_path, [os.path.join(kit, "bin")])
    monkeypatch.setattr(SETUP.torch.version, "cuda", "13.0")
    monkeypatch.setattr(SETUP.cpp_extension, "CUDA_HOME", "/usr/local", raising=False)
    monkeypatch.setenv("FASTMTL_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", "")  # so that monkeypatch restores the environment after _want_cuda sets it
    monkeypatch.delenv("CUDA_HOME")
    assert SETUP._want_cuda() is True
    assert SETUP.cpp_extension.CUDA_HOME == kit and os.environ["CUDA_HOME"] == kit
