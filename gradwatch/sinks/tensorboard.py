"""TensorBoard event files through PyTorch's own ``SummaryWriter``: lifecycle scalars, gradient norms, findings."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Sequence

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

from .. import timeline
from ..findings import Finding
from . import Histogram, LossWeights, RunInfo, Sink, StepRecord
from .records import ScalarEncoder, fast_records

TIMELINE_NAME = "gradwatch-timeline.png"
MAX_HELD_STEPS = 64  # step values whose scalars wait for the end of an optimizer step
PER_PARAM_LIMIT = 32  # above this many parameters, gradient norms are logged per layer
PER_LAYER_LIMIT = 64  # above this many layers, per contiguous range of layers
RANGES = 32
LINE_REFRESH = 100  # a lifecycle line on the backward-pass axis gets a point at least every this many passes
HANDOFF_SECONDS = 1.0  # the scalar events go to the writer's thread at most this often (and at each finding)
MAX_HELD_EVENTS = 1024  # events held before they are handed over anyway (a loop of more than 1000 steps a second)


@dataclass(frozen=True)
class TensorBoardOptions:
    """What the TensorBoard stream holds besides the lifecycle and the gradient norms.

    ``group_by``: "auto" (per parameter up to 32 parameters, else per layer up to 64 layers, else 32
    contiguous ranges of layers), "param" or "layer".
    ``update_ratio_every``: log ||dw|| / ||w|| per layer every N optimizer steps (0: never); it copies the
    weights before those steps. ``contribution_every``: log the norm of each backward pass's contribution
    during the window of every N-th step (0: never). ``histogram_every``: gradient histograms per layer every
    N steps (0: never).
    """

    group_by: str = "auto"
    update_ratio_every: int = 10
    contribution_every: int = 10
    histogram_every: int = 50

    def __post_init__(self) -> None:
        if self.group_by not in ("auto", "param", "layer"):
            raise ValueError(f"group_by must be 'auto', 'param' or 'layer', got {self.group_by!r}")
        for name in ("update_ratio_every", "contribution_every", "histogram_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 turns it off), got {value!r}")


class Polyline:
    """One scalar on the backward-pass axis, written only where its line bends.

    TensorBoard draws straight lines between the points it has, so a point on the line through its neighbours
    adds nothing to the chart: a constant (parameters per pass) or steadily growing series (clears so far) is
    written as its first point, every ``refresh``-th point (the live chart moves on) and its last one. Each
    point it leaves out lies exactly on the chart's line.
    """

    __slots__ = ("_anchor", "_held", "_merged", "_refresh")

    def __init__(self, refresh: int = LINE_REFRESH) -> None:
        self._anchor: tuple[int, float] | None = None  # the last point written
        self._held: tuple[int, float] | None = None  # the latest point, not written yet
        self._merged = 0  # points left out since the anchor
        self._refresh = refresh

    def add(self, step: int, value: float) -> list[tuple[int, float]]:
        """The points to write now that ``value`` is the series' value at ``step`` (steps increase)."""
        point, anchor, held = (step, value), self._anchor, self._held
        if anchor is None:
            self._anchor = point
            return [point]
        if held is None:
            self._held = point
            return []
        (x0, y0), (x1, y1) = anchor, held
        if (y1 - y0) * (step - x1) == (value - y1) * (x1 - x0) and self._merged < self._refresh:
            self._held, self._merged = point, self._merged + 1
            return []
        self._anchor, self._held, self._merged = held, point, 0
        return [held]

    def end(self) -> list[tuple[int, float]]:
        """The last point, if it is not written yet."""
        held, self._held = self._held, None
        if held is None:
            return []
        self._anchor, self._merged = held, 0
        return [held]


def layer_of(name: str) -> str:
    """The module a parameter belongs to: 'encoder.0.weight' -> 'encoder.0'."""
    return name.rsplit(".", 1)[0] if "." in name else name


class TensorBoardSink(Sink):
    """Streams the run to ``logdir``. The writer is created at ``watch()``, so an unwritable logdir fails there."""

    wants_norms = True
    wants_contributions = True

    def __init__(self, logdir: str | os.PathLike[str], options: TensorBoardOptions | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # where fast_records cannot take over, the events go one queue item each: a queue that takes a second's
        # worth, else (the default 10) the hand-off waits for the writer's checksums
        self._writer = SummaryWriter(log_dir=os.fspath(logdir), max_queue=2 * MAX_HELD_EVENTS)
        self._records = fast_records(self._writer)  # see records.py: TensorBoard's own path cost most of the stream
        self.logdir = os.fspath(logdir)
        self.timeline_path: str | None = None
        self._timeline: list[dict] = []  # trace-format events for the picture, bounded
        self._options = options or TensorBoardOptions()
        self._group_by = self._options.group_by
        self._groups: list[str] = []
        self._n_optimizers = 1
        self._clears = 0
        self._findings: list[Finding] = []
        self._scalars: dict[int, list[bytes]] = {}  # scalars by their step, written as one event per step value
        self._encoder = ScalarEncoder()
        self._lines: dict[str, Polyline] = {}  # the lifecycle series on the backward-pass axis
        self._events: list[bytes] = []  # serialized events not handed off yet
        self._handed_off = time.monotonic()

    def started(self, info: RunInfo) -> None:
        self._names = list(info.params)
        self._groups = choose_groups(self._names, self._group_by)
        self._n_optimizers = len(info.optimizers)
        self._writer.add_custom_scalars(
            {
                "lifecycle": {
                    "backward passes consumed per step": ["Multiline", [r"lifecycle/.*backward_passes_per_step"]],
                    "clears": ["Multiline", ["lifecycle/clears"]],
                    "findings": ["Multiline", ["lifecycle/findings"]],
                },
                "grad norms": {
                    "gradient norm at step": ["Multiline", [r"grad_norm/.*"]],
                    "contribution norm per backward pass": ["Multiline", [r"contribution_norm/.*"]],
                },
                "update ratios": {"||dw|| / ||w|| per layer": ["Multiline", [r"update_ratio/.*"]]},
            }
        )
        self._writer.add_text("gradwatch/run", _run_table(info), 0)

    def update_ratio_due(self, step: int) -> bool:
        every = self._options.update_ratio_every
        return every > 0 and step % every == 0

    def contributions_due(self, step: int) -> bool:
        every = self._options.contribution_every
        return every > 0 and step % every == 0

    def histogram_due(self, step: int) -> bool:
        every = self._options.histogram_every
        return every > 0 and step % every == 0

    def _remember(self, event: dict) -> None:
        if len(self._timeline) < timeline.MAX_EVENTS or event["event"] == "finding":
            self._timeline.append(event)

    def backward(self, backward: int, params: Sequence[int], synced: bool | None) -> None:
        self._line("lifecycle/params_per_backward", len(params), backward)
        if synced is not None:
            self._line("lifecycle/allreduce", float(synced), backward)
        self._remember({"event": "backward", "backward": backward})

    def contributions(self, backward: int, params: Sequence[int], norms: Sequence[float]) -> None:
        """The norm of what one backward pass added, per parameter group, on the backward-pass axis."""
        for group, square in self._group_squares(params, norms, self._groups).items():
            self._scalar(f"contribution_norm/{group}", math.sqrt(square), backward)

    def step(self, record: StepRecord) -> None:
        prefix = f"opt{record.optimizer}/" if self._n_optimizers > 1 else ""
        s = record.step
        if not record.adopted:  # a window begun before the watch has no known size: no point rather than a wrong one
            self._scalar(f"lifecycle/{prefix}backward_passes_per_step", record.window, s)
        self._remember({"event": "step", "optimizer": record.optimizer, "step": s, "window": record.window})
        if record.grad_norms:
            squares = self._group_squares(record.params, record.grad_norms, self._groups)
            for group, square in squares.items():
                self._scalar(f"grad_norm/{prefix}{group}", math.sqrt(square), s)
            self._scalar(f"grad_norm/{prefix}total", math.sqrt(sum(squares.values())), s)
        if record.update_norms:
            layers = [layer_of(n) for n in self._names]
            updates = self._group_squares(record.updated, record.update_norms, layers)
            weights = self._group_squares(record.updated, record.weight_norms, layers)
            for layer, update in updates.items():
                if weights[layer] > 0:
                    self._scalar(f"update_ratio/{prefix}{layer}", math.sqrt(update / weights[layer]), s)
        for layer, histogram in record.histograms.items():
            self._histogram(f"grad/{prefix}{layer}", histogram, s)
        self._write_scalars()

    def histogram_groups(self) -> Sequence[str]:
        return [layer_of(name) for name in self._names]

    def _histogram(self, tag: str, h: Histogram, step: int) -> None:
        """Held with the scalars (an event handed to the writer's thread on its own wakes it, and the thread took the
        GIL from the loop for several times the event's own cost)."""
        proto = HistogramProto(
            min=h.min,
            max=h.max,
            num=h.num,
            sum=h.sum,
            sum_squares=h.sum_squares,
            bucket_limit=h.limits,
            bucket=h.counts,
        )
        summary = Summary(value=[Summary.Value(tag=tag, histo=proto)])
        self._events.append(Event(summary=summary, wall_time=time.time(), step=step).SerializeToString())

    def loss_weights(self, weights: LossWeights) -> None:
        """The loss-weight audit of one window: 1.0 and 1.0 when every element weighs the same and the weights sum to
        the window's mean."""
        prefix = f"opt{weights.optimizer}/" if self._n_optimizers > 1 else ""
        if weights.weight_sum is not None:
            self._scalar(f"loss_weights/{prefix}window_weight_sum", weights.weight_sum, weights.step)
        self._scalar(f"loss_weights/{prefix}max_min_ratio", weights.weight_ratio, weights.step)

    @staticmethod
    def _group_squares(params: Sequence[int], norms: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
        squares: dict[str, float] = {}
        for i, norm in zip(params, norms, strict=True):
            squares[groups[i]] = squares.get(groups[i], 0.0) + norm * norm
        return squares

    def param_group_added(self, optimizer: int, params: Sequence[int], new_names: Sequence[str]) -> None:
        per_param = self._groups == self._names
        self._names.extend(new_names)
        self._groups.extend(new_names if per_param else [layer_of(n) for n in new_names])

    def cleared(self, backward: int, source: str, params: int, discarded: int) -> None:
        self._clears += 1
        self._line("lifecycle/clears", self._clears, backward)
        self._remember({"event": "clear", "backward": backward, "source": source})

    def finding(self, finding: Finding) -> None:
        self._findings.append(finding)
        self._remember({"event": "finding", "kind": finding.kind, "step": finding.step, "backward": finding.backward})
        self._scalar("lifecycle/findings", len(self._findings), finding.step)
        self._writer.add_text("gradwatch/findings", findings_table(self._findings), finding.step)
        self._end_lines()  # the charts up to date where the finding shows
        self._write_scalars(now=True)
        self._writer.flush()

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """A scalar, held until the optimizer step ends: all the scalars of one step value go out as one event
        (one ``add_scalar`` event per value cost several times the bare step on small models)."""
        self._scalars.setdefault(step, []).append(self._encoder.value(tag, float(value)))
        if len(self._scalars) > MAX_HELD_STEPS:  # backward passes and no step: do not hold them for ever
            self._write_scalars()

    def _line(self, tag: str, value: float, backward: int) -> None:
        line = self._lines.get(tag)
        if line is None:
            line = self._lines[tag] = Polyline()
        for step, point in line.add(backward, float(value)):
            self._scalar(tag, point, step)

    def _end_lines(self) -> None:
        for tag, line in self._lines.items():
            for step, value in line.end():
                self._scalar(tag, value, step)

    def _write_scalars(self, now: bool = False) -> None:
        """Queue the held scalars as one event per step value; hand the queue to the writer's thread when ``now``,
        or when a second has passed since the last time: its pure-Python CRC, woken for every event, took the
        GIL from the training loop for several times the event's own cost."""
        pending, self._scalars = self._scalars, {}
        wall_time, event = time.time(), self._encoder.event
        self._events += [event(step, wall_time, values) for step, values in pending.items()]
        if not self._events:
            return
        clock = time.monotonic()
        if now or clock - self._handed_off >= HANDOFF_SECONDS or len(self._events) >= MAX_HELD_EVENTS:
            events, self._events, self._handed_off = self._events, [], clock
            if self._records is not None:  # one queue item (FileWriter.add_summary's events, serialized here)
                self._records.write(events)
                return
            file_writer = self._writer._get_file_writer()
            for data in events:
                parsed = Event.FromString(data)
                file_writer.add_event(parsed, parsed.step, parsed.wall_time)

    def finished(self, findings: Sequence[Finding], backwards: int, steps: Sequence[int]) -> None:
        self._end_lines()
        self._write_scalars(now=True)
        last_step = max(steps, default=0)
        self._writer.add_text("gradwatch/findings", findings_table(findings), last_step)
        if timeline.available():
            path = os.path.join(self.logdir, TIMELINE_NAME)
            pixels = timeline.render(self._timeline, path)
            self._writer.add_image("gradwatch/timeline", pixels[..., :3], last_step, dataformats="HWC")
            self.timeline_path = path
        self.abandon()

    def abandon(self) -> None:
        try:
            self._end_lines()
            self._write_scalars(now=True)
        finally:
            self._writer.close()


def choose_groups(names: Sequence[str], group_by: str) -> list[str]:
    """The group each parameter's norms are logged under (see ``TensorBoardOptions.group_by``)."""
    if group_by == "param" or (group_by == "auto" and len(names) <= PER_PARAM_LIMIT):
        return list(names)
    layers = [layer_of(n) for n in names]
    distinct = list(dict.fromkeys(layers))
    if group_by == "layer" or len(distinct) <= PER_LAYER_LIMIT:
        return layers
    size = -(-len(distinct) // RANGES)  # ceil: contiguous ranges of layers, in model order
    range_of = {}
    for start in range(0, len(distinct), size):
        chunk = distinct[start : start + size]
        for layer in chunk:
            range_of[layer] = f"{chunk[0]}..{chunk[-1]}" if len(chunk) > 1 else chunk[0]
    return [range_of[layer] for layer in layers]


def findings_table(findings: Sequence[Finding]) -> str:
    """Findings as a markdown table (TensorBoard's text dashboard renders it)."""
    if not findings:
        return "no findings: every gradient contribution was consumed by exactly one step."
    rows = ["| kind | severity | step | backward | count | parameters | what to do |", "|---|---|---|---|---|---|---|"]
    for f in findings:
        message = f.message.replace("|", "\\|")
        rows.append(
            f"| {f.kind} | {f.severity} | {f.step} | {f.backward} | {f.count} | {', '.join(f.params)} | {message} |"
        )
    return "\n".join(rows)


def _run_table(info: RunInfo) -> str:
    rows = ["| optimizer | type | parameters |", "|---|---|---|"]
    for o, (kind, params) in enumerate(info.optimizers):
        rows.append(f"| {o} | {kind} | {', '.join(info.params[i] for i in params)} |")
    accumulation = info.accumulation_steps if info.accumulation_steps is not None else "not checked"
    return "\n".join([*rows, "", f"accumulation_steps: {accumulation}"])
