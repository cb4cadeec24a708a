"""Pure bookkeeping of gradient contributions per parameter: produced, consumed, cleared.

No torch here: the tracker feeds events (parameter indices), the ledger answers with ``Occurrence``s.
A *contribution* is one backward pass accumulating into one parameter's ``.grad``; it is *consumed* by a
step of the parameter's optimizer and *cleared* by anything that empties the ``.grad``.

Two choices keep legitimate multi-optimizer loops (a GAN whose generator backward also reaches the
discriminator) free of false alarms:
- a contribution onto an already-consumed ``.grad`` is only reported when a step consumes the mix
  (``uncleared-gradient``); a clear before that makes it harmless;
- contributions from a backward pass whose gradients some step did consume (for other parameters) are a
  by-product when cleared, not ``discarded-gradient``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from . import findings as k

NO_OWNER = -1


@dataclass(frozen=True)
class Occurrence:
    """One occurrence of a finding kind, in parameter indices."""

    kind: str
    params: tuple[int, ...]
    step: int
    backward: int
    detail: Mapping[str, object] = field(default_factory=dict)


class Ledger:
    """Counters per parameter and the rules that turn lifecycle events into occurrences."""

    def __init__(self, owners: Sequence[int], n_optimizers: int, accumulation_steps: int | None = None) -> None:
        n = len(owners)
        self.owners = list(owners)
        self.accumulation_steps = accumulation_steps
        self.fresh = [0] * n  # contributions not yet consumed
        self.consumed = [0] * n  # contributions consumed by a step and still in .grad
        self.fresh_first = [0] * n  # backward index of the first fresh contribution
        self.fresh_last = [-1] * n  # backward index of the latest fresh contribution
        self.mixed_at: list[tuple[int, int] | None] = [None] * n  # (step, backward) fresh landed on consumed
        # (step, first, last backward) where NaN/Inf appeared; first == last when checked after every backward
        self.nonfinite_at: list[tuple[int, int, int] | None] = [None] * n
        self.received = [False] * n
        self.steps = [0] * n_optimizers
        self.in_step = [0] * n_optimizers
        self.n_fresh = [0] * n_optimizers  # parameters of each optimizer holding fresh contributions
        self.window_nonfinite = [False] * n_optimizers  # the pending window holds NaN/Inf (a skipped step)
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

    # -- events ------------------------------------------------------------------------------------
    def backward(self, indices: Iterable[int]) -> list[Occurrence]:
        """One backward pass contributed to the parameters ``indices`` (each at most once)."""
        b = self.backwards
        self.backwards = b + 1
        orphans = []
        fresh, owners = self.fresh, self.owners
        for i in indices:
            owner = owners[i]
            self.received[i] = True
            if owner == NO_OWNER:
                orphans.append(i)
                continue
            if not fresh[i]:
                self.fresh_first[i] = b
                self.n_fresh[owner] += 1
                if self.consumed[i] and self.mixed_at[i] is None:
                    self.mixed_at[i] = (self.steps[owner], b)
            fresh[i] += 1
            self.fresh_last[i] = b
        if orphans:
            return [Occurrence(k.ORPHAN, tuple(sorted(orphans)), max(self.steps, default=0), b)]
        return []

    def backward_synced(self) -> None:
        """The backward pass just booked all-reduced its gradients across ranks (DDP outside ``no_sync()``)."""
        self.synced.append(self.backwards - 1)
        self.allreduces += 1

    def adopt(self, indices: Iterable[int]) -> None:
        """Gradients already in ``.grad`` when the watch began: one window of unknown size, not yet consumed."""
        for i in indices:
            owner = self.owners[i]
            if owner == NO_OWNER or self.fresh[i]:
                continue
            self.fresh[i] = 1
            self.received[i] = True
            self.n_fresh[owner] += 1
            self.unknown_window.add(owner)

    def add_param(self, owner: int) -> int:
        """Watch one more parameter (added to optimizer ``owner`` during the run); returns its index."""
        for per_param, value in (
            (self.owners, owner),
            (self.fresh, 0),
            (self.consumed, 0),
            (self.fresh_first, 0),
            (self.fresh_last, -1),
            (self.mixed_at, None),
            (self.nonfinite_at, None),
            (self.received, False),
        ):
            per_param.append(value)  # type: ignore[attr-defined]
        return len(self.owners) - 1

    def has_unconsumed(self, indices: Iterable[int]) -> bool:
        """Whether clearing ``indices`` would drop contributions no step consumed."""
        fresh = self.fresh
        return any(fresh[i] for i in indices)

    def clear(self, indices: Iterable[int], source: str) -> list[Occurrence]:
        """The ``.grad`` of ``indices`` was emptied (set to None, replaced or zeroed) by ``source``."""
        discarded: list[int] = []
        most_fresh = 0
        owners, fresh = self.owners, self.fresh
        for i in indices:
            owner = owners[i]
            if fresh[i] and owner != NO_OWNER:
                if self._discard_is_a_bug(i, owner):
                    discarded.append(i)
                    most_fresh = max(most_fresh, fresh[i])
                self.n_fresh[owner] -= 1
                if self.n_fresh[owner] == 0:
                    self.window_nonfinite[owner] = False
            fresh[i] = 0
            if self.consumed[i]:
                self.consumed[i] = 0
                self.uncleared -= 1
            self.mixed_at[i] = None
            self.nonfinite_at[i] = None
        self.clears += 1
        if not discarded:
            return []
        owner = owners[discarded[0]]
        detail = {"source": source, "fresh": most_fresh}
        return [Occurrence(k.DISCARDED, tuple(sorted(discarded)), self.steps[owner], self.backwards, detail)]

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

    def _discard_is_a_bug(self, i: int, owner: int) -> bool:
        if self.in_step[owner]:  # a closure (LBFGS, Lightning) clears inside its own step
            return False
        if self.window_nonfinite[owner]:  # a skipped NaN/Inf window (GradScaler, or the user's own check)
            return False
        return self.fresh_last[i] > self.newest_consumed_backward  # else a by-product of a consumed backward

    def mark_nonfinite(self, i: int, step: int, first_backward: int, last_backward: int | None = None) -> None:
        """NaN/Inf was found in parameter ``i``'s ``.grad``, put there by one of the backward passes
        ``first_backward``..``last_backward`` (the same one when it was checked after every backward pass)."""
        owner = self.owners[i]
        if owner == NO_OWNER or not (self.fresh[i] or self.consumed[i]):
            return
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
        fresh, consumed = self.fresh, self.consumed
        with_fresh = [i for i in indices if fresh[i]]
        stale = [i for i in indices if consumed[i] and not fresh[i]]
        out: list[Occurrence] = []
        if not with_fresh and not stale:
            out.append(Occurrence(k.EMPTY_STEP, tuple(indices), step, b))
        if stale:
            out.append(Occurrence(k.STALE, tuple(stale), step, b))
        mixed = [i for i in with_fresh if self.mixed_at[i] is not None]
        if mixed:
            first_step, first_b = min(self.mixed_at[i] for i in mixed)  # type: ignore[type-var]
            detail = {"prev_step": first_step - 1}
            out.append(Occurrence(k.UNCLEARED, tuple(mixed), first_step, first_b, detail))
        nonfinite = [i for i in indices if self.nonfinite_at[i] is not None and (fresh[i] or consumed[i])]
        if nonfinite:
            first_step, first_b, last_b = min(self.nonfinite_at[i] for i in nonfinite)  # type: ignore[type-var]
            where = _passes(first_b, last_b)
            out.append(Occurrence(k.NON_FINITE, tuple(nonfinite), first_step, first_b, {"where": where}))
        if self.synced and with_fresh:
            out += self._redundant_syncs(opt, with_fresh, step)
        unknown = opt in self.unknown_window
        self.unknown_window.discard(opt)
        if self.accumulation_steps is not None and with_fresh and not unknown:
            window = max(fresh[i] for i in with_fresh)
            if window != self.accumulation_steps:
                detail = {"window": window, "expected": self.accumulation_steps}
                out.append(Occurrence(k.ACCUMULATION_MISMATCH, tuple(with_fresh), step, b, detail))
        for i in with_fresh:
            if not consumed[i]:
                self.uncleared += 1
            consumed[i] += fresh[i]
            fresh[i] = 0
            self.mixed_at[i] = None
            if self.fresh_last[i] > self.newest_consumed_backward:
                self.newest_consumed_backward = self.fresh_last[i]
        self.n_fresh[opt] = 0
        self.window_nonfinite[opt] = False
        self.clip_pending[opt] = None
        self.steps[opt] = step + 1
        return out

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
        return [Occurrence(k.REDUNDANT_SYNC, tuple(window), step, wasted[0], detail)]

    def finish(self, trainable: Sequence[bool]) -> list[Occurrence]:
        """End-of-run checks: contributions never consumed, and parameters that never got a gradient."""
        out: list[Occurrence] = []
        dangling = [
            i
            for i, owner in enumerate(self.owners)
            if owner != NO_OWNER
            and self.fresh[i]
            and not self.window_nonfinite[owner]
            and self.fresh_last[i] > self.newest_consumed_backward
        ]
        if dangling:
            owner = self.owners[dangling[0]]
            detail = {"fresh": max(self.fresh[i] for i in dangling)}
            out.append(Occurrence(k.DANGLING, tuple(dangling), self.steps[owner], self.backwards, detail))
        unused = [
            i
            for i, owner in enumerate(self.owners)
            if owner != NO_OWNER and trainable[i] and not self.received[i] and self.steps[owner] > 0
        ]
        if unused:
            out.append(Occurrence(k.UNUSED, tuple(unused), max(self.steps), self.backwards))
        return out


def _passes(first: int, last: int) -> str:
    return f"pass {first}" if first == last else f"passes {first}-{last} (one of them)"
