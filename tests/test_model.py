"""MultiTaskLSTM: sharing strategies, padding by lengths, last/first pooling, transfer, pretrained vectors."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import fastmtl
from fastmtl.checkpoint import save_checkpoint
from fastmtl.model import CharCNN
from fastmtl.nn import SequenceTask, TokenTask


def _tasks():
    return [SequenceTask("intent", 5), TokenTask("slots", 7)]


def _batch(B=5, T=9, V=40):
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    ids = torch.randint(2, V, (B, T))
    mask = torch.arange(T)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    targets = {"intent": torch.randint(0, 5, (B,)), "slots": torch.randint(0, 7, (B, T)).masked_fill(~mask, -100)}
    return ids, lengths, targets


@pytest.mark.parametrize("sharing,layers,task_layers", [("hard", 1, None), ("hard", 2, None), ("soft", 1, None),
                                                         ("hierarchical", 2, {"slots": 1})])
def test_forward_backward_every_parameter(sharing, layers, task_layers):
    m = fastmtl.MultiTaskLSTM(40, 8, 6, _tasks(), num_layers=layers, sharing=sharing, task_layers=task_layers,
                              dropout=0.1, soft_lambda=0.5)
    ids, lengths, targets = _batch()
    out = m(ids, lengths, targets)
    assert torch.isfinite(out.loss) and set(out.losses) == {"intent", "slots"}
    if sharing == "soft":  # perturb so the penalty (and the anchor's gradient) is not zero
        with torch.no_grad():
            for p in m.task_encoders["slots"].parameters():
                p.add_(torch.randn_like(p) * 0.1)
        out = m(ids, lengths, targets)
    out.loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if not n.startswith("embedding"):
            assert p.grad.abs().sum() > 0, n
    preds = m.predict(ids, lengths)
    assert preds["intent"].shape == (5,) and preds["slots"].shape == ids.shape
    assert (preds["slots"][ids == 0] == -1).all()


def test_padding_never_matters():
    m = fastmtl.MultiTaskLSTM(40, 8, 6, _tasks(), dropout=0.0).eval()
    ids, lengths, targets = _batch()
    junk = ids.clone()
    mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    junk[~mask] = torch.randint(2, 40, (int((~mask).sum()),))
    a, b = m(ids, lengths, targets), m(junk, lengths, targets)
    torch.testing.assert_close(a.loss, b.loss)
    pa, pb = m.predict(ids, lengths), m.predict(junk, lengths)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    for i in range(ids.shape[0]):  # alone, unpadded: same predictions
        L = int(lengths[i])
        pi = m.predict(ids[i:i + 1, :L], lengths[i:i + 1])
        assert int(pi["intent"][0]) == int(pa["intent"][i])
        assert pi["slots"][0].tolist() == pa["slots"][i, :L].tolist()


def test_bilstm_sequence_task_reads_final_state_of_each_direction():
    """The intent loss equals a plain-PyTorch model's: torch.nn.LSTM with pack_padded_sequence, h_n of both
    directions concatenated, Linear, cross-entropy."""
    m = fastmtl.MultiTaskLSTM(40, 8, 6, [SequenceTask("intent", 5)], dropout=0.0).eval()
    ids, lengths, targets = _batch()
    out = m(ids, lengths, {"intent": targets["intent"]})
    ref_lstm = torch.nn.LSTM(8, 6, batch_first=True, bidirectional=True)
    ref_lstm.load_state_dict(m.encoder.lstm.state_dict())
    x = m.embedding(ids)
    _, (h, _) = ref_lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    pooled = torch.cat([h[0], h[1]], -1)
    params = list(m.heads["top"].parameters())
    W = next(p for p in params if p.dim() == 2)
    b = next(p for p in params if p.dim() == 1)
    ref = F.cross_entropy(pooled @ W.t() + b, targets["intent"])
    torch.testing.assert_close(out.losses["intent"], ref, rtol=1e-4, atol=1e-5)


def test_soft_penalty_value():
    m = fastmtl.MultiTaskLSTM(40, 8, 6, _tasks(), sharing="soft", soft_lambda=0.3, dropout=0.0)
    ids, lengths, targets = _batch()
    assert float(m(ids, lengths, targets).penalty.detach()) == 0.0  # task encoders start at the anchor
    with torch.no_grad():
        for e in m.task_encoders.values():
            for p in e.parameters():
                p.add_(torch.randn_like(p))
    expected = sum(((p - q) ** 2).sum() for e in m.task_encoders.values()
                   for p, q in zip(e.parameters(), m.encoder.parameters()))
    torch.testing.assert_close(m(ids, lengths, targets).penalty, 0.3 * expected)


def test_hierarchical_task_reads_its_layer():
    m = fastmtl.MultiTaskLSTM(40, 8, 6, _tasks(), num_layers=2, sharing="hierarchical",
                              task_layers={"slots": 1, "intent": 2}, dropout=0.0)
    ids, lengths, targets = _batch()
    m(ids, lengths, {"slots": targets["slots"]}).loss.backward()
    assert all(p.grad is None for p in m.encoder.layers[1].parameters())  # layer 2 does not feed slots
    assert all(p.grad is not None for p in m.encoder.layers[0].parameters())
    with pytest.raises(ValueError, match="layers 1..2"):
        fastmtl.MultiTaskLSTM(40, 8, 6, _tasks(), num_layers=2, sharing="hierarchical", task_layers={"slots": 3})
    with pytest.raises(ValueError, match="needs sharing='hierarchical'"):
        fastmtl.MultiTaskLSTM(40, 8, 6, _tasks(), task_layers={"slots": 1})
    with pytest.raises(ValueError, match="sharing must be"):
        fastmtl.MultiTaskLSTM(40, 8, 6, _tasks(), sharing="medium")


def test_transfer_encoder(tmp_path):
    src = fastmtl.MultiTaskLSTM(40, 8, 6, _tasks())
    dst = fastmtl.MultiTaskLSTM(40, 8, 6, [TokenTask("ner", 3)])
    path = str(tmp_path / "src.pt")
    save_checkpoint({"model": src.state_dict()}, path)
    dst.load_encoder(path, freeze=True)
    for k, v in src.encoder_state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    trainable = [n for n, p in dst.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("heads.") for n in trainable)
    with pytest.raises(ValueError, match="does not fit"):
        fastmtl.MultiTaskLSTM(40, 8, 7, _tasks()).load_encoder(src.state_dict())


def test_pretrained_vectors(tmp_path):
    from fastmtl.data import Vocab
    from fastmtl.embeddings import embedding_matrix

    p = tmp_path / "vec.txt"
    p.write_text("3 4\nboston 1 2 3 4\nFlight 0.5 0.5 0.5 0.5\nzzz 9 9 9 9\n")
    v = Vocab.build([["flight", "to", "boston"]])
    mat, found = embedding_matrix(v, str(p))
    assert found == 2 and mat.shape == (len(v), 4)
    assert mat[v.stoi["boston"]].tolist() == [1, 2, 3, 4] and mat[0].abs().sum() == 0
    m = fastmtl.MultiTaskLSTM(len(v), 4, 3, _tasks(), pretrained=mat, freeze_embeddings=True)
    assert torch.equal(m.embedding.weight, mat) and not m.embedding.weight.requires_grad
    bad = tmp_path / "bad.txt"
    bad.write_text("a 1 2\nb 1\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        embedding_matrix(v, str(bad))


def _words(V=40):
    import random

    rng = random.Random(0)
    return ["<pad>", "<unk>"] + ["".join(rng.choice("abcdefgh0") for _ in range(rng.randint(1, 9)))
                                 for _ in range(V - 2)]


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_char_cnn_inference_path_matches_training_path(kernel_size):
    # Without gradients the CPU forward runs the convolution as one GEMM over the windows: the same features as
    # Conv1d (with gradients), also for words without characters.
    words = ["<pad>", "<unk>", "a", "boston", "bos", "x" * 30, "denver", "to"]
    torch.manual_seed(kernel_size)
    enc = CharCNN(words, char_dim=6, filters=7, kernel_size=kernel_size, max_word_len=20)
    ids = torch.tensor([[3, 4, 2, 5, 6], [1, 0, 7, 2, 0]])
    chars = enc.chars_tensor([["boston", "bos", "a", "x" * 30, "q"], ["zzq", "", "to", "a", "denver"]])
    for c in (None, chars):
        train = enc(ids, c)
        assert train.requires_grad
        with torch.no_grad():
            assert enc._inference(enc.embedding(torch.zeros(1, 1, dtype=torch.long)))
            infer = enc(ids, c)
        torch.testing.assert_close(infer, train.detach(), rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # against a direct computation: Conv1d, ReLU, max over the real characters only
            cc = c.reshape(-1, c.shape[2]) if c is not None else enc.char_ids[ids.reshape(-1)]
            for n in range(cc.shape[0]):
                real = cc[n][cc[n] != 0]
                want = (torch.zeros(7) if real.numel() == 0 else
                        torch.relu(enc.conv(enc.embedding(real)[None].transpose(1, 2))).amax(dim=2)[0])
                torch.testing.assert_close(infer.reshape(-1, 7)[n], want, rtol=1e-5, atol=1e-6)


def test_char_cnn_shape_padding_and_specials():
    words = ["<pad>", "<unk>", "a", "boston", "bos", "x" * 30]
    enc = CharCNN(words, char_dim=4, filters=5, kernel_size=3, max_word_len=20)
    assert enc.char_ids.shape == (6, 20)
    assert (enc.char_ids[:2] == 0).all() and enc.char_ids[2].tolist()[:2] == [enc.char_itos.index("a"), 0]
    ids = torch.tensor([[3, 4, 2, 5], [1, 0, 0, 0]])
    out = enc(ids)
    assert out.shape == (2, 4, 5)
    assert (out[1] == 0).all()  # <unk> and <pad>: no characters, zero features
    # a word's feature does not depend on the padding of its character row: compare with an unpadded conv
    with torch.no_grad():
        c = enc.char_ids[3, :6][None]
        ref = torch.relu(enc.conv(enc.embedding(c).transpose(1, 2))).amax(dim=2)[0]
    torch.testing.assert_close(out[0, 0], ref)
    with pytest.raises(ValueError, match="kernel_size"):
        CharCNN(words, kernel_size=2)
    # explicit characters: the same as the table for vocabulary words, real features for unknown words
    chars = enc.chars_tensor([["boston", "bos", "a", "x" * 30], ["zzq", "", "b", "a"]])
    assert chars.shape == (2, 4, 20)
    both = enc(torch.tensor([[3, 4, 2, 5], [1, 0, 1, 2]]), chars)
    torch.testing.assert_close(both[0], out[0])
    assert chars[1, 0, :3].tolist() == [1, 1, 1] and both[1, 0].abs().sum() > 0  # unknown characters -> id 1
    assert (both[1, 1] == 0).all()
    with pytest.raises(ValueError, match="chars"):
        enc(ids, chars[:, :2])


@pytest.mark.parametrize("char_dim,token_context", [(4, False), (0, True), (3, True)])
def test_char_features_and_token_context(char_dim, token_context):
    tasks = [SequenceTask("intent", 5, pooling="max"), TokenTask("slots", 7)]
    m = fastmtl.MultiTaskLSTM(40, 8, 6, tasks, dropout=0.1, char_words=_words() if char_dim else None,
                              char_dim=char_dim, char_filters=5, token_context=token_context)
    ids, lengths, targets = _batch()
    out = m(ids, lengths, targets)
    out.loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if not n.startswith("embedding") and not n.startswith("char_cnn.embedding"):
            assert p.grad.abs().sum() > 0, n
    if char_dim:
        assert m.char_cnn.embedding.weight.grad.abs().sum() > 0
    m.eval()
    junk = ids.clone()
    mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    junk[~mask] = torch.randint(2, 40, (int((~mask).sum()),))
    pa, pb = m.predict(ids, lengths), m.predict(junk, lengths)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert (pa["slots"][ids == 0] == -1).all()
    with pytest.raises(ValueError, match="char_words"):
        fastmtl.MultiTaskLSTM(40, 8, 6, tasks, char_dim=4)
    with pytest.raises(ValueError, match="token_context"):
        fastmtl.MultiTaskLSTM(40, 8, 6, tasks, sharing="soft", token_context=True)
