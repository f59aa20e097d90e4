r"""Per-task gradients of the shared encoder, for the gradient-based multi-task methods of :mod:`fastmtl.weighting`.

:func:`task_gradients` runs the encoder of a :class:`fastmtl.MultiTaskLSTM` once (one autograd graph, one dropout
draw) and then the fused heads op once per task on the same encoder output. The heads op forms each task's
gradient in its forward pass, so this gives, per task k, without any backward through the encoder:

* the task loss :math:`L_k` (unweighted) and the gradient of :math:`w_k L_k` with respect to task k's own head
  (``w_k`` the static task weight, 1 by default);
* :math:`z_k = \partial (w_k L_k) / \partial Z`, the gradient with respect to the shared representation Z (the
  encoder output each head reads; several outputs for ``token_context`` or ``hierarchical`` sharing).

The encoder backward is linear in its incoming gradient, so everything else follows from the :math:`z_k`:

* :meth:`TaskGradients.backward` pushes one combination :math:`\sum_k c_k z_k` through the encoder: the gradient
  of :math:`\sum_k c_k w_k L_k` with respect to the shared parameters at the cost of one backward (what MGDA-UB
  needs);
* :meth:`TaskGradients.shared` pushes all K of them through the encoder and returns K gradients of every shared
  parameter (what PCGrad, CAGrad, MGDA, IMTL-G, Aligned-MTL and Nash-MTL need). Two schedules, the same numbers:

  - ``"loop"`` (default): K backward passes over the one retained graph. Each runs the fused LSTM backward op on
    the saved activations (no forward is recomputed); the heads are not run again and the embedding/char CNN get
    their gradients from each pass.
  - ``"vmap"``: the encoder's forward under ``torch.func.vjp`` and ``torch.func.vmap`` of its vjp over the K
    stacked cotangents, the general form that works for any encoder built from fastmtl ops (or plain PyTorch).
    Only the cotangents are vmapped, so the vmap rule of ``lstm_layer_backward`` runs each LSTM layer's K
    backwards as one ``lstm_layer_backward_multi`` call on the saved activations: the time loop on K*B rows
    (row b*K + k is cotangent k of sequence b; its K rows read the sequence's saved gates), the weight gradients
    as large GEMMs per task. The other encoder ops (embedding, dropout, character CNN) run through their vmap rules.

  The K backwards cost about K times one backward in arithmetic either way (the LSTM backward is linear in its
  cotangent, every product is per task); the fused call saves the per-pass overhead and runs the recurrent
  products on K times the rows, which pays most where one backward is latency-bound (small batches, GPUs).

  Nothing here is CPU-specific: on CUDA both schedules run through the same ops.

"Shared" parameters are those of everything below the heads: the word embeddings, the character CNN and the
encoder LSTM (``hard`` and ``hierarchical`` sharing; under ``hierarchical`` a task reading a lower layer has zero
gradient on the layers above it). ``soft`` sharing shares only the embeddings through a penalty between per-task
encoders and is rejected with a ValueError. Frozen parameters (``requires_grad=False``) are left out.

The gradients are exact: the same numbers as K separate ``torch.autograd.grad(w_k L_k, ..., retain_graph=True)``
passes over the model's ordinary forward (tests/test_gradients.py).
"""
from dataclasses import dataclass, field
from typing import Dict, List

import torch

__all__ = ["TaskGradients", "task_gradients", "per_task_gradients", "shared_named_parameters", "gram",
           "gradient_method_step", "labelled_counts"]


def shared_named_parameters(model):
    """``[(name, parameter)]`` of the shared parameters of ``model`` (everything below the heads that trains)."""
    if getattr(model, "sharing", "hard") == "soft":
        raise ValueError("fastmtl: gradient-based task weighting needs a shared encoder; sharing='soft' gives every "
                         "task its own encoder (only the embeddings are shared, through a penalty). Use "
                         "sharing='hard' or 'hierarchical', or a loss weighting (static, uncertainty, dwa, gradnorm, "
                         "famo)")
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")]


def gram(stacked):
    """The K x K Gram matrix (float64) of per-task gradients given as a list of (K, ...) tensors (one per
    parameter) or one (K, P) tensor: one GEMM per parameter in its own precision (float32 for lower ones),
    accumulated over the parameters in float64."""
    if isinstance(stacked, torch.Tensor):
        stacked = [stacked]
    G = None
    for g in stacked:
        f = g.reshape(g.shape[0], -1)
        if f.dtype not in (torch.float32, torch.float64):
            f = f.float()
        part = (f @ f.t()).double()
        G = part if G is None else G + part
    return G


class _Encode(torch.nn.Module):
    # model.encode as a module's forward, for torch.func.functional_call
    def __init__(self, model, keys):
        super().__init__()
        self.m = model
        self.keys = keys

    def forward(self, ids, lengths, chars):
        h = self.m.encode(ids, lengths, chars)
        return tuple(h[k] for k in self.keys)


@dataclass
class TaskGradients:
    """What :func:`task_gradients` computed for one batch (see the module docstring).

    ``tasks``: the task names in model order; ``losses[k]``: :math:`L_k` (detached, unweighted); ``loss_tensor``:
    the (K,) tensor of them; ``weights[k]``: :math:`w_k`; ``heads``: ``{parameter: gradient of w_k L_k}`` for the
    heads of every task; ``rep[k]``: :math:`z_k` as a tuple over the encoder outputs in ``keys``."""
    tasks: List[str]
    losses: Dict[str, torch.Tensor]
    weights: List[float]
    heads: Dict[torch.nn.Parameter, torch.Tensor]
    rep: List[tuple]
    keys: List[str]
    params: List[torch.nn.Parameter]
    names: List[str]
    mode: str = "loop"
    _hidden: tuple = field(repr=False, default=None)
    _vjp: object = field(repr=False, default=None)

    @property
    def K(self):
        return len(self.tasks)

    @property
    def loss_tensor(self):
        return torch.stack([self.losses[t].float() for t in self.tasks])

    def rep_gram(self):
        """K x K Gram matrix (float64) of the representation gradients :math:`z_k` (MGDA-UB)."""
        return gram([torch.stack([r[i] for r in self.rep]) for i in range(len(self.keys))])

    def _cotangent(self, coeffs):
        c = [float(x) for x in coeffs]
        out = []
        for i in range(len(self.keys)):
            acc = None
            for k, r in enumerate(self.rep):
                if c[k] != 0.0:
                    acc = r[i] * c[k] if acc is None else acc.add(r[i], alpha=c[k])
            out.append(acc if acc is not None else torch.zeros_like(self.rep[0][i]))
        return out

    def backward(self, coeffs, retain_graph=True):
        """Gradients of :math:`\\sum_k c_k w_k L_k` with respect to the shared parameters (a list in the order of
        :attr:`params`), through one backward of the encoder."""
        if self._vjp is not None:
            with torch.no_grad():
                (g,) = self._vjp(tuple(self._cotangent(coeffs)))
            return [g["m." + n].detach() for n in self.names]
        grads = torch.autograd.grad(self._hidden, self.params, self._cotangent(coeffs), retain_graph=retain_graph,
                                    allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]

    def shared(self):
        """K gradients of every shared parameter: a list (order of :attr:`params`) of (K, *p.shape) tensors, row k
        the gradient of :math:`w_k L_k`, scheduled as :attr:`mode` says (see the module docstring)."""
        K = self.K
        if self._vjp is not None:
            cot = tuple(torch.stack([r[i] for r in self.rep]) for i in range(len(self.keys)))
            with torch.no_grad():  # the gradients are data here: nothing records a graph of the backward
                (g,) = torch.func.vmap(self._vjp)(cot)
            return [g["m." + n].detach() for n in self.names]
        per = []
        for k in range(K):
            e = [0.0] * K
            e[k] = 1.0
            per.append(self.backward(e, retain_graph=True))
        return [torch.stack([per[k][i] for k in range(K)]) for i in range(len(self.params))]


def task_gradients(model, ids, lengths, targets, weights=None, chars=None, mode="loop"):
    """Encoder once, heads once per task (see the module docstring); returns a :class:`TaskGradients`.

    ``targets``: ``{task: labels}`` for the tasks of this batch (any subset of the model's tasks, at least one);
    ``weights``: ``{task: w_k}`` static loss weights (numbers; default each task's own ``weight``)."""
    shared = shared_named_parameters(model)
    tasks = [n for n in model.task_names if n in targets]
    unknown = [n for n in targets if n not in model.task_names]
    if unknown or not tasks:
        raise ValueError("fastmtl: task_gradients: targets name %s; the model's tasks are %s"
                         % (sorted(targets), model.task_names))
    specs = {t.name: t for t in model.tasks}
    w = []
    for n in tasks:
        v = (weights or {}).get(n, specs[n].weight)
        w.append(float(v.detach()) if isinstance(v, torch.Tensor) else float(v))
    keys = [key for key, names in model.groups if any(n in targets for n in names)]
    vjp_fn = None
    if mode == "vmap":
        enc = _Encode(model, keys)
        pdict = {"m." + n: p for n, p in shared}
        out, vjp_fn = torch.func.vjp(lambda p: torch.func.functional_call(enc, p, (ids, lengths, chars)), pdict)
        hidden = dict(zip(keys, out))
    elif mode == "loop":
        hidden = model.encode(ids, lengths, chars)
    else:
        raise ValueError("fastmtl: task_gradients: mode must be 'loop' or 'vmap', got %r" % (mode,))
    group_of = {n: key for key, names in model.groups for n in names}
    detached = {k: hidden[k].detach().requires_grad_() for k in keys}
    losses, head_grads, rep = {}, {}, []
    with torch.enable_grad():
        for n, wk in zip(tasks, w):
            key = group_of[n]
            head = model.heads[key][n]
            hp = [p for p in head.parameters() if p.requires_grad]
            out = model.heads[key](detached[key], lengths=lengths, targets={n: targets[n]}, weights={n: wk})
            g = [x.detach() for x in torch.autograd.grad(out.loss, [detached[key]] + hp)]
            losses[n] = out.losses[n].detach()
            head_grads.update(zip(hp, g[1:]))
            rep.append(tuple(g[0] if k == key else torch.zeros_like(detached[k]) for k in keys))
    return TaskGradients(tasks, losses, w, head_grads, rep, keys, [p for _, p in shared], [n for n, _ in shared],
                         mode, tuple(hidden[k] for k in keys), vjp_fn)


def per_task_gradients(model, ids, lengths, targets, weights=None, chars=None, mode="loop"):
    """``(losses, grads, head_grads)``: ``losses`` ``{task: L_k}``; ``grads`` ``{task: {shared parameter name:
    gradient of w_k L_k}}``; ``head_grads`` ``{task: {head parameter name: gradient of w_k L_k}}`` (names as in
    ``model.named_parameters()``). One encoder forward, one heads call per task, the K encoder backwards fused as
    ``mode`` says (:meth:`TaskGradients.shared`)."""
    tg = task_gradients(model, ids, lengths, targets, weights, chars, mode)
    stacked = tg.shared()
    grads = {t: {n: g[k] for n, g in zip(tg.names, stacked)} for k, t in enumerate(tg.tasks)}
    pname = {p: n for n, p in model.named_parameters()}
    head_grads = {t: {} for t in tg.tasks}
    for key, names in model.groups:
        for t in names:
            if t in head_grads:
                for p in model.heads[key][t].parameters():
                    if p in tg.heads:
                        head_grads[t][pname[p]] = tg.heads[p]
    return dict(tg.losses), grads, head_grads


def labelled_counts(model, targets, lengths=None):
    """``{task: number of labelled items}`` of ``targets`` (targets other than the task's ``ignore_index``; token
    positions at or past a sequence's length do not count)."""
    names, counts = _labelled(model, targets, lengths)
    return dict(zip(names, (int(c) for c in counts.tolist())))


def _labelled(model, targets, lengths):
    """The task names of ``targets`` and their labelled-item counts as one float64 tensor (one host sync to read)."""
    specs = {t.name: t for t in model.tasks}
    names, counts = list(targets), []
    for n in names:
        y = targets[n]
        valid = y != specs[n].ignore_index
        if y.dim() == 2 and lengths is not None:
            pos = torch.arange(y.shape[1], device=y.device)
            valid = valid & (pos[None, :] < lengths.to(y.device)[:, None])
        counts.append(valid.sum())
    return names, torch.stack(counts).double()


def gradient_method_step(model, method, ids, lengths, targets, weights=None, chars=None, mode="loop",
                         all_reduce=None, world=1):
    """One backward of a gradient-based method (a :class:`fastmtl.weighting.GradientMethod`): per-task
    gradients, the method's coefficients from their Gram matrix, and the combined gradient written into ``.grad``
    of the shared parameters (accumulated, as ``backward()`` does); every head gets its own task's gradient.
    Returns the :class:`TaskGradients` (its ``losses`` for logging) and the coefficients.

    ``all_reduce(t)`` (DDP: sum over the ranks, then divide by ``world``) is applied to the per-task gradients
    (``level="param"``) or to the Gram matrix of the representation gradients (``level="rep"``) before the method
    reads them, because the methods are not linear; every rank then combines the same gradients with the same
    coefficients. With per-rank task weights scaled so that the ranks' average is the global-batch loss (what the
    trainer does), the result equals one process on the global batch.

    Tasks without a label in the (global) batch are left out (:func:`labelled_counts`); when none is left, nothing
    is computed and ``(None, None)`` is returned (no update)."""
    names, counts = _labelled(model, targets, lengths)
    if all_reduce is not None:  # every rank leaves out the same tasks: those without a label in the global batch
        all_reduce(counts)
    targets = {n: targets[n] for n, c in zip(names, counts.tolist()) if c > 0}
    if not targets:  # no task has a label in this batch: no update
        return None, None
    tg = task_gradients(model, ids, lengths, targets, weights, chars, mode if method.level == "param" else "loop")
    if not tg.params:  # a frozen encoder: only the heads train, each on its own task
        c, grads = torch.ones(tg.K, dtype=torch.float64), []
    elif method.level == "rep":
        G = tg.rep_gram()
        if all_reduce is not None:
            # the rows of z are this rank's samples: the global Gram is the sum of the ranks' Grams (each z_k is
            # 1/world of the global batch's gradient under the scaled weights)
            all_reduce(G)
            G = G / world
        c = method(G, tg.tasks)
        grads = tg.backward(c.tolist(), retain_graph=False)
        if all_reduce is not None:
            for g in grads:
                all_reduce(g)
    else:
        stacked = tg.shared()
        if all_reduce is not None:
            for g in stacked:
                all_reduce(g)
        c = method(gram(stacked), tg.tasks)
        grads = []
        for g in stacked:
            cc = c.to(device=g.device, dtype=g.dtype)
            grads.append(torch.tensordot(cc, g, dims=1))
    for p, g in zip(tg.params, grads):
        p.grad = g.detach() if p.grad is None else p.grad.add_(g)
    for p, g in tg.heads.items():
        if all_reduce is not None:
            g = g.clone()
            all_reduce(g)
        p.grad = g.detach() if p.grad is None else p.grad.add_(g)
    return tg, c
