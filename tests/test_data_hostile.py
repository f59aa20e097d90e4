"""The readers against hostile and unusual files: comment lines built to make a regular
expression backtrack, line separators other than '\\n' inside valid lines, byte order marks, bytes that are not
UTF-8, JSON nested deep or holding huge numbers and labels that are not labels, and repeated column names."""
import codecs
import json
import random
import time

import pytest

from fastmtl import data as D

SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"]  # str.splitlines splits on these
JSON_SEPARATORS = ["\u2028", "\u2029", "\x85"]  # the ones JSON allows raw inside a string
MB = 1 << 20


def _write(tmp_path, name, text, bom=False):
    p = tmp_path / name
    p.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8"))
    return str(p)


def _word(rng, extra=""):
    return "".join(rng.choice("abcdefxyzéü" + extra) for _ in range(rng.randint(1, 6)))


def _conllu_line(i, form, upos="X"):
    return "\t".join([str(i), form, form.lower(), upos, "_", "_", "0", "dep", "_", "_"])


# ---------------------------------------------------------------------------------------------------------------
# 3. comment lines in linear time

ADVERSARIAL = {
    "spaces": lambda n: "#" + " " * n,
    "space-equals": lambda n: "#" + " =" * (n // 2),
    "words-then-equals": lambda n: "# " + "a " * (n // 2) + "=",
    "tabs-then-key": lambda n: "#" + "\t" * n + "k",
    "spaces-key-spaces": lambda n: "#" + " " * (n // 2) + "k" + " " * (n // 2),
    "spaces-and-tabs": lambda n: "#" + " \t" * (n // 2),
    "unicode-spaces": lambda n: "#" + "\u3000\xa0" * (n // 4) + "x",
}


@pytest.mark.parametrize("shape", sorted(ADVERSARIAL))
def test_comment_line_of_a_megabyte_reads_fast(tmp_path, shape):
    comment = ADVERSARIAL[shape](MB)
    assert len(comment.encode("utf-8")) >= MB // 2
    conllu = _write(tmp_path, "a.conllu", "# sent_id = s1\n" + comment + "\n" + _conllu_line(1, "Hi") + "\n")
    conll = _write(tmp_path, "a.txt", comment + "\nHi X\n\n# id = 2\nBye Y\n")
    t = time.perf_counter()
    u = D.read_conllu(conllu)
    elapsed_conllu = time.perf_counter() - t
    t = time.perf_counter()
    try:
        c = D.read_conll(conll)
    except D.DataFormatError as e:  # a '#' line that is no key = value pair is a token line of the wrong width
        assert "a.txt:2: expected" in str(e)
        c = None
    elapsed_conll = time.perf_counter() - t
    assert elapsed_conllu < 1.0, elapsed_conllu  # milliseconds when linear (the regex took hours)
    # a '#' line that is no key = value pair is a token line in a column file; one of half a million columns takes
    # about half a second to split and name, which is linear too
    key, sep, value = comment[1:].partition("=")
    pair = bool(sep and key.strip())
    wide = not pair and len(comment.split()) > 1000
    assert elapsed_conll < (5.0 if wide else 1.0), elapsed_conll
    assert u[0]["tokens"] == ["Hi"] and u[0]["sent_id"] == "s1"
    if pair:
        assert u[0][key.strip()] == value.strip()
        assert c is not None and c[0][key.strip()] == value.strip() and c[1]["id"] == "2"


def test_comment_semantics(tmp_path, _fresh_seed):
    rng = random.Random(_fresh_seed)
    blank = [" ", "\t", "\xa0", "\u3000", ""]
    lines, expected = [], {}
    for i in range(200):
        key = "k%d_%s" % (i, _word(rng, " :#"))
        value = rng.choice(["", _word(rng, " =:#"), "a = b", "= x"])
        pre, mid1, mid2, post = (rng.choice(blank) for _ in range(4))
        lines.append("#" + pre + key + mid1 + "=" + mid2 + value + post)
        expected[key.strip()] = value.strip()
    lines += ["# no key value pair here", "#", "#=", "# = orphan value", "#\t=", "# \u3000 = x"]
    exs = D.read_conllu(_write(tmp_path, "a.conllu", "\n".join(lines) + "\n" + _conllu_line(1, "w") + "\n"))
    got = {k: v for k, v in exs[0].items() if k not in ("tokens",) + D.conll.CONLLU_FIELDS}
    assert got == expected  # a whitespace-only key is no key (the regex made the field " " of "# = orphan value")


# ---------------------------------------------------------------------------------------------------------------
# 5. lines end at '\n' only (and '\r\n'); never at U+2028, U+0085, form feed, ...

@pytest.mark.parametrize("sep", SEPARATORS)
def test_conll_separators_inside_tokens(tmp_path, sep, _fresh_seed):
    rng = random.Random(_fresh_seed)
    sents = [[(_word(rng) + (sep if rng.random() < 0.5 else "") + _word(rng), _word(rng), _word(rng))
              for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(2, 8))]
    sents[0][0] = ("a" + sep + "b", "NN", "O")
    text = "\n\n".join("\n".join(" ".join(cols) for cols in s) for s in sents) + "\n"
    p = _write(tmp_path, "a.txt", text)
    exs = D.read_conll(p, ["word", "pos", "ner"])
    assert [e["tokens"] for e in exs] == [[w for w, _, _ in s] for s in sents]
    assert [e["ner"] for e in exs] == [[n for _, _, n in s] for s in sents]
    # the line numbers after the separator are the file's
    nlines = text.count("\n")
    bad = _write(tmp_path, "b.txt", text + "x y\n")
    with pytest.raises(D.DataFormatError, match=r"b\.txt:%d: expected 3 columns" % (nlines + 1)):
        D.read_conll(bad)


@pytest.mark.parametrize("sep", SEPARATORS)
def test_conllu_separators_inside_forms(tmp_path, sep, _fresh_seed):
    rng = random.Random(_fresh_seed)
    forms = [_word(rng) + sep + _word(rng) for _ in range(rng.randint(1, 5))]
    text = "# text = %s\n" % " ".join(forms) + "\n".join(_conllu_line(i + 1, f) for i, f in enumerate(forms)) + "\n"
    exs = D.read_conllu(_write(tmp_path, "a.conllu", text))
    assert len(exs) == 1 and exs[0]["tokens"] == forms and exs[0]["text"] == " ".join(forms)
    bad = _write(tmp_path, "b.conllu", text + "\n1\tA\ta\n")
    with pytest.raises(D.DataFormatError, match=r"b\.conllu:%d: expected 10" % (len(forms) + 3)):
        D.read_conllu(bad)


@pytest.mark.parametrize("sep", JSON_SEPARATORS)
def test_jsonl_separators_inside_strings(tmp_path, sep, _fresh_seed):
    rng = random.Random(_fresh_seed)
    rows = [{"tokens": [_word(rng) + sep + _word(rng), _word(rng)], "tags": ["B", "O"], "label": sep + _word(rng)}
            for _ in range(rng.randint(2, 6))]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert sep in text
    exs = D.read_jsonl(_write(tmp_path, "a.jsonl", text))
    assert exs == rows
    with pytest.raises(D.DataFormatError, match=r"b\.jsonl:%d: invalid JSON" % (len(rows) + 1)):
        D.read_jsonl(_write(tmp_path, "b.jsonl", text + "{oops\n"))


@pytest.mark.parametrize("sep", SEPARATORS)
def test_atis_separators_inside_words(tmp_path, sep, _fresh_seed):
    rng = random.Random(_fresh_seed)
    rows = [([_word(rng) + sep + _word(rng) for _ in range(rng.randint(1, 4))], _word(rng)) for _ in range(5)]
    text = "".join(" ".join(w + ":O" for w in ws) + " <=> " + intent + "\n" for ws, intent in rows)
    exs = D.read_examples(_write(tmp_path, "a.txt", text), "atis")
    assert [(e["tokens"], e["intent"]) for e in exs] == rows


def test_crlf_and_split_lines(tmp_path):
    text = "EU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\n"
    lf = D.read_conll(_write(tmp_path, "lf.txt", text))
    assert D.read_conll(_write(tmp_path, "crlf.txt", text.replace("\n", "\r\n"))) == lf
    assert lf[0]["col2"] == ["B-ORG", "O"]
    # user text (predict input): one record per '\n'-line, whatever else the line holds
    assert D.split_lines("a\u2028b c\r\nd\x85e\x0cf\n\ng\n") == ["a\u2028b c", "d\x85e\x0cf", "", "g"]
    assert D.split_lines("\ufeffx\ny") == ["x", "y"] and D.split_lines("") == [] and D.split_lines("\n") == [""]


# ---------------------------------------------------------------------------------------------------------------
# 5. a UTF-8 byte order mark is not text

def test_bom_conll_docstart(tmp_path):
    p = _write(tmp_path, "a.txt", "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\n", bom=True)
    exs = D.read_conll(p, ["word", "pos", "chunk", "ner"])
    assert [e["tokens"] for e in exs] == [["EU"]]


def test_bom_every_reader(tmp_path):
    u = D.read_conllu(_write(tmp_path, "a.conllu", "# sent_id = 7\n" + _conllu_line(1, "Hi") + "\n", bom=True))
    assert u[0]["sent_id"] == "7" and u[0]["tokens"] == ["Hi"]
    j = D.read_jsonl(_write(tmp_path, "a.jsonl", '{"tokens": ["Hi"], "label": "x"}\n', bom=True))
    assert j == [{"tokens": ["Hi"], "label": "x"}]
    a = D.read_examples(_write(tmp_path, "a.atis", "hi:O there:O <=> greet\n", bom=True), "atis")
    assert a[0]["tokens"] == ["hi", "there"]
    c = D.read_conll(_write(tmp_path, "b.txt", "# id = 3\nHi X\n", bom=True))
    assert c == [{"tokens": ["Hi"], "col1": ["X"], "id": "3"}]


# ---------------------------------------------------------------------------------------------------------------
# 5. bytes that are not UTF-8: the file and the line

BAD_BYTES = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80"]


def _corrupt(text, rng):
    """``text`` encoded with a bad byte sequence planted at a random line; returns (bytes, line number)."""
    lines = text.split("\n")
    i = rng.randrange(len(lines) - 1)
    pos = rng.randint(0, len(lines[i]))
    bad = rng.choice(BAD_BYTES)
    data = b"\n".join(l.encode("utf-8") if j != i else
                      lines[i][:pos].encode("utf-8") + bad + lines[i][pos:].encode("utf-8")
                      for j, l in enumerate(lines))
    return data, i + 1, pos + 1


@pytest.mark.parametrize("fmt", ["conllu", "conll", "jsonl", "atis"])
def test_not_utf8_names_file_and_line(tmp_path, fmt, _fresh_seed):
    rng = random.Random(_fresh_seed)
    n = rng.randint(3, 12)
    if fmt == "conllu":
        text = "".join("# sent_id = %d\n%s\n\n" % (i, _conllu_line(1, _word(rng))) for i in range(n))
    elif fmt == "conll":
        text = "".join("%s X\n\n" % _word(rng) for _ in range(n))
    elif fmt == "jsonl":
        text = "".join(json.dumps({"tokens": [_word(rng)]}, ensure_ascii=False) + "\n" for _ in range(n))
    else:
        text = "".join("%s:O <=> i\n" % _word(rng) for _ in range(n))
    data, line, col = _corrupt(text, rng)
    p = tmp_path / ("bad." + fmt)
    p.write_bytes(data)
    with pytest.raises(D.DataFormatError, match=r"bad\.%s:%d: not valid UTF-8 .*column %d" % (fmt, line, col)):
        D.read_examples(str(p), fmt)


def test_utf16_file_says_so(tmp_path):
    p = tmp_path / "a.conllu"
    p.write_bytes(("# sent_id = 1\n" + _conllu_line(1, "Hi") + "\n").encode("utf-16"))
    with pytest.raises(D.DataFormatError, match=r"a\.conllu:1: not valid UTF-8 .*column 1.*UTF-16 byte order mark"):
        D.read_conllu(str(p))


def test_atis_package_file_not_utf8(tmp_path, monkeypatch):
    from fastmtl.data import atis

    p = tmp_path / "test"
    p.write_bytes(b"hi:O <=> greet\nb\xffad:O <=> x\n")
    monkeypatch.setattr(atis, "_package_file", lambda name: p)
    with pytest.raises(D.DataFormatError, match=r"test:2: not valid UTF-8 .*column 2"):
        D.load_atis("test")


# ---------------------------------------------------------------------------------------------------------------
# 5. JSONL: deep nesting, huge numbers, values that are not labels

def _jsonl_error(tmp_path, bad_line, msg):
    good = json.dumps({"tokens": ["a", "b"], "tags": ["X", "O"]})
    p = _write(tmp_path, "bad.jsonl", good + "\n\n" + bad_line + "\n" + good + "\n")
    with pytest.raises(D.DataFormatError, match=r"bad\.jsonl:3: .*" + msg):
        D.read_jsonl(p)


@pytest.mark.parametrize("depth", [10 ** 5, 10 ** 6])
def test_jsonl_deep_nesting(tmp_path, depth):
    _jsonl_error(tmp_path, '{"tokens": ["a"], "x": ' + "[" * depth + "]" * depth + "}", "nested too deeply")
    _jsonl_error(tmp_path, '{"tokens": ["a"], "x": ' + '{"a": ' * depth + "1" + "}" * depth + "}", "too deeply")


def test_jsonl_huge_integer(tmp_path, _fresh_seed):
    rng = random.Random(_fresh_seed)
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(5000, 50000)))
    _jsonl_error(tmp_path, '{"tokens": ["a"], "label": 9%s}' % digits, "invalid JSON")
    _jsonl_error(tmp_path, '{"tokens": ["a"], "tags": [9%s]}' % digits, "invalid JSON")


@pytest.mark.parametrize("bad,msg", [
    ('{"tokens": ["a", "b"], "tags": ["O", null]}', r"'tags': label 2 \(token 'b'\) is null"),
    ('{"tokens": ["a", "b"], "tags": [["O"], "O"]}', r"'tags': label 1 \(token 'a'\) is a list"),
    ('{"tokens": ["a", "b"], "tags": ["O", {"t": "O"}]}', r"'tags': label 2 \(token 'b'\) is an object"),
    ('{"tokens": ["a", "b"], "tags": ["O", 1.5]}', r"'tags': label 2 \(token 'b'\) is a number"),
    ('{"tokens": ["a"], "label": {"name": "x"}}', r"'label' is an object"),
    ('{"tokens": ["a"], "label": 0.5}', r"'label' is a number"),
])
def test_jsonl_labels_that_are_not_labels(tmp_path, bad, msg):
    _jsonl_error(tmp_path, bad, msg)


def test_jsonl_labels_that_are(tmp_path):
    """Guard (passes before and after the fix): integer labels stay labels, a null sentence label is no label."""
    p = _write(tmp_path, "a.jsonl", '{"tokens": ["a", "b"], "tags": ["O", 3], "label": null}\n'
                                    '{"tokens": ["c"], "tags": ["B"], "label": 7}\n')
    exs = D.read_jsonl(p)
    assert exs == [{"tokens": ["a", "b"], "tags": ["O", "3"]}, {"tokens": ["c"], "tags": ["B"], "label": "7"}]


# ---------------------------------------------------------------------------------------------------------------
# 5. CoNLL column names: no name twice

@pytest.mark.parametrize("columns,msg", [
    (["word", "pos", "pos"], "duplicate column name 'pos'"),
    (["word", "ner", "pos", "ner"], "duplicate column name 'ner'"),
    (["word", "tokens", "ner"], "named 'tokens'"),
    (["word", "", "ner"], "column 2 has an empty name"),
])
def test_conll_bad_column_names(tmp_path, columns, msg):
    p = _write(tmp_path, "a.txt", "EU NNP B-NP B-ORG\n" if len(columns) == 4 else "EU NNP B-ORG\n")
    with pytest.raises(ValueError, match=msg):
        D.read_conll(p, columns)
    with pytest.raises(ValueError, match=msg):
        D.read_examples(p, "conll", columns)
    with pytest.raises(ValueError, match=msg):
        D.parse_columns(",".join(columns))


def test_conll_column_names_from_the_command_line(tmp_path):
    assert D.parse_columns("word, pos ,ner") == ["word", "pos", "ner"]
    p = _write(tmp_path, "a.txt", "EU NNP B-ORG\n")
    assert D.read_conll(p, "word,pos,ner") == [{"tokens": ["EU"], "pos": ["NNP"], "ner": ["B-ORG"]}]
    with pytest.raises(ValueError, match="column 3 name 3 is not a string"):
        D.parse_columns(["w", "pos", 3, ""])


@pytest.mark.parametrize("fmt,text,line,key", [
    ("conllu", "# sent_id = 1\n# tokens = hijack\n" + _conllu_line(1, "Hi") + "\n", 2, "tokens"),
    ("conllu", "# upos = NOUN\n" + _conllu_line(1, "Hi") + "\n", 1, "upos"),
    ("conll", "# ner = PER\nEU NNP B-ORG\n", 1, "ner"),
    ("conll", "Bye X O\n\n# id = 1\n# tokens = x\nEU NNP B-ORG\n", 4, "tokens"),
])
def test_comment_key_naming_a_token_field(tmp_path, fmt, text, line, key):
    p = _write(tmp_path, "a." + fmt, text)
    with pytest.raises(D.DataFormatError, match=r"a\.%s:%d: comment '# %s = \.\.\.' names the token field"
                       % (fmt, line, key)):
        D.read_examples(p, fmt, ["word", "pos", "ner"] if fmt == "conll" else None)
