"""The data stage of a run: datasets -> examples per split, task specs, the shared vocabulary, encoded training data
and the batch plan of each epoch (which dataset every batch comes from)."""
import math
import random
from dataclasses import dataclass

from .. import data as D
from .config import dataset_specs, task_specs

__all__ = ["LoadedDataset", "load_datasets", "read_split", "EpochPlanner", "AUX_SUFFIX", "is_aux", "aux_specs"]

AUX_SUFFIX = "@token"


def is_aux(spec):
    return spec.name.endswith(AUX_SUFFIX)


def aux_specs(specs, sequence_aux):
    """With ``sequence_aux``: every sentence-level task also as an auxiliary token-level task on every token (each
    token state learns the sentence label, which conditions the token tasks on it); never evaluated."""
    if not sequence_aux:
        return []
    return [D.TaskSpec(s.name + AUX_SUFFIX, "token", s.source, s.dataset) for s in specs if s.level == "sequence"]


@dataclass
class LoadedDataset:
    """One dataset of a run: its spec, its examples per split (None where the split is not given), the paths they
    came from (for messages) and its tasks."""

    spec: object
    splits: dict
    paths: dict
    tasks: list  # TaskSpecs of this dataset (the evaluated ones)

    @property
    def name(self):
        return self.spec.name


def read_split(ds, split):
    """``(examples or None, path)``: the ``split`` of dataset ``ds`` (a DatasetSpec): a built-in corpus's, or the
    file the run names (None where it names none); ``path`` names it in messages."""
    if ds.builtin is not None:
        from ..data import builtin

        label = ds.builtin.upper() if ds.builtin == "atis" else ds.builtin
        return builtin.load_builtin(ds.builtin, split), "%s/%s" % (label, split)
    path = getattr(ds, split)
    cols = ",".join(ds.columns) if ds.columns else None
    return (D.read_examples(path, ds.format, cols) if path else None), path


def _read(ds, max_train):
    splits, paths = {}, {}
    for s in ("train", "dev", "test"):
        splits[s], paths[s] = read_split(ds, s)
    if max_train:
        splits["train"] = splits["train"][:max_train]
    if not splits["train"]:
        raise ValueError("fastmtl: %s has no training examples" % paths["train"])
    return splits, paths


def load_datasets(cfg):
    """``(datasets, specs)``: every dataset of ``cfg`` read and checked against its tasks (a task's source field
    must exist with the right level in every split given), and the evaluated TaskSpecs in order."""
    dspecs = dataset_specs(cfg)
    specs = task_specs(cfg, dspecs)
    out = []
    for ds in dspecs:
        splits, paths = _read(ds, cfg.max_train)
        mine = [s for s in specs if s.dataset == ds.name]
        for split, ex in splits.items():
            if ex is not None:
                D.check_tasks(ex, mine, paths[split])
        out.append(LoadedDataset(ds, splits, paths, mine))
    return out, specs


class EpochPlanner:
    """The batches of each epoch: ``plan(epoch)`` -> ``[(dataset index, [example indices])]``, a pure function of
    the seed and the epoch (a resumed run replays an epoch exactly).

    Every batch comes from one dataset (its tasks' losses; the other tasks contribute nothing to that step). An
    epoch has as many batches as all training sets hold together. ``proportional``: each dataset's batches once,
    interleaved at random (a batch comes from a dataset with probability proportional to its size); ``uniform``:
    each batch from a dataset drawn uniformly; ``temperature``: drawn with probability proportional to
    size^(1/T); ``round_robin``: the datasets in turn. The last three reuse a small dataset's batches (reshuffled
    each pass) and leave a part of a large one unseen in an epoch. With one dataset every strategy is the same."""

    def __init__(self, sizes, batch_size, strategy="proportional", temperature=2.0, seed=1, lengths=None,
                 min_batch=1):
        self.sizes, self.batch_size = list(sizes), batch_size
        self.strategy, self.temperature, self.seed = strategy, temperature, seed
        self.lengths = lengths  # per dataset: the token counts of its training examples
        self.min_batch = min_batch  # DDP: a batch must give every rank an example

    def _batches(self, d, seed):
        bs = D.bucket_batches(self.lengths[d], self.batch_size, True, seed)
        return [b for b in bs if len(b) >= self.min_batch]

    def batches_of(self, d):
        """Dataset ``d``'s batches in one pass (their number is the same in every pass)."""
        return self._batches(d, 0)

    def probabilities(self):
        n = self.sizes
        if self.strategy == "uniform":
            w = [1.0 for _ in n]
        elif self.strategy == "temperature":
            # n_i^(1/T) in log space: a small T would overflow the power (T -> 0 gives the largest dataset)
            logs = [math.log(x) / self.temperature if x > 0 else -math.inf for x in n]
            top = max(logs)
            w = [math.exp(v - top) for v in logs]
        else:
            w = [float(x) for x in n]
        s = sum(w)
        return [x / s for x in w]

    def steps(self):
        """Batches per epoch (the same for every epoch)."""
        return sum(len(self.batches_of(d)) for d in range(len(self.sizes)))

    def plan(self, epoch):
        k = len(self.sizes)
        # the per-dataset order as in a single-dataset run (the same seed: one dataset gives the same batches)
        base = self.seed * 100003 + epoch
        per = [self._batches(d, base + 7919 * d) for d in range(k)]
        if k == 1:
            return [(0, b) for b in per[0]]
        rng = random.Random(base * 31 + 17)
        if self.strategy == "proportional":
            out = [(d, b) for d in range(k) for b in per[d]]
            rng.shuffle(out)
            return out
        total = sum(len(p) for p in per)
        queues = [list(p) for p in per]
        passes = [0] * k
        out = []
        probs = self.probabilities()
        cum = [sum(probs[: i + 1]) for i in range(k)]
        for step in range(total):
            if self.strategy == "round_robin":
                d = step % k
            else:
                r = rng.random()
                d = next((i for i, c in enumerate(cum) if r < c), k - 1)
            if not queues[d]:  # a new pass over dataset d, in a new order
                passes[d] += 1
                queues[d] = self._batches(d, base + 7919 * d + 1000003 * passes[d])
                if not queues[d]:
                    continue
            out.append((d, queues[d].pop(0)))
        return out


def expected_share(sizes, strategy, temperature):
    """The expected fraction of an epoch's batches from each dataset (for the log)."""
    if strategy in ("proportional",):
        s = float(sum(sizes))
        return [x / s for x in sizes]
    if strategy == "round_robin":
        return [1.0 / len(sizes)] * len(sizes)
    return EpochPlanner(sizes, 1, strategy, temperature).probabilities()

