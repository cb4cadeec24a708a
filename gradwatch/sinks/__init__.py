"""Where the lifecycle goes besides the findings: the trace file, TensorBoard. Each sink is optional."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from ..findings import Finding


@dataclass(frozen=True)
class RunInfo:
    """What was watched: parameter names and, per optimizer, its type and parameter indices."""

    params: tuple[str, ...]
    optimizers: tuple[tuple[str, tuple[int, ...]], ...]
    accumulation_steps: int | None
    rank: int | None = None  # under torch.distributed with more than one process
    world_size: int | None = None


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: the backward passes it consumed and the norms of the gradients it consumed."""

    optimizer: int
    step: int
    backward: int
    window: int
    params: tuple[int, ...]
    grad_norms: tuple[float, ...] = ()
    adopted: bool = False  # the window began before the watch (attached mid-run): its size is unknown
    # on the steps a sink asked for them: per parameter of the optimizer, norms of the update and of the weight
    updated: tuple[int, ...] = ()
    update_norms: tuple[float, ...] = ()
    weight_norms: tuple[float, ...] = ()
    # on histogram steps: the consumed gradients themselves, by parameter index (valid during the call only)
    grads: dict[int, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossWeights:
    """What the loss calls of one window weighed, read at its step (the loss-weight audit)."""

    optimizer: int
    step: int
    weight_sum: float | None  # the window's total weight (1.0: its gradient is the mean); None: several losses
    weight_ratio: float  # heaviest / lightest element of one loss in the window (1.0: even)
    # per backward pass: (pass, ((loss function, reduction, counted elements, weight that reached it), ...))
    passes: tuple[tuple[int, tuple[tuple[str, str, float, float], ...]], ...]


class Sink(Protocol):
    """Receives the lifecycle, already computed; must not touch tensors."""

    def started(self, info: RunInfo) -> None: ...
    def backward(self, backward: int, params: Sequence[int], synced: bool | None) -> None: ...
    def step(self, record: StepRecord) -> None: ...
    def loss_weights(self, weights: LossWeights) -> None: ...
    def cleared(self, backward: int, source: str, params: int, discarded: int) -> None: ...
    def param_group_added(self, optimizer: int, params: Sequence[int], new_names: Sequence[str]) -> None: ...
    def finding(self, finding: Finding) -> None: ...
    def finished(self, findings: Sequence[Finding], backwards: int, steps: Sequence[int]) -> None: ...
    def abandon(self) -> None: ...


class Sinks:
    """Fan-out to the sinks; a sink that fails is reported once and dropped, training goes on."""

    def __init__(self, sinks: Sequence[Sink], report_failure: Callable[[str], None]) -> None:
        self._sinks = list(sinks)
        self._report_failure = report_failure

    def __bool__(self) -> bool:
        return bool(self._sinks)

    def wants_contributions(self) -> bool:
        return any(getattr(s, "wants_contributions", False) for s in self._sinks)

    def wants_norms(self) -> bool:
        return any(getattr(s, "wants_norms", False) for s in self._sinks)

    def update_ratio_due(self, step: int) -> bool:
        return any(getattr(s, "update_ratio_due", lambda _: False)(step) for s in self._sinks)

    def contributions_due(self, step: int) -> bool:
        return any(getattr(s, "contributions_due", lambda _: False)(step) for s in self._sinks)

    def histogram_due(self, step: int) -> bool:
        return any(getattr(s, "histogram_due", lambda _: False)(step) for s in self._sinks)

    def close(self) -> None:
        """Close every sink without a final record (a watch that was never detached)."""
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            with contextlib.suppress(Exception):
                sink.abandon()

    def call(self, method: str, *args: object) -> None:
        for sink in list(self._sinks):
            handler = getattr(sink, method, None)
            if handler is None:  # an optional event this sink does not take
                continue
            try:
                handler(*args)
            except Exception as error:  # a full disk must not stop the training
                self._sinks.remove(sink)
                self._report_failure(f"gradwatch: the {type(sink).__name__} failed ({error!r}) and was turned off")
                close = getattr(sink, "abandon", None)
                if close is not None:
                    with contextlib.suppress(Exception):  # already reported
                        close()
