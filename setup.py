"""Builds the extension ``fastmtl._C`` against the torch that is installed.

Environment:
  FASTMTL_CUDA=1   require the CUDA kernels: a torch without CUDA, or no CUDA toolkit found (see below), stops the
                   build at once with a clear message
  FASTMTL_CUDA=0   CPU-only build even where CUDA is available
  (unset)          CUDA kernels when the installed torch has CUDA and a CUDA toolkit is found. A CUDA torch on a
                   machine with no CUDA compiler at all (no nvcc on PATH, no CUDA_HOME / CUDA_PATH) builds CPU-only
                   and prints a warning; a CUDA compiler that is there but whose toolkit cannot be found (an nvcc
                   wrapper script outside the toolkit, a CUDA_HOME without the CUDA headers) is an error, as with
                   FASTMTL_CUDA=1: a half-found toolkit is a misconfiguration, not a reason to drop the kernels.
  CUDA_HOME / CUDA_PATH   where the CUDA toolkit is (optional: see find_cuda_home)
  FASTMTL_DEBUG=1  -O0 -g builds

The CUDA toolkit is the first of these folders that holds include/cuda_runtime_api.h (find_cuda_home):
CUDA_HOME, CUDA_PATH, torch's own guess (torch.utils.cpp_extension.CUDA_HOME), the toolkit of the nvcc on PATH
(symbolic links resolved; an nvcc that is a wrapper script is read for the real nvcc it runs), /usr/local/cuda,
/usr/local/cuda-* (the one matching torch's CUDA version first, then newest first), /opt/cuda. torch derives its
CUDA_HOME from the nvcc on PATH alone, which names a folder without the headers when nvcc is a wrapper script; the
build then failed minutes later at the first glue file (cuda_runtime.h: No such file or directory). setup.py hands
the folder it found to torch (cpp_extension.CUDA_HOME and the CUDA_HOME environment variable of the compilers).
tests/test_cuda_compile.py and the CUDA emulation tests load find_cuda_home from this file (importing setup.py does
not build: main() runs only when setup.py is run).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - clear message instead of a traceback
    sys.exit(
        "fastmtl: torch must be installed before building (pip install torch), "
        "and the build must see it: use `pip install --no-build-isolation ...`."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_support():
    """fastmtl/_support.py (the torch support window), loaded from its file: importing fastmtl needs the build."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastmtl_support", os.path.join(HERE, "fastmtl", "_support.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The C++ standards that torch's headers may demand (ATen/ATen.h: `#if ... __cplusplus < 201703L` / `202002L`).
_CPLUSPLUS = {"201703": 17, "202002": 20, "202302": 23}


def torch_cxx_standard(include_dirs=None, cmake_dir=None):
    """The C++ standard (17, 20, ...) of the installed torch: the newest of what its headers require (ATen/ATen.h and
    c10/macros/Macros.h check ``__cplusplus`` and stop with `#error C++NN or later compatible compiler is
    required`: C++20 from torch 2.14) and what torch builds its own users with (``CXX_STANDARD`` of the torch target
    in its TorchConfig.cmake: C++20 from 2.12, whose headers already use C++20 features), at least 17. g++ and nvcc
    both get ``-std=c++NN`` of it; CMakeLists.txt reads the same two sources for libtorch builds."""
    if include_dirs is None:
        include_dirs = cpp_extension.include_paths()
    if cmake_dir is None:
        cmake_dir = os.path.join(os.path.dirname(torch.__file__), "share", "cmake", "Torch")
    want = 17
    config = os.path.join(cmake_dir, "TorchConfig.cmake")
    if os.path.isfile(config):
        with open(config, encoding="utf-8", errors="replace") as f:
            for m in re.finditer(r"\bCXX_STANDARD\s+(\d\d)\b", f.read()):
                want = max(want, int(m.group(1)))
    for d in include_dirs:
        for rel in ("ATen/ATen.h", "c10/macros/Macros.h", "torch/extension.h"):
            path = os.path.join(d, rel)
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            for m in re.finditer(r"__cplusplus\s*<\s*(\d{6})L", text):
                want = max(want, _CPLUSPLUS.get(m.group(1), 17))
            for m in re.finditer(r"C\+\+(\d\d) or later", text):
                want = max(want, int(m.group(1)))
    return want


# The usual install folders, after CUDA_HOME / CUDA_PATH / torch's guess / the nvcc on PATH.
SYSTEM_CUDA_DIRS = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")


def _version_key(path):
    """Sort key of /usr/local/cuda-12.4 style folders: (12, 4); others last."""
    m = re.search(r"(\d+)\.(\d+)", os.path.basename(path))
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def _nvcc_targets(nvcc):
    """The real nvcc behind `nvcc` on PATH: its symbolic links resolved; when it is a (small) wrapper script, every
    absolute path ending in /bin/nvcc that the script names (e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`)."""
    real = os.path.realpath(nvcc)
    out = [real]
    try:
        if os.path.getsize(real) < 64 * 1024:
            with open(real, "rb") as f:
                head = f.read()
            if head.startswith(b"#!"):
                text = head.decode("utf-8", "replace")
                out = [os.path.realpath(p) for p in re.findall(r"(/[^\s\"'$;&|]*/bin/nvcc)\b", text)] + out
    except OSError:
        pass
    return out


def cuda_home_candidates(torch_cuda_version=None):
    """Folders that may hold the CUDA toolkit, in order of preference (see the module docstring)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME as torch_cuda_home

        cands.append(torch_cuda_home)
    except Exception:  # torch missing or broken: the callers that need no torch still get a toolkit
        pass
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands += [os.path.dirname(os.path.dirname(t)) for t in _nvcc_targets(nvcc)]
    for pattern in SYSTEM_CUDA_DIRS:
        found = sorted(glob.glob(pattern), key=_version_key, reverse=True)
        if torch_cuda_version and "*" in pattern:
            want = tuple(int(x) for x in str(torch_cuda_version).split(".")[:2])
            found.sort(key=lambda p: _version_key(p) != want)  # stable: the matching version first
        cands += found
    seen, out = set(), []
    for c in cands:
        if c and c not in seen:
            seen.add(c)
            out.append(c)
    return out


def find_cuda_home(torch_cuda_version=None):
    """The CUDA toolkit root: the first candidate holding include/cuda_runtime_api.h (and bin/nvcc), or None."""
    for c in cuda_home_candidates(torch_cuda_version):
        if os.path.isfile(os.path.join(c, "include", "cuda_runtime_api.h")) and os.path.exists(
            os.path.join(c, "bin", "nvcc")
        ):
            return os.path.abspath(c)
    return None


def _fail(msg):
    sys.exit("fastmtl setup.py: error: " + msg)


def _want_cuda():
    """Whether to build the CUDA kernels; points torch's cpp_extension at the toolkit when it does."""
    flag = os.environ.get("FASTMTL_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        _fail("FASTMTL_CUDA must be 0, 1 or unset, got %r" % flag)
    if flag == "0":
        return False
    have_torch_cuda = torch.version.cuda is not None
    if not have_torch_cuda:
        if flag == "1":
            _fail(
                "FASTMTL_CUDA=1 but the installed torch (%s) has no CUDA support; install a CUDA build of torch "
                "or unset FASTMTL_CUDA." % torch.__version__
            )
        return False
    home = find_cuda_home(torch.version.cuda)
    if home is None:
        nvcc = shutil.which("nvcc")
        env_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        tried = ", ".join(cuda_home_candidates(torch.version.cuda))
        why = (
            "no CUDA toolkit was found: none of [%s] holds include/cuda_runtime_api.h and bin/nvcc%s. Set CUDA_HOME "
            "to the toolkit's folder (the one with bin/nvcc and include/cuda_runtime_api.h)"
            % (tried, " (nvcc on PATH: %s, which runs %s)" % (nvcc, ", ".join(_nvcc_targets(nvcc))) if nvcc else "")
        )
        if flag == "1":
            _fail("FASTMTL_CUDA=1 but " + why + ", or unset FASTMTL_CUDA.")
        if nvcc or env_home:
            _fail(
                "torch %s has CUDA and a CUDA compiler is configured, but %s, or set FASTMTL_CUDA=0 for a CPU-only "
                "build." % (torch.__version__, why)
            )
        print(
            "fastmtl setup.py: WARNING: torch %s has CUDA but no CUDA toolkit (nvcc) was found: building the CPU "
            "kernels only (set CUDA_HOME, or FASTMTL_CUDA=1 to make this an error)." % torch.__version__,
            file=sys.stderr,
        )
        return False
    # torch guessed its CUDA_HOME at import from the nvcc on PATH; use the real toolkit for every compiler call.
    if cpp_extension.CUDA_HOME != home:
        print("fastmtl setup.py: CUDA toolkit %s (torch guessed %s)" % (home, cpp_extension.CUDA_HOME))
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    return True


def main():
    support = _load_support()
    try:
        support.check(torch.__version__, "setup.py", error=ValueError)
    except ValueError as e:
        _fail(str(e))
    with_cuda = _want_cuda()
    debug = os.environ.get("FASTMTL_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    std = "-std=c++%d" % torch_cxx_standard()
    cxx_flags = opt + [std, "-fvisibility=hidden"]
    if not debug and sys.platform.startswith("linux"):
        cxx_flags += ["-fopenmp"] if torch.backends.openmp.is_available() else []
    # csrc/cpu/kernels/*_<isa>.cpp hold the per-ISA hot loops; they are compiled with the same flags as the rest
    # (their entry points carry target attributes) and chosen at run time from the CPU's features.
    sources = ["csrc/fastmtl.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/cpu/kernels/*.cpp"))
    define_macros = [("FASTMTL_TORCH_VERSION", '"%s"' % torch.__version__)]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_glue.cpp"))
        define_macros.append(("FASTMTL_WITH_CUDA", "1"))
        extra["nvcc"] = opt + [std, "--expt-relaxed-constexpr", "-lineinfo"]
        Ext = cpp_extension.CUDAExtension
    else:
        Ext = cpp_extension.CppExtension
    flags_str = " ".join(cxx_flags + (extra.get("nvcc", []) if with_cuda else []))
    define_macros.append(("FASTMTL_BUILD_FLAGS", '"%s"' % flags_str))

    # Record what this build was made against, readable before the extension is imported
    # (so a torch mismatch gives a clear message instead of an undefined-symbol error).
    with open(os.path.join(HERE, "fastmtl", "_build_meta.py"), "w") as f:
        f.write("# generated by setup.py; do not edit\n")
        f.write("TORCH_VERSION = %r\n" % torch.__version__)
        f.write("WITH_CUDA = %r\n" % with_cuda)
        f.write("CUDA_VERSION = %r\n" % (torch.version.cuda if with_cuda else None))
        f.write("FLAGS = %r\n" % flags_str)

    ext = Ext(
        name="fastmtl._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )
    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":  # setuptools runs setup.py as __main__; importing it builds nothing
    main()
