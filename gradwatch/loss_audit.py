"""The loss-weight audit: the weight each counted element of a loss carries in the window's gradient.

A loss call audited (``torch.nn.functional``'s losses, wrapped by ``hooks.py``) leaves a ``LossCall``: the
elements its reduction counts (``mean``: non-ignored targets, class-weight sum or ``numel``; ``sum``: each
element weighs 1), and, once the backward pass reaches its output, the scalar that flowed into it (for
``(loss / K).backward()`` it is 1/K). Both stay on the device until the step that consumes the window, which
reads them in one transfer and judges the window:

- ``uneven-loss-weights``: within one loss (a *slot*: the k-th call of one loss function that the pass reached), the
  elements of one pass weigh more than those of another (each micro-batch normalised by its own count);
- ``loss-scale``: the window's total weight is not 1 (the window's gradient is not its mean), and the factor
  is one a loop makes by mistake: K (never divided), 1/K (divided twice), m/K (a short window of m passes
  divided by K). Other factors are coefficients (``0.1 * aux``) and stay quiet, as does a window of several
  losses.

The bugs are systematic, so the first windows are audited and then one in ``AUDIT_EVERY``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch

from . import findings as k
from .ledger import Occurrence
from .sinks import LossWeights
from .stats import HostBatch

AUDIT_FIRST = 8  # steps whose windows are all audited
AUDIT_EVERY = 32  # then the window of every this-many-th step
TOLERANCE = 0.02  # weights within 2 % are the same weight
MAX_PASSES_HELD = 64  # audited passes waiting for a step (a window longer than this is not weighed)
_CLASS_TARGETS = ("cross_entropy", "nll_loss")
# the functions audited, with their arguments' positions (torch.nn.functional's signatures since 2.1)
LOSS_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction"),
    "nll_loss": ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction"),
    "mse_loss": ("input", "target", "size_average", "reduce", "reduction", "weight"),
    "l1_loss": ("input", "target", "size_average", "reduce", "reduction", "weight"),
    "smooth_l1_loss": ("input", "target", "size_average", "reduce", "reduction"),
    "huber_loss": ("input", "target", "reduction", "delta", "weight"),
    "binary_cross_entropy": ("input", "target", "weight", "size_average", "reduce", "reduction"),
    "binary_cross_entropy_with_logits": ("input", "target", "weight", "size_average", "reduce", "reduction"),
}


@dataclass
class LossCall:
    """One audited call of a loss function whose output requires grad."""

    loss: str
    sequence: int  # the order of the calls (a pass's calls of one function are numbered in this order)
    reduction: str
    count: torch.Tensor | float  # the elements the reduction counts (the class-weight sum under ``weight=``)
    mask: torch.Tensor | None  # ``reduction='none'`` with ``ignore_index``: the elements that count
    targets: float = 0.0  # the elements the reduction could count: ``count`` equals it when none is ignored or weighed
    upstream: torch.Tensor | None = None  # mean/sum: the scalar into the output; none: [total, max, min, n]
    task: int = -1  # the autograd graph task that reached the output
    ordinal: int = 0  # its place among the calls of its function that the same backward pass reached


_POSITIONS = {loss: {name: at for at, name in enumerate(names)} for loss, names in LOSS_ARGUMENTS.items()}


def describe_call(loss: str, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, Any, Any, float] | None:
    """(reduction, count, mask, targets) of a loss call, the count and mask on the device (``targets``: the elements
    it could count); None for a call the audit cannot weigh (legacy ``size_average``/``reduce``, an
    element-weighted regression loss, an unknown reduction)."""
    positions = _POSITIONS[loss]

    def argument(name: str, default: Any = None) -> Any:
        at = positions.get(name, len(args))
        return args[at] if at < len(args) else kwargs.get(name, default)

    if argument("size_average") is not None or argument("reduce") is not None:
        return None
    reduction = argument("reduction", "mean")
    if reduction not in ("mean", "sum", "none"):
        return None
    input, target = argument("input"), argument("target")
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        return None
    weight = argument("weight")
    if loss in _CLASS_TARGETS and not target.is_floating_point():
        valid = target != argument("ignore_index", -100)
        if weight is None:
            return reduction, valid.sum(), valid, float(target.numel())
        weights = weight[target.masked_fill(~valid, 0)] * valid
        return reduction, weights.sum(), valid, math.nan  # a sum of class weights: never a count of targets
    if loss in _CLASS_TARGETS:  # class probabilities: the mean is over the batch
        count = float(input.numel() // input.shape[1] if input.dim() > 1 else 1)
        return reduction, count, None, count
    if weight is not None and not loss.startswith("binary_cross_entropy"):
        return None  # per-element weights of a regression loss: deliberate, and normalised its own way
    shape = input.shape if input.shape == target.shape else torch.broadcast_shapes(input.shape, target.shape)
    count = float(math.prod(shape))
    return reduction, count, None, count


def upstream_of(call: LossCall, grad: torch.Tensor) -> torch.Tensor:
    """What the backward pass put into the output, reduced on the device: the scalar for mean/sum, and
    [total, max, min, count] over the elements that count for ``none``."""
    grad = grad.detach()
    if call.reduction != "none":
        return grad  # one value
    counted = grad != 0
    if call.mask is not None and call.mask.shape == grad.shape:
        counted &= call.mask
    values = grad.float()
    if not values.numel():
        return torch.zeros(4, device=grad.device)
    highest = values.masked_fill(~counted, -math.inf).max()
    lowest = values.masked_fill(~counted, math.inf).min()
    return torch.stack([(values * counted).sum(), highest, lowest, counted.sum().float()])


class LossAudit:
    """Loss calls by backward pass, judged at the step that consumes their window."""

    def __init__(self) -> None:
        self.due = True  # whether the calls of the coming window are audited
        self._last_short: int | None = None  # the latest step on a short window (an epoch's last)
        self._short_every: int | None = None  # steps between the last two short windows (an epoch, in steps)
        self._calls = 0
        self._reached: list[LossCall] = []  # outputs the running (or a foreign) graph task reached
        self._by_pass: dict[int, list[LossCall]] = {}
        # per slot, the elements every pass of the latest audited window held when they were equal (the batch size)
        self._batch_size: dict[tuple[str, int], float] = {}

    def called(self, loss: str, described: tuple[str, Any, Any, float]) -> LossCall:
        """A loss call to audit (its output requires grad)."""
        self._calls += 1
        reduction, count, mask, targets = described
        return LossCall(loss, self._calls, reduction, count, mask, targets)

    def reached(self, call: LossCall, grad: torch.Tensor, task: int) -> None:
        """A backward pass (graph task ``task``) reached the call's output with ``grad``."""
        with torch.no_grad():
            call.upstream = upstream_of(call, grad)
        call.task = task
        self._reached.append(call)

    def pass_ended(self, backward: int, task: int) -> None:
        """Backward pass ``backward`` (graph task ``task``) was booked: it owns the calls its task reached."""
        if not self._reached:
            return
        reached, self._reached = self._reached, []
        mine = sorted((call for call in reached if call.task == task), key=lambda call: call.sequence)
        ordinals: dict[str, int] = {}  # calls whose output never reached backward (logging, eval) take no place
        for call in mine:
            call.ordinal = ordinals.get(call.loss, 0)
            ordinals[call.loss] = call.ordinal + 1
        if mine:
            self._by_pass.setdefault(backward, []).extend(mine)
        while len(self._by_pass) > MAX_PASSES_HELD:  # backward passes and no step: keep the latest ones only
            del self._by_pass[min(self._by_pass)]

    def pending(self) -> bool:
        return bool(self._by_pass)

    def step_done(self, steps: int, short: bool) -> None:
        """A step finished (``steps`` so far; ``short``: on a window shorter than the accumulation steps): audit
        the next window or not. Besides the sample, the epoch's short window is audited once its period shows
        (a short window divided by K shows nowhere else)."""
        if short:
            if self._last_short is not None:
                self._short_every = steps - 1 - self._last_short
            self._last_short = steps - 1
        predicted_short = self._short_every is not None and steps == self._last_short + self._short_every
        self.due = steps < AUDIT_FIRST or steps % AUDIT_EVERY == 0 or predicted_short

    def discard(self, last: int) -> None:
        """Forget the calls of passes up to ``last`` (dropped, or consumed by a step not audited)."""
        for b in [b for b in self._by_pass if b <= last]:
            del self._by_pass[b]

    def judge(
        self, optimizer: int, step: int, first: int, last: int, passes: int, accumulation: int | None, scale: float
    ) -> tuple[list[Occurrence], LossWeights | None]:
        """The window of passes ``first``..``last`` (``passes`` of them) consumed by ``optimizer``'s step ``step``;
        ``scale``: a GradScaler's loss scale (1.0 without)."""
        calls = [(b, call) for b in range(first, last + 1) for call in self._by_pass.get(b, ())]
        self.discard(last)
        if not calls:
            return [], None
        batch = HostBatch()
        getters = [
            (batch.vector(call.upstream), batch.vector(call.count) if isinstance(call.count, torch.Tensor) else None)
            for _, call in calls
        ]
        batch.read()
        weighed: list[_Weighed] = []
        for (b, call), (upstream, count) in zip(calls, getters, strict=True):
            up = upstream()
            n = count()[0] if count is not None else float(call.count)  # type: ignore[arg-type]
            if call.reduction == "none":
                total, highest, lowest, n = up
                even = n > 0 and lowest > 0 and highest <= lowest * (1 + TOLERANCE)
                weighed.append(_Weighed(b, call, n, highest if even else None, total / scale, n == call.targets))
            elif n > 0:
                unit = up[0] / n if call.reduction == "mean" else up[0]
                total = up[0] if call.reduction == "mean" else up[0] * n
                weighed.append(_Weighed(b, call, n, unit / scale, total / scale, n == call.targets))
        slots = {(w.call.loss, w.call.ordinal) for w in weighed}
        out = [
            *_uneven(weighed, step, last, self._batch_size),
            *_scaled(weighed, slots, step, last, passes, accumulation),
        ]
        self._note_batch_sizes(weighed)
        units = [w.unit for w in weighed if w.unit]
        summary = LossWeights(
            optimizer,
            step,
            sum(w.total for w in weighed) if len(slots) == 1 else None,
            max(units) / min(units) if units and min(units) > 0 else 1.0,
            tuple(
                (b, tuple((w.call.loss, w.call.reduction, w.elements, w.total) for w in weighed if w.backward == b))
                for b in sorted({w.backward for w in weighed})
            ),
        )
        return out, summary

    def _note_batch_sizes(self, weighed: list[_Weighed]) -> None:
        """Per slot, the elements its passes held in this window when they held the same number, all counted."""
        by_slot: dict[tuple[str, int], set[float]] = {}
        for w in weighed:
            by_slot.setdefault((w.call.loss, w.call.ordinal), set()).add(w.elements if w.all_counted else math.nan)
        for slot, counts in by_slot.items():
            if len(counts) == 1 and not math.isnan(size := next(iter(counts))):
                self._batch_size[slot] = size


class _Weighed(NamedTuple):
    """One loss call of a window, read: what one counted element weighs (None: its elements weigh differently,
    a ``reduction='none'`` loss weighted by hand) and the total weight that reached it."""

    backward: int
    call: LossCall
    elements: float
    unit: float | None
    total: float
    all_counted: bool  # every element of the target counted once (none ignored, no class weights)


def _uneven(
    weighed: list[_Weighed], step: int, last: int, batch_size: dict[tuple[str, int], float]
) -> list[Occurrence]:
    """``uneven-loss-weights``: one slot's elements weigh differently in two passes of the window (``batch_size``: see
    ``_short_last_batch``)."""
    by_slot: dict[tuple[str, int], list[_Weighed]] = {}
    for w in weighed:
        if w.unit:
            by_slot.setdefault((w.call.loss, w.call.ordinal), []).append(w)
    for (loss, ordinal), entries in by_slot.items():
        heavy = max(entries, key=lambda w: w.unit)  # type: ignore[arg-type, return-value]
        light = min(entries, key=lambda w: w.unit)  # type: ignore[arg-type, return-value]
        if heavy.backward == light.backward or heavy.unit <= light.unit * (1 + TOLERANCE):  # type: ignore[operator]
            continue
        if _short_last_batch(entries, batch_size.get((loss, ordinal))):
            continue
        detail = {
            "how": "mean" if heavy.call.reduction == "mean" and light.call.reduction == "mean" else "other",
            "loss": loss,
            "ratio": f"{heavy.unit / light.unit:.3g}",  # type: ignore[operator]
            "heavy": heavy.backward,
            "light": light.backward,
            "n_heavy": f"{heavy.elements:g}",
            "n_light": f"{light.elements:g}",
        }
        return [Occurrence(k.UNEVEN_LOSS_WEIGHTS, (), step, last, detail)]
    return []


def _short_last_batch(entries: list[_Weighed], batch_size: float | None) -> bool:
    """Whether one slot's weights differ only because the window's last micro-batch holds fewer elements than its
    others, which hold the batch size of an earlier even window and weigh the same: an epoch's last batch (a
    DataLoader without ``drop_last``), whose mean weighs its elements more in that one window. Batch sizes that vary
    from the start, or a count that varies from batch to batch (ignored or class-weighted targets: tokens), are not
    this."""
    last = max(entries, key=lambda w: w.backward)
    others = [w for w in entries if w.backward != last.backward]
    if not others or not all(w.all_counted for w in entries):
        return False
    full, unit = others[0].elements, others[0].unit
    return (
        full == batch_size
        and last.elements < full
        and all(w.elements == full and abs(w.unit - unit) <= TOLERANCE * unit for w in others)  # type: ignore[operator]
        and last.unit > unit  # type: ignore[operator]
    )


def _scaled(
    weighed: list[_Weighed], slots: set[tuple[str, int]], step: int, last: int, passes: int, accumulation: int | None
) -> list[Occurrence]:
    """``loss-scale``: the window's one loss weighs in total a factor a loop makes by mistake."""
    per_pass = [w.backward for w in weighed]
    if len(slots) != 1 or len(per_pass) != passes or len(set(per_pass)) != passes:
        return []  # several losses (their coefficients are the loop's choice), or a pass not audited
    total = sum(w.total for w in weighed)
    how = _mistake(total, passes, accumulation)
    if how is None:
        return []
    loss = next(iter(slots))[0]
    detail = {"how": how, "loss": loss, "factor": f"{total:.3g}", "passes": passes, "accumulation": accumulation}
    return [Occurrence(k.LOSS_SCALE, (), step, last, detail)]


def _mistake(total: float, passes: int, accumulation: int | None) -> str | None:
    """The mistake a window's total weight ``total`` betrays, if it is one a loop makes."""

    def near(value: float) -> bool:
        return abs(total - value) <= TOLERANCE * value

    if near(1.0):
        return None
    if passes > 1 and near(passes):
        return "unscaled"
    if passes > 1 and near(1 / passes):
        return "twice"
    if accumulation is not None and passes < accumulation and near(passes / accumulation):
        return "short"
    return None
