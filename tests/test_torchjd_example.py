"""examples/torchjd_mtl.py: TorchJD's mtl_backward + UPGrad on a model built on fastmtl.nn.LSTM gives the Jacobian
and the update that the same model on torch.nn.LSTM gets (float64), and trains."""
import importlib.util
import os

import pytest
import torch

pytest.importorskip("torchjd.autojac")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location("torchjd_mtl", os.path.join(ROOT, "examples", "torchjd_mtl.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_mtl_backward_on_fastmtl_lstm_equals_torch_lstm():
    ex = _example()
    from torchjd.autojac import mtl_backward

    import fastmtl

    g = torch.Generator().manual_seed(3)
    batch = ex.random_batch(6, 9, 50, 4, 7, g)
    models = {}
    for name, lstm in (("fastmtl", fastmtl.nn.LSTM), ("torch", torch.nn.LSTM)):
        torch.manual_seed(0)
        models[name] = ex.JointModel(50, 8, 12, 4, 7, lstm=lstm).double()
    models["fastmtl"].load_state_dict(models["torch"].state_dict())
    jac, grads = {}, {}
    for name, m in models.items():
        feats = m.features(batch[0], batch[1])
        mtl_backward(m.losses(feats, *batch[1:]), features=feats)
        jac[name] = [p.jac.clone() for p in m.shared_parameters()]
        grads[name] = [p.grad.clone() for p in (m.intent.weight, m.slots.weight)]
    for a, b in zip(jac["fastmtl"], jac["torch"]):
        assert a.shape[0] == 2  # one row per task
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(grads["fastmtl"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

    # and a whole UPGrad step moves both models the same way
    for m in models.values():
        for p in m.parameters():
            p.grad = None
            if hasattr(p, "jac"):
                del p.jac
    steps = {}
    for name, m in models.items():
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        losses = ex.jacobian_step(m, opt, *batch)
        steps[name] = (losses, [p.detach().clone() for p in m.parameters()])
    assert steps["fastmtl"][0] == pytest.approx(steps["torch"][0], rel=1e-12)
    for a, b in zip(steps["fastmtl"][1], steps["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
