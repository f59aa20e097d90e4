"""The README and the pages of docs/ say what is true and lead where they say.

* Every ```python block of README.md and docs/*.md runs as pasted: each on its own, in a fresh interpreter, in an
  empty temporary folder, within a time limit. A block that needs data, a model or a long run must make them itself
  at a size that runs in seconds (and that a user could paste as it is). Code that cannot run as pasted is not
  fenced as ```python (use ```bash, ```toml, ```json or a plain fence). A block that appears twice (the README's
  tour and the guide) runs once.
* Every relative link of those pages reaches an existing file, and its #anchor a heading of that file.
* The README stays the front door: short, and its opening names every weighting method of the registry.
"""
import glob
import os
import re
import subprocess
import sys

import pytest

import fastmtl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT_S = 300  # per block; they take seconds on an idle 2-core machine
README_MAX_LINES = 300
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def doc_pages():
    """README.md and every docs/*.md, as paths relative to the checkout."""
    return ["README.md"] + sorted(os.path.relpath(p, ROOT).replace(os.sep, "/")
                                  for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text):
    """``[(line number, info string, code, (first line index, last line index))]`` of every fenced block
    (indentation of fences inside list items removed). A fence of another language is skipped with its content, so
    a ``` inside it never starts a block."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        open_at, start, body, i = i, i + 1, [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        blocks.append((start, lang, "\n".join(body) + "\n", (open_at, i)))
        i += 1
    return blocks


def python_blocks(text):
    """``[(line number, code)]`` of the fenced blocks whose info string is ``python``."""
    return [(line, code) for line, lang, code, _ in fenced_blocks(text) if lang in ("python", "py", "python3")]


def _blocks():
    """``[(page, line, code)]`` of every python block of the pages, each distinct code once (first place)."""
    out, seen = [], set()
    for rel in doc_pages():
        for line, code in python_blocks(_read(rel)):
            if code not in seen:
                seen.add(code)
                out.append((rel, line, code))
    return out


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n\n- item\n\n  ```python\n  y = 2\n  ```\n```bash\necho '```python'\n```\n" \
           "````python\nz = '```'\n````\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (8, "y = 2\n"), (14, "z = '```'\n")]
    assert len(python_blocks(_read("README.md"))) >= 3  # the README's tour
    assert "docs/guide.md" in doc_pages() and len(python_blocks(_read("docs/guide.md"))) >= 5  # the guide's
    assert {rel for rel, _, _ in _blocks()} >= {"README.md", "docs/guide.md"}


@pytest.mark.parametrize("page,line,code", _blocks(), ids=["%s:%d" % (rel, l) for rel, l, _ in _blocks()])
def test_python_block_runs(page, line, code, tmp_path):
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
        pytest.fail("%s line %d: the block ran longer than %d s; make it run in seconds" % (page, line, TIMEOUT_S))
    assert r.returncode == 0, "%s line %d: the block failed:\n%s\n%s" % (page, line, code, r.stderr[-4000:])


# ---------------------------------------------------------------------------------------------------------------------
# links

_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")


def _outside_fences(text):
    """The lines of ``text`` with those of its fenced blocks (fences included) blanked."""
    lines = text.split("\n")
    for _, _, _, (a, b) in fenced_blocks(text):
        for i in range(a, min(b, len(lines) - 1) + 1):
            lines[i] = ""
    return lines


def _prose(text):
    """The text without its fenced blocks and inline code spans (links there are code, not links)."""
    return re.sub(r"`[^`\n]*`", "", "\n".join(_outside_fences(text)))


def github_slug(heading):
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def anchors(text):
    """The anchors of the headings of ``text`` (a repeated heading gets -1, -2, ... as on GitHub)."""
    out, counts = set(), {}
    for line in _outside_fences(text):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = counts.get(slug, 0)
        out.add(slug if n == 0 else "%s-%d" % (slug, n))
        counts[slug] = n + 1
    return out


def test_slugs():
    assert github_slug("Training: the `fastmtl` command") == "training-the-fastmtl-command"
    assert github_slug("Predictions, per-class reports and `fastmtl.load`") == \
        "predictions-per-class-reports-and-fastmtlload"
    assert github_slug("C++ users") == "c-users"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


@pytest.mark.parametrize("page", doc_pages())
def test_relative_links_lead_somewhere(page):
    text = _read(page)
    links = _LINK.findall(_prose(text))
    bad = []
    for label, target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(os.path.join(ROOT, page)), path)) if path \
            else os.path.join(ROOT, page)
        if not os.path.exists(dest):
            bad.append("%s: no such file" % target)
            continue
        if anchor and dest.endswith(".md"):
            with open(dest, encoding="utf-8") as f:
                if anchor not in anchors(f.read()):
                    bad.append("%s: no heading with that anchor" % target)
    assert not bad, "%s: broken links:\n  %s" % (page, "\n  ".join(bad))


def test_readme_links_to_every_docs_page():
    readme = _read("README.md")
    missing = [rel for rel in doc_pages()[1:] if "](%s" % rel not in readme]
    assert not missing, "README.md does not link to %s" % missing


# ---------------------------------------------------------------------------------------------------------------------
# the front door

def test_readme_stays_short():
    n = _read("README.md").count("\n")
    assert n <= README_MAX_LINES, ("README.md has %d lines (at most %d): what it is, the two commands, a short tour, "
                                   "the headline tables, the limitations; the rest belongs in docs/" %
                                   (n, README_MAX_LINES))


def test_readme_opening_names_every_weighting_method():
    from fastmtl.weighting import registry

    opening = _read("README.md").split("\n## ", 1)[0]
    own = [n for n, m in registry.METHODS.items() if m.extra is None]
    missing = [n for n in own if "`%s`" % n not in opening]
    assert not missing, "the README's opening does not name the weighting methods %s" % missing
    m = re.search(r"\[(\d+) methods\]\(docs/weighting-methods\.md\)", opening)
    assert m and int(m.group(1)) == len(own), \
        "the README's opening must link '[%d methods](docs/weighting-methods.md)'" % len(own)
