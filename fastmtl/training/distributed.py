"""Data-parallel training (``torchrun``), in one place: the process group, the DDP wrapper, this rank's share of a
batch, the per-rank task weights, the reductions. In one process (no ``WORLD_SIZE`` above 1) every method is the
identity, so the trainer reads the same either way."""
import gc
import os

import torch

from .. import data as D

__all__ = ["Distributed", "scaled_weights", "count_items"]


def scaled_weights(weights, targets, global_counts, world, ignore_index=-100):
    """Per-rank task weights so that DDP's gradient average equals the global-batch mean of every task loss."""
    out = {}
    for name, w in weights.items():
        if name not in targets:
            continue
        local = int((targets[name] != ignore_index).sum())
        g = global_counts.get(name, 0)
        out[name] = w * (local * world / g) if g else w * 0.0
    return out


def count_items(encoded, idx, specs, ignore_index=-100):
    """``{task: labelled items}`` of the examples ``idx`` of ``encoded`` (tokens for token tasks)."""
    c = {}
    for s in specs:
        if s.level == "token":
            c[s.name] = sum(sum(1 for y in encoded[i][1][s.name] if y != ignore_index) for i in idx)
        else:
            c[s.name] = sum(1 for i in idx if encoded[i][1][s.name] != ignore_index)
    return c


class Distributed:
    """The run's processes: ``world`` (ranks), ``rank``, ``local`` (the rank on this host) from torchrun's
    environment; ``enabled`` when there is more than one."""

    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        self.world = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local = int(env.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.own_group = False

    @property
    def is_main(self):
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def min_batch(self):
        """The smallest batch: one example per rank."""
        return self.world

    def start(self, device):
        """Joins (or creates) the process group; ``device`` is this rank's."""
        if not self.enabled:
            return
        import torch.distributed as dist

        self.own_group = not dist.is_initialized()
        if self.own_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)

    def wrap(self, module, device):
        """``module`` in a DistributedDataParallel wrapper (itself in one process)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)

    @property
    def reduce(self):
        """The in-place mean over the ranks of a tensor, or None in one process (what the weighting methods take)."""
        if not self.enabled:
            return None
        import torch.distributed as dist

        def reduce(t):
            dist.all_reduce(t)
            t.div_(self.world)

        return reduce

    def any(self, flag, device):
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t)
        return bool(float(t))

    def share(self, batch, gidx, encoded, specs):
        """This rank's part of the global ``batch`` (examples ``gidx`` of ``encoded``) and the global item counts of
        every task (None in one process)."""
        if not self.enabled:
            return batch, None
        k = len(gidx)
        lo, hi = self.rank * k // self.world, (self.rank + 1) * k // self.world
        mine = gidx[lo:hi]
        tmax = max(len(encoded[i][0]) for i in mine)
        counts = count_items(encoded, gidx, specs)
        part = D.Batch(batch.ids[lo:hi, :tmax], batch.lengths[lo:hi],
                       {n: (t[lo:hi, :tmax] if t.dim() == 2 else t[lo:hi]) for n, t in batch.targets.items()}, mine,
                       batch.raw_ids[lo:hi, :tmax])
        return part, counts

    def scale(self, targets, counts):
        """The function that scales task weights by this rank's share of each task's items (None in one process)."""
        if not self.enabled:
            return None
        return lambda w: scaled_weights(w, targets, counts, self.world)

    def global_losses(self, losses, scale):
        """``{task: L_k}`` detached; under DDP the global batch's (the ranks' losses weighted by their item counts:
        the mean over the ranks of ``scale``'s factor times the local loss)."""
        losses = {n: l.detach().float().reshape(()) for n, l in losses.items()}
        if self.enabled and losses:
            names = sorted(losses)
            f = scale({n: 1.0 for n in names})
            t = torch.stack([losses[n] * f.get(n, 0.0) for n in names])
            self.reduce(t)
            losses = dict(zip(names, t.unbind(0)))
        return losses

    def end(self, trainer):
        """Once every rank is done: the DDP reducer (which holds the process group and its gloo/nccl work objects)
        goes before the group is destroyed (the other order can abort at exit)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        dist.barrier()
        trainer.wrapped = None
        gc.collect()
        if self.own_group:
            dist.destroy_process_group()
