"""Where the lifecycle goes besides the findings: the trace file, TensorBoard. Each sink is optional."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

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
class Histogram:
    """The finite values of one group of gradients as TensorBoard's histogram holds them: equal-width buckets,
    ``limits`` the right edge of each of ``counts`` (the first, empty, marks the left edge)."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    limits: tuple[float, ...]
    counts: tuple[float, ...]


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
    # on histogram steps: the consumed gradients' histograms, by the group a sink asked for (``histogram_groups``)
    histograms: dict[str, Histogram] = field(default_factory=dict)


@dataclass(frozen=True)
class LossWeights:
    """What the loss calls of one window weighed, read at its step (the loss-weight audit)."""

    optimizer: int
    step: int
    weight_sum: float | None  # the window's total weight (1.0: its gradient is the mean); None: several losses
    weight_ratio: float  # heaviest / lightest element of one loss in the window (1.0: even)
    # per backward pass: (pass, ((loss function, reduction, counted elements, weight that reached it), ...))
    passes: tuple[tuple[int, tuple[tuple[str, str, float, float], ...]], ...]


class Sink:
    """Receives the lifecycle, already computed; must not touch tensors. Every event is a no-op unless a sink
    overrides it, and a sink asks for the costlier statistics with the ``wants_*`` flags and ``*_due`` methods."""

    wants_norms = False  # per-step gradient norms in StepRecord.grad_norms
    wants_contributions = False  # per-backward norms of what each pass added (``contributions``)
    # equal-width buckets of a histogram: TensorBoard's dashboard draws 30 (the ~1500 exponential buckets of
    # add_histogram's default took ~10 KB a histogram)
    histogram_buckets = 30

    def update_ratio_due(self, step: int) -> bool:
        """Whether step ``step`` should carry update and weight norms."""
        return False

    def contributions_due(self, step: int) -> bool:
        """Whether the backward passes after step ``step`` should be measured."""
        return False

    def histogram_due(self, step: int) -> bool:
        """Whether step ``step`` should carry histograms of the consumed gradients."""
        return False

    def histogram_groups(self) -> Sequence[str]:
        """Per watched parameter, the histogram its gradient goes into."""
        return ()

    def started(self, info: RunInfo) -> None: ...
    def backward(self, backward: int, params: Sequence[int], synced: bool | None) -> None: ...
    def contributions(self, backward: int, params: Sequence[int], norms: Sequence[float]) -> None: ...
    def step(self, record: StepRecord) -> None: ...
    def loss_weights(self, weights: LossWeights) -> None: ...
    def cleared(self, backward: int, source: str, params: int, discarded: int) -> None: ...
    def param_group_added(self, optimizer: int, params: Sequence[int], new_names: Sequence[str]) -> None: ...
    def finding(self, finding: Finding) -> None: ...
    def finished(self, findings: Sequence[Finding], backwards: int, steps: Sequence[int]) -> None: ...

    def abandon(self) -> None:
        """Close without a final record (the run did not end cleanly); must not raise."""


class Sinks(Sink):
    """Fan-out to the sinks; a sink that fails is reported once and dropped, training goes on."""

    def __init__(self, sinks: Sequence[Sink], report_failure: Callable[[str], None]) -> None:
        self._sinks = list(sinks)
        self._report_failure = report_failure
        self.wants_norms = any(s.wants_norms for s in sinks)
        self.wants_contributions = any(s.wants_contributions for s in sinks)

    def __bool__(self) -> bool:
        return bool(self._sinks)

    def update_ratio_due(self, step: int) -> bool:
        return any(s.update_ratio_due(step) for s in self._sinks)

    def contributions_due(self, step: int) -> bool:
        return any(s.contributions_due(step) for s in self._sinks)

    def histogram_due(self, step: int) -> bool:
        return any(s.histogram_due(step) for s in self._sinks)

    def histogram_groups(self) -> Sequence[str]:
        """The groups of the first sink that has any (one sink draws histograms: TensorBoard's)."""
        return next((groups for s in self._sinks if (groups := s.histogram_groups())), ())

    def started(self, info: RunInfo) -> None:
        self._each(lambda sink: sink.started(info))

    def backward(self, backward: int, params: Sequence[int], synced: bool | None) -> None:
        self._each(lambda sink: sink.backward(backward, params, synced))

    def contributions(self, backward: int, params: Sequence[int], norms: Sequence[float]) -> None:
        self._each(lambda sink: sink.contributions(backward, params, norms))

    def step(self, record: StepRecord) -> None:
        self._each(lambda sink: sink.step(record))

    def loss_weights(self, weights: LossWeights) -> None:
        self._each(lambda sink: sink.loss_weights(weights))

    def cleared(self, backward: int, source: str, params: int, discarded: int) -> None:
        self._each(lambda sink: sink.cleared(backward, source, params, discarded))

    def param_group_added(self, optimizer: int, params: Sequence[int], new_names: Sequence[str]) -> None:
        self._each(lambda sink: sink.param_group_added(optimizer, params, new_names))

    def finding(self, finding: Finding) -> None:
        self._each(lambda sink: sink.finding(finding))

    def finished(self, findings: Sequence[Finding], backwards: int, steps: Sequence[int]) -> None:
        self._each(lambda sink: sink.finished(findings, backwards, steps))

    def abandon(self) -> None:
        """Close every sink without a final record (a watch that was never detached)."""
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            with contextlib.suppress(Exception):
                sink.abandon()

    def _each(self, deliver: Callable[[Sink], None]) -> None:
        """Deliver one event to every sink; the one place where a sink's failure is contained."""
        for sink in list(self._sinks):
            try:
                deliver(sink)
            except Exception as error:  # a full disk must not stop the training
                self._sinks.remove(sink)
                self._report_failure(f"gradwatch: the {type(sink).__name__} failed ({error!r}) and was turned off")
                with contextlib.suppress(Exception):  # already reported
                    sink.abandon()
