"""The statistics the sinks ask for, computed from the watched tensors and handed on as numbers.

Per step: the consumed gradients' norms, the update and weight norms (update ratios) on the steps a sink asks
for, the per-pass contribution norms measured by the tensor pre-hooks, and on histogram steps the consumed
gradients' histograms, counted on their device. Everything a step needs reaches the host in the step's one transfer
(``stats.HostBatch``), shared with the tracker's own NaN/Inf check (histograms: two more, on their steps only).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from ..stats import FiniteChecks, HostBatch, NormPlan, local_tensors
from . import Histogram, Sinks, StepRecord

Getter = Callable[[], list[float]]


@dataclass
class ScheduledStep:
    """A step's statistics, scheduled on a HostBatch; the getters work once the batch is read."""

    opt_index: int
    grad_norms: Getter | None
    updates: tuple[Getter, Getter] | None
    contributions: list[tuple[int, list[int], Getter]]
    sparse_norms: list[tuple[int, Getter]]  # (position, norm) of the sparse gradients: for the sinks only


class Telemetry:
    """Feeds the sinks the statistics they ask for; sinks themselves never touch a tensor."""

    def __init__(self, sinks: Sinks) -> None:
        self.sinks = sinks
        self.measuring_contributions = sinks.contributions_due(0)  # read between passes: pre-hooks on or off
        self._weights_before: dict[int, list[torch.Tensor]] = {}  # copies for update ratios, one step long
        # per backward, read at the step: norms on the device, or read already (small CPU gradients)
        self._contributions: list[tuple[int, list[int], torch.Tensor | list[float]]] = []

    def before_step(self, opt_index: int, step: int, weights: list[torch.Tensor]) -> None:
        """Copy the weights when this step's update ratio is due."""
        if self.sinks.update_ratio_due(step):
            with torch.no_grad():
                self._weights_before[opt_index] = torch._foreach_mul(local_tensors([w.detach() for w in weights]), 1.0)

    def backward(
        self,
        backward: int,
        params: list[int],
        synced: bool | None,
        incoming: dict[int, torch.Tensor | float] | None,
    ) -> None:
        """A backward pass was booked; ``incoming``: the norms of what it added, by parameter (device tensors, or
        floats already read)."""
        self.sinks.backward(backward, params, synced)
        measured = [i for i in params if i in incoming] if incoming else []
        if measured:
            norms = [incoming[i] for i in measured]  # type: ignore[index]
            if all(n.__class__ is float for n in norms):
                self._contributions.append((backward, measured, norms))  # type: ignore[arg-type]
            else:
                tensors = [torch.tensor(n) if n.__class__ is float else n for n in norms]
                if len({n.dtype for n in tensors}) > 1 or len({n.device for n in tensors}) > 1:
                    tensors = [n.float().cpu() for n in tensors]
                self._contributions.append((backward, measured, torch.stack(tensors)))
            if len(self._contributions) >= FiniteChecks.max_pending:
                self.flush()

    def schedule_step(
        self,
        batch: HostBatch,
        opt_index: int,
        weights: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        plan: NormPlan | None = None,
    ) -> ScheduledStep:
        """Schedule a step's statistics on ``batch`` (``weights``: all of the optimizer's; ``grads``: the consumed;
        ``plan``: how they split for their norms last time)."""
        grad_norms = batch.norms(grads, plan) if self.sinks.wants_norms else None
        before = self._weights_before.pop(opt_index, None)
        updates = None
        if before is not None and len(before) == len(weights):
            with torch.no_grad():
                after = local_tensors([w.detach() for w in weights])
                torch._foreach_sub_(before, after)  # in place: the copy is ours, and a new one cost a third more
                updates = batch.norms(before), batch.norms(after)
        sparse_norms: list[tuple[int, Getter]] = []
        if grad_norms is not None:  # the batched norms leave a sparse gradient at 0.0: its own, for the sinks
            strided = torch.strided
            sparse = [(pos, g) for pos, g in enumerate(grads) if g is not None and g.layout is not strided]
            sparse_norms = [(pos, batch.vector(_sparse_norm(g))) for pos, g in sparse]
        return ScheduledStep(opt_index, grad_norms, updates, self._schedule_contributions(batch), sparse_norms)

    def step(
        self,
        scheduled: ScheduledStep,
        record: StepRecord,
        updated: tuple[int, ...],
        grads: dict[int, torch.Tensor],
        next_step: int,
    ) -> None:
        """Hand a read step to the sinks (``grads``: the consumed gradients, for a histogram step)."""
        self._send_contributions(scheduled.contributions)
        if scheduled.sparse_norms:  # the checks took them as 0.0 (not checked); the sinks get their norms
            norms = list(record.grad_norms)
            for pos, get in scheduled.sparse_norms:
                norms[pos] = get()[0]
            record = replace(record, grad_norms=tuple(norms))
        if scheduled.updates is not None:
            update_norms, weight_norms = scheduled.updates
            record = replace(
                record, updated=updated, update_norms=tuple(update_norms()), weight_norms=tuple(weight_norms())
            )
        if self.sinks.histogram_due(record.step) and (groups := self.sinks.histogram_groups()):
            record = replace(record, histograms=gradient_histograms(grads, groups, self.sinks.histogram_buckets))
        self.sinks.step(record)
        self.measuring_contributions = self.sinks.contributions_due(next_step)

    def flush(self) -> None:
        """Hand the queued contribution norms to the sinks (outside a step): one read."""
        if self._contributions:
            batch = HostBatch()
            scheduled = self._schedule_contributions(batch)
            batch.read()
            self._send_contributions(scheduled)

    def release(self) -> None:
        self._weights_before.clear()
        self._contributions.clear()

    def _schedule_contributions(self, batch: HostBatch) -> list[tuple[int, list[int], Getter]]:
        queued, self._contributions = self._contributions, []
        return [
            (backward, indices, batch.vector(norms) if isinstance(norms, torch.Tensor) else _getter(norms))
            for backward, indices, norms in queued
        ]

    def _send_contributions(self, scheduled: list[tuple[int, list[int], Getter]]) -> None:
        for backward, indices, get in scheduled:
            self.sinks.contributions(backward, indices, get())


def _sparse_norm(grad: torch.Tensor) -> torch.Tensor:
    """A sparse gradient's 2-norm, as a 1-element tensor on its device (duplicate entries summed first)."""
    with torch.no_grad():
        values = grad.coalesce().values() if grad.layout is torch.sparse_coo else grad.values()
        return torch.linalg.vector_norm(values).reshape(1)


def _getter(values: list[float]) -> Getter:
    return lambda: values


def gradient_histograms(
    grads: dict[int, torch.Tensor], groups: Sequence[str], buckets: int, by_comparison: bool | None = None
) -> dict[str, Histogram]:
    """Histograms of the finite values of ``grads`` per group (``groups[i]``: parameter ``i``'s), counted on the
    device: only the counts and a few sums reach the host, in two reads (each tensor's range, then the counts)."""
    by_group: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for i, grad in grads.items():
            (values,) = local_tensors([grad.detach()])
            if values.layout is not torch.strided:  # a sparse gradient (an embedding's): left out, as from the norms
                continue
            if values.is_complex():  # real and imaginary parts, not a cast that drops the imaginary one
                values = torch.view_as_real(values)
            if values.numel():
                by_group.setdefault(groups[i], []).append(values.reshape(-1))
        ranges = _ranges(by_group)
        batch = HostBatch(keep_float64=True)
        scheduled = []
        for name, parts in by_group.items():
            lo, hi = ranges[name]
            if lo is None or hi is None:
                continue
            lo, hi = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)  # as numpy.histogram widens a single value
            edges = [lo + (hi - lo) * k / buckets for k in range(buckets)] + [hi]
            if any(a >= b for a, b in itertools.pairwise(edges)):  # a range too narrow for its values' precision
                edges = [lo, hi]
            counts = torch.stack([_counts(t, edges, by_comparison) for t in parts]).sum(0)
            wide = [None if t.dtype in (torch.float32, torch.float64) else torch.float32 for t in parts]
            sums = [t.sum(dtype=dtype) for t, dtype in zip(parts, wide, strict=True)]
            norms = [torch.linalg.vector_norm(t, dtype=dtype) for t, dtype in zip(parts, wide, strict=True)]
            # (the norms are squared on the host: a float32 square overflows long before its norm does)
            scheduled.append((name, edges, batch.vector(torch.cat([counts, torch.stack(sums + norms)]))))
        batch.read()
    out = {}
    for name, edges, get in scheduled:
        values, b = get(), len(edges) - 1
        counts, sums, norms = values[:b], values[b : (len(values) + b) // 2], values[(len(values) + b) // 2 :]
        num = int(sum(counts))
        if not num:
            continue
        nonzero = [k for k, c in enumerate(counts) if c]
        start, end = nonzero[0], nonzero[-1] + 1
        kept = counts[start - 1 : end] if start else [0.0, *counts[:end]]
        lo, hi = ranges[name]
        squares = math.fsum(n * n for n in norms)
        out[name] = Histogram(lo, hi, num, math.fsum(sums), squares, tuple(edges[start : end + 1]), tuple(kept))
    return out


def _ranges(by_group: dict[str, list[torch.Tensor]]) -> dict[str, tuple[float | None, float | None]]:
    """(min, max) of each group's finite values; a tensor holding NaN/Inf is replaced by its finite values."""
    batch = HostBatch(keep_float64=True)  # float64 gradients' extremes exactly: the buckets must hold them
    extremes = [[batch.vector(torch.stack([t.amin(), t.amax()])) for t in parts] for parts in by_group.values()]
    batch.read()
    out = {}
    for (name, parts), getters in zip(by_group.items(), extremes, strict=True):
        lows, highs = [], []
        for k, get in enumerate(getters):
            lo, hi = get()
            if not (math.isfinite(lo) and math.isfinite(hi)):  # the rare path: one more read for this tensor
                t = parts[k] = parts[k][torch.isfinite(parts[k])]
                if not t.numel():
                    continue
                lo, hi = torch.stack([t.amin(), t.amax()]).tolist()
            lows.append(lo)
            highs.append(hi)
        out[name] = (min(lows), max(highs)) if lows else (None, None)
    return out


def _counts(values: torch.Tensor, edges: list[float], by_comparison: bool | None) -> torch.Tensor:
    """How many of ``values`` fall in each bucket (the last one closed), on their device (no float64 there: MPS has
    none)."""
    if by_comparison is None:  # histc has no deterministic CUDA kernel
        by_comparison = values.device.type != "cpu" and torch.are_deterministic_algorithms_enabled()
    if not by_comparison:
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()  # one gradient's copy at a time
        return torch.histc(values, len(edges) - 1, min=edges[0], max=edges[-1])
    at_least = [(values >= e).sum() for e in edges[1:-1]]
    total = torch.tensor(values.numel(), device=values.device)
    above = torch.stack([total, *at_least, torch.zeros_like(total)])
    return (above[:-1] - above[1:]).float()
