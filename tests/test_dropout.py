"""fastmtl.functional.dropout: torch.nn.functional.dropout's contract with a cheaper mask on the CPU."""
import pytest
import torch

import fastmtl
from fastmtl.functional import dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mask_rate_scale_and_gradient(p, dtype):
    torch.manual_seed(0)
    x = (torch.rand(400, 500, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    y = dropout(x, p)
    kept = y != 0
    n = kept.numel()
    # the dropped fraction is Binomial(n, p) / n: within 5 standard deviations
    assert abs((~kept).double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], (x[kept].double() / (1 - p)).to(dtype))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g.double() / (1 - p), 0.0).to(dtype))


def test_identity_zero_and_errors():
    x = torch.randn(7, 5, requires_grad=True)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0) is x
    z = dropout(x, 1.0)
    assert torch.equal(z, torch.zeros_like(x))
    z.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    for bad in (-0.1, 1.5, float("nan"), "0.3", True):
        with pytest.raises(ValueError, match="dropout probability"):
            dropout(x, bad)
    with pytest.raises(ValueError, match="dropout probability"):  # what torch raises for the same mistake
        torch.nn.functional.dropout(x, 1.5)


def test_reproducible_under_manual_seed_and_inplace_is_torchs():
    x = torch.randn(64, 33)
    torch.manual_seed(3)
    a = dropout(x, 0.4)
    torch.manual_seed(3)
    b = dropout(x, 0.4)
    assert torch.equal(a, b)
    y = x.clone()
    torch.manual_seed(3)
    out = dropout(y, 0.4, inplace=True)
    assert out is y  # inplace: torch's own dropout
    torch.manual_seed(3)
    assert torch.equal(out, torch.nn.functional.dropout(x.clone(), 0.4, True, True))


def test_vmap_with_different_randomness():
    x = torch.ones(3, 1000)
    y = torch.func.vmap(lambda r: dropout(r, 0.5), randomness="different")(x)
    assert not torch.equal(y[0], y[1])
    assert set(y.unique().tolist()) <= {0.0, 2.0}


def test_model_uses_it_in_training_only(monkeypatch):
    import fastmtl.model as fm

    calls = []
    real = fm.dropout
    monkeypatch.setattr(fm, "dropout", lambda x, p, training: calls.append(training) or real(x, p, training))
    torch.manual_seed(0)
    m = fastmtl.MultiTaskLSTM(50, 8, 6, [fastmtl.nn.SequenceTask("a", 3)], dropout=0.5)
    ids, lengths = torch.randint(1, 50, (4, 5)), torch.tensor([5, 4, 3, 2])
    m.eval()
    e1, e2 = m.encode(ids, lengths), m.encode(ids, lengths)
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    m.train()
    torch.manual_seed(1)
    t1 = m.encode(ids, lengths)
    torch.manual_seed(1)
    t2 = m.encode(ids, lengths)
    assert all(torch.equal(t1[k], t2[k]) for k in t1) and not all(torch.equal(t1[k], e1[k]) for k in t1)
    assert calls and set(calls) == {False, True}  # the model's dropout is fastmtl.functional.dropout
