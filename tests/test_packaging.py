"""Packaging and portability.

* The source distribution is complete (every C++/CUDA source and header, the CMake build, the tests) and contains no
  build artefacts, whether or not it is made from a git checkout.
* It installs on its own: a clean virtual environment that sees the installed torch builds it with
  ``pip install --no-build-isolation --no-deps`` and runs a smoke check from outside the source tree.
* The extension runs on every CPU torch runs on: csrc uses public ATen/BLAS APIs only (no ``at::native``, no weak
  symbols, no private BLAS/LAPACK declarations, no CPU_CAPABILITY of its own), and the built library holds no
  undefined weak reference to torch internals (a weak reference resolves to null where the symbol is missing).
* The README's test command is the one CI runs (.ci/run).
"""
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_FILES = ["setup.py", "pyproject.toml", "README.md", "CMakeLists.txt", "MANIFEST.in"]
SHIPPED_DIRS = ["csrc", "cpp_tests", "tests", "benchmarks"]
SOURCE_EXTS = (".c", ".cc", ".cpp", ".cxx", ".h", ".hh", ".hpp", ".cu", ".cuh")
# Never part of the project's files: version control, caches, build trees, generated files, compiled objects.
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".benchmarks", "dist", "runs", ".whl", ".gl"}
_SKIP_DIR_PREFIXES = ("build", "cmake-build", ".venv", "venv")
_ARTEFACT = re.compile(r"(\.(so|pyd|dylib|dll|o|obj|a|lib|pyc|pyo)$)|(^|/)(_build_meta\.py|\.ninja_deps|\.ninja_log|"
                       r"build\.ninja)$")


def _in_git_checkout():
    if shutil.which("git") is None:
        return False
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    return r.returncode == 0 and os.path.realpath(r.stdout.strip()) == os.path.realpath(ROOT)


def _project_files(*subdirs):
    """The project's files (relative paths): tracked by git plus new files git does not ignore (git ls-files), or,
    outside a git checkout (an unpacked sdist), every file but caches and build artefacts."""
    if _in_git_checkout():
        out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                              *subdirs], capture_output=True, text=True, check=True).stdout
        files = [f for f in out.split("\0") if f]
    else:
        files = []
        for top in subdirs or ["."]:
            for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
                dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")
                               and not (os.path.samefile(dirpath, ROOT) and d.startswith(_SKIP_DIR_PREFIXES))]
                files += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
    files = [f.replace(os.sep, "/") for f in files]
    # a file deleted but not yet committed is not the project's any more; build artefacts never are
    return sorted(f for f in files if os.path.isfile(os.path.join(ROOT, f)) and not _ARTEFACT.search(f))


# ---------------------------------------------------------------------------------------------------------------------
# the source distribution

# Stale build outputs planted in the copy the sdist is made from: none of them may reach the archive.
_PLANTED = ["fastmtl/_C.cpython-311-x86_64-linux-gnu.so", "build/temp.linux-x86_64/csrc/cpu/lstm.o",
            "csrc/cpu/stale.o", "csrc/cpu/__pycache__/stale.cpython-311.pyc", "build/lib/fastmtl/_C.so"]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """Builds the sdist through setuptools' PEP 517 backend (what `python -m build --sdist --no-isolation` runs) in a
    copy of the project's files without .git, so only MANIFEST.in decides what goes in (no setuptools-scm git file
    finder, no stale egg-info SOURCES.txt), with stale build outputs planted in the copy."""
    base = tmp_path_factory.mktemp("sdist")
    src, dist = base / "src", base / "dist"
    for f in _project_files():
        os.makedirs(os.path.dirname(os.path.join(src, f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(src, f))
    for f in _PLANTED:
        os.makedirs(os.path.dirname(os.path.join(src, f)), exist_ok=True)
        with open(os.path.join(src, f), "wb") as fh:
            fh.write(b"stale build output")
    env = dict(os.environ, FASTMTL_CUDA="0")  # setup.py runs for an sdist too; no toolchain is needed to pack
    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                        "print(build_meta.build_sdist(sys.argv[1]))", str(dist)],
                       cwd=src, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "sdist build failed:\n" + r.stdout[-4000:] + r.stderr[-4000:]
    archives = sorted(dist.glob("fastmtl-*.tar.gz"))
    assert len(archives) == 1, list(dist.iterdir())
    return archives[0]


def _members(archive):
    with tarfile.open(archive) as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
    prefix = os.path.basename(str(archive))[: -len(".tar.gz")] + "/"
    assert all(n.startswith(prefix) for n in names), names[:5]
    return {n[len(prefix):] for n in names}


def test_sdist_is_complete(sdist):
    members = _members(sdist)
    csrc = _project_files("csrc")
    assert any(f.endswith(".cpp") for f in csrc) and any(f.endswith(".h") for f in csrc), csrc  # the scan works
    expected = set(TOP_FILES) | set(_project_files(*SHIPPED_DIRS[1:])) | set(csrc)
    expected |= {f for f in _project_files("fastmtl") if f.endswith(".py")}
    missing = sorted(expected - members)
    assert not missing, "missing from the sdist (MANIFEST.in): %s" % missing
    assert "PKG-INFO" in members


def test_sdist_has_no_build_artefacts(sdist):
    members = _members(sdist)
    bad = sorted(m for m in members if _ARTEFACT.search(m) or m.startswith("build/"))
    assert not bad, "build artefacts or generated files in the sdist: %s" % bad


_SMOKE = textwrap.dedent("""
    import json, os, sys
    import torch
    import fastmtl

    venv, seed = os.path.realpath(sys.argv[1]), int(sys.argv[2])
    for mod in (fastmtl, fastmtl._native._C):
        assert os.path.realpath(mod.__file__).startswith(venv + os.sep), (mod.__name__, mod.__file__, venv)
    torch.manual_seed(seed)
    for dtype, tol in ((torch.float32, dict(rtol=1e-4, atol=1e-5)), (torch.float64, {})):
        ref = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True, dtype=dtype)
        lstm = fastmtl.nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True, dtype=dtype)
        lstm.load_state_dict(ref.state_dict())
        x = torch.randn(3, 6, 5, dtype=dtype)
        results = []
        for mod in (lstm, ref):
            xi = x.clone().requires_grad_()
            out, (h, c) = mod(xi)
            g = torch.Generator().manual_seed(seed)
            w = [torch.randn(t.shape, generator=g, dtype=dtype) for t in (out, h, c)]
            ((out * w[0]).sum() + (h * w[1]).sum() + (c * w[2]).sum()).backward()
            results.append([out, h, c, xi.grad] + [p.grad for p in mod.parameters()])
        assert len(results[0]) == len(results[1]) == 4 + 16
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, **tol)
    print(json.dumps({"torch_version": torch.__version__, "torch_file": torch.__file__,
                      "build_info": fastmtl.build_info()}))
""")


@pytest.mark.slow
def test_sdist_installs_in_clean_venv_and_runs(sdist, tmp_path, _fresh_seed):
    """Installs the sdist with `pip install --no-build-isolation --no-deps --no-index` into a fresh venv that sees
    the installed torch (--system-site-packages, plus the site directories of the venv these tests run in, if any):
    pip reaches no index, so it cannot pull another torch. Compiles the extension (~1-2 min on 2 cores)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(FASTMTL_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    if sys.prefix != sys.base_prefix:
        # These tests run inside a virtual environment: --system-site-packages gives the base interpreter's packages,
        # not this environment's, so its site directories (and so its torch) are added, after the new venv's own.
        outer = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
        with open(os.path.join(site, "_outer_environment.pth"), "w") as f:
            f.write("".join(p + "\n" for p in outer))
    # --ignore-installed: the outer (editable) fastmtl is visible through the system site-packages; install beside it
    r = subprocess.run([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                        "--ignore-installed", str(sdist)], env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, "pip install of the sdist failed:\n" + r.stdout[-6000:] + r.stderr[-6000:]
    assert not [d for d in os.listdir(site) if d.lower().startswith("torch")], "a torch was installed into the venv"

    elsewhere = tmp_path / "elsewhere"  # outside the source tree: `import fastmtl` must find the installed package
    elsewhere.mkdir()
    script = elsewhere / "smoke.py"
    script.write_text(_SMOKE)
    r = subprocess.run([py, str(script), str(venv), str(_fresh_seed)], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "smoke check failed in the venv:\n" + r.stdout[-6000:] + r.stderr[-6000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["torch_version"] == torch.__version__
    assert os.path.realpath(res["torch_file"]) == os.path.realpath(torch.__file__)
    assert res["build_info"]["torch_version"] == torch.__version__
    assert res["build_info"]["cuda"] is False  # FASTMTL_CUDA=0


# ---------------------------------------------------------------------------------------------------------------------
# runs on every CPU: public APIs only

_FORBIDDEN = [
    ("torch internals (at::native)", re.compile(r"\bat::native\b|\bnamespace\s+at\s*\{\s*namespace\s+native\b"
                                                r"|ATen/native/")),
    ("weak symbol", re.compile(r"__attribute__\s*\(\((?:(?!\)\)).)*?\b(__)?weak(__)?\b|#\s*pragma\s+weak\b"
                               r"|\[\[\s*gnu::(__)?weak(__)?\s*\]\]", re.S)),
    ("BLAS/LAPACK entry point", re.compile(
        r"\b[sdcz](gemm|gemv|ger|axpy|dot|scal|copy|swap|nrm2|asum|symm|syrk|syr2k|trmm|trsm|gesv|getrf|getrs|getri"
        r"|potrf|potrs|geqrf|gesdd|gesvd|syev|syevd)_\b|\bcblas_\w+|\bLAPACKE_\w+")),
    ("CPU_CAPABILITY defined", re.compile(r"#\s*define\s+CPU_CAPABILITY\w*\b")),
]


def _strip_comments(text):
    """C/C++/CUDA source without its comments (newlines kept, so line numbers hold); string literals stay."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _violations_in_text(text):
    """[(line, what, matched text)] for each forbidden form in C/C++/CUDA source, comments ignored."""
    code = _strip_comments(text)
    lines = code.splitlines()
    found = set()
    for what, rx in _FORBIDDEN:
        for m in rx.finditer(code):
            line = code.count("\n", 0, m.start()) + 1
            found.add((line, what, lines[line - 1].strip()))
    return sorted(found)


def _violations(files):
    found = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            found += ["%s:%d: %s: %s" % (os.path.relpath(path, ROOT), line, what, text)
                      for line, what, text in _violations_in_text(f.read())]
    return found


def test_violation_scan_catches_what_it_must():
    # the scanner itself: every forbidden form is found in code, none in comments or string literals
    src = ("// at::native::mkldnn_matmul, sgemm_ and #pragma weak in a comment\n"
           "/* __attribute__((weak))\n   #define CPU_CAPABILITY AVX2 */\n"
           "namespace at {\nnamespace native {\nvoid f() __attribute__((weak));\n}}\n"
           "#pragma weak g\n"
           "extern \"C\" void sgemm_(); void h() { cblas_sgemm(); at::native::f(); }\n"
           "#define CPU_CAPABILITY AVX2\n#  define CPU_CAPABILITY_AVX512\n"
           "const char* s = \"// not a comment\"; [[gnu::weak]] void k(); void dgemm_(); // sgemm_\n"
           "#include <ATen/ATen.h>\nauto y = at::matmul(a, b); at::native_x(); int sgemm_count;\n"
           "void m() __attribute__((visibility(\"default\"), __weak__)); void n() __attribute__((weakref(\"x\")));\n")
    kinds = dict(_FORBIDDEN)
    native, weak, blas, cap = list(kinds)
    assert [(line, what) for line, what, _ in _violations_in_text(src)] == sorted([
        (4, native), (6, weak), (8, weak), (9, blas), (9, native), (10, cap), (11, cap), (12, weak), (12, blas),
        (15, weak)])


def test_csrc_uses_public_apis_only():
    files = [os.path.join(ROOT, f) for f in _project_files("csrc") if f.endswith(SOURCE_EXTS)]
    assert files, "no C++/CUDA sources found under csrc/"
    found = _violations(files)
    assert not found, ("csrc must use public ATen/BLAS APIs only (torch internals and weak or private BLAS symbols "
                       "break on CPUs and torch builds that lack them):\n  " + "\n  ".join(found))


def _weak_references(so):
    """Undefined weak symbols (nm types w, v) of a shared library that name torch (at::, c10::, torch::, caffe2::)
    or BLAS/LAPACK, demangled."""
    r = subprocess.run(["nm", "-D", "-C", "--undefined-only", so], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    undefined = [line.split(None, 1) for line in r.stdout.splitlines() if line.strip()]
    # the listing is real: the extension imports torch's (demangled) symbols
    assert any(t == "U" and ("at::" in s or "c10::" in s) for t, s in undefined), r.stdout[:2000]
    torch_ns, blas = re.compile(r"\b(at|c10|torch|caffe2)::"), _FORBIDDEN[2][1]
    return sorted(s for t, s in undefined if t in ("w", "v") and (torch_ns.search(s) or blas.search(s)))


def test_extension_has_no_weak_references_to_torch_internals():
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not found")
    so = importlib.util.find_spec("fastmtl._C").origin
    weak = _weak_references(so)
    assert not weak, "%s has undefined weak references to torch internals or BLAS:\n  %s" % (so, "\n  ".join(weak))


# ---------------------------------------------------------------------------------------------------------------------
# the README's test command is what CI runs

def _commands(text):
    """Shell commands of a script or a code block: continuation lines joined, comments dropped."""
    text = text.replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _normalise(command):
    """`python3 -m pip install -q X` == `pip install X`; `python3` == `python`."""
    parts = []
    for cmd in command.split("&&"):
        words = shlex.split(cmd)
        words = ["python" if w == "python3" else w for w in words]
        if words[:3] == ["python", "-m", "pip"]:
            words = ["pip"] + words[3:]
        if words[:1] == ["pip"]:
            words = [w for w in words if w not in ("-q", "--quiet")]
        parts.append(words)
    return parts


def test_readme_test_command_is_what_ci_runs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Install and run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = _commands(block)
    assert len(commands) == 2, commands  # 1: install torch + fastmtl, train; 2: install for the tests, run them
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    marker = "# --- the README's test command"
    assert marker in ci, "mark the README's test command in .ci/run with a line starting %r" % marker
    ci_command = _commands(ci.split(marker, 1)[1].split("\n", 1)[1].split("\n\n", 1)[0])
    assert len(ci_command) == 1, ci_command
    assert _normalise(ci_command[0]) == _normalise(commands[1]), (ci_command[0], commands[1])
