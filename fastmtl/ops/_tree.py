"""The small pytree the op registrations need: nested lists and tuples of leaves (tensors, numbers, bools, None).

The ops' arguments and results are flat schemas with ``Tensor[]`` members, so lists, tuples and named tuples
(PackedSequence) are the only containers; every other object, None included, is a leaf. (torch's own pytree is
private, ``torch.utils._pytree``.)
"""
from typing import Any, List, Sequence, Tuple

__all__ = ["TreeSpec", "tree_flatten", "tree_unflatten", "tree_leaves", "tree_structure"]


class TreeSpec:
    """The structure of a nested list/tuple: ``kind`` is list, tuple or None (a leaf)."""

    __slots__ = ("kind", "_children", "num_leaves")

    def __init__(self, kind, children: Sequence["TreeSpec"] = ()):
        self.kind = kind
        self._children = tuple(children)
        self.num_leaves = 1 if kind is None else sum(c.num_leaves for c in self._children)

    def children(self) -> Tuple["TreeSpec", ...]:
        return self._children

    def __eq__(self, other) -> bool:
        return isinstance(other, TreeSpec) and self.kind is other.kind and self._children == other._children

    def __hash__(self) -> int:
        return hash((self.kind, self._children))

    def __repr__(self) -> str:
        if self.kind is None:
            return "*"
        inner = ", ".join(map(repr, self._children))
        return "[%s]" % inner if self.kind is list else "(%s)" % inner


_LEAF = TreeSpec(None)


def tree_flatten(tree: Any) -> Tuple[List[Any], TreeSpec]:
    leaves: List[Any] = []

    def walk(t):
        if isinstance(t, (list, tuple)):
            return TreeSpec(type(t), [walk(c) for c in t])
        leaves.append(t)
        return _LEAF

    return leaves, walk(tree)


def tree_unflatten(leaves: Sequence[Any], spec: TreeSpec) -> Any:
    if len(leaves) != spec.num_leaves:
        raise ValueError("tree_unflatten: %d leaves for a structure of %d" % (len(leaves), spec.num_leaves))
    it = iter(leaves)

    def build(s):
        if s.kind is None:
            return next(it)
        children = [build(c) for c in s.children()]
        if s.kind in (list, tuple):
            return s.kind(children)
        if hasattr(s.kind, "_fields"):  # a named tuple
            return s.kind(*children)
        return s.kind(children)  # a list or tuple subclass

    return build(spec)


def tree_leaves(tree: Any) -> List[Any]:
    return tree_flatten(tree)[0]


def tree_structure(tree: Any) -> TreeSpec:
    return tree_flatten(tree)[1]
