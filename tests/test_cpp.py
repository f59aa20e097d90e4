"""The CMake build for C++ users: the same csrc built against libtorch, and its C++ test run through ctest."""
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), *gen,
                          "-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    # the C++ standard follows libtorch's headers, as setup.py's does for the Python extension
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastmtl_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    assert "fastmtl: C++%d (what libtorch's headers require)" % setup.torch_cxx_standard() in cfg.stdout, cfg.stdout
    bld = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                         capture_output=True, text=True, timeout=900)
    assert bld.returncode == 0, bld.stdout[-5000:] + bld.stderr[-5000:]
    test = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure", "-V"],
                          capture_output=True, text=True, timeout=300)
    assert test.returncode == 0, test.stdout[-5000:] + test.stderr[-3000:]
    assert "all C++ checks passed" in test.stdout
