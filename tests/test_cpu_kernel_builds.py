"""Build checks of the per-ISA CPU kernels (csrc/cpu/kernels) that need no torch: every file compiles, warnings
as errors, with each C++ compiler found here (g++ always; clang++ and an aarch64 cross g++ where installed), and
the objects define no symbol that the linker could merge with baseline code (a weak or COMDAT function compiled
for AVX2/AVX-512 would be an illegal instruction on an older CPU), and the vector paths really use the wide
registers."""
import glob
import os
import platform
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "kernels", "*.cpp")))
INCLUDE = os.path.join(ROOT, "csrc", "include")
COMPILERS = [c for c in ("g++", "clang++", "aarch64-linux-gnu-g++") if shutil.which(c)]


def _compile(compiler, src, out):
    cmd = [compiler, "-O3", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-psabi", "-I" + INCLUDE, "-c", src,
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, "%s failed on %s:\n%s" % (compiler, os.path.relpath(src, ROOT), r.stderr[-4000:])


def test_kernel_files_exist():
    names = {os.path.basename(p) for p in KERNELS}
    for op in ("lstm_cell", "heads_rows", "gemm", "crf"):
        assert {"%s_scalar.cpp" % op, "%s_avx2.cpp" % op, "%s_avx512.cpp" % op} <= names


@pytest.mark.parametrize("compiler", COMPILERS)
def test_kernels_compile(compiler, tmp_path):
    nm = shutil.which("aarch64-linux-gnu-nm" if compiler.startswith("aarch64") else "nm")
    for src in KERNELS:
        obj = tmp_path / (os.path.basename(src) + ".o")
        _compile(compiler, src, obj)
        if nm is None:
            continue
        syms = subprocess.run([nm, "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        defined = [ln for ln in syms.splitlines() if ln[17:18] not in ("U", "") and " r .LC" not in ln]
        # Only the table getters are global; everything else is local to its file.
        for ln in defined:
            kind, name = ln[17], ln[19:]
            assert kind not in "WVuiw", "%s defines a weak/unique symbol %s" % (os.path.basename(src), name)
            if kind.isupper() and kind in "TD":
                assert name.startswith("fastmtl::cpu_kernels::") and name.endswith("_kernels_" + name.split(
                    "_kernels_")[-1]), "%s exports %s" % (os.path.basename(src), name)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="x86-64 hosts with objdump")
def test_vector_paths_use_the_wide_registers(tmp_path):
    for src in KERNELS:
        base = os.path.basename(src)
        obj = tmp_path / (base + ".o")
        _compile("g++", src, obj)
        asm = subprocess.run(["objdump", "-d", str(obj)], capture_output=True, text=True, check=True).stdout
        if base.endswith("_avx512.cpp"):
            assert "zmm" in asm, base
        elif base.endswith("_avx2.cpp"):
            assert "ymm" in asm and "zmm" not in asm, base
        elif base.endswith("_scalar.cpp"):
            assert "ymm" not in asm and "zmm" not in asm, base


def test_no_wide_isa_flags_outside_the_entry_points():
    # The invariant that keeps AVX2/AVX-512 code out of baseline paths: the wider ISAs are enabled only by function
    # target attributes on the per-ISA entry points, never for a whole file (pragma) or the whole build (-m flags).
    import re
    for src in glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True):
        if src.endswith((".cpp", ".h", ".cc")):
            text = open(src, encoding="utf-8").read()
            assert not re.search(r"^\s*#\s*pragma\s+(GCC|clang)\s+(target|attribute)", text, re.M), src
    for build_file in ("setup.py", "CMakeLists.txt"):
        text = open(os.path.join(ROOT, build_file), encoding="utf-8").read()
        assert not re.search(r"-m(avx|fma|arch=|cpu=|tune=native|sse4|f16c)", text), build_file
