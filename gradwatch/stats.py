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
    tensors = list(tensors)
    if dtensor is None or not any(issubclass(kind, dtensor) for kind in set(map(type, tensors))):
        return tensors
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def _groups(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Positions of dense tensors grouped by (device, dtype), as ``torch._foreach_*`` needs them."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for pos, t in enumerate(tensors):
        if t.layout is torch.strided:
            groups.setdefault((t.device, t.dtype), []).append(pos)
    return groups


_GROUP_BY_DEVICE_AND_DTYPE = getattr(torch._C, "_group_tensors_by_device_and_dtype", None)  # what optimizers use


class NormPlan:
    """How ``norms_by_group`` split a caller's tensors the last time, kept by the caller (one per optimizer) to
    split its next list of as many tensors the same way: on 1000 small CPU tensors the grouping cost twice the
    kernels. A list the plan does not fit (unequal shapes in a stack, another device, a sparse tensor) raises in
    the kernels and is grouped afresh; a plan is kept only when it covers every position."""

    def __init__(self) -> None:
        self._size = -1
        self._parts: list[tuple[bool, list[int]]] = []  # (stacked row by row, positions)

    def run(self, tensors: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]] | None:
        if len(tensors) != self._size:
            return None
        out = []
        try:
            for stacked, positions in self._parts:
                group = list(map(tensors.__getitem__, positions))
                out.append((positions, _row_norms(group) if stacked else _each_norm(group)))
        except (RuntimeError, TypeError, ValueError):
            self._size = -1
            return None
        return out

    def learn(self, size: int, parts: list[tuple[bool, list[int]]]) -> None:
        covered = sum(len(positions) for _, positions in parts)
        self._size, self._parts = (size, parts) if covered == size else (-1, [])


def norms_by_group(
    tensors: Sequence[torch.Tensor], plan: NormPlan | None = None
) -> list[tuple[list[int], torch.Tensor]]:
    """(positions, their 2-norms as a 1-d tensor) covering the dense tensors, no sync.

    One ``_foreach_norm`` per device/dtype group, except on the CPU, where a kernel per tensor costs about a
    microsecond of dispatch: there the small tensors of one shape are stacked and normed row by row in one kernel
    (1000 tensors: a third of the time). ``plan``: the caller's split of its previous list, tried first.
    """
    tensors = local_tensors(tensors)
    if not tensors:
        return []
    grad_enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # torch.no_grad() without its Python objects: this runs every step
    try:
        if len(tensors) <= FEW_ON_CPU and _one_dense_group(tensors):  # a small model's step: no grouping at all
            return [(list(range(len(tensors))), _each_norm(tensors))]
        planned = plan.run(tensors) if plan is not None else None
        if planned is not None:
            return planned
        parts = _split_and_norm(tensors)
        if plan is not None:
            plan.learn(len(tensors), [(stacked, positions) for positions, _, stacked in parts])
        return [(positions, norms) for positions, norms, _ in parts]
    finally:
        torch._C._set_grad_enabled(grad_enabled)


Part = tuple[list[int], torch.Tensor, bool]  # positions, their norms, whether stacked row by row


def _split_and_norm(tensors: Sequence[torch.Tensor]) -> list[Part]:
    if _GROUP_BY_DEVICE_AND_DTYPE is not None:
        try:  # grouped in C++: a third of the Python loop's time over 1000 tensors
            grouped = _GROUP_BY_DEVICE_AND_DTYPE([tensors], True).values()
            ordered = sorted((positions, lists[0]) for lists, positions in grouped)
            return [part for positions, group in ordered for part in _group_norms(list(positions), group)]
        except (RuntimeError, TypeError):  # a sparse gradient has no norm kernel: the Python grouping skips it
            pass
    groups = _groups(tensors).values()
    return [part for pos in groups for part in _group_norms(pos, [tensors[p] for p in pos])]


def _each_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each tensor (one device and dtype), one ``_foreach_norm``."""
    return torch.stack(torch._foreach_norm(tensors))


def _row_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each tensor (all of one shape), stacked and normed row by row in one kernel."""
    return torch.linalg.vector_norm(torch.stack(tensors).reshape(len(tensors), -1), dim=1)


def _one_dense_group(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0]
    device, dtype = first.device, first.dtype
    return all(t.layout is torch.strided and t.dtype is dtype and t.device == device for t in tensors)


SMALL_ON_CPU = 1 << 16  # elements: below this, dispatching a kernel per CPU tensor costs more than copying it
STACK_LIMIT = 1 << 22  # elements copied into one stack at most
FEW_ON_CPU = 16  # up to this many CPU tensors of a group get a kernel each


def _group_norms(positions: list[int], group: list[torch.Tensor]) -> list[Part]:
    """The norms of one device/dtype group (``positions``: where its tensors are in the caller's list)."""
    if len(group) <= FEW_ON_CPU or group[0].device.type != "cpu":
        return [(positions, _each_norm(group), False)]
    by_shape: dict[torch.Size, list[int]] = {}
    for at, t in enumerate(group):
        by_shape.setdefault(t.shape, []).append(at)
    out: list[Part] = []
    rest: list[int] = []
    for shape, ats in by_shape.items():
        numel = math.prod(shape)
        if len(ats) == 1 or numel > SMALL_ON_CPU:
            rest.extend(ats)
            continue
        per = max(2, STACK_LIMIT // max(1, numel))
        for start in range(0, len(ats), per):
            chunk = ats[start : start + per]
            out.append(([positions[at] for at in chunk], _row_norms([group[at] for at in chunk]), True))
    if rest:
        out.append(([positions[at] for at in rest], _each_norm([group[at] for at in rest]), False))
    return out


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
    """Positions of the tensors holding NaN or Inf: one batched pass, one read per device/dtype group (one transfer
    of its norms; more only if some are bad)."""
    return _nonfinite(tensors, _read(norms_by_group(tensors)))


def _read(groups: list[tuple[list[int], torch.Tensor]]) -> list[tuple[list[int], list[float]]]:
    return [(positions, norms.tolist()) for positions, norms in groups]


def _nonfinite(tensors: Sequence[torch.Tensor], read: list[tuple[list[int], list[float]]]) -> list[int]:
    if all([all(map(math.isfinite, values)) for _, values in read]):
        return []
    bad = [p for positions, values in read for p, v in zip(positions, values, strict=True) if not math.isfinite(v)]
    return confirm_nonfinite(tensors, sorted(bad)) if bad else []


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


def nonfinite_and_zero(
    tensors: Sequence[torch.Tensor], candidates: Sequence[int], plan: NormPlan | None = None
) -> tuple[list[int], list[int]]:
    """Positions of the tensors holding NaN/Inf, and of the ``candidates`` that are all zeros: one batched pass
    and one read (``plan``: see ``NormPlan``); a few small CPU tensors are read directly instead."""
    on_host = _host_checks(tensors)
    if on_host is not None:
        bad, zero = on_host
        return bad, [p for p in candidates if p in zero]
    read = _read(norms_by_group(tensors, plan))
    if not candidates:
        return _nonfinite(tensors, read), []
    wanted = set(candidates)
    zero = {p for positions, values in read for p, v in zip(positions, values, strict=True) if v == 0.0 and p in wanted}
    return _nonfinite(tensors, read), [p for p in candidates if p in zero]


HOST_CHECK_LIMIT = 256  # elements: CPU gradients this small in all are checked in Python, not by norm kernels
_HOST_READABLE = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})


def host_values(tensors: Sequence[torch.Tensor]) -> list[list[float]] | None:
    """Each tensor's values as a flat list of floats, read on the host, when the tensors are dense floating-point
    CPU tensors of at most ``HOST_CHECK_LIMIT`` elements in all; else None (a subclass, sparse, complex or larger:
    kernels). On the CPU a kernel's dispatch outweighs reading a few values."""
    limit = HOST_CHECK_LIMIT  # read at each call: tests lower it
    total = 0
    for t in tensors:
        dense = type(t) is torch.Tensor and t.layout is torch.strided
        if not dense or not t.is_cpu or t.dtype not in _HOST_READABLE:
            return None
        total += math.prod(t.shape)
        if total > limit:
            return None
    out = []
    for t in tensors:
        values = t.tolist()
        if values.__class__ is not list:  # a 0-d tensor
            values = [values]
        while values and values[0].__class__ is list:  # flatten one dimension at a time
            values = [v for row in values for v in row]
        out.append(values)
    return out


def host_norm(values: list[float]) -> float:
    """The 2-norm of values read by ``host_values`` (in float64: it cannot overflow where float32 would)."""
    return math.hypot(*values)


def _host_checks(tensors: Sequence[torch.Tensor]) -> tuple[list[int], set[int]] | None:
    """(positions holding NaN/Inf, positions all zeros), read exactly on the host, when the tensors are dense
    floating-point CPU tensors of at most ``HOST_CHECK_LIMIT`` elements in all; else None. On a small model's step
    this is a third of the norm kernels' cost (each CPU kernel's dispatch outweighs reading its few values)."""
    read = host_values(tensors)
    if read is None:
        return None
    bad: list[int] = []
    zero: set[int] = set()
    for pos, values in enumerate(read):
        if not all(map(math.isfinite, values)):
            bad.append(pos)
        elif not any(values):
            zero.add(pos)
    return bad, zero


class HostBatch:
    """Device vectors gathered while handling one step, read back together: one transfer per device."""

    def __init__(self, keep_float64: bool = False) -> None:
        self._keep_float64 = keep_float64  # read float64 vectors as they are (else everything as float32)
        self._parts: list[torch.Tensor] = []
        self._values: list[list[float]] = []

    def norms(self, tensors: Sequence[torch.Tensor | None], plan: NormPlan | None = None) -> Callable[[], list[float]]:
        """Schedule the 2-norm of each tensor (0.0 for None or sparse); the getter works after ``read()``."""
        present = [(pos, t) for pos, t in enumerate(tensors) if t is not None]
        size = len(tensors)
        on_host = host_values([t for _, t in present])
        if on_host is not None:  # a small model's CPU gradients: read now, no kernels
            norms = [0.0] * size
            for (pos, _), values in zip(present, on_host, strict=True):
                norms[pos] = host_norm(values)
            return lambda: norms
        groups = norms_by_group([t for _, t in present], plan)
        slots = [(positions, self._add(norms)) for positions, norms in groups]

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
        tensor = tensor.detach()
        if tensor.dtype is not torch.float32 and not (self._keep_float64 and tensor.dtype is torch.float64):
            tensor = tensor.float()
        self._parts.append(tensor.reshape(-1) if tensor.dim() != 1 else tensor)
        return len(self._parts) - 1

    def read(self) -> None:
        """Move everything scheduled to the host."""
        self._values = [[] for _ in self._parts]
        by_device: dict[torch.device, list[int]] = {}
        for slot, part in enumerate(self._parts):
            if part.device.type == "cpu":  # already on the host: no transfer to batch
                self._values[slot] = part.tolist()
            else:
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
