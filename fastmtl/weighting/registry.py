"""The registry of weighting methods: each method is declared once, here, with its class, the level it works at,
a one-line summary and its options (keyword argument, configuration key, type, default, allowed range, help).

Everything else derives from it: :data:`fastmtl.weighting.STRATEGIES` and ``GRADIENT_METHODS``, the choices of
``TrainConfig.weighting`` / ``fastmtl train --weighting``, the option fields of :class:`fastmtl.training.TrainConfig`
(hence the command line's ``--dwa-temperature`` ... and the TOML keys ``dwa_temperature`` ...) with their checks, the
keyword arguments the trainer passes (:func:`method_kwargs`) and the methods table of the docs
(:func:`markdown_table`). A new method is one class and one :func:`register` call.
"""
from dataclasses import dataclass

__all__ = ["Option", "Method", "register", "METHODS", "method", "method_kwargs", "config_options",
           "markdown_table", "LEVELS"]

# what a method reads: the per-task losses, the tasks' gradients of the shared parameters, or of the shared
# representation (the encoder output)
LEVELS = {"loss": "losses", "param": "gradients of the shared parameters",
          "rep": "gradients of the shared representation"}


@dataclass(frozen=True)
class Option:
    """One option of a method: the class's keyword ``arg``; ``key`` the configuration field (``--key-with-dashes``
    on the command line, ``key`` in a TOML file; None: ``run_key`` reads a field of the run instead, e.g. its
    seed); ``type`` (float or int), ``default``, ``help``; ``low``/``high`` the allowed range (``low_ok``/
    ``high_ok``: whether the bound itself is allowed; None: unbounded)."""
    arg: str
    key: str = None
    type: type = float
    default: object = None
    help: str = ""
    low: float = None
    low_ok: bool = True
    high: float = None
    high_ok: bool = True
    run_key: str = None


@dataclass(frozen=True)
class Method:
    """A weighting method: ``name`` (``--weighting NAME``), ``cls`` (a :class:`fastmtl.weighting.TaskWeighting`),
    ``level`` (a key of :data:`LEVELS`), ``summary`` (one line for the docs, with its reference), ``options`` and
    ``extra`` (the optional extra of fastmtl the method needs, e.g. ``"torchjd"``; None: none)."""
    name: str
    cls: type
    level: str
    summary: str
    options: tuple = ()
    extra: str = None


METHODS = {}


def register(name, cls, level, summary, options=(), extra=None):
    """Declares the method ``name`` (see :class:`Method`); returns ``cls``."""
    if name in METHODS:
        raise ValueError("fastmtl: weighting method %r is already registered" % name)
    if level not in LEVELS:
        raise ValueError("fastmtl: weighting method %r: level must be one of %s, got %r" % (name, list(LEVELS), level))
    keys = {o.key for m in METHODS.values() for o in m.options if o.key}
    for o in options:
        if o.key is not None and o.key in keys:
            raise ValueError("fastmtl: weighting method %r: option key %r is taken" % (name, o.key))
    METHODS[name] = Method(name, cls, level, summary, tuple(options), extra)
    return cls


def method(name):
    """The :class:`Method` named ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError("fastmtl: unknown weighting %r (expected one of %s)" % (name, ", ".join(METHODS))) from None


def config_options():
    """Every option with a configuration key, in registration order."""
    return [o for m in METHODS.values() for o in m.options if o.key is not None]


def method_kwargs(name, cfg):
    """The keyword arguments of method ``name``'s class from the configuration ``cfg`` (any object with the
    options' keys as attributes)."""
    return {o.arg: getattr(cfg, o.key if o.key is not None else o.run_key) for o in method(name).options}


def markdown_table(extra=None):
    """The methods table of the docs: name, what it reads, summary, options with their defaults; the methods of
    the optional extra ``extra`` (None: those that need none)."""
    rows = ["| `--weighting` | reads | method | options (default) |", "|---|---|---|---|"]
    for m in METHODS.values():
        if m.extra != extra:
            continue
        opts = ", ".join("`--%s` (%s)" % (o.key.replace("_", "-"), o.default) for o in m.options if o.key)
        rows.append("| `%s` | %s | %s | %s |" % (m.name, LEVELS[m.level], m.summary, opts or "-"))
    return "\n".join(rows)
