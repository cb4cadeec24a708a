"""Pure bookkeeping of gradient contributions per parameter: produced, consumed, cleared.

No torch here: the tracker feeds events (parameter indices), the ledger answers with ``Occurrence``s.
A *contribution* is one backward pass accumulating into one parameter's ``.grad``; it is *consumed* by a
step of the parameter's optimizer and *cleared* by anything that empties the ``.grad``.

Rules that keep legitimate loops free of false alarms while the bugs stay caught:
- a contribution onto an already-consumed ``.grad`` is only reported when a step consumes the mix
  (``uncleared-gradient``); a clear before that makes it harmless;
- contributions that another optimizer's step consumed (a GAN's generator pass reaching the discriminator)
  are a by-product when cleared, but only for an optimizer that steps on passes of its own; an optimizer
  whose gradients only ever come from passes others step on, and which skips some, was forgotten;
- window sizes: with ``accumulation_steps`` K, a window shorter than K is an epoch's short last window when
  the window before it was full (at most one short window between full ones); anything else is a mismatch;
- a clear that drops unconsumed contributions is judged at the optimizer's next step: if that step consumes
  an empty or wrong-sized window, the clear ran inside the window or between backward and step
  (``discarded-gradient``); if it consumes a full window, the loop dropped an epoch's partial last window
  (wasted batches: ``dangling-gradient``, a warning) or dropped a whole window on purpose (a NaN guard, or passes
  run only to be read: an adversarial attack's, per-task gradients combined by hand). Without
  ``accumulation_steps``, whole windows dropped before two steps in a row are a ``zero_grad()`` inside every
  window, unless the step's gradient was assigned by hand. Before an optimizer's first step a dropped window is
  a set-up pass (a sanity check);
- dropped contributions whose weights the loop moved outside a step (SAM's perturbation) were used on purpose.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from itertools import compress
from typing import Callable, Iterable, Mapping, Sequence

from . import findings as k

NO_OWNER = -1
SILENT, REPORTED = 1, 2  # how a gradient found in .grad when watched was adopted


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One occurrence of a finding kind, in parameter indices."""

    kind: str
    params: tuple[int, ...]
    step: int
    backward: int
    detail: Mapping[str, object] = field(default_factory=dict)
    where: tuple[str, int] | None = field(default=None, compare=False)  # the user's line that caused it, if known


# The per-parameter fields, declared once: (name, value of a parameter not seen yet). Every list has one entry
# per watched parameter; ``__init__`` and ``add_param`` both build them from here.
PER_PARAM: tuple[tuple[str, object], ...] = (
    ("fresh", 0),  # contributions not yet consumed
    ("consumed", 0),  # contributions consumed by a step and still in .grad
    ("fresh_first", 0),  # backward index of the first fresh contribution
    ("fresh_last", -1),  # backward index of the latest fresh contribution
    ("mixed_at", None),  # (step, backward) where fresh contributions landed on consumed ones
    ("nonfinite_at", None),  # (step, first, last backward) of NaN/Inf; first == last when checked per backward
    ("received", False),  # ever received a gradient
    ("adopted", 0),  # .grad held a gradient of unknown origin when watched: REPORTED or SILENT
    ("held", 0),  # contributions FSDP2 keeps out of .grad (gradient sync off) until the next synced pass
    ("held_first", -1),  # backward index of the first of them
)

_DEFAULTS = dict(PER_PARAM)
WHOLE_LISTS_FROM = 8  # parameters: from this many, a pass or clear reaching all of them updates whole lists


class Ledger:
    """Counters per parameter and the rules that turn lifecycle events into occurrences."""

    fresh: list[int]
    consumed: list[int]
    fresh_first: list[int]
    fresh_last: list[int]
    mixed_at: list[tuple[int, int] | None]
    nonfinite_at: list[tuple[int, int, int] | None]
    received: list[bool]
    adopted: list[int]
    held: list[int]
    held_first: list[int]

    def __init__(self, owners: Sequence[int], n_optimizers: int, accumulation_steps: int | None = None) -> None:
        n = len(owners)
        self.owners = list(owners)
        self.accumulation_steps = accumulation_steps
        for name, initial in PER_PARAM:
            setattr(self, name, [initial] * n)
        self.steps = [0] * n_optimizers
        self.in_step = [0] * n_optimizers
        self.n_fresh = [0] * n_optimizers  # parameters of each optimizer holding fresh contributions
        self.window_nonfinite = [False] * n_optimizers  # the pending window holds NaN/Inf (a skipped step)
        self.last_window: list[int | None] = [None] * n_optimizers  # passes the latest step consumed (None: unknown)
        self.dropped: list[tuple[Occurrence, int] | None] = [
            None
        ] * n_optimizers  # cleared unconsumed: judged next step
        self.skipped_window = [False] * n_optimizers  # the latest step came after a whole window was dropped
        # the pending window holds a .grad assigned by hand: gradients read before a clear may be combined in it
        self.assigned = [False] * n_optimizers
        self.independent = [False] * n_optimizers  # stepped on a pass no other optimizer consumed
        self.unstepped_drop: list[Occurrence | None] = [None] * n_optimizers  # by-products cleared before any step
        self._consumers: dict[int, int] = {}  # recent backward passes -> bit mask of the optimizers that consumed them
        self.uncleared = 0  # parameters whose .grad holds consumed contributions
        self.backwards = 0
        self.clears = 0
        self.unknown_window: set[int] = set()  # optimizers whose pending window started before the watch
        self.newest_consumed_backward = -1
        self.unscaled_upto = [0] * n_optimizers  # backward passes seen when GradScaler last unscaled each optimizer
        self.clip_pending: list[Occurrence | None] = [None] * n_optimizers  # a clip seen before any GradScaler
        self.synced: deque[int] = deque(maxlen=4096)  # recent backward passes that all-reduced (DDP)
        self.allreduces = 0  # backward passes that all-reduced, and those wasted inside a window
        self.wasted_allreduces = 0
        self.collective = "all-reduce"  # what a synced pass does: DDP all-reduces, FSDP2 reduce-scatters
        self.n_held = 0  # parameters with held contributions

    # -- events ------------------------------------------------------------------------------------
    def backward(self, indices: Iterable[int], same_pass: bool = False) -> list[Occurrence]:
        """One backward pass contributed to the parameters ``indices`` (each at most once). ``same_pass``: more
        parameters of the pass booked last (a step inside the backward consumed part of it already)."""
        if same_pass and self.backwards:
            b = self.backwards - 1
        else:
            b = self.backwards
            self.backwards = b + 1
        if self.n_held:
            indices = list(indices)
            self._land(indices)
        orphans = []
        fresh, owners, received, fresh_last = self.fresh, self.owners, self.received, self.fresh_last
        if not isinstance(indices, list):
            indices = list(indices)
        if len(indices) == len(fresh) >= WHOLE_LISTS_FROM and self._book_whole_pass(b):
            return []
        for i in indices:  # once per parameter per backward pass
            owner = owners[i]
            received[i] = True
            if owner == NO_OWNER:
                orphans.append(i)
                continue
            if not fresh[i]:
                self.fresh_first[i] = b
                self.n_fresh[owner] += 1
                if self.consumed[i] and self.mixed_at[i] is None:
                    self.mixed_at[i] = (self.steps[owner], b)
            fresh[i] += 1
            fresh_last[i] = b
        if orphans:
            return [Occurrence(k.ORPHAN, tuple(sorted(orphans)), max(self.steps, default=0), b)]
        return []

    def _book_whole_pass(self, b: int) -> bool:
        """Book pass ``b`` that reached every parameter, all booked to optimizers, with whole-list operations when
        it opens a window on cleared gradients or adds to a window all of them are in; else False (book each)."""
        fresh, n = self.fresh, len(self.fresh)
        if self.owners.count(NO_OWNER):
            return False
        empty = fresh.count(0)
        if not empty:  # a later pass of a window every parameter is in
            fresh[:] = map((1).__add__, fresh)
        elif empty == n and self.consumed.count(0) == n:  # the first pass after a clear of all of them
            for owner in range(len(self.n_fresh)):
                self.n_fresh[owner] += self.owners.count(owner)
            self.fresh_first[:] = [b] * n
            fresh[:] = [1] * n
            self.received[:] = [True] * n
        else:
            return False
        self.fresh_last[:] = [b] * n
        return True

    def hold(self, indices: Iterable[int]) -> None:
        """The backward pass just booked also contributed to ``indices``, but FSDP2 keeps that contribution out of
        their ``.grad`` (gradient sync off) until a synced pass reduce-scatters it there; no clear reaches it."""
        b = self.backwards - 1
        for i in indices:
            if self.owners[i] == NO_OWNER:
                continue  # an orphan is reported when its gradient lands
            self.received[i] = True
            if not self.held[i]:
                self.held_first[i] = b
                self.n_held += 1
            self.held[i] += 1

    def _land(self, indices: Iterable[int]) -> None:
        """A synced pass reached ``indices``: what FSDP2 held for them lands in their ``.grad`` with it."""
        held, fresh = self.held, self.fresh
        for i in indices:
            if not held[i]:
                continue
            owner = self.owners[i]
            if not fresh[i]:
                self.fresh_first[i] = self.held_first[i]
                self.n_fresh[owner] += 1
                if self.consumed[i] and self.mixed_at[i] is None:
                    self.mixed_at[i] = (self.steps[owner], self.held_first[i])
            fresh[i] += held[i]
            self.fresh_last[i] = max(self.fresh_last[i], self.backwards - 1)
            held[i] = 0
            self.n_held -= 1

    def backward_synced(self) -> None:
        """The backward pass just booked all-reduced its gradients across ranks (DDP outside ``no_sync()``)."""
        self.synced.append(self.backwards - 1)
        self.allreduces += 1

    def adopt(self, indices: Iterable[int], report: bool = False) -> None:
        """Gradients already in ``.grad`` when the watch began (or a parameter joined it): one window of unknown
        size, not yet consumed. ``report``: a step that consumes it is reported (``pre-existing-gradient``)."""
        for i in indices:
            owner = self.owners[i]
            if owner == NO_OWNER:
                continue
            if self.fresh[i]:
                if not report and self.adopted[i]:
                    self.adopted[i] = SILENT
                continue
            self.fresh[i] = 1
            self.fresh_first[i] = self.fresh_last[i] = self.backwards - 1
            self.received[i] = True
            self.adopted[i] = REPORTED if report else SILENT
            self.n_fresh[owner] += 1
            self.unknown_window.add(owner)

    def supplied(self, indices: Iterable[int]) -> None:
        """A gradient was assigned to ``.grad`` by hand (``torch.autograd.grad``, ``torch.func``, DP-SGD) onto a
        ``.grad`` holding no fresh contribution: it is one contribution, from no backward pass."""
        b = self.backwards - 1
        for i in indices:
            owner = self.owners[i]
            if owner == NO_OWNER:
                continue
            if self.consumed[i]:
                self.consumed[i] = 0
                self.uncleared -= 1
            self.mixed_at[i] = None
            if not self.fresh[i]:
                self.n_fresh[owner] += 1
                self.fresh_first[i] = b
            self.fresh[i] = 1
            self.fresh_last[i] = b
            self.received[i] = True
            self.unknown_window.add(owner)
            self.assigned[owner] = True

    def replaced(self, indices: Iterable[int]) -> None:
        """The ``.grad`` of ``indices``, holding fresh contributions, was replaced by hand with another tensor (scaled,
        projected, or combined from gradients the loop read and cleared: PCGrad and other multi-task methods)."""
        for i in indices:
            owner = self.owners[i]
            if owner != NO_OWNER:
                self.assigned[owner] = True

    def add_param(self, owner: int) -> int:
        """Watch one more parameter (added to optimizer ``owner`` during the run); returns its index."""
        self.owners.append(owner)
        for name, initial in PER_PARAM:
            getattr(self, name).append(initial)
        return len(self.owners) - 1

    def book(self, i: int, owner: int) -> bool:
        """Book parameter ``i``, which no optimizer held until now, to optimizer ``owner``; False if one did."""
        if self.owners[i] != NO_OWNER:
            return False
        self.owners[i] = owner
        return True

    # -- questions -----------------------------------------------------------------------------------
    def is_fresh(self, i: int) -> bool:
        """Whether parameter ``i``'s ``.grad`` holds contributions no step consumed yet."""
        return bool(self.fresh[i])

    def fresh_passes(self, i: int) -> int:
        """How many contributions no step consumed yet parameter ``i``'s ``.grad`` holds."""
        return self.fresh[i]

    def holds_gradient(self, i: int) -> bool:
        """Whether parameter ``i``'s ``.grad`` holds contributions, consumed or not (a clear would empty it)."""
        return bool(self.fresh[i] or self.consumed[i])

    def only_consumed(self, i: int) -> bool:
        """Whether parameter ``i``'s ``.grad`` holds consumed contributions and nothing fresh."""
        return bool(self.consumed[i]) and not self.fresh[i]

    def clear_suspects(self) -> list[int]:
        """Parameters whose ``.grad`` holds only consumed contributions: a backward pass adding onto one of them
        needs a look at whether something cleared it in place first."""
        if not self.uncleared:
            return []
        fresh = self.fresh
        return [i for i, c in enumerate(self.consumed) if c and not fresh[i]]

    def fresh_among(self, indices: Iterable[int]) -> list[int]:
        """The parameters of ``indices`` holding fresh contributions."""
        fresh = self.fresh
        return [i for i in indices if fresh[i]]

    def window_size(self, indices: Iterable[int]) -> int:
        """The most fresh contributions any of ``indices`` holds: the passes a step over them would consume."""
        fresh = self.fresh
        return max((fresh[i] for i in indices), default=0)

    def is_mixed(self, i: int) -> bool:
        """Whether fresh contributions landed on consumed ones in parameter ``i``'s ``.grad``."""
        return self.mixed_at[i] is not None

    def is_nonfinite(self, i: int) -> bool:
        """Whether NaN/Inf was found in parameter ``i``'s pending gradient."""
        return self.nonfinite_at[i] is not None

    def window_unknown(self, opt: int) -> bool:
        """Whether optimizer ``opt``'s pending window began before the watch (its size is unknown)."""
        return opt in self.unknown_window

    def has_unconsumed(self, indices: Iterable[int]) -> bool:
        """Whether clearing ``indices`` would drop contributions no step consumed."""
        return any(map(self.fresh.__getitem__, indices))

    def clear(
        self,
        indices: Iterable[int],
        source: str,
        perturbed: bool = False,
        count: bool = True,
        before_step: bool = False,
        where: Callable[[], tuple[str, int] | None] | None = None,
    ) -> list[Occurrence]:
        """The ``.grad`` of ``indices`` was emptied (set to None or zeroed) by ``source``. ``perturbed``: the loop
        moved their weights outside a step since the last step (SAM), so a dropped gradient was used on purpose.
        ``count``: whether this is a new clear (not the rest of one already counted). ``before_step``: found
        during a step, but done before it began (not a closure's clear). ``where``: the clear's line, asked for
        only when a drop is kept to be judged later (its finding then points at the clear)."""
        dropped: dict[int, list[int]] = {}
        owners, fresh = self.owners, self.fresh
        if not isinstance(indices, list):
            indices = list(indices)
        if len(indices) == len(fresh) >= WHOLE_LISTS_FROM and fresh.count(0) == len(fresh):
            self._clear_all_consumed()  # the clear after a step, of every parameter: nothing to judge
            indices = []
        for i in indices:
            owner = owners[i]
            if fresh[i] and owner != NO_OWNER:
                if not perturbed and self._drop_needs_judging(i, owner, before_step):
                    dropped.setdefault(owner, []).append(i)
                else:
                    self._note_skipped_window(owner, self.fresh_last[i] - self.fresh_first[i] + 1)
                self.n_fresh[owner] -= 1
                if self.n_fresh[owner] == 0:
                    self.window_nonfinite[owner] = False
            fresh[i] = 0
            self.adopted[i] = 0
            if self.consumed[i]:
                self.consumed[i] = 0
                self.uncleared -= 1
            self.mixed_at[i] = None
            self.nonfinite_at[i] = None
        if count:
            self.clears += 1
        out: list[Occurrence] = []
        for owner, params in dropped.items():
            out += self._judge_drop(owner, params, source, where=where)
        return out

    def _clear_all_consumed(self) -> None:
        """Every parameter's ``.grad`` emptied while none held fresh contributions: the lists reset whole."""
        n = len(self.fresh)
        for name in ("adopted", "consumed", "mixed_at", "nonfinite_at"):
            values, default = getattr(self, name), _DEFAULTS[name]
            if values.count(default) != n:
                values[:] = [default] * n
        self.uncleared = 0

    def cleared_before(self, drops: Sequence[tuple[int, int, int]], source: str) -> list[Occurrence]:
        """Each (parameter, passes, pass b): its ``.grad`` was zeroed before pass ``b``, which dropped its first
        ``passes`` fresh contributions (found out after ``b`` accumulated onto the zeros)."""
        dropped: dict[int, list[int]] = {}
        last = {}
        for i, passes, b in drops:
            owner = self.owners[i]
            if owner == NO_OWNER or self.fresh[i] <= passes or self.fresh_first[i] >= b:
                continue  # consumed or cleared since, or nothing left of the window before b
            if self._drop_needs_judging(i, owner, before_step=True):
                dropped.setdefault(owner, []).append(i)
                last[owner] = max(last.get(owner, -1), b - 1)
            else:
                self._note_skipped_window(owner, passes)
            self.fresh[i] -= passes
            self.fresh_first[i] = b
            self.mixed_at[i] = None
            if self.nonfinite_at[i] is not None and self.nonfinite_at[i][2] < b:  # type: ignore[index]
                self.nonfinite_at[i] = None
        self.clears += 1
        out: list[Occurrence] = []
        for owner, params in dropped.items():
            passes = max(p for i, p, _ in drops if i in params)
            out += self._judge_drop(owner, params, source, passes, last[owner])
        return out

    def _judge_drop(
        self,
        owner: int,
        params: list[int],
        source: str,
        passes: int | None = None,
        last: int | None = None,
        where: Callable[[], tuple[str, int] | None] | None = None,
    ) -> list[Occurrence]:
        """A clear dropped the fresh contributions ``params`` of optimizer ``owner`` (``passes`` of them, the last
        from pass ``last``; default: all they held): a bug now, or judged at the next step."""
        if passes is None:
            passes = max(self.fresh_last[i] for i in params) - min(self.fresh_first[i] for i in params) + 1
        if last is None:
            last = max(self.fresh_last[i] for i in params)
        detail = {"source": source, "fresh": passes}
        occurrence = Occurrence(k.DISCARDED, tuple(sorted(params)), self.steps[owner], self.backwards, detail)
        if where is not None:
            occurrence = replace(occurrence, where=where())
        if last <= self.newest_consumed_backward:
            # another optimizer stepped on these passes, and this one never steps on passes of its own
            forgotten = replace(occurrence, detail={**detail, "how": "not-stepped", "opt": owner})
            if self.steps[owner]:
                return [forgotten]
            first, self.unstepped_drop[owner] = self.unstepped_drop[owner], forgotten
            if first is not None:  # a second window dropped and still no step of its own: it was forgotten
                self.unstepped_drop[owner] = None
                return [first, forgotten]
            return []  # maybe a GAN updating G first: D steps on a pass of its own next
        earlier = self.dropped[owner]
        if earlier is None or earlier[1] < passes:
            self.dropped[owner] = (occurrence, passes)
        elif earlier[1] == passes:  # the same window, noticed in two parts (a .grad set to None by hand)
            params_of_both = tuple(sorted({*earlier[0].params, *occurrence.params}))
            self.dropped[owner] = (replace(earlier[0], params=params_of_both), passes)
        return []

    def clear_consumed(self, indices: Iterable[int]) -> None:
        """The consumed ``.grad`` of ``indices`` turned out to be zeroed in place before their fresh contributions."""
        indices = list(indices)
        if not indices:
            return
        for i in indices:
            if self.consumed[i]:
                self.consumed[i] = 0
                self.uncleared -= 1
            self.mixed_at[i] = None
        self.clears += 1

    def _note_skipped_window(self, owner: int, passes: int) -> None:
        """A window holding NaN/Inf was dropped instead of stepped on: for the window rule it was one."""
        if self.window_nonfinite[owner]:
            self.last_window[owner] = max(passes, self.last_window[owner] or 0)

    def _drop_needs_judging(self, i: int, owner: int, before_step: bool = False) -> bool:
        if self.in_step[owner] and not before_step:  # a closure (LBFGS, Lightning) clears inside its own step
            return False
        if self.window_nonfinite[owner]:  # a skipped NaN/Inf window (GradScaler, or the user's own check)
            return False
        if self.adopted[i]:  # a gradient from before the watch, cleared before training: as it should be
            return False
        if self.fresh_last[i] > self.newest_consumed_backward:
            return True
        return not self._is_independent(owner)  # else a by-product of a pass another optimizer consumed

    def _dropped_unstepped(self, i: int) -> bool:
        forgotten = self.unstepped_drop[self.owners[i]]
        return forgotten is not None and i in forgotten.params

    def _is_independent(self, owner: int) -> bool:
        if not self.independent[owner]:
            self.independent[owner] = (1 << owner) in self._consumers.values()
        return self.independent[owner]

    def mark_nonfinite(self, i: int, step: int, first_backward: int, last_backward: int | None = None) -> None:
        """NaN/Inf was found in parameter ``i``'s ``.grad``, put there by one of the backward passes
        ``first_backward``..``last_backward`` (the same one when it was checked after every backward pass)."""
        owner = self.owners[i]
        if owner == NO_OWNER or not (self.fresh[i] or self.consumed[i]):
            return
        if self.fresh[i] and (last_backward if last_backward is not None else first_backward) < self.fresh_first[i]:
            return  # from contributions dropped since (zeroed by hand)
        if self.nonfinite_at[i] is None:
            last = first_backward if last_backward is None else last_backward
            self.nonfinite_at[i] = (step, first_backward, last)
        self.window_nonfinite[owner] = True

    def clip(self, opt: int, indices: Sequence[int], how: str, scaled: bool | None) -> list[Occurrence]:
        """``how`` (a clipping function) ran over ``indices`` of optimizer ``opt``. ``scaled``: whether a
        GradScaler scales its gradients; None while none was seen (the clip is judged when one reaches ``opt``)."""
        if scaled is False:
            return []
        upto, fresh, consumed, last = self.unscaled_upto[opt], self.fresh, self.consumed, self.fresh_last
        still_scaled = tuple(i for i in indices if (fresh[i] or consumed[i]) and last[i] >= upto)
        if not still_scaled:
            return []
        occurrence = Occurrence(k.CLIP_BEFORE_UNSCALE, still_scaled, self.steps[opt], self.backwards, {"clip": how})
        if scaled:
            return [occurrence]
        if self.clip_pending[opt] is None:
            self.clip_pending[opt] = occurrence
        return []

    def scaler_reached(self, opt: int, enabled: bool) -> list[Occurrence]:
        """A GradScaler is about to unscale or step optimizer ``opt``: a clip seen before was on scaled values."""
        pending, self.clip_pending[opt] = self.clip_pending[opt], None
        return [pending] if pending is not None and enabled else []

    def unscaled(self, opt: int) -> None:
        """A GradScaler unscaled optimizer ``opt``'s gradients (or stepped it, which unscales)."""
        self.unscaled_upto[opt] = self.backwards

    def skipped_step(self, opt: int, nonfinite: Sequence[int]) -> list[Occurrence]:
        """A GradScaler skipped optimizer ``opt``'s step because its gradients held NaN/Inf (``nonfinite``; empty
        when only unwatched ones did). Clearing that window next is expected, not a bug.

        The occurrence names the whole window, not the overflowing parameters: those differ from skip to skip,
        and every skip of one optimizer should count into one finding.
        """
        self.window_nonfinite[opt] = True
        self.clip_pending[opt] = None
        window = tuple(i for i, o in enumerate(self.owners) if o == opt and self.fresh[i])
        if not window:
            return []
        marks = [self.nonfinite_at[i] for i in nonfinite if self.nonfinite_at[i] is not None]
        if marks:
            _, first, last = min(marks)  # type: ignore[type-var]
        else:
            first, last = min(self.fresh_first[i] for i in window), max(self.fresh_last[i] for i in window)
        detail = {"where": _passes(first, last), "overflowed": len(nonfinite) or "some", "total": len(window)}
        return [Occurrence(k.SKIPPED_STEP, window, self.steps[opt], first, detail)]

    def window_of(self, i: int) -> tuple[int, int]:
        """(first, last) backward pass of parameter ``i``'s fresh contributions."""
        return self.fresh_first[i], self.fresh_last[i]

    def pending_window(self, opt: int, indices: Iterable[int]) -> tuple[int, int, int] | None:
        """(first pass, last pass, passes) of the window that optimizer ``opt`` would consume now over ``indices``;
        None when nothing is fresh or the window began before the watch (its size is unknown)."""
        fresh = [i for i in indices if self.fresh[i]]
        if not fresh or opt in self.unknown_window:
            return None
        first = min(self.fresh_first[i] for i in fresh)
        return first, max(self.fresh_last[i] for i in fresh), max(self.fresh[i] for i in fresh)

    def step_begin(self, opt: int) -> None:
        """An optimizer step starts (a closure may run backward and clears until ``step_end``)."""
        self.in_step[opt] += 1

    def step_end(self, opt: int, indices: Sequence[int]) -> list[Occurrence]:
        """Optimizer ``opt``, over the parameters ``indices``, finished a step and consumed their ``.grad``."""
        self.in_step[opt] = max(0, self.in_step[opt] - 1)
        if self.in_step[opt]:  # a subclass whose step() calls super().step(): count the outer one
            return []
        step, b = self.steps[opt], self.backwards
        if not indices:  # every parameter it holds is booked to another optimizer (overlapping optimizers)
            self.steps[opt] = step + 1
            return []
        fresh, consumed, mixed_at, nonfinite_at, adopted = (
            self.fresh,
            self.consumed,
            self.mixed_at,
            self.nonfinite_at,
            self.adopted,
        )
        with_fresh = list(compress(indices, map(fresh.__getitem__, indices)))
        stale = [i for i in indices if consumed[i] and not fresh[i]] if self.uncleared else []
        out: list[Occurrence] = []
        held = [i for i in indices if self.held[i]] if self.n_held else []
        if held:  # FSDP2 still holds passes made with the sync off: the sync was not back on for the last pass
            detail = {"held": max(self.held[i] for i in held)}
            out.append(Occurrence(k.UNSYNCED, tuple(held), step, min(self.held_first[i] for i in held), detail))
        elif not with_fresh and not stale:
            out.append(Occurrence(k.EMPTY_STEP, tuple(indices), step, b))
        if stale:
            out.append(Occurrence(k.STALE, tuple(stale), step, b))
        # the rare marks, looked for over whole lists in C first: a Python pass over the step's parameters each
        # costs as much as the rest of the step on a model of many small tensors
        n = len(fresh)
        mixed = [i for i in with_fresh if mixed_at[i] is not None] if mixed_at.count(None) != n else []
        if mixed:
            first_step, first_b = min(mixed_at[i] for i in mixed)  # type: ignore[type-var]
            detail = {"prev_step": first_step - 1}
            out.append(Occurrence(k.UNCLEARED, tuple(mixed), first_step, first_b, detail))
        if nonfinite_at.count(None) != n:
            nonfinite = [i for i in indices if nonfinite_at[i] is not None and (fresh[i] or consumed[i])]
            if nonfinite:
                first_step, first_b, last_b = min(nonfinite_at[i] for i in nonfinite)  # type: ignore[type-var]
                where = _passes(first_b, last_b)
                out.append(Occurrence(k.NON_FINITE, tuple(nonfinite), first_step, first_b, {"where": where}))
        reported = [i for i in with_fresh if adopted[i] == REPORTED] if REPORTED in adopted else []
        if reported:
            out.append(Occurrence(k.PRE_EXISTING, tuple(reported), step, b))
        if self.synced and with_fresh:
            out += self._redundant_syncs(opt, with_fresh, step)
        unknown = opt in self.unknown_window
        self.unknown_window.discard(opt)
        whole = len(with_fresh) == n >= WHOLE_LISTS_FROM  # the step consumes every parameter's window
        window = max(fresh) if whole else max([fresh[i] for i in with_fresh], default=0)
        out += self._judge_window(opt, window, tuple(with_fresh), unknown)
        if with_fresh:
            self._book_consumers(opt, with_fresh)
            fresh_last = self.fresh_last
            if whole:
                self.uncleared += consumed.count(0)
                consumed[:] = map(int.__add__, consumed, fresh)
                fresh[:] = [0] * n
                newest = max(fresh_last)
            else:
                self.uncleared += len(with_fresh) - sum([1 for i in with_fresh if consumed[i]])
                for i in with_fresh:
                    consumed[i] += fresh[i]
                    fresh[i] = 0
                newest = max([fresh_last[i] for i in with_fresh])
            if newest > self.newest_consumed_backward:
                self.newest_consumed_backward = newest
            if adopted.count(0) != n:
                for i in with_fresh:
                    adopted[i] = 0
            if mixed:
                for i in mixed:
                    mixed_at[i] = None
        self.n_fresh[opt] = 0
        self.window_nonfinite[opt] = False
        self.clip_pending[opt] = None
        self.steps[opt] = step + 1
        return out

    def _book_consumers(self, opt: int, window: Sequence[int]) -> None:
        """Remember which optimizers consumed the recent passes (whether an optimizer steps on passes of its own)."""
        self.unstepped_drop[opt] = None
        if self.independent[opt] or len(self.steps) == 1:
            self.independent[opt] = True
            return
        last = max(self.fresh_last[i] for i in window)
        first = max(min(self.fresh_first[i] for i in window), last - 16)
        consumers, bit = self._consumers, 1 << opt
        for b in range(first, last + 1):
            consumers[b] = consumers.get(b, 0) | bit
        if len(consumers) > 128:
            for old in sorted(consumers)[:64]:
                del consumers[old]

    def _judge_window(self, opt: int, window: int, params: tuple[int, ...], unknown: bool) -> list[Occurrence]:
        """The window a step consumed against ``accumulation_steps``, and contributions dropped before it."""
        full = self.accumulation_steps
        previous = self.last_window[opt]
        expected = full if full is not None else previous
        dropped, self.dropped[opt] = self.dropped[opt], None
        skipped_before, self.skipped_window[opt] = self.skipped_window[opt], False
        assigned, self.assigned[opt] = self.assigned[opt], False
        out: list[Occurrence] = []
        if dropped is not None:
            occurrence, passes = dropped
            whole = expected is None or passes >= expected
            own = max(self.fresh[i] for i in occurrence.params)  # what the dropped parameters hold now
            if self._kept_by_others(occurrence, params):  # not a skipped window, nor an epoch's dropped tail
                out.append(replace(occurrence, detail={**occurrence.detail, "how": "part"}))
            elif window == 0:
                out.append(occurrence)  # cleared between backward() and step()
            elif not whole and (window != expected or own != expected):
                out.append(occurrence)  # cleared inside this window: the step consumed what was left of it
            elif not whole and occurrence.step > 0:  # a full window followed: an epoch's partial last one dropped
                out.append(_wasted(occurrence))
            elif whole and occurrence.step > 0 and skipped_before and full is None and not assigned:
                # whole windows dropped before two steps in a row, with no accumulation_steps to tell a window from
                # passes run only to be read (an adversarial attack's): a zero_grad() inside every window
                out.append(replace(occurrence, detail={**occurrence.detail, "how": "repeated"}))
                self.skipped_window[opt] = True  # and so is every such drop after it
            elif whole and occurrence.step > 0:
                self.skipped_window[opt] = True  # a window skipped on purpose (a NaN or loss-spike guard)
            if whole:
                previous = passes  # the window before this one was the dropped one
        if window:
            self.last_window[opt] = full if unknown else window
        if full is None or unknown or not params or window == full:
            return out
        if window < full and previous is not None and previous >= full:
            return out  # the short last window of an epoch, stepped on
        detail = {"window": window, "expected": full}
        return [*out, Occurrence(k.ACCUMULATION_MISMATCH, params, self.steps[opt], self.backwards, detail)]

    def _kept_by_others(self, dropped: Occurrence, consumed: tuple[int, ...]) -> bool:
        """Whether the step consumed, besides, gradients that other parameters held since before the drop: the
        clear took some parameters' contributions and left the rest of the same passes in place."""
        cleared = set(dropped.params)
        return any(self.fresh_first[i] < dropped.backward for i in consumed if i not in cleared)

    def _redundant_syncs(self, opt: int, window: Sequence[int], step: int) -> list[Occurrence]:
        """All-reduces by backward passes of the window other than its last: their result is summed over again."""
        first = min(self.fresh_first[i] for i in window)
        last = max(self.fresh_last[i] for i in window)
        synced = [b for b in self.synced if first <= b <= last]
        wasted = [b for b in synced if b != last]
        if not wasted:
            return []
        self.wasted_allreduces += len(wasted)
        n = last - first + 1
        detail = {"wasted": len(wasted), "passes": n, "share": round(100 * len(wasted) / len(synced))}
        detail["how"] = self.collective
        return [Occurrence(k.REDUNDANT_SYNC, tuple(window), step, wasted[0], detail)]

    def finish(self, trainable: Sequence[bool]) -> list[Occurrence]:
        """End-of-run checks: contributions never consumed, and parameters that never got a gradient."""
        out: list[Occurrence] = []
        for opt, dropped in enumerate(self.dropped):
            expected = self.accumulation_steps or self.last_window[opt]
            if dropped is not None and dropped[0].step > 0 and expected is not None and dropped[1] < expected:
                out.append(_wasted(dropped[0]))  # the last partial window dropped; a whole one was skipped
        self.dropped = [None] * len(self.dropped)
        left = [
            i
            for i, owner in enumerate(self.owners)
            if owner != NO_OWNER and self.fresh[i] and not self.window_nonfinite[owner] and not self.adopted[i]
        ]
        for opt, forgotten in enumerate(self.unstepped_drop):
            if forgotten is not None and not self.steps[opt]:
                out.append(forgotten)
        by_others = [i for i in left if self.fresh_last[i] <= self.newest_consumed_backward]
        never = [i for i in by_others if not self.steps[self.owners[i]] and not self._dropped_unstepped(i)]
        if never:  # never cleared and never stepped, while another optimizer stepped on the same passes
            owner = self.owners[never[0]]
            detail = {"source": "the end of the run", "fresh": max(self.fresh[i] for i in never)}
            detail |= {"how": "not-stepped", "opt": owner}
            out.append(Occurrence(k.DISCARDED, tuple(never), self.steps[owner], self.backwards, detail))
        dangling = [i for i in left if self.fresh_last[i] > self.newest_consumed_backward]
        listed = set(dangling)
        dangling += [i for i, n in enumerate(self.held) if n and i not in listed]  # never synced again
        dangling += [i for i in by_others if self.steps[self.owners[i]] and not self._is_independent(self.owners[i])]
        if dangling:
            owner = self.owners[dangling[0]]
            passes = max(self.fresh[i] + self.held[i] for i in dangling)
            detail = {"fresh": passes, "how": "left", "source": "the end of the run"}
            out.append(Occurrence(k.DANGLING, tuple(sorted(dangling)), self.steps[owner], self.backwards, detail))
        unused = [
            i
            for i, owner in enumerate(self.owners)
            if owner != NO_OWNER and trainable[i] and not self.received[i] and self.steps[owner] > 0
        ]
        if unused:
            out.append(Occurrence(k.UNUSED, tuple(unused), max(self.steps), self.backwards))
        return out


def _wasted(dropped: Occurrence) -> Occurrence:
    """A dropped partial window, judged: an epoch's tail that was never trained on."""
    return replace(dropped, kind=k.DANGLING, detail={**dropped.detail, "how": "dropped"})


def _passes(first: int, last: int) -> str:
    return f"pass {first}" if first == last else f"passes {first}-{last} (one of them)"
