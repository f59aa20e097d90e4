"""TorchJD's Gramian weightings as fastmtl gradient methods (--weighting torchjd:NAME, the [torchjd] extra): each
gives the update TorchJD's own aggregator gives on the same Jacobian, trains, and a missing TorchJD is one clear
error."""
import random
import sys

import pytest
import torch

from fastmtl import train as T
from fastmtl import weighting as W
from fastmtl.weighting import registry
from fastmtl.weighting.torchjd import TORCHJD_METHODS
from train_data import TINY, write_splits

aggregation = pytest.importorskip("torchjd.aggregation")

NAMES = ["torchjd:" + n for n in TORCHJD_METHODS]


def test_every_torchjd_method_is_registered_with_its_extra():
    for n in NAMES:
        m = registry.method(n)
        assert m.extra == "torchjd" and m.level == "param" and issubclass(m.cls, W.GradientMethod)


@pytest.mark.parametrize("name", NAMES)
def test_the_update_is_torchjds_aggregation(name):
    """fastmtl's combination sum_k c_k g_k of the per-task gradients equals TorchJD's aggregator applied to the
    Jacobian whose rows are those gradients (float64)."""
    cls_name = TORCHJD_METHODS[name[len("torchjd:"):]][0]
    options = registry.method_kwargs(name, T.TrainConfig())
    for K, n, seed in ((2, 9, 0), (3, 20, 1), (5, 40, 2)):
        g = torch.Generator().manual_seed(seed)
        J = torch.randn(K, n, generator=g, dtype=torch.float64)
        J[1] -= 0.8 * J[0]  # some conflict
        ours = W.make_weighting(name, ["t%d" % k for k in range(K)], None, **options)
        torch.manual_seed(seed)  # (PCGrad's task orders come from torch's generator: the same draws both sides)
        c = ours(J @ J.T, ours.tasks)
        agg = getattr(aggregation, cls_name[:-len("Weighting")], None)
        torch.manual_seed(seed)
        want = agg(**options)(J) if agg is not None else getattr(aggregation, cls_name)(**options)(J @ J.T) @ J
        torch.testing.assert_close(c @ J, want.to(torch.float64), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["torchjd:upgrad", "torchjd:dualproj"])
def test_a_torchjd_method_trains(tmp_path, name):
    files = write_splits(tmp_path, random.Random(4))
    res = T.train(T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=None,
                                tasks=["tags:token:tags", "label:sequence:label"], epochs=1, weighting=name, **TINY))
    init = T.train(T.TrainConfig(format="jsonl", train=files["train"], dev=files["dev"], test=None,
                                 tasks=["tags:token:tags", "label:sequence:label"], epochs=0, weighting=name, **TINY))
    moved = [k for k, v in res["model"].state_dict().items() if not torch.equal(v, init["model"].state_dict()[k])]
    assert any(k.startswith("embedding") or "encoder" in k for k in moved)
    assert set(res["history"][0]["task_weights"]) == {"tags", "label"}


def test_without_torchjd_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match=r'torchjd:upgrad needs TorchJD: pip install "fastmtl\[torchjd\]"'):
        W.make_weighting("torchjd:upgrad", ["a", "b"])
