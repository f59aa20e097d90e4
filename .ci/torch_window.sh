#!/usr/bin/env bash
# Builds fastmtl against one torch release in a venv of its own and runs the core suite (`pytest -m core`: op
# parity of the LSTM and the heads, the drop-in tests with torch's ported nn.LSTM tests, the transforms, a short
# train/evaluate/predict run) there. Called by .ci/run for the oldest and the newest supported torch; by hand for any
# release of the support window:
#
#   bash .ci/torch_window.sh 2.8.0            # or 2.15.0, 2.14.1, 2.13.0 ...
#
#   1. the torch wheel, --no-deps: PyPI's wheels for Linux x86-64 are CUDA builds whose nvidia-* / cuda-toolkit /
#      triton dependencies are several GB and not needed on the CPU; downloaded once into build/torch-wheels
#      (this machine's pip configuration is ignored: it caps torch and offers other builds of the same version);
#   2. a venv (build/torch-VERSION/venv) with that wheel and torch's small pure-Python dependencies (from the wheel's
#      own metadata, the nvidia / CUDA / triton ones left out);
#   3. for a CUDA wheel, stand-ins for the CUDA libraries it links against (.ci/cuda_stub_libs.py --no-device): every
#      CUDA runtime call answers "no CUDA device", so `import torch` works and torch.cuda.is_available() is False;
#   4. a copy of the checkout (tracked and untracked, not ignored files) in build/torch-VERSION/src, where
#      `pip install --no-build-isolation -e ".[test]"` builds fastmtl against that torch (a CPU build,
#      FASTMTL_CUDA=0: the CUDA build is .ci/cuda_build_check.sh's), a constraint holding torch at VERSION (the
#      checkout's own fastmtl/_C*.so and _build_meta.py stay those of the main interpreter);
#   5. `python -m pytest -m core` there.
# FASTMTL_WINDOW_DIR moves the work folder (default build/); a later run reuses the wheel and the venv. PYTHON picks
# the interpreter of the venv (default python3; e.g. PYTHON=python3.10 for the oldest Python of the window).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION=${1:?usage: torch_window.sh TORCH_VERSION [pytest args]}
shift
PY=${PYTHON:-python3}
BASE=$(realpath -m "${FASTMTL_WINDOW_DIR:-$ROOT/build}")
PYTAG=cp$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
# (the default interpreter's folder keeps the plain name; another Python's gets its tag)
DEFAULT_TAG=cp$(python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')
WORK=$BASE/torch-$VERSION$([ "$PYTAG" = "$DEFAULT_TAG" ] || echo "-$PYTAG")
WHEELS=$BASE/torch-wheels
T0=$(date +%s)
say() { echo "[torch $VERSION $PYTAG +$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$WORK" "$WHEELS"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# no global configuration (the local cap on torch, the local indexes); PyPI only
pipq() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null "$@"; }

# --- 1. the wheel
find_wheel() {  # (a wheel may carry a build tag: torch-2.10.0-3-cp311-...)
    ls "$WHEELS"/torch-"$VERSION"-*.whl 2>/dev/null | grep -e "-$PYTAG-" | head -1 || true; }
WHEEL=$(find_wheel)
if [ -z "$WHEEL" ]; then
    say "downloading torch==$VERSION ($PYTAG, --no-deps) from PyPI"
    rm -rf "$WHEELS/tmp"
    pipq timeout 900 "$PY" -m pip download -q --no-deps --only-binary=:all: --progress-bar off --retries 2 \
        --timeout 120 -d "$WHEELS/tmp" "torch==$VERSION"
    mv "$WHEELS"/tmp/torch-*.whl "$WHEELS"/ && rm -rf "$WHEELS/tmp"
    WHEEL=$(find_wheel)
    [ -n "$WHEEL" ] || { say "FAILED: no torch $VERSION wheel for $PYTAG"; exit 1; }
fi
say "wheel $(basename "$WHEEL") ($(du -m "$WHEEL" | cut -f1) MB)"

# --- 2. the venv
VENV=$WORK/venv
VPY=$VENV/bin/python
if [ "$(cat "$VENV/.fastmtl_wheel" 2>/dev/null)" != "$(basename "$WHEEL")" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    pipq "$VPY" -m pip install -q --no-deps "$WHEEL"
    pipq "$VPY" -m pip install -q packaging
    # torch's own requirements for this interpreter, without the GPU stack
    DEPS_TXT=$("$VPY" - <<'EOF'
import importlib.metadata as md
import re
from packaging.requirements import Requirement
for r in md.requires("torch") or []:
    req = Requirement(r)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if re.match(r"(nvidia-|cuda-|triton)", req.name):
        continue
    print(str(req).split(";")[0])
EOF
    ) || { say "FAILED: could not read torch's requirements"; exit 1; }
    mapfile -t DEPS <<<"$DEPS_TXT"
    # (pip then lists the left-out nvidia packages as unmet requirements of torch: expected, kept in the log)
    pipq "$VPY" -m pip install -q "${DEPS[@]}" "setuptools>=77" wheel "setuptools-scm==8.1.0" ninja \
        >"$WORK/venv.log" 2>&1 || { cat "$WORK/venv.log"; say "FAILED: torch's dependencies"; exit 1; }
    basename "$WHEEL" >"$VENV/.fastmtl_wheel"
fi
TORCH_LIB=$("$VPY" -c "import sysconfig, os; print(os.path.join(sysconfig.get_paths()['purelib'], 'torch', 'lib'))")

# --- 3. stand-ins for the CUDA libraries of a CUDA wheel
if [ -f "$TORCH_LIB/libtorch_cuda.so" ]; then
    STUBS=$WORK/stubs
    rm -rf "$STUBS"
    say "CUDA wheel: no-device stand-ins for: $("$PY" .ci/cuda_stub_libs.py --no-device "$TORCH_LIB" "$STUBS")"
    export LD_LIBRARY_PATH="$STUBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
"$VPY" -c "import torch; assert not torch.cuda.is_available(); print('torch', torch.__version__, 'imports')"

# --- 4. fastmtl from a copy of the checkout
SRC=$WORK/src
rm -rf "$SRC"
mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
    | tar -c --null -T - | tar -x -C "$SRC"
echo "torch==$VERSION" >"$WORK/constraints.txt"
say "building fastmtl against torch $VERSION"
B0=$(date +%s)
(cd "$SRC" && env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    PIP_CONSTRAINT="$WORK/constraints.txt" FASTMTL_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install -q --no-build-isolation -e ".[test]" >"$WORK/install.log" 2>&1) || {
    tail -60 "$WORK/install.log"; say "FAILED: the build or install failed (log: $WORK/install.log)"; exit 1; }
say "built and installed in $(( $(date +%s) - B0 ))s"

# --- 5. the core suite
say "core suite"
(cd "$SRC" && FASTMTL_EXPECT_CUDA=0 "$VPY" -m pytest -q -m core -p no:cacheprovider "$@")
say "OK: torch $VERSION builds and passes the core suite"
