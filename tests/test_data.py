"""Data layer: ATIS from the installed package, CoNLL-U, CoNLL columns, JSONL, vocabularies, batching."""
import json
import random

import pytest
import torch

from fastmtl import data as D


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_atis_splits():
    train, dev, test = D.load_atis("train"), D.load_atis("dev"), D.load_atis("test")
    assert (len(train), len(dev), len(test)) == (4478, 500, 893)
    ex = train[0]
    assert ex["tokens"][:3] == ["i", "want", "to"] and ex["intent"] == "atis_flight"
    assert len(ex["slots"]) == len(ex["tokens"]) and "B-fromloc.city_name" in ex["slots"]
    intents = {e["intent"] for e in train}
    assert "atis_flight;atis_airfare" in intents  # multi-intents are classes of their own
    assert any(e["intent"] not in intents for e in test)  # unseen labels exist (and count as errors)
    with pytest.raises(ValueError, match="split"):
        D.load_atis("valid")


def test_atis_parse_errors():
    with pytest.raises(D.DataFormatError, match=r"f.txt:2: .*'<=>'"):
        D.parse_atis_lines(["a:O <=> x", "a:O b:O"], path="f.txt")
    with pytest.raises(D.DataFormatError, match=r"f.txt:1: token 'b' "):
        D.parse_atis_lines(["a:O b <=> x"], path="f.txt")


CONLLU = """# sent_id = 1
# intent = greet
1\tHello\thello\tINTJ\tUH\t_\t0\troot\t_\t_
2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tgo\tgo\tVERB\tVB\t_\t1\tparataxis\t_\t_

# intent = other
1\tBye\tbye\tINTJ\tUH\t_\t0\troot\t_\t_
1.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t0:root\t_
"""


def test_conllu(tmp_path):
    p = _write(tmp_path, "a.conllu", CONLLU)
    exs = D.read_examples(p)
    assert len(exs) == 2
    assert exs[0]["tokens"] == ["Hello", "do", "n't", "go"]
    assert exs[0]["upos"] == ["INTJ", "AUX", "PART", "VERB"]
    assert exs[0]["deprel"][0] == "root" and exs[0]["intent"] == "greet" and exs[0]["sent_id"] == "1"
    assert exs[1]["tokens"] == ["Bye"] and exs[1]["intent"] == "other"
    specs = [D.parse_task("upos:token:upos"), D.parse_task("intent:sequence")]
    D.check_tasks(exs, specs, p)
    with pytest.raises(D.DataFormatError, match="level 'sequence'"):
        D.check_tasks(exs, [D.parse_task("x:token:intent")], p)
    with pytest.raises(D.DataFormatError, match="no field 'nope'"):
        D.check_tasks(exs, [D.parse_task("x:token:nope")], p)


@pytest.mark.parametrize("bad,line,msg", [
    ("1\tA\ta\tX\n", 1, "10 tab-separated columns, found 4"),
    ("1\tA\ta\tX\tX\t_\t0\troot\t_\t_\n3\tB\tb\tX\tX\t_\t0\troot\t_\t_\n", 2, "token ID '3' where 2"),
])
def test_conllu_malformed(tmp_path, bad, line, msg):
    p = _write(tmp_path, "bad.conllu", bad)
    with pytest.raises(D.DataFormatError) as e:
        D.read_conllu(p)
    assert "bad.conllu:%d" % line in str(e.value) and msg in str(e.value)


def test_conll_columns(tmp_path):
    text = "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n"
    p = _write(tmp_path, "a.txt", text)
    exs = D.read_conll(p, ["word", "pos", "chunk", "ner"])
    assert [e["tokens"] for e in exs] == [["EU", "rejects"], ["Peter"]]
    assert exs[0]["ner"] == ["B-ORG", "O"] and exs[1]["pos"] == ["NNP"]
    assert D.read_conll(p)[0]["col3"] == ["B-ORG", "O"]
    bad = _write(tmp_path, "b.txt", "a X O\nb Y\n")
    with pytest.raises(D.DataFormatError, match=r"b.txt:2: expected 3 columns"):
        D.read_conll(bad)
    with pytest.raises(D.DataFormatError, match="4 columns but 2 column names"):
        D.read_conll(p, ["word", "pos"])


def test_jsonl(tmp_path):
    rows = [{"tokens": ["a", "b"], "tags": ["B-X", "O"], "label": "p"}, {"tokens": ["c"], "tags": ["O"], "label": 3}]
    p = _write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    exs = D.read_examples(p)
    assert exs[1]["label"] == "3" and exs[0]["tags"] == ["B-X", "O"]
    for bad, msg in [('{"tokens": ["a"], "t": ["x", "y"]}', "2 labels for 1 tokens"),
                     ('{"tokens": []}', "non-empty list"), ("{oops", "invalid JSON"), ("[1]", "JSON object")]:
        q = _write(tmp_path, "bad.jsonl", json.dumps(rows[0]) + "\n" + bad + "\n")
        with pytest.raises(D.DataFormatError, match=r"bad.jsonl:2: .*" + msg.replace("[", r"\[")):
            D.read_jsonl(q)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_examples(str(tmp_path / "missing.jsonl"))


def test_vocab_unknown_words():
    sents = [["Flight", "to", "Boston"], ["flight", "at", "838"], ["to", "Denver"]]
    v = D.Vocab.build(sents, min_count=1)
    assert v.itos[:2] == ["<pad>", "<unk>"]
    assert v.encode(["FLIGHT", "123", "zzz"]) == [v.stoi["flight"], v.stoi["000"], D.Vocab.UNK]
    v2 = D.Vocab.build(sents, min_count=2)
    assert v2.encode(["boston", "to", "flight"]) == [1, v2.stoi["to"], v2.stoi["flight"]]
    p = v.unk_probabilities(0.25)
    assert p[0] == p[1] == 0 and p[v.stoi["boston"]] == pytest.approx(0.25 / 1.25)
    assert p[v.stoi["flight"]] == pytest.approx(0.25 / 2.25)
    assert D.Vocab.from_state_dict(v.state_dict()).encode(["to"]) == v.encode(["to"])
    with pytest.raises(ValueError, match="min_count"):
        D.Vocab.build(sents, min_count=0)


def test_bucketing_and_collate(_fresh_seed):
    rng = random.Random(_fresh_seed)
    lengths = [rng.randint(1, 40) for _ in range(503)]
    batches = D.bucket_batches(lengths, 16, shuffle=True, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(503))
    assert batches == D.bucket_batches(lengths, 16, shuffle=True, seed=3)
    assert batches != D.bucket_batches(lengths, 16, shuffle=True, seed=4)
    # buckets: the padding overhead is far below a random split's
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.2 * sum(lengths)
    ordered = D.bucket_batches(lengths, 16, shuffle=False)
    assert [lengths[i] for b in ordered for i in b] == sorted(lengths)

    specs = [D.TaskSpec("tag", "token", "tag"), D.TaskSpec("cls", "sequence", "cls")]
    exs = [{"tokens": ["a", "b", "c"], "tag": ["X", "Y", "X"], "cls": "p"}, {"tokens": ["b"], "tag": ["Z"]}]
    v = D.Vocab.build([e["tokens"] for e in exs])
    lvs = D.build_label_vocabs(exs[:1], specs)
    enc = D.encode_examples(exs, v, lvs, specs)
    b = D.collate(enc, [0, 1], specs)
    assert b.ids.shape == (2, 3) and b.lengths.tolist() == [3, 1] and b.ids[1, 1:].tolist() == [0, 0]
    assert b.targets["tag"][1].tolist() == [-100, -100, -100]  # unseen label "Z" and padding are ignored
    assert b.targets["cls"].tolist() == [0, -100]  # missing label is ignored
    probs = torch.ones(len(v))
    probs[:2] = 0
    assert D.collate(enc, [0, 1], specs, unk_probs=probs).ids.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="NAME:LEVEL:SOURCE"):
        D.parse_task("a:b:c:d")
    with pytest.raises(ValueError, match="level must be"):
        D.parse_task("a:word:b")
