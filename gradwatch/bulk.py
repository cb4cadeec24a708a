"""The identities and versions of many gradients at once, read and compared in C.

At every pass and step the tracker asks of each parameter whether ``.grad`` is the tensor it saw last and whether
that tensor's version moved. On a model of many small tensors a Python loop over them costs more than all the rest
of the bookkeeping; these helpers answer over whole lists with ``map`` over C callables (no Python frame per
parameter), for the common case where every answer is the expected one. The caller's loop handles the rest.
"""

from __future__ import annotations

import weakref
from collections import deque
from operator import and_, attrgetter, eq, is_
from typing import Any, Iterable, Sequence

import torch

grad_of = attrgetter("grad")
version_of = attrgetter("_version")


def _canonical_refs() -> bool:
    """Whether ``weakref.ref`` hands out one reference object per live tensor (CPython does): then "the same
    reference object" means "the same tensor", and lists of references compare with ``is`` in C."""
    t = torch.zeros(1)
    return weakref.ref(t) is weakref.ref(t)


CANONICAL_REFS = _canonical_refs()


def weak_refs(tensors: Iterable[Any]) -> list[weakref.ref[torch.Tensor]] | None:
    """A weak reference to each tensor, or None when one of them is None (or references are not canonical)."""
    if not CANONICAL_REFS:
        return None
    try:
        return list(map(weakref.ref, tensors))
    except TypeError:  # None has no weak reference
        return None


def same_objects(a: Iterable[Any], b: Iterable[Any]) -> list[bool]:
    """``x is y`` for each pair."""
    return list(map(is_, a, b))


def any_same_and_equal(same: Iterable[bool], a: Iterable[Any], b: Iterable[Any]) -> bool:
    """Whether some position is marked in ``same`` and has ``a == b`` (ints: a version that did not move)."""
    return any(map(and_, same, map(eq, a, b)))


def gather(source: Sequence[Any], indices: Iterable[int]) -> list[Any]:
    """``[source[i] for i in indices]``."""
    return list(map(source.__getitem__, indices))


def any_at(source: Sequence[Any], indices: Iterable[int]) -> bool:
    """Whether ``source[i]`` is true for some ``i`` in ``indices``."""
    return any(map(source.__getitem__, indices))


def all_at(source: Sequence[Any], indices: Iterable[int]) -> bool:
    """Whether ``source[i]`` is true for every ``i`` in ``indices``."""
    return all(map(source.__getitem__, indices))


def scatter(target: list[Any], indices: Iterable[int], values: Iterable[Any]) -> None:
    """``target[i] = v`` for each pair."""
    deque(map(target.__setitem__, indices, values), 0)
