"""The train benchmark compares like with like: its plain-PyTorch model computes the same loss and gradients as
fastmtl.MultiTaskLSTM given the same weights (both model configurations it measures)."""
import pytest
import torch

from fastmtl.bench.train import PlainMultiTaskLSTM
from fastmtl.model import CharCNN, MultiTaskLSTM
from fastmtl.nn import SequenceTask, TokenTask


@pytest.mark.parametrize("model", ["default", "basic", "crf"])
def test_plain_baseline_matches_fastmtl(model, _fresh_seed):
    if model == "crf":
        pytest.importorskip("torchcrf")
    V, E, H, NI, NS, B, T = 37, 12, 9, 5, 11, 7, 13
    words = ["<pad>", "<unk>"] + ["w%d%s" % (i, "xyz"[i % 3] * (i % 4)) for i in range(V - 2)]
    full = model in ("default", "crf")
    crf = model == "crf"
    pooling, ls = ("max", 0.1) if full else ("last", 0.0)
    char = dict(char_words=words, char_dim=4, char_filters=6, char_kernel=3) if full else {}
    slot_task = TokenTask("slots", NS, crf=True) if crf else TokenTask("slots", NS, label_smoothing=ls)
    fm = MultiTaskLSTM(V, E, H, [SequenceTask("intent", NI, pooling=pooling, label_smoothing=ls), slot_task],
                       dropout=0.5, **char).double()
    plain_char = CharCNN(words, 4, 6, 3) if full else None
    pm = PlainMultiTaskLSTM(V, E, H, NI, NS, 0.5, plain_char, pooling, ls, crf=crf).double()
    sd = fm.state_dict()
    pm.embedding.weight.data.copy_(sd["embedding.weight"])
    if plain_char is not None:
        plain_char.load_state_dict({k[len("char_cnn."):]: v for k, v in sd.items() if k.startswith("char_cnn.")})
    pm.lstm.load_state_dict({k[len("encoder.lstm."):]: v for k, v in sd.items() if k.startswith("encoder.lstm.")})
    for n in ("intent", "slots"):
        getattr(pm, n).load_state_dict({"weight": sd["heads.top.%s.weight" % n], "bias": sd["heads.top.%s.bias" % n]})
    if crf:
        pm.crf.load_state_dict({k: sd["heads.top.slots." + k] for k in ("transitions", "start_transitions",
                                                                        "end_transitions")})
    fm.eval()
    pm.eval()
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    ids = torch.randint(2, V, (B, T))
    valid = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    ids = ids.masked_fill(~valid, 0)
    intent = torch.randint(0, NI, (B,))
    slots = torch.randint(0, NS, (B, T)).masked_fill(~valid, -100)
    lf = fm(ids, lengths, {"intent": intent, "slots": slots}).loss
    lp = pm(ids, lengths, intent, slots)
    torch.testing.assert_close(lf, lp, rtol=1e-10, atol=1e-10)
    gf = torch.autograd.grad(lf, [fm.embedding.weight, fm.heads.top.intent.weight, fm.encoder.lstm.weight_hh_l0])
    gp = torch.autograd.grad(lp, [pm.embedding.weight, pm.intent.weight, pm.lstm.weight_hh_l0])
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
