"""The ONNX graph of an :class:`~fastmtl.export.module.InferenceModule`, written node by node with standard ONNX
operators (``onnx.helper``; no tracing, so nothing of the model is unrolled or specialised to an example's shape).

Inputs: ``ids`` int64 (B, T) word ids (0-padded), ``lengths`` int64 (B,) real lengths in [1, T], and, when the model
has a character CNN, ``chars`` int64 (B, T, L) character ids (0-padded). B, T and L are dynamic. Outputs: per task,
``"<task>.log_probs"`` (float32, (B, C) or (B, T, C)) or, for a CRF task, ``"<task>.emissions"`` (B, T, C).

Operators: Gather (embeddings), Conv/Relu/ReduceMax (the character CNN), ``LSTM`` (one node per layer run or layer,
``sequence_lens`` from ``lengths``, bidirectional in one node; outputs past a sequence's length are zero, as ONNX
specifies), Transpose/Reshape/Concat, Range/Less/Where (masks), GatherND (``last`` pooling), ReduceSum/ReduceMax
(``mean``/``max`` pooling, the sentence vector), MatMul/Add (heads) and LogSoftmax.
"""
import numpy as np
import torch

__all__ = ["build_onnx", "DEFAULT_OPSET", "MIN_OPSET"]

DEFAULT_OPSET = 17
MIN_OPSET = 14  # LSTM-14 (layout), GatherND batch_dims (12), ReduceSum axes as an input (13)


class _Graph:
    def __init__(self, opset):
        from onnx import helper

        self.h = helper
        self.opset = opset
        self.nodes, self.inits = [], []
        self.names = set()
        self.n = 0

    def name(self, base):
        self.n += 1
        return "%s_%d" % (base, self.n)

    def init(self, base, array):
        from onnx import numpy_helper

        name = self.name(base)
        array = np.asarray(array)  # (np.ascontiguousarray would make a scalar 1-d)
        self.inits.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(order="C"), name))
        return name

    def const(self, base, values, dtype=np.int64):
        return self.init(base, np.asarray(values, dtype=dtype))

    def op(self, op_type, inputs, n_out=1, base=None, **attrs):
        outs = [self.name(base or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, list(inputs), outs, name=self.name("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def reduce(self, op_type, x, axes, keepdims=0):
        """ReduceMax/ReduceSum over ``axes``: attribute before opset 18 (ReduceSum: 13), input from then."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.const("axes", axes)], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x, axes):
        return self.op("Unsqueeze", [x, self.const("axes", axes)])

    def squeeze(self, x, axes):
        return self.op("Squeeze", [x, self.const("axes", axes)])


def _np(t):
    return t.detach().to(torch.float32).cpu().numpy()


def _onnx_gates(w):
    """PyTorch's gate blocks (i, f, g, o) reordered to ONNX's (i, o, f, c) along dim 0."""
    i, f, g, o = np.split(w, 4, axis=0)
    return np.concatenate([i, o, f, g], axis=0)


def _lstm_nodes(G, x, seq_lens, lstm):
    """One ONNX LSTM node per layer of the ``nn.LSTM`` ``lstm`` on time-major ``x`` (T, B, in); returns the top
    layer's output (T, B, D*H)."""
    D = 2 if lstm.bidirectional else 1
    H = lstm.hidden_size
    for k in range(lstm.num_layers):
        sfx = [""] + (["_reverse"] if D == 2 else [])
        W = np.stack([_onnx_gates(_np(getattr(lstm, "weight_ih_l%d%s" % (k, s)))) for s in sfx])
        R = np.stack([_onnx_gates(_np(getattr(lstm, "weight_hh_l%d%s" % (k, s)))) for s in sfx])
        inputs = [x, G.init("lstm_W", W), G.init("lstm_R", R)]
        if lstm.bias:
            B = np.stack([np.concatenate([_onnx_gates(_np(getattr(lstm, "bias_ih_l%d%s" % (k, s)))),
                                          _onnx_gates(_np(getattr(lstm, "bias_hh_l%d%s" % (k, s))))]) for s in sfx])
            inputs.append(G.init("lstm_B", B))
        else:
            inputs.append("")
        inputs.append(seq_lens)
        y = G.op("LSTM", inputs, base="lstm_Y", hidden_size=H,
                 direction="bidirectional" if D == 2 else "forward")
        # Y: (T, D, B, H) -> (T, B, D, H) -> (T, B, D*H)
        y = G.op("Transpose", [y], perm=[0, 2, 1, 3])
        x = G.op("Reshape", [y, G.const("shape", [0, 0, -1])])
    return x


def build_onnx(module, opset=DEFAULT_OPSET, doc="", metadata=None):
    """The ``onnx.ModelProto`` of ``module`` (an :class:`InferenceModule`). ``metadata``: ``{key: str}`` stored in the
    model's metadata_props."""
    from onnx import TensorProto, checker, helper

    from .module import FastmtlLSTM, TorchLSTM

    G = _Graph(opset)
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "time"]),
              helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"])]
    if module.has_chars:
        inputs.append(helper.make_tensor_value_info("chars", TensorProto.INT64, ["batch", "time", "word_length"]))

    # masks and lengths
    shape = G.op("Shape", ["ids"])
    T = G.op("Gather", [shape, G.const("one", 1)], axis=0)
    steps = G.op("Range", [G.const("zero", 0), T, G.const("one", 1)])               # (T,)
    valid = G.op("Less", [G.unsqueeze(steps, [0]), G.unsqueeze("lengths", [1])])   # (B, T) bool
    valid3 = G.unsqueeze(valid, [2])
    seq_lens = G.op("Cast", ["lengths"], to=TensorProto.INT32)

    # embeddings, time-major (T, B, E)
    ids_t = G.op("Transpose", ["ids"], perm=[1, 0])
    x = G.op("Gather", [G.init("embedding", _np(module.embedding.weight)), ids_t], axis=0)
    if module.has_chars:
        conv = module.char_conv
        chars_t = G.op("Transpose", ["chars"], perm=[1, 0, 2])                     # (T, B, L)
        cshape = G.op("Shape", [chars_t])
        L = G.op("Slice", [cshape, G.const("s", [2]), G.const("e", [3])])
        flat = G.op("Reshape", [chars_t, G.op("Concat", [G.const("m1", [-1]), L], axis=0)])  # (T*B, L)
        ce = G.op("Gather", [G.init("char_embedding", _np(module.char_embedding.weight)), flat], axis=0)  # (N, L, C)
        ce = G.op("Transpose", [ce], perm=[0, 2, 1])                                # (N, C, L)
        k = conv.kernel_size[0]
        conv_in = [ce, G.init("char_conv_W", _np(conv.weight))]
        if conv.bias is not None:
            conv_in.append(G.init("char_conv_B", _np(conv.bias)))
        h = G.op("Relu", [G.op("Conv", conv_in, kernel_shape=[k], pads=[conv.padding[0]] * 2)])  # (N, F, L)
        cmask = G.op("Cast", [G.op("Not", [G.op("Equal", [flat, G.const("zero", 0)])])], to=TensorProto.FLOAT)
        h = G.op("Mul", [h, G.unsqueeze(cmask, [1])])
        feat = G.reduce("ReduceMax", h, [2])                                       # (N, F)
        tb = G.op("Slice", [cshape, G.const("s", [0]), G.const("e", [2])])
        feat = G.op("Reshape", [feat, G.op("Concat", [tb, G.const("m1", [-1])], axis=0)])  # (T, B, F)
        x = G.op("Concat", [x, feat], axis=2)

    # encoders: time-major outputs, then batch-first (B, T, D)
    outs = []
    for chain in module.encoders:
        xi = x
        for part in chain.parts:
            if not isinstance(part, (TorchLSTM, FastmtlLSTM)):  # pragma: no cover - from_model builds only these
                raise TypeError("fastmtl export: unknown encoder %s" % type(part).__name__)
            xi = _lstm_nodes(G, xi, seq_lens, part.lstm)
            outs.append(G.op("Transpose", [xi], perm=[1, 0, 2]))
    hidden = []
    for src, ctx in zip(module.sources, module.contexts):
        h = outs[src]
        if ctx:
            masked = G.op("Where", [valid3, h, G.const("ninf", [float("-inf")], np.float32)])
            sent = G.reduce("ReduceMax", masked, [1], keepdims=1)                 # (B, 1, D)
            hs = G.op("Shape", [h])
            sent = G.op("Expand", [sent, hs])
            h = G.op("Concat", [h, sent], axis=2)
        hidden.append(h)

    # heads
    outputs = []
    cache = {}

    def lengths_f():  # (B, 1) float lengths, made once when a mean pooling needs them
        if "lengths" not in cache:
            cache["lengths"] = G.unsqueeze(G.op("Cast", ["lengths"], to=TensorProto.FLOAT), [1])
        return cache["lengths"]

    for head in module.heads:
        h = hidden[head.group]
        if not head.token:
            h = _pool(G, h, head.pooling, valid3, lengths_f)
        lin = head.linear
        z = G.op("MatMul", [h, G.init("W_" + head.name, _np(lin.weight).T)])
        if lin.bias is not None:
            z = G.op("Add", [z, G.init("b_" + head.name, _np(lin.bias))])
        if head.kind != 2:
            z = G.op("LogSoftmax", [z], axis=-1)
        G.nodes.append(helper.make_node("Identity", [z], [head.output], name=G.name("n_out")))
        C = lin.out_features
        dims = ["batch", "time", C] if head.token else ["batch", C]
        outputs.append(helper.make_tensor_value_info(head.output, TensorProto.FLOAT, dims))

    # drop what no output reads (e.g. the mask when no head needs it)
    G.nodes = _prune(G.nodes, [o.name for o in outputs])
    used = {i for n in G.nodes for i in n.input}
    G.inits = [t for t in G.inits if t.name in used]
    graph = helper.make_graph(G.nodes, "fastmtl", inputs, outputs, initializer=G.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fastmtl",
                              doc_string=doc)
    model.ir_version = min(model.ir_version, _max_ir(opset))
    if metadata:
        helper.set_model_props(model, dict(metadata))
    checker.check_model(model, full_check=True)
    return model


def _max_ir(opset):
    # the IR version that onnx pairs with the opset (older runtimes refuse a newer IR than they know)
    from onnx import helper

    for entry in helper.VERSION_TABLE:
        release, ir, ai_onnx = entry[0], entry[1], entry[2]
        if ai_onnx >= opset:
            return ir
    return helper.VERSION_TABLE[-1][1]


def _pool(G, h, pooling, valid3, lengths_f):
    """(B, T, D) -> (B, D) as :func:`fastmtl.export.module._pool` (codes of POOLING_CODES)."""
    from onnx import TensorProto

    if pooling == 1:  # first
        return G.op("Gather", [h, G.const("zero", 0)], axis=1)
    if pooling == 2:  # mean
        s = G.reduce("ReduceSum", G.op("Mul", [h, G.op("Cast", [valid3], to=TensorProto.FLOAT)]), [1])
        return G.op("Div", [s, lengths_f()])
    if pooling == 3:  # max
        masked = G.op("Where", [valid3, h, G.const("ninf", [float("-inf")], np.float32)])
        return G.reduce("ReduceMax", masked, [1])
    idx = G.unsqueeze(G.op("Sub", ["lengths", G.const("one", 1)]), [1])          # (B, 1)
    last = G.op("GatherND", [h, idx], batch_dims=1)                                 # (B, D)
    if pooling == 0:
        return last
    # last_first: the forward half of the last state, the backward half of the first
    first = G.op("Gather", [h, G.const("zero", 0)], axis=1)
    shape = G.op("Shape", [h])
    D = G.op("Slice", [shape, G.const("s", [2]), G.const("e", [3])])
    half = G.op("Div", [D, G.const("two", [2])])
    big = G.const("big", [1 << 62])
    a = G.op("Slice", [last, G.const("s", [0]), half, G.const("ax", [1])])
    b = G.op("Slice", [first, half, big, G.const("ax", [1])])
    return G.op("Concat", [a, b], axis=1)


def _prune(nodes, outputs):
    needed = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return list(reversed(keep))
