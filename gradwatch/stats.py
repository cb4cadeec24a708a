"""Batched tensor checks, computed on the device and read back only when an answer is needed."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


def local_tensors(tensors: Sequence[Any]) -> list[Any]:
    """Each rank's own shard of a ``DTensor`` (FSDP2's sharded parameters and gradients), other tensors as they
    are: the checks run per rank on what the rank holds. Free unless torch.distributed.tensor was imported."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def _groups(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Positions of dense tensors grouped by (device, dtype), as ``torch._foreach_*`` needs them."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for pos, t in enumerate(tensors):
        if t.layout is torch.strided:
            groups.setdefault((t.device, t.dtype), []).append(pos)
    return groups


def norms_by_group(tensors: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """(positions, stacked 2-norms) per device/dtype group: one ``_foreach_norm`` per group, no sync."""
    return [(positions, torch.stack(norms)) for positions, norms in _foreach_norms(tensors)]


@dataclass
class _Window:
    backward: int
    owner_steps: tuple[int, ...]
    params: list[int]
    groups: list[tuple[list[int], torch.Tensor]]


class FiniteChecks:
    """Per-backward NaN/Inf checks kept on the device and read in one go when a step or clear needs them."""

    max_pending = 256  # read back early rather than grow without bound when no step comes

    def __init__(self) -> None:
        self._pending: list[_Window] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, backward: int, owner_steps: tuple[int, ...], params: list[int], grads: list[torch.Tensor]) -> None:
        """Queue the check of the gradients ``grads`` of ``params`` right after backward pass ``backward``."""
        self._pending.append(_Window(backward, owner_steps, params, norms_by_group(grads)))

    def resolve(self) -> list[tuple[int, tuple[int, ...], int]]:
        """(param index, optimizer steps then, backward) for every non-finite gradient queued; empties the queue."""
        pending, self._pending = self._pending, []
        flags = [torch.isfinite(norms).all() for w in pending for _, norms in w.groups]
        if not flags or all(_to_host(flags)):
            return []
        found = []
        for w in pending:
            for positions, norms in w.groups:
                finite = torch.isfinite(norms).tolist()
                bad = [p for p, ok in zip(positions, finite, strict=True) if not ok]
                found.extend((w.params[p], w.owner_steps, w.backward) for p in bad)
        return found


def _to_host(flags: list[torch.Tensor]) -> list[bool]:
    """Read scalar device flags, in order, with one transfer per device."""
    batch = HostBatch()
    getters = [batch.vector(f) for f in flags]
    batch.read()
    return [bool(get()[0]) for get in getters]


def nonfinite_positions(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Positions of the tensors holding NaN or Inf: one batched pass, one read (more only if some are bad)."""
    suspects = [
        p
        for positions, ats, norm in _finite_blocks(tensors)
        if not math.isfinite(norm.item())
        for p in (positions if ats is None else [positions[at] for at in ats])
    ]
    return confirm_nonfinite(tensors, sorted(suspects)) if suspects else []


def confirm_nonfinite(tensors: Sequence[torch.Tensor | None], suspects: Sequence[int]) -> list[int]:
    """The ``suspects`` (positions whose norm is not finite) that do hold NaN/Inf: a norm of finite values can
    overflow (float32 values near 1e19 and up). Reads one flag per suspect, on this rare path only."""
    present = [pos for pos in suspects if tensors[pos] is not None]
    if not present:
        return list(suspects)
    tensors = local_tensors(tensors)
    flags = _to_host([~torch.isfinite(tensors[pos]).all() for pos in present])  # type: ignore[arg-type]
    unconfirmed = {pos for pos, bad in zip(present, flags, strict=True) if not bad}
    return [pos for pos in suspects if pos not in unconfirmed]


def nonfinite_and_zero(tensors: Sequence[torch.Tensor], candidates: Sequence[int]) -> tuple[list[int], list[int]]:
    """Positions of the tensors holding NaN/Inf, and of the ``candidates`` that are all zeros (their norms read on
    this rarer path only)."""
    bad = nonfinite_positions(tensors)
    if not candidates:
        return bad, []
    values: dict[int, float] = {}
    for positions, norms in _foreach_norms([tensors[p] for p in candidates]):
        values.update((candidates[at], v) for at, v in zip(positions, _values(norms), strict=True))
    return bad, [p for p in candidates if values.get(p) == 0.0]


SMALL_ON_CPU = 1 << 16  # elements: below this, dispatching a kernel per CPU tensor costs more than copying it
STACK_LIMIT = 1 << 22  # elements copied into one stack at most
FEW_ON_CPU = 16  # up to this many CPU norms are read one by one


Block = tuple[Sequence[int], Sequence[int] | None, torch.Tensor]  # positions, which of them (None: all), a norm


def _finite_blocks(tensors: Sequence[torch.Tensor]) -> list[Block]:
    """Blocks covering the dense tensors: (positions of a group in ``tensors``, which of them, a 0-d tensor that is
    finite when every tensor there is).

    On the CPU, where a kernel per tensor costs about a microsecond of dispatch, the small tensors of one shape are
    stacked and normed at once (1000 tensors: a third of the time of ``_foreach_norm``); on a GPU, the norms of a
    device/dtype group come from one ``_foreach_norm`` and are summed. A norm of finite values can overflow: the
    caller confirms on the values.
    """
    tensors = local_tensors(tensors)
    grad_enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # torch.no_grad() without its Python objects: this runs every step
    try:
        if _GROUP_BY_DEVICE_AND_DTYPE is not None and tensors:
            try:
                grouped = _GROUP_BY_DEVICE_AND_DTYPE([tensors], True).values()
                return [block for lists, positions in grouped for block in _group_blocks(positions, lists[0])]
            except (RuntimeError, TypeError):  # a sparse gradient has no norm kernel: the Python grouping skips it
                pass
        groups = _groups(tensors).values()
        return [block for pos in groups for block in _group_blocks(pos, [tensors[p] for p in pos])]
    finally:
        torch._C._set_grad_enabled(grad_enabled)


def _group_blocks(positions: Sequence[int], group: list[torch.Tensor]) -> list[Block]:
    """The blocks of one device/dtype group (``positions``: where its tensors are in the caller's list)."""
    if group[0].device.type != "cpu":
        return [(positions, None, torch.stack(torch._foreach_norm(group)).sum())]
    if len(group) <= FEW_ON_CPU:  # reading a few CPU scalars beats stacking them
        return [(positions, (at,), norm) for at, norm in enumerate(torch._foreach_norm(group))]
    by_shape: dict[torch.Size, list[int]] = {}
    for at, t in enumerate(group):
        by_shape.setdefault(t.shape, []).append(at)
    blocks: list[Block] = []
    rest: list[int] = []
    for shape, ats in by_shape.items():
        numel = math.prod(shape)
        if len(ats) == 1 or numel > SMALL_ON_CPU:
            rest.extend(ats)
            continue
        per = max(2, STACK_LIMIT // max(1, numel))
        for start in range(0, len(ats), per):
            chunk = ats[start : start + per]
            blocks.append((positions, chunk, torch.linalg.vector_norm(torch.stack([group[at] for at in chunk]))))
    if rest:
        norms = torch._foreach_norm([group[at] for at in rest])
        blocks.append((positions, rest, norms[0] if len(norms) == 1 else torch.stack(norms).sum()))
    return blocks


_GROUP_BY_DEVICE_AND_DTYPE = getattr(torch._C, "_group_tensors_by_device_and_dtype", None)  # what optimizers use


def _foreach_norms(tensors: Sequence[torch.Tensor]) -> list[tuple[list[int], list[torch.Tensor]]]:
    """(positions, unstacked 0-d norms) per device/dtype group of the dense tensors."""
    tensors = local_tensors(tensors)
    with torch.no_grad():
        if _GROUP_BY_DEVICE_AND_DTYPE is not None and tensors:
            try:  # grouped in C++: a third of the Python loop's time over 1000 tensors
                grouped = sorted(_GROUP_BY_DEVICE_AND_DTYPE([tensors], True).values(), key=lambda g: g[1][0])
                return [(list(positions), torch._foreach_norm(lists[0])) for lists, positions in grouped]
            except (RuntimeError, TypeError):  # a sparse gradient has no norm kernel: the Python grouping skips it
                pass
        return [(pos, torch._foreach_norm([tensors[p] for p in pos])) for pos in _groups(tensors).values()]


def _values(norms: list[torch.Tensor]) -> list[float]:
    return torch.stack(norms).float().tolist()


class HostBatch:
    """Device vectors gathered while handling one step, read back together: one transfer per device."""

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []
        self._values: list[list[float]] = []

    def norms(self, tensors: Sequence[torch.Tensor | None]) -> Callable[[], list[float]]:
        """Schedule the 2-norm of each tensor (0.0 for None or sparse); the getter works after ``read()``."""
        present = [(pos, t) for pos, t in enumerate(tensors) if t is not None]
        slots = [(positions, self._add(norms)) for positions, norms in norms_by_group([t for _, t in present])]
        size = len(tensors)

        def get() -> list[float]:
            values = [0.0] * size
            for positions, slot in slots:
                for at, value in zip(positions, self._values[slot], strict=True):
                    values[present[at][0]] = value
            return values

        return get

    def vector(self, tensor: torch.Tensor) -> Callable[[], list[float]]:
        """Schedule a 1-D tensor; the getter works after ``read()``."""
        slot = self._add(tensor)
        return lambda: self._values[slot]

    def _add(self, tensor: torch.Tensor) -> int:
        self._parts.append(tensor.detach().float().reshape(-1))
        return len(self._parts) - 1

    def read(self) -> None:
        """Move everything scheduled to the host."""
        self._values = [[] for _ in self._parts]
        by_device: dict[torch.device, list[int]] = {}
        for slot, part in enumerate(self._parts):
            by_device.setdefault(part.device, []).append(slot)
        for slots in by_device.values():
            flat = torch.cat([self._parts[s] for s in slots]).tolist()
            at = 0
            for s in slots:
                n = self._parts[s].numel()
                self._values[s], at = flat[at : at + n], at + n


def zero_flags(grads: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """(positions, bool tensor 'this gradient is all zeros') per group, kept on the device."""
    return [(positions, norms == 0) for positions, norms in norms_by_group(grads)]


def read_flags(flags: Sequence[tuple[torch.Tensor, int | None]]) -> list[bool]:
    """Read (tensor, position) flags; position None means the whole tensor must be all True."""
    scalars = [t.all() if pos is None else t[pos] for t, pos in flags]
    return _to_host(scalars) if scalars else []
