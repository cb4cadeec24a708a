"""The statistics the sinks ask for, computed from the watched tensors and handed on as numbers.

Per step: the consumed gradients' norms, the update and weight norms (update ratios) on the steps a sink asks
for, the per-pass contribution norms measured by the tensor pre-hooks, and on histogram steps the consumed
gradients' values as host arrays. Everything a step needs reaches the host in the step's one transfer
(``stats.HostBatch``), shared with the tracker's own NaN/Inf check.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..stats import FiniteChecks, HostBatch, NormPlan, local_tensors
from . import Sinks, StepRecord

Getter = Callable[[], list[float]]


@dataclass
class ScheduledStep:
    """A step's statistics, scheduled on a HostBatch; the getters work once the batch is read."""

    opt_index: int
    grad_norms: Getter | None
    updates: tuple[Getter, Getter] | None
    contributions: list[tuple[int, list[int], Getter]]


class Telemetry:
    """Feeds the sinks the statistics they ask for; sinks themselves never touch a tensor."""

    def __init__(self, sinks: Sinks) -> None:
        self.sinks = sinks
        self.measuring_contributions = sinks.contributions_due(0)  # read by the contribution pre-hooks
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
        return ScheduledStep(opt_index, grad_norms, updates, self._schedule_contributions(batch))

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
        if scheduled.updates is not None:
            update_norms, weight_norms = scheduled.updates
            record = replace(
                record, updated=updated, update_norms=tuple(update_norms()), weight_norms=tuple(weight_norms())
            )
        if self.sinks.histogram_due(record.step):
            record = replace(record, histograms={i: _host_values(g) for i, g in grads.items()})
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


def _getter(values: list[float]) -> Getter:
    return lambda: values


def _host_values(grad: torch.Tensor) -> list[float] | object:
    """A gradient's values as a flat float32 host array (complex: real and imaginary parts)."""
    (values,) = local_tensors([grad.detach()])
    if values.is_complex():  # real and imaginary parts, not a cast that drops the imaginary one
        values = torch.view_as_real(values)
    return values.reshape(-1).float().cpu().numpy()
