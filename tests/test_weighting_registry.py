"""The weighting registry: every method declared once, and everything that names methods or their options derives
from it (config choices, command-line options, TOML keys, checks, the trainer's keyword arguments, the docs table)."""
import dataclasses
import os

import pytest

import fastmtl
from fastmtl import cli
from fastmtl import weighting as W
from fastmtl.training.config import TrainConfig
from fastmtl.weighting import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastmtl.__file__)))


def test_the_package_is_used():
    assert os.path.isdir(os.path.dirname(W.__file__)) and W.__file__.endswith(os.path.join("weighting", "__init__.py"))


def test_every_method_is_declared_once_and_everything_derives_from_it():
    assert W.STRATEGIES == tuple(registry.METHODS)
    assert set(W.GRADIENT_METHODS) == {n for n, m in registry.METHODS.items()
                                       if m.level in ("param", "rep") and m.extra is None}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert tuple(fields["weighting"].metadata["choices"]) == W.STRATEGIES
    for o in registry.config_options():
        f = fields[o.key]
        assert f.default == o.default and f.type is o.type and f.metadata["help"] == o.help
    for name, m in registry.METHODS.items():
        assert issubclass(m.cls, W.TaskWeighting)
        if m.extra is not None:  # built in tests/test_weighting_torchjd.py
            continue
        w = W.make_weighting(name, ["a", "b"], None, **registry.method_kwargs(name, TrainConfig()))
        assert type(w) is m.cls


def test_options_are_command_line_options_and_checked():
    p = cli.build_parser()
    text = p._subparsers._group_actions[0].choices["train"].format_help()
    for o in registry.config_options():
        assert "--" + o.key.replace("_", "-") in text
    cfg = TrainConfig(dwa_temperature=0.5, famo_lr=0.1, nash_update_every=3)
    assert registry.method_kwargs("dwa", cfg) == {"temperature": 0.5}
    assert registry.method_kwargs("famo", cfg) == {"lr": 0.1, "gamma": 0.01}
    assert registry.method_kwargs("nash_mtl", cfg) == {"update_every": 3}
    assert registry.method_kwargs("pcgrad", TrainConfig(seed=7)) == {"seed": 7}
    with pytest.raises(ValueError, match="--dwa-temperature"):
        TrainConfig(dwa_temperature=0.0).validate()
    with pytest.raises(ValueError, match="--nash-update-every"):
        TrainConfig(nash_update_every=0).validate()
    with pytest.raises(ValueError, match="unknown weighting 'nope'"):
        W.make_weighting("nope", ["a"])


def test_register_refuses_a_taken_name_or_key():
    with pytest.raises(ValueError, match="already registered"):
        W.register("static", W.StaticWeighting, "loss", "again")
    with pytest.raises(ValueError, match="level"):
        W.register("other", W.StaticWeighting, "nowhere", "x")
    with pytest.raises(ValueError, match="is taken"):
        W.register("other2", W.DWAWeighting, "loss", "x", [W.Option("temperature", "dwa_temperature")])
    assert "other" not in registry.METHODS and "other2" not in registry.METHODS


@pytest.mark.parametrize("extra", [None, "torchjd"])
def test_the_docs_tables_are_the_registry(extra):
    """docs/weighting-methods.md holds the registry's tables (written by tools/gen_docs.py)."""
    with open(os.path.join(REPO, "docs", "weighting-methods.md"), encoding="utf-8") as f:
        text = f.read()
    table = registry.markdown_table(extra)
    assert table.count("\n| `") == sum(m.extra == extra for m in registry.METHODS.values())  # one row per method
    assert "\n" + table + "\n" in text, \
        "docs/weighting-methods.md is not the registry's: regenerate with `python tools/gen_docs.py`"


def test_the_trainer_dispatches_through_the_hooks_only():
    """No method names or method types in the trainer: it calls train_step, check_model, epoch_end and reads
    every_task_every_step (a new method needs no edit there)."""
    with open(os.path.join(REPO, "fastmtl", "training", "trainer.py"), encoding="utf-8") as f:
        src = f.read()
    for name in registry.METHODS:
        assert '"%s"' % name not in src, name
    for cls in ("GradientMethod", "FAMOWeighting", "GradNormWeighting", "isinstance(self.weighting"):
        assert cls not in src, cls
    assert "self.weighting.train_step(" in src
