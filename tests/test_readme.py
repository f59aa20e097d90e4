"""Every ```python block of README.md runs as pasted: each on its own, in a fresh interpreter, in an empty temporary
folder, within a time limit. A block that needs data, a model or a long run must make them itself at a size that runs
in seconds (and that a user could paste as it is)."""
import os
import re
import subprocess
import sys

import pytest

import fastmtl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT_S = 300  # per block; they take seconds on an idle 2-core machine
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def python_blocks(text):
    """``[(line number, code)]`` of the fenced blocks whose info string is ``python`` (indentation of fences inside
    list items removed). Fences of other languages are skipped with their content, so a ``` inside them never
    starts a block."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        start, body, i = i + 1, [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        if lang in ("python", "py", "python3"):
            blocks.append((start, "\n".join(body) + "\n"))
    return blocks


def _blocks():
    with open(README, encoding="utf-8") as f:
        return python_blocks(f.read())


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n\n- item\n\n  ```python\n  y = 2\n  ```\n```bash\necho '```python'\n```\n" \
           "````python\nz = '```'\n````\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (8, "y = 2\n"), (14, "z = '```'\n")]
    assert len(_blocks()) >= 5  # the README has its examples


@pytest.mark.parametrize("line,code", _blocks(), ids=["line%d" % l for l, _ in _blocks()])
def test_readme_python_block_runs(line, code, tmp_path):
    # the installed fastmtl (this checkout) must be importable from the empty folder, as it is for a user
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(fastmtl.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p),
               MPLBACKEND="Agg", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    try:
        r = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("README.md line %d: the block ran longer than %d s; make it run in seconds" % (line, TIMEOUT_S))
    assert r.returncode == 0, "README.md line %d: the block failed:\n%s\n%s" % (line, code, r.stderr[-4000:])
