#!/usr/bin/env bash
# CUDA build check (no GPU needed): builds fastmtl._C with its CUDA kernels against a CUDA torch, in a separate venv,
# wherever a CUDA toolkit (nvcc + cuda_runtime_api.h) is found, so CUDA glue that does not compile or link cannot
# land. Called by .ci/run after the tests; skipped with a message where no toolkit exists.
#
#   1. the toolkit: setup.py's find_cuda_home (the nvcc on PATH may be a wrapper script outside the toolkit);
#   2. a CUDA torch wheel (FASTMTL_CUDA_CHECK_TORCH, default 2.13.0) for the toolkit's CUDA version, downloaded with
#      --no-deps (~530 MB; its nvidia-* / cuda-toolkit dependencies are several GB and not needed to build): from
#      download.pytorch.org/whl/cuXY, else the default index's plain torch==VERSION when that is the CUDA build
#      (on PyPI it is: torch 2.13.0 for linux x86_64 is CUDA 13.0). Any other torch is refused;
#   3. a venv of its own (never the CI interpreter, whose CPU torch the tests use) with that wheel and torch's small
#      pure-Python dependencies;
#   4. stand-ins for the CUDA runtime libraries the wheel needs and the toolkit lacks (.ci/cuda_stub_libs.py), so
#      that `import torch` works for the build; they abort if ever called, and nothing here calls them;
#   5. FASTMTL_CUDA=1 MAX_JOBS=2 python setup.py build_ext on a copy of the sources (the checkout's fastmtl/_C*.so
#      and fastmtl/_build_meta.py stay those of the CPU build);
#   6. checks: every undefined symbol of the built _C*.so is defined by torch's, the toolkit's or the system's real
#      libraries (never a stand-in), and `import fastmtl` in that venv reports a CUDA build with CUDA kernels
#      registered for every op.
# Everything lives under build/cuda_build_check (FASTMTL_CUDA_CHECK_DIR); a later run reuses the wheel, the venv and
# the object files there. FASTMTL_CUDA_CHECK=0 skips the check; FASTMTL_CUDA_CHECK=1 makes a missing toolkit or a
# failed download an error instead of a skip. FASTMTL_CUDA_CHECK_ARCHS (default "8.0;9.0") is TORCH_CUDA_ARCH_LIST.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(realpath -m "${FASTMTL_CUDA_CHECK_DIR:-$ROOT/build/cuda_build_check}")
TORCH_VERSION=${FASTMTL_CUDA_CHECK_TORCH:-2.13.0}
ARCHS=${FASTMTL_CUDA_CHECK_ARCHS:-8.0;9.0}
MODE=${FASTMTL_CUDA_CHECK:-auto}
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "[cuda-build-check +$(( $(date +%s) - T0 ))s] $*"; }
skip() {
    if [ "$MODE" = 1 ]; then say "FAILED: $* (FASTMTL_CUDA_CHECK=1)"; exit 1; fi
    say "SKIPPED: $*"; exit 0
}
[ "$MODE" = 0 ] && { say "SKIPPED: FASTMTL_CUDA_CHECK=0"; exit 0; }

CUDA_HOME=$("$PY" - <<'EOF' 2>/dev/null || true
import importlib.util
spec = importlib.util.spec_from_file_location("fastmtl_setup", "setup.py")
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
print(m.find_cuda_home() or "")
EOF
)
[ -n "$CUDA_HOME" ] || skip "no CUDA toolkit found (nvcc and include/cuda_runtime_api.h; see setup.py find_cuda_home)"
CUDA_VER=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
TAG=cu$(echo "$CUDA_VER" | tr -d .)
say "toolkit $CUDA_HOME (CUDA $CUDA_VER); torch $TORCH_VERSION+$TAG; archs $ARCHS; work dir $WORK"
mkdir -p "$WORK/wheels"

# --- 2. the CUDA torch wheel, no dependencies
wheel_ok() {  # a CUDA torch of the right version and CUDA major version
    local list version  # (no `unzip | grep -q`: under pipefail, grep's early exit fails unzip)
    list=$(unzip -l "$1" 2>/dev/null) && version=$(unzip -p "$1" torch/version.py 2>/dev/null) || return 1
    grep -q "torch/lib/libtorch_cuda.so" <<<"$list" && grep -q "^cuda: .*'${CUDA_VER%%.*}\." <<<"$version"
}
WHEEL=""
for w in "$WORK"/wheels/torch-"$TORCH_VERSION"*.whl; do
    [ -f "$w" ] && wheel_ok "$w" && WHEEL=$w && break
done
if [ -z "$WHEEL" ]; then
    PYTAG=cp$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
    # no find-links / constraints of this machine's pip configuration: they offer the CPU wheel of the same version
    pip_dl() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null timeout 900 "$PY" -m pip download \
        -q --no-deps --only-binary=:all: --progress-bar off --retries 1 --timeout 60 -d "$WORK/wheels.tmp" "$@"; }
    for attempt in "index" "default"; do
        rm -rf "$WORK/wheels.tmp"
        if [ $attempt = index ]; then
            say "downloading torch==$TORCH_VERSION+$TAG from https://download.pytorch.org/whl/$TAG (--no-deps)"
            pip_dl "torch==$TORCH_VERSION+$TAG" --index-url "https://download.pytorch.org/whl/$TAG" >/dev/null 2>&1 \
                || { say "not reachable or no such wheel"; continue; }
        else
            say "downloading torch==$TORCH_VERSION from the default index (--no-deps)"
            pip_dl "torch==$TORCH_VERSION" 2>&1 | tail -3 || true
        fi
        for w in "$WORK"/wheels.tmp/torch-*.whl; do
            if [ -f "$w" ] && wheel_ok "$w"; then
                mv "$w" "$WORK/wheels/" && WHEEL="$WORK/wheels/$(basename "$w")"
            elif [ -f "$w" ]; then
                say "$(basename "$w") is not a CUDA $CUDA_VER build of torch: refused"
            fi
        done
        [ -n "$WHEEL" ] && break
    done
    rm -rf "$WORK/wheels.tmp"
fi
[ -n "$WHEEL" ] || skip "could not download a CUDA $CUDA_VER torch $TORCH_VERSION wheel"
say "wheel $(basename "$WHEEL") ($(du -m "$WHEEL" | cut -f1) MB)"

# --- 3. the venv
VENV=$WORK/venv
VPY=$VENV/bin/python
# (torch itself imports only with the stand-ins of step 4: check the install, not the import)
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
if ! "$VPY" -c "import setuptools, ninja, numpy" >/dev/null 2>&1 || [ ! -f "$SITE/torch/lib/libtorch_cuda.so" ] \
        || [ "$(cat "$VENV/.fastmtl_wheel" 2>/dev/null)" != "$(basename "$WHEEL")" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    # (without this machine's pip configuration: its constraints may cap torch below the wheel's version)
    env -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "$VPY" -m pip install -q --no-deps "$WHEEL"
    "$VPY" -m pip install -q "setuptools>=77" wheel ninja numpy filelock "typing-extensions>=4.10" sympy networkx \
        jinja2 fsspec
    basename "$WHEEL" >"$VENV/.fastmtl_wheel"
fi
TORCH_LIB=$("$VPY" -c "import sysconfig, os; print(os.path.join(sysconfig.get_paths()['purelib'], 'torch', 'lib'))")

# --- 4. stand-ins for the runtime libraries the wheel's dependencies would bring
STUBS=$WORK/stubs
rm -rf "$STUBS"
say "stand-ins for: $("$PY" .ci/cuda_stub_libs.py "$TORCH_LIB" "$CUDA_HOME" "$STUBS")"
export LD_LIBRARY_PATH="$STUBS:$CUDA_HOME/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$VPY" -c "import torch; assert torch.version.cuda, torch.__version__; print('torch', torch.__version__)"

# --- 5. the build, on a copy of the sources
SRC=$WORK/src
mkdir -p "$SRC"
rm -rf "$SRC/csrc" "$SRC/fastmtl"
tar -c --exclude='*.so' --exclude=__pycache__ --exclude=_build_meta.py setup.py pyproject.toml README.md csrc fastmtl \
    | tar -x -C "$SRC"
say "building (FASTMTL_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=$ARCHS)"
B0=$(date +%s)
(cd "$SRC" && FASTMTL_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST="$ARCHS" CUDA_HOME="$CUDA_HOME" \
    timeout 2400 "$VPY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1) || {
    tail -60 "$WORK/build.log"; say "FAILED: the CUDA build failed (full log: $WORK/build.log)"; exit 1; }
say "built in $(( $(date +%s) - B0 ))s"
SO=$(ls "$SRC"/fastmtl/_C*.so)

# --- 6. checks
"$PY" .ci/cuda_stub_libs.py --check "$SO" "$TORCH_LIB" "$CUDA_HOME" "$STUBS" || {
    say "FAILED: the CUDA build does not link"; exit 1; }
(cd "$SRC" && "$VPY" - <<'EOF') || { say "FAILED: the CUDA build does not import"; exit 1; }
import torch
import fastmtl

info = fastmtl.build_info()
assert info["cuda"] is True, info
ops = ["lstm_layer_forward", "lstm_layer_backward", "lstm_layer_backward_multi", "multitask_loss", "multitask_predict"]
from fastmtl._torch_private import has_kernel
missing = [op for op in ops if not has_kernel("fastmtl::" + op, "CUDA")]
assert not missing, "no CUDA kernel registered for %s" % missing
assert hasattr(torch.ops.fastmtl, "check_input_errors") or not hasattr(fastmtl.functional, "check_input_errors")
print("import ok: fastmtl %s, CUDA kernels registered for %s" % (fastmtl.__file__, ", ".join(ops)))
EOF
say "OK: fastmtl's CUDA extension compiles, links and imports against $(basename "$WHEEL")"
