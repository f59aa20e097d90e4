"""Trainer callbacks: the hooks in order with the run's state, stopping from a callback, --callback module:Class and
the TOML list, clear errors for what is not a callback, and the TensorBoard callback read back from its event files."""
import json
import os
import random
import sys

import pytest

from fastmtl import cli
from fastmtl.training import Callback, Trainer, TrainConfig, TensorBoard
from fastmtl.training.callbacks import HOOKS, load_callback
from train_data import TINY, TASKS, data_args, write_splits


@pytest.fixture
def files(tmp_path, _fresh_seed):
    return write_splits(tmp_path, random.Random(_fresh_seed), (("train", 40), ("dev", 12), ("test", 12)))


def config(files, **kw):
    base = dict(TINY, format="jsonl", train=files["train"], dev=files["dev"], test=files["test"], tasks=list(TASKS),
                epochs=2, patience=50)
    base.update(kw)
    return TrainConfig(**base)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, trainer):
        self.events.append(("fit_start", trainer.state.epoch, trainer.state.global_step))

    def on_epoch_start(self, trainer, epoch):
        self.events.append(("epoch_start", epoch, trainer.state.epoch_steps))

    def on_step_end(self, trainer, step):
        assert set(step.losses) <= {"tags", "label"} and step.tokens > 0 and step.examples > 0
        self.events.append(("step", step.epoch, step.step, step.global_step, step.loss))

    def on_evaluate(self, trainer, split, metrics):
        self.events.append(("evaluate", split, sorted(metrics)))

    def on_epoch_end(self, trainer, record):
        assert trainer.state.history[-1] is record and trainer.state.epoch == record["epoch"]
        self.events.append(("epoch_end", record["epoch"], trainer.state.improved))

    def on_save(self, trainer, path, kind):
        assert os.path.isfile(path)
        self.events.append(("save", kind, os.path.basename(path)))

    def on_fit_end(self, trainer, result):
        self.events.append(("fit_end", result["best_epoch"], sorted(result["test"])))


def test_hooks_in_order_with_the_run_state(files, tmp_path):
    rec = Recorder()
    out = str(tmp_path / "run")
    trainer = Trainer(config(files, output_dir=out), callbacks=[rec])
    result = trainer.fit()
    ev = rec.events
    kinds = [e[0] for e in ev]
    assert kinds[0] == "fit_start" and ev[0][1:] == (0, 0) and kinds[-1] == "fit_end"
    steps = [e for e in ev if e[0] == "step"]
    per_epoch = [e[2] for e in ev if e[0] == "epoch_start"]
    assert len(per_epoch) == 2 and len(steps) == sum(per_epoch) == trainer.state.global_step
    assert [s[3] for s in steps] == list(range(1, len(steps) + 1))  # global steps count from 1
    assert [s[2] for s in steps if s[1] == 1] == list(range(per_epoch[1]))
    # each epoch: start, its steps, dev, the saves of the built-in Checkpoints callback (best.pt where it improved,
    # last.pt always; the built-in callbacks come first), end
    i = 1
    for epoch in range(2):
        assert ev[i][:2] == ("epoch_start", epoch)
        i += 1 + per_epoch[epoch]
        assert ev[i][:2] == ("evaluate", "dev") and ev[i][2] == ["frame_accuracy", "label", "tags"]
        i += 1
        saves = []
        while ev[i][0] == "save":
            saves.append(ev[i][1:])
            i += 1
        assert ev[i][:2] == ("epoch_end", epoch + 1)
        assert saves == ([("best", "best.pt")] if ev[i][2] else []) + [("last", "last.pt")]
        i += 1
    assert ev[-2][:2] == ("evaluate", "test")
    assert ev[-1] == ("fit_end", result["best_epoch"], ["frame_accuracy", "label", "tags"])
    assert trainer.is_setup and trainer.state.epoch == 2 and len(trainer.state.history) == 2
    # the mean of the steps' losses is the epoch's train loss
    rec1 = trainer.state.history[0]
    l1 = [s[4] for s in steps if s[1] == 0]
    assert abs(sum(l1) / len(l1) - rec1["train_loss"]) < 1e-9


def test_a_callback_stops_the_run(files):
    class StopAfterOne(Callback):
        def on_epoch_end(self, trainer, record):
            trainer.state.should_stop = True
            trainer.state.stop_reason = "enough"

    res = Trainer(config(files, epochs=5), callbacks=[StopAfterOne()]).fit()
    assert len(res["history"]) == 1 and res["test"] is not None


def test_callbacks_do_not_change_the_run(files):
    from fastmtl.train import train

    plain = Trainer(config(files)).fit()
    rec = Recorder()
    watched = train(config(files), callbacks=[rec])
    assert rec.events[-1][0] == "fit_end"
    assert watched["test"] == plain["test"]
    assert [h["train_loss"] for h in watched["history"]] == [h["train_loss"] for h in plain["history"]]


CB_MODULE = '''
import json, os
from fastmtl.training import Callback

class Marker(Callback):
    def on_epoch_end(self, trainer, record):
        with open(os.path.join(trainer.out_dir, "marker.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": record["epoch"], "step": trainer.state.global_step}) + "\\n")
'''


def _module(tmp_path, name):
    d = tmp_path / "cbmods"
    d.mkdir(exist_ok=True)
    (d / ("%s.py" % name)).write_text(CB_MODULE)
    return d


def test_cli_callback_module_class_from_the_current_folder(files, tmp_path, monkeypatch, capsys):
    d = _module(tmp_path, "fastmtl_test_cb_cli")
    monkeypatch.chdir(d)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(d), os.getcwd())])
    out = str(tmp_path / "run")
    from train_data import TINY_ARGS

    rc = cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "2", "--output-dir", out,
                                                              "--callback", "fastmtl_test_cb_cli:Marker"])
    assert rc == 0
    capsys.readouterr()
    with open(os.path.join(out, "marker.jsonl")) as f:
        assert [json.loads(l)["epoch"] for l in f] == [1, 2]
    with open(os.path.join(out, "log.jsonl")) as f:  # the built-in callbacks still run
        assert len(f.readlines()) == 2


def test_toml_callbacks_list(files, tmp_path, monkeypatch):
    d = _module(tmp_path, "fastmtl_test_cb_toml")
    monkeypatch.syspath_prepend(str(d))
    from fastmtl.training.config import read_toml

    run = tmp_path / "run.toml"
    run.write_text('callbacks = ["fastmtl_test_cb_toml:Marker"]\nepochs = 1\n')
    cfg = read_toml(run)
    assert cfg["callbacks"] == ["fastmtl_test_cb_toml:Marker"]
    out = str(tmp_path / "run")
    Trainer(config(files, output_dir=out, **cfg)).fit()
    assert os.path.exists(os.path.join(out, "marker.jsonl"))


@pytest.mark.parametrize("spec, exc, words", [
    ("nope", ValueError, "--callback must be tensorboard or module:Class"),
    ("a b:C", ValueError, "--callback must be"),
    ("os.path:", ValueError, "--callback must be"),
    ("fastmtl_no_such_module_x:C", ValueError, "cannot import fastmtl_no_such_module_x"),
    ("json:Nope", ValueError, "json has no Nope"),
    ("json:dumps", ValueError, "dumps is not a class"),
    ("fastmtl.training:TrainConfig", ValueError, "has none of the hooks"),
    ("fastmtl.training.callbacks:StepInfo", ValueError, "made with no arguments"),
])
def test_bad_callback_specs(spec, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(")):
        load_callback(spec)


def test_bad_callbacks_config_and_objects(files):
    with pytest.raises(ValueError, match="--callback must be"):
        TrainConfig(callbacks=["tensorboard", 3]).validate()
    with pytest.raises(ValueError, match="--callback must be"):
        TrainConfig(callbacks="tensorboard").validate()

    class Typo(Callback):
        def on_epoch_ends(self, trainer, record):
            pass

    with pytest.raises(TypeError, match="on_epoch_ends, which is no hook"):
        Trainer(config(files), callbacks=[Typo()])
    with pytest.raises(TypeError, match="has none of the hooks"):
        Trainer(config(files), callbacks=[object()])
    with pytest.raises(TypeError, match=r"Recorder is a class; give an instance \(Recorder\(\)\)"):
        Trainer(config(files), callbacks=[Recorder])


def test_cli_bad_callback_is_one_line(files, capsys):
    from train_data import TINY_ARGS, one_line_error

    rc = cli.main(["train"] + data_args(files) + TINY_ARGS + ["--epochs", "1", "--callback", "json:dumps"])
    assert rc != 0
    one_line_error(capsys, "--callback json:dumps", "not a class")


def test_every_hook_of_the_base_class_is_declared():
    assert sorted(n for n in dir(Callback) if n.startswith("on_")) == sorted(HOOKS)


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files(files, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install "
                        "fastmtl[tensorboard])")
    out = str(tmp_path / "run")
    rec = Recorder()
    res = Trainer(config(files, output_dir=out, callbacks=["tensorboard"]), callbacks=[rec]).fit()
    ev = _events(os.path.join(out, "tensorboard"))
    steps = [e for e in rec.events if e[0] == "step"]
    assert [s for s, _ in ev["train/loss"]] == [e[3] for e in steps]
    assert [v for _, v in ev["train/loss"]] == pytest.approx([e[4] for e in steps], rel=1e-6)
    assert "train/loss/tags" in ev and "train/loss/label" in ev
    hist = res["history"]
    assert ev["epoch/train_loss"] == [(h["epoch"], pytest.approx(h["train_loss"], rel=1e-6)) for h in hist]
    assert ev["dev/tags/f1"] == [(h["epoch"], pytest.approx(h["dev"]["tags"]["f1"], rel=1e-6)) for h in hist]
    assert ev["dev/label/accuracy"] == [(h["epoch"], pytest.approx(h["dev"]["label"]["accuracy"], rel=1e-6))
                                        for h in hist]
    assert [s for s, _ in ev["epoch/lr"]] == [1, 2] and "epoch/task_weights/tags" in ev
    assert ev["test/frame_accuracy"] == [(res["best_epoch"], pytest.approx(res["test"]["frame_accuracy"]))]


def test_tensorboard_resume_continues_without_repeating_steps(files, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    out = str(tmp_path / "run")

    class Interrupt(Callback):
        def on_step_end(self, trainer, step):
            if step.epoch == 1 and step.step == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config(files, output_dir=out, epochs=3, callbacks=["tensorboard"]), callbacks=[Interrupt()]).fit()
    full = Trainer(config(files, epochs=3)).fit()
    res = Trainer(config(files, output_dir=out, epochs=3, callbacks=["tensorboard"], resume=True)).fit()
    assert res["test"] == full["test"]
    ev = _events(os.path.join(out, "tensorboard"))
    steps = [s for s, _ in ev["train/loss"]]
    assert steps == list(range(1, len(steps) + 1))  # the interrupted epoch's steps are not there twice
    assert [s for s, _ in ev["epoch/train_loss"]] == [1, 2, 3]


def test_tensorboard_needs_a_folder(files):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    with pytest.raises(ValueError, match="tensorboard callback writes under --output-dir"):
        Trainer(config(files, callbacks=["tensorboard"])).fit()
    with pytest.raises(ValueError, match="every must be an integer"):
        TensorBoard(every=0)

