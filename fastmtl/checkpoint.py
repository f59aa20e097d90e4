"""fastmtl checkpoints: one safetensors file, nothing unpickled.

A checkpoint (``best.pt``, ``last.pt``) is a standard safetensors file, so any safetensors reader can open its
tensors. Its ``__metadata__`` holds, as strings:

* ``format``: ``"fastmtl-checkpoint"``, and ``format_version``: ``"2"``;
* ``fastmtl``: a JSON document with everything that is not a tensor (configuration, vocabularies, label sets, task
  list, history, epoch, best metric, RNG states of Python and NumPy, optimizer hyper-parameters ...). Each tensor in
  it is a reference ``{"$tensor": NAME}`` to the safetensors entry NAME (e.g. ``model/embedding.weight``,
  ``optimizer/state/0/exp_avg``, ``rng/torch``); dicts whose keys are not all strings are ``{"$items": [[k, v],
  ...]}``, tuples ``{"$tuple": [...]}``, non-finite floats ``{"$float": "nan" | "inf" | "-inf"}``;
* ``fastmtl_sha256``: the SHA-256 of the whole file as written with this value set to 64 zeros. A truncated or
  corrupted file fails this check and is refused with an error naming it.

Loading parses the JSON and the safetensors tensors only: no pickle, no code from the file ever runs. PyTorch
pickle files (what ``torch.save`` writes, and what fastmtl wrote before) are refused with a clear message.
"""
import hashlib
import json
import math
import os
import re

import torch

from .fileio import atomic_write, open_regular

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint_tree", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fastmtl-checkpoint"
FORMAT_VERSION = "2"
_SUM_KEY = "fastmtl_sha256"
_ZERO_SUM = "0" * 64
_MAX_HEADER = 100_000_000  # safetensors' own limit
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, unreadable, corrupted, truncated, a pickle, or not fastmtl's."""


# ----------------------------------------------------------------------------------------------------------------
# tree <-> (JSON, tensors)

def _encode(obj, name, tensors, seen_storages):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        if t.layout != torch.strided:
            raise TypeError("fastmtl: cannot checkpoint a %s tensor at %r" % (t.layout, name))
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if (not t.is_contiguous() or key in seen_storages or t.storage_offset() != 0
                or storage.nbytes() != t.numel() * t.element_size()):
            t = t.clone(memory_format=torch.contiguous_format)  # safetensors stores whole, unshared buffers
        else:
            seen_storages.add(key)
        tname, n = name or "tensor", 1
        while tname in tensors:
            n += 1
            tname = "%s#%d" % (name, n)
        tensors[tname] = t
        return {"$tensor": tname}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, dict):
        sub = lambda k: "%s/%s" % (name, k) if name else str(k)  # noqa: E731
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, sub(k), tensors, seen_storages) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise TypeError("fastmtl: cannot checkpoint a dict key of type %s at %r" % (type(k).__name__, name))
            items.append([_encode(k, sub(k), tensors, seen_storages), _encode(v, sub(k), tensors, seen_storages)])
        return {"$items": items}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, "%s/%d" % (name, i), tensors, seen_storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, "%s/%d" % (name, i), tensors, seen_storages) for i, v in enumerate(obj)]
    raise TypeError("fastmtl: cannot checkpoint a value of type %s at %r (JSON types and tensors only)"
                    % (type(obj).__name__, name))


def _decode(obj, tensors):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if any(k.startswith("$") for k in obj):
        if len(obj) != 1:
            raise ValueError("a tagged value with extra keys: %s" % sorted(obj)[:5])
        (tag, val), = obj.items()
        if tag == "$tensor":
            if not isinstance(val, str) or val not in tensors:
                raise ValueError("a reference to a missing tensor %r" % (val,))
            return tensors[val]
        if tag == "$tuple" and isinstance(val, list):
            return tuple(_decode(v, tensors) for v in val)
        if tag == "$items" and isinstance(val, list):
            out = {}
            for kv in val:
                if not (isinstance(kv, list) and len(kv) == 2):
                    raise ValueError("a malformed $items entry")
                k = _decode(kv[0], tensors)
                if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                    raise ValueError("a dict key of type %s" % type(k).__name__)
                out[k] = _decode(kv[1], tensors)
            return out
        if tag == "$float" and val in ("nan", "inf", "-inf"):
            return float(val)
        raise ValueError("an unknown tag %r" % tag)
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------------------------
# file

def save_checkpoint(tree, path):
    """Writes ``tree`` (nested dicts/lists/tuples of JSON values and tensors) to ``path`` atomically in the format
    described in the module docstring."""
    from safetensors.torch import save as st_save

    tensors = {}
    doc = _encode(tree, "", tensors, set())
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "fastmtl": json.dumps(doc, ensure_ascii=True, allow_nan=False, separators=(",", ":")),
            _SUM_KEY: _ZERO_SUM}
    raw = bytearray(st_save(tensors, metadata=meta))
    n = int.from_bytes(raw[:8], "little")
    pos = bytes(raw[8:8 + n]).find(b'"%s":"%s"' % (_SUM_KEY.encode(), _ZERO_SUM.encode()))
    if pos < 0:  # pragma: no cover - safetensors always writes compact JSON
        raise RuntimeError("fastmtl: could not place the checkpoint checksum")
    pos += 8 + len(_SUM_KEY) + 4
    digest = hashlib.sha256(raw).hexdigest()
    raw[pos:pos + 64] = digest.encode("ascii")
    atomic_write(path, raw)


def _looks_like_pickle(head):
    # torch.save's zip container, or a raw pickle (protocol 2+ starts with PROTO 0x80 and the protocol number; the
    # legacy torch format too)
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                   b"\x05"))


def load_checkpoint_tree(path):
    """Reads a checkpoint written by :func:`save_checkpoint` and returns its tree (tensors on the CPU).

    Raises :class:`CheckpointError` (a ``ValueError``) naming ``path`` if the file is missing, unreadable, a pickle
    (never unpickled), not a fastmtl checkpoint, truncated or corrupted (checksum mismatch).
    """
    path = os.fspath(path)
    try:
        with open_regular(path, "checkpoint", error=CheckpointError) as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError("fastmtl: cannot read checkpoint %s: %s" % (path, e.strerror or e)) from None
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
    # a safetensors file starts with its header's length, then "{": its first bytes can look like a pickle's
    # (a header of 128 + 256k bytes starts with 0x80), so the pickle test comes second
    is_safetensors = 0 < n <= min(_MAX_HEADER, len(raw) - 8) and raw[8:9] == b"{"
    if not is_safetensors and _looks_like_pickle(raw[:4]):
        raise CheckpointError(
            "fastmtl: %s looks like a pickle-based PyTorch checkpoint (torch.save, or fastmtl before checkpoint "
            "format 2); fastmtl does not unpickle files, since unpickling can run arbitrary code. Retrain with this "
            "version (checkpoints are now safetensors with a JSON header)" % path)
    bad = "fastmtl: %s is not a fastmtl checkpoint, or it is truncated or corrupted (%s)"
    if len(raw) < 8:
        raise CheckpointError(bad % (path, "%d bytes" % len(raw)))
    if not is_safetensors:
        raise CheckpointError(bad % (path, "header length %d, file size %d" % (n, len(raw))))
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(bad % (path, "its header is not valid JSON")) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(bad % (path, "no fastmtl header"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError("fastmtl: %s is a fastmtl checkpoint of format version %r; this fastmtl reads version %s"
                              % (path, meta.get("format_version"), FORMAT_VERSION))
    digest = meta.get(_SUM_KEY)
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise CheckpointError(bad % (path, "no valid checksum"))
    pos = raw.find(b'"%s":"%s"' % (_SUM_KEY.encode(), digest.encode()), 8, 8 + n)
    if pos < 0:
        raise CheckpointError(bad % (path, "no valid checksum"))
    pos += len(_SUM_KEY) + 4
    h = hashlib.sha256()
    h.update(memoryview(raw)[:pos])
    h.update(_ZERO_SUM.encode())
    h.update(memoryview(raw)[pos + 64:])
    if h.hexdigest() != digest:
        raise CheckpointError("fastmtl: %s is corrupted or truncated: its SHA-256 checksum does not match "
                              "(%d bytes)" % (path, len(raw)))
    try:
        from safetensors.torch import load as st_load

        tensors = st_load(raw)
        doc = json.loads(meta["fastmtl"])
        return _decode(doc, tensors)
    except Exception as e:  # a file with a valid checksum but a bad body: crafted, or written by a buggy tool
        raise CheckpointError(bad % (path, "%s: %s" % (type(e).__name__, e))) from None
