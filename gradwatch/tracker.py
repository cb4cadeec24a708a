"""Reads what the hooks saw on the tensors and turns it into ledger events.

Host-side facts (is ``.grad`` None, the same object, a new version) are free and checked as events
arrive. Values are read only when needed: NaN/Inf once per optimizer step over the gradients it consumes
(or, with ``finite_check="backward"``, queued on the device after each backward pass and read at the step),
and before a clear that would drop unconsumed gradients. "Was this gradient zeroed in place by hand?" is
asked only of gradients whose version moved without an event gradwatch saw: at a step, in the same read as
the NaN/Inf check; when a backward pass starts (consumed gradients, and fresh ones when a probe parameter per
optimizer moved), computed on the device and read at the next step or clear.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable, Protocol, Sequence

import torch

from .finding_log import user_location
from .findings import ACCUMULATION_MISMATCH, DISCARDED, EMPTY_STEP, STALE
from .hooks import current_graph_task
from .ledger import NO_OWNER, Ledger, Occurrence
from .loss_audit import LossAudit, LossCall, describe_call
from .sinks import Sinks, StepRecord
from .sinks.telemetry import Telemetry
from .stats import (
    FiniteChecks,
    HostBatch,
    NormPlan,
    confirm_nonfinite,
    nonfinite_and_zero,
    nonfinite_positions,
    read_flags,
    zero_flags,
)

SET_TO_NONE = ".grad set to None (or replaced)"
WINDOW_KINDS = (ACCUMULATION_MISMATCH, DISCARDED, EMPTY_STEP, STALE)  # a window wrong in size or content
ZEROED_BY_HAND = ".grad zeroed in place by hand (p.grad.zero_())"


Layout = tuple[int, list[int], "list[int] | None"]  # see Tracker._layout


class Outbox(Protocol):
    """Where the tracker's results go: findings, the names of parameters watched from now on, and a stop."""

    def findings(self, occurrences: list[Occurrence]) -> None: ...
    def new_params(self, names: list[str]) -> None: ...
    def stop(self, reason: str, error: BaseException | None = None) -> None: ...


class Tracker:
    """Implements the hooks' ``Receiver``: turns tensor facts (hook calls, ``.grad`` identities and versions) into
    ledger events, and what the ledger finds into the outbox."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        ledger: Ledger,
        outbox: Outbox,
        finite_check: str = "step",
        sinks: Sinks | None = None,
        scaler: Any = None,
        ddp: torch.nn.Module | None = None,
        count_syncs: bool = True,
        audit_losses: bool = False,
        sharded: bool = False,
    ) -> None:
        n = len(params)
        self.ledger = ledger
        self._params = [weakref.ref(p) for p in params]
        self._index = {id(p): i for i, p in enumerate(params)}
        self._opt_layout: list[Layout] = [(-1, [], None)] * len(ledger.steps)  # filled on first use
        self._norm_plans = [NormPlan() for _ in ledger.steps]  # how each optimizer's gradients split for their norms
        self._grad_refs: list[weakref.ref[torch.Tensor] | None] = [None] * n
        self._grad_versions = [0] * n
        self._zeroed: dict[int, list[tuple[torch.Tensor, int | None]]] = {}  # device evidence per suspected param
        self._finite = FiniteChecks()  # used when finite_check == "backward"
        self._check_every_backward = finite_check == "backward"
        self._skipped_steps: set[int] = set()  # optimizers inside a step that GradScaler told to skip
        self._scaler: weakref.ref[Any] | None = weakref.ref(scaler) if scaler is not None else None
        self._steps_before_scaler: dict[int, int] = {}
        self._outbox = outbox
        self._sinks = sinks if sinks else None
        self._telemetry = Telemetry(sinks) if sinks else None
        self._ddp = weakref.ref(ddp) if ddp is not None and count_syncs else None
        # DDP with gradient_as_bucket_view rebinds .grad to views of its flat buckets (the same view again after a
        # clear): there only None counts as a clear made by hand. DDP without it copies into .grad (two version bumps
        # per pass) and FSDP2 accumulates into the local shard of its .grad DTensor (no bump): both keep the tensor
        # until a clear, so identity tells a clear, but every hook call is a contribution
        self._rebinds = ddp is not None and bool(getattr(ddp, "gradient_as_bucket_view", True))
        self._versions_unreliable = ddp is not None or sharded
        self._reduce_scatters = sharded and count_syncs  # FSDP2 over ranks: a pass that fires the hooks synced
        if self._reduce_scatters:
            ledger.collective = "reduce-scatter"
        self._weight_versions = [p._version for p in params]  # at the latest step: weights moved outside a step?
        # what steps taken inside the running backward pass booked of it (None: no such step, nothing booked yet)
        self._booked_in_pass: list[int] | None = None
        self._clipping: list[tuple[int, torch.Tensor]] = []  # gradients a running clip changes, seen unchanged
        self._probes: dict[int, int] = {}  # per optimizer, a parameter of the latest pass: changed in place since?
        self._rotation = 0  # the parameter the rotating probe looks at next
        # fresh gradients found changed in place when a pass began: (device evidence, passes before, that pass)
        self._zeroed_fresh: dict[int, tuple[list[tuple[torch.Tensor, int | None]], int, int]] = {}
        self._clear_counted = False  # the running pass noticed a clear by hand already
        self.pending_stop: str | None = None  # a reason to stop, found where no warning may be issued (GC)
        self.stopped = False
        self._audit = LossAudit() if audit_losses else None
        self.auditing_losses = audit_losses

    @property
    def measuring_contributions(self) -> bool:
        """Whether the window to come is measured (a sink asked for its contribution norms): the hooks put the
        contribution pre-hooks on or off by it between passes."""
        return self._telemetry is not None and self._telemetry.measuring_contributions

    # -- Receiver ----------------------------------------------------------------------------------
    def on_backward_start(self, index: int, param: torch.Tensor) -> None:
        """Before the other parameters accumulate: look at the consumed gradients still in place, and at the
        fresh ones if a probe says something changed them in place since the last pass."""
        ledger = self.ledger
        if self.stopped:
            return
        if not self._versions_unreliable and self._probe_changed(index):
            self._look_at_changed_fresh(index, param)
        suspects = ledger.clear_suspects()
        if not suspects:
            return
        cleared, live, grads = [], [], []
        for i in suspects:
            if i == index:
                continue
            p = self._params[i]()
            grad = None if p is None else p.grad
            if grad is None or not self._same_grad(i, grad):
                cleared.append(i)
            else:
                live.append(i)
                grads.append(grad)
        out = self._clear(cleared, SET_TO_NONE) if cleared else []
        self._clear_counted = bool(cleared)
        if live:
            groups = zero_flags(grads)
            for positions, zeros in groups:
                for pos, at in enumerate(positions):
                    self._zeroed[live[at]] = [(zeros, pos)]
            if index in suspects:  # it accumulated already: judge it by its peers, of every dtype and device
                self._zeroed[index] = [(zeros, None) for _, zeros in groups]
        elif index in suspects:  # no peer to judge by: an in-place change besides this accumulation is the clear
            ref, grad = self._grad_refs[index], param.grad
            if (
                grad is not None
                and ref is not None
                and ref() is grad
                and grad._version - self._grad_versions[index] > 1
            ):
                ledger.clear_consumed([index])
        self._outbox.findings(out)

    def on_backward_end(
        self,
        grads: dict[int, torch.Tensor | None],
        incoming: dict[int, torch.Tensor | float] | None = None,
        held: Sequence[int] = (),
    ) -> None:
        """One backward pass finished; ``grads`` maps each parameter it reached to its ``.grad``, ``incoming``
        (TensorBoard only) to the device norm of what it added; ``held``: parameters whose contribution FSDP2 kept
        out of ``.grad`` (gradient sync off), to land there at the next synced pass."""
        if not self.stopped:
            self._outbox.findings(self._book_pass(grads, incoming, self._booked_in_pass is not None, held))
            if self._audit is not None:
                self._audit.pass_ended(self.ledger.backwards - 1, current_graph_task())
        self._booked_in_pass = None
        self._clear_counted = False

    def on_loss(self, loss: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LossCall | None:
        """A loss function was called and its output requires grad: a call to audit, or None."""
        if self.stopped or self._audit is None:
            return None
        described = describe_call(loss, args, kwargs)
        return None if described is None else self._audit.called(loss, described)

    def on_loss_reached(self, call: LossCall, grad: torch.Tensor, task: int) -> None:
        """A backward pass (graph task ``task``) reached an audited loss output with ``grad``."""
        if self._audit is not None and not self.stopped:
            self._audit.reached(call, grad, task)

    def _loss_window(self, opt_index: int, consumed: list[tuple[int, torch.Tensor]]) -> tuple[int, ...] | None:
        """(step, first pass, last pass, passes) of the window a step consumes, if its loss calls are to be judged
        (taken before the ledger books the step)."""
        if self._audit is None or not self._audit.pending():
            return None
        window = self.ledger.pending_window(opt_index, (i for i, _ in consumed))
        return None if window is None else (self.ledger.steps[opt_index], *window)

    def _judge_losses(
        self, opt_index: int, window: tuple[int, ...] | None, booked: list[Occurrence]
    ) -> list[Occurrence]:
        """The loss weights of the window a step consumed; ``booked``: what the ledger found in that window (a
        window already wrong in size or content is not also reported for its weights)."""
        audit = self._audit
        if audit is None:
            return []
        ledger = self.ledger
        size, expected = ledger.last_window[opt_index], ledger.accumulation_steps
        audit.step_done(max(ledger.steps), size is not None and expected is not None and 0 < size < expected)
        self.auditing_losses = audit.due
        if window is None:
            return []
        step, first, last, passes = window
        if any(occ.kind in WINDOW_KINDS for occ in booked):
            audit.discard(last)
            return []
        scaler = self._scaler() if self._scaler is not None else None
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        out, weights = audit.judge(opt_index, step, first, last, passes, expected, scale)
        if weights is not None and self._sinks is not None:
            self._sinks.loss_weights(weights)
        return out

    def _probe_changed(self, index: int) -> bool:
        """Whether a probe's fresh ``.grad`` changed in place since the latest pass (``index``: the parameter that
        began this pass, accumulated already). The probes: per optimizer the parameter the latest pass reached last
        (any clear of all gradients changes it), and the next of all parameters in turn (a clear of a few is found
        when the turn comes to one of them). Inlined: it runs at every pass."""
        n = len(self._params)
        turn = self._rotation
        self._rotation = turn + 1 if turn + 1 < n else 0
        fresh, refs, versions, params = self.ledger.fresh, self._grad_refs, self._grad_versions, self._params
        for probe in (*self._probes.values(), turn):
            if probe == index or probe >= n or not fresh[probe]:
                continue
            p = params[probe]()
            grad = None if p is None else p.grad
            ref = refs[probe]
            if grad is not None and ref is not None and ref() is grad and grad._version != versions[probe]:
                return True
        return False

    def _changed_in_place(self, i: int) -> bool:
        """Whether parameter ``i``'s ``.grad`` is the tensor we last saw, changed in place since then (never under
        DDP, whose bucket views share one version counter, nor FSDP2)."""
        if self._versions_unreliable:
            return False
        p = self._params[i]()
        grad = None if p is None else p.grad
        ref = self._grad_refs[i]
        return grad is not None and ref is not None and ref() is grad and grad._version != self._grad_versions[i]

    def _changed_positions(self, params: list[tuple[int, torch.Tensor]]) -> list[int]:
        """Positions in ``params`` whose ``.grad`` changed in place since we last saw it."""
        return [pos for pos, (i, _) in enumerate(params) if self._changed_in_place(i)]

    def _look_at_changed_fresh(self, index: int, param: torch.Tensor) -> None:
        """Fresh gradients changed in place between two passes of a window: zeroed by hand (a window dropped, or
        a clear inside it)? Computed on the device now, read at the next step or clear."""
        ledger = self.ledger
        changed = [i for i in ledger.fresh_among(range(len(self._params))) if i != index and self._changed_in_place(i)]
        grads = [self._params[i]().grad for i in changed]  # type: ignore[union-attr]
        b = ledger.backwards
        groups = zero_flags(grads) if grads else []
        for positions, zeros in groups:
            for pos, at in enumerate(positions):
                self._zeroed_fresh[changed[at]] = ([(zeros, pos)], ledger.fresh_passes(changed[at]), b)
        grad = param.grad
        if groups and ledger.is_fresh(index) and grad is not None and grad._version - self._grad_versions[index] > 1:
            self._zeroed_fresh[index] = ([(zeros, None) for _, zeros in groups], ledger.fresh_passes(index), b)

    def _resolve_zeroed_fresh(self) -> list[Occurrence]:
        """Read the evidence of ``_look_at_changed_fresh``: the contributions before that pass were dropped."""
        pending, self._zeroed_fresh = self._zeroed_fresh, {}
        if not pending:
            return []
        items = list(pending.items())
        values = iter(read_flags([flag for _, (flags, _, _) in items for flag in flags]))
        zeroed = [(i, before, b) for i, (flags, before, b) in items if all([next(values) for _ in flags])]
        if len(zeroed) < len(items):  # a hand clear zeroes all it touches; else they were clipped or scaled
            return []
        return self.ledger.cleared_before(zeroed, ZEROED_BY_HAND)

    def _hand_zeroed(
        self, params: list[tuple[int, torch.Tensor]], changed: list[int], zero: list[int] | None = None
    ) -> list[int]:
        """The gradients of ``params`` zeroed in place by hand since we last saw them: each of those that changed
        in place (the positions ``changed``) is all zeros (``zero``: positions known to be, else read now).
        Clipping also changes them in place, so all of them must be zero."""
        if not changed:
            return []
        if zero is None:
            flags: list[tuple[torch.Tensor, int | None] | None] = [None] * len(changed)
            for positions, zeros in zero_flags([params[pos][1].grad for pos in changed]):  # type: ignore[misc]
                for at, k in enumerate(positions):
                    flags[k] = (zeros, at)
            if any(flag is None for flag in flags):  # a sparse gradient: no zero check, no verdict
                return []
            zero = [changed[k] for k, z in enumerate(read_flags(flags)) if z]  # type: ignore[arg-type]
        return [params[pos][0] for pos in changed] if set(changed) <= set(zero) else []

    def on_step_in_backward(
        self, grads: dict[int, torch.Tensor | None], opt_index: int, optimizer: torch.optim.Optimizer
    ) -> None:
        """A step runs inside a backward pass (an optimizer stepped from a post-accumulate-grad hook): book the
        part of the pass recorded so far, and this optimizer's gradients that the pass filled before our hook ran."""
        if self.stopped:
            return
        refs, versions = self._grad_refs, self._grad_versions
        for i, p in zip(*self._params_of(opt_index, optimizer), strict=True):
            grad = p.grad
            if i in grads or grad is None:
                continue
            ref = refs[i]
            if ref is None or ref() is not grad or grad._version != versions[i]:
                grads[i] = grad
        self._outbox.findings(self._book_pass(grads, None, self._booked_in_pass is not None, part=True))

    def _book_pass(
        self,
        grads: dict[int, torch.Tensor | None],
        incoming: dict[int, torch.Tensor | float] | None,
        continuing: bool,
        held: Sequence[int] = (),
        part: bool = False,
    ) -> list[Occurrence]:
        """Book a pass (``part``: the part of a running pass that a step taken inside it consumes; the sinks hear of
        the pass once, when it is over)."""
        ledger = self.ledger
        idle: list[int] = []  # reached, nothing accumulated (an undefined incoming gradient)
        cleared: list[int] = []
        # the hot path, one iteration per parameter per backward pass: the ledger's counters read as lists (a method
        # call per parameter would cost as much as the rest of the iteration)
        refs, versions, versions_unreliable, fresh, consumed = (
            self._grad_refs,
            self._grad_versions,
            self._versions_unreliable,
            ledger.fresh,
            ledger.consumed,
        )
        for i, grad in grads.items():
            if grad is None:
                idle.append(i)
                continue
            ref = refs[i]
            version = grad._version
            if ref is None or ref() is not grad:
                if ref is not None and (fresh[i] or consumed[i]) and not self._same_grad(i, grad):
                    cleared.append(i)  # .grad was set to None or replaced since we last saw it
                refs[i] = weakref.ref(grad)
            elif version == versions[i] and not versions_unreliable:
                idle.append(i)  # same tensor, untouched
                continue
            versions[i] = version
        contributed = list(grads)
        if idle:
            skip = set(idle)
            contributed = [i for i in contributed if i not in skip]
        out = self._clear(cleared, SET_TO_NONE, count=not self._clear_counted) if cleared else []
        self._clear_counted = self._clear_counted or bool(cleared)
        if continuing and not contributed:
            if not part:
                self._pass_to_sinks(ledger.backwards - 1, [], None, incoming)
            return out
        backward = ledger.backwards - 1 if continuing else ledger.backwards
        out += ledger.backward(contributed, same_pass=continuing)
        if held:
            ledger.hold(held)
        owners = ledger.owners
        if len(ledger.steps) == 1:  # one optimizer: the parameter reached last is its probe
            if contributed and owners[contributed[-1]] != NO_OWNER:
                self._probes[0] = contributed[-1]
        else:
            probes: dict[int, int] = {}
            for i in reversed(contributed):  # reached last: most likely not the first one next time
                if owners[i] != NO_OWNER and owners[i] not in probes:
                    probes[owners[i]] = i
                    if len(probes) == len(ledger.steps):
                        break
            self._probes.update(probes)
        synced = None
        if self._ddp is not None and contributed:
            synced = bool(getattr(self._ddp(), "require_forward_param_sync", False))  # set by DDP at the forward
        elif self._reduce_scatters:
            synced = bool(contributed)
        if synced:
            ledger.backward_synced()
        if part:
            self._booked_in_pass = [*(self._booked_in_pass or ()), *contributed, *held]
        elif self._telemetry is not None:
            self._pass_to_sinks(backward, [*contributed, *held] if held else contributed, synced, incoming)
        if self._zeroed:
            for i in contributed:
                if not ledger.is_mixed(i):
                    self._zeroed.pop(i, None)
        owned = [i for i in contributed if ledger.owners[i] != NO_OWNER] if self._check_every_backward else []
        if owned:
            self._finite.add(backward, tuple(ledger.steps), owned, [grads[i] for i in owned])  # type: ignore[misc]
            if len(self._finite) > self._finite.max_pending:
                self._read_finite_checks()
        return out

    def _pass_to_sinks(
        self,
        backward: int,
        reached: list[int],
        synced: bool | None,
        incoming: dict[int, torch.Tensor | float] | None,
    ) -> None:
        """A pass is over: to the sinks with every parameter it reached, the parts that steps taken inside it booked
        first included (one event per pass, and the norms of what it added to each of them)."""
        if self._booked_in_pass is not None:
            reached, self._booked_in_pass = [*self._booked_in_pass, *reached], None
        if self._telemetry is not None:
            self._telemetry.backward(backward, reached, synced, incoming)

    def on_step_pre(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None:
        """Before the step (and its closure): notice gradients set to None since we last saw them."""
        if self.stopped:
            return
        indices, params = self._params_of(opt_index, optimizer)
        if _skipped_by_grad_scaler(optimizer):
            self._skipped_steps.add(opt_index)  # after_scaler_step books the skip
            return
        # before the step begins: a raise here leaves no step open
        self._outbox.findings(self._notice_replaced(zip(indices, params, strict=True)))
        if self._telemetry is not None:
            self._telemetry.before_step(opt_index, self.ledger.steps[opt_index], list(params))
        self.ledger.step_begin(opt_index)

    def on_step_post(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None:
        """The step consumed its parameters' gradients."""
        if self.stopped:
            return
        if opt_index in self._skipped_steps:
            self._skipped_steps.discard(opt_index)
            return
        ledger = self.ledger
        indices, params = self._params_of(opt_index, optimizer)
        mixed = [i for i in indices if i in self._zeroed and ledger.is_mixed(i)] if self._zeroed else []
        if mixed:
            flags = [self._zeroed[i] for i in mixed]
            values = iter(read_flags([flag for per_param in flags for flag in per_param]))
            zeroed = [all([next(values) for _ in per_param]) and bool(per_param) for per_param in flags]
            ledger.clear_consumed([i for i, z in zip(mixed, zeroed, strict=True) if z])
        for i in mixed:
            del self._zeroed[i]
        out = self._resolve_zeroed_fresh() if self._zeroed_fresh else []
        consumed, grads, changed = self._scan_after_step(indices, params)
        window = self._loss_window(opt_index, consumed) if self._audit is not None else None
        if self._telemetry is None:
            zero = None
            if not self._check_every_backward:
                bad, zero = nonfinite_and_zero(grads, changed, self._norm_plans[opt_index])  # type: ignore[arg-type]
                if bad:
                    self._mark_nonfinite([consumed[pos][0] for pos in bad])
            else:
                self._check_finite(consumed)
            zeroed = self._hand_zeroed(consumed, changed, zero) if changed else []
            if zeroed:
                out += self._clear(zeroed, ZEROED_BY_HAND, before_step=True)
            booked = ledger.step_end(opt_index, indices)
            self._outbox.findings(out + booked + self._judge_losses(opt_index, window, booked))
            return
        booked = self._step_with_telemetry(self._telemetry, opt_index, indices, params, consumed, grads, changed)
        self._outbox.findings(out + booked + self._judge_losses(opt_index, window, booked))

    def _step_with_telemetry(
        self,
        telemetry: Telemetry,
        opt_index: int,
        indices: list[int],
        params: Sequence[torch.Tensor],
        consumed: list[tuple[int, torch.Tensor]],
        grads: list[torch.Tensor],
        changed: list[int],
    ) -> list[Occurrence]:
        """Book the step and hand its statistics to the sinks; all of them reach the host in one transfer, and the
        gradient norms read for the sinks serve the NaN/Inf check and the hand-zeroed check too."""
        ledger = self.ledger
        batch = HostBatch()
        scheduled = telemetry.schedule_step(batch, opt_index, list(params), grads, self._norm_plans[opt_index])
        batch.read()
        norms = scheduled.grad_norms() if scheduled.grad_norms is not None else None
        self._check_finite(consumed, norms)
        zero = [pos for pos, n in enumerate(norms) if n == 0.0] if norms is not None else None
        zeroed = self._hand_zeroed(consumed, changed, zero) if changed else []
        cleared = self._clear(zeroed, ZEROED_BY_HAND, before_step=True) if zeroed else []
        step, window = ledger.steps[opt_index], ledger.window_size(i for i, _ in consumed)
        adopted = ledger.window_unknown(opt_index)
        out = cleared + ledger.step_end(opt_index, indices)
        record = StepRecord(
            opt_index, step, ledger.backwards, window, tuple(i for i, _ in consumed), tuple(norms or ()), adopted
        )
        present = {i: g for (i, _), g in zip(consumed, grads, strict=True) if g is not None}
        telemetry.step(scheduled, record, tuple(indices), present, max(ledger.steps))
        return out

    def before_optimizer_clear(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.zero_grad()`` is about to run."""
        self._before_clear(*self._params_of(opt_index, optimizer))

    def on_optimizer_cleared(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.zero_grad()`` ran."""
        self._cleared(self._params_of(opt_index, optimizer)[0], "optimizer.zero_grad()")

    def before_module_clear(self, module: torch.nn.Module) -> None:
        """``module.zero_grad()`` is about to run on some module."""
        params = self._watched_params_of(module)
        self._before_clear([i for i, _ in params], [p for _, p in params])

    def on_module_cleared(self, module: torch.nn.Module) -> None:
        """``module.zero_grad()`` ran on some module; clear the watched parameters it holds."""
        indices = [i for i, _ in self._watched_params_of(module)]
        if indices:
            self._cleared(indices, f"{type(module).__name__}.zero_grad()")

    def on_clip(self, parameters: list[torch.Tensor], how: str) -> None:
        """A clipping function is about to run over ``parameters``."""
        if self.stopped:
            return
        ledger, index, refs = self.ledger, self._index, self._params
        by_owner: dict[int, list[int]] = {}
        self._clipping = []
        for p in parameters:
            i = index.get(id(p))
            if i is not None and refs[i]() is p:
                grad, ref = p.grad, self._grad_refs[i]
                if grad is not None and ref is not None and ref() is grad and grad._version == self._grad_versions[i]:
                    self._clipping.append((i, grad))
                if ledger.owners[i] != NO_OWNER:
                    by_owner.setdefault(ledger.owners[i], []).append(i)
        scaler = self._scaler() if self._scaler is not None else None
        scaled = None if scaler is None else scaler.is_enabled()
        self._outbox.findings(
            [occ for opt, indices in by_owner.items() for occ in ledger.clip(opt, indices, how, scaled)]
        )

    def on_clipped(self) -> None:
        """The clipping function ran: its in-place change of the gradients we had seen unchanged is no clear (a
        gradient changed by something else before the clip stays changed, to be judged as such)."""
        clipped, self._clipping = self._clipping, []
        for i, grad in clipped:
            p = self._params[i]()
            if p is not None and p.grad is grad:
                self._grad_versions[i] = grad._version

    def on_unscale(self, opt_index: int, scaler: Any) -> None:
        """``scaler.unscale_(optimizer)`` ran."""
        if self.stopped:
            return
        self._know_scaler(scaler)
        out = self.ledger.scaler_reached(opt_index, scaler.is_enabled())
        self.ledger.unscaled(opt_index)
        self._outbox.findings(out)

    def before_scaler_step(self, opt_index: int, scaler: Any) -> None:
        """``scaler.step(optimizer)`` is about to run (it unscales, then steps unless it found NaN/Inf)."""
        if self.stopped:
            return
        self._know_scaler(scaler)
        self._steps_before_scaler[opt_index] = self.ledger.steps[opt_index]
        self._outbox.findings(self.ledger.scaler_reached(opt_index, scaler.is_enabled()))

    def after_scaler_step(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None:
        """``scaler.step(optimizer)`` returned: if no step was booked, the scaler skipped it."""
        if self.stopped:
            return
        ledger = self.ledger
        ledger.unscaled(opt_index)
        if self._steps_before_scaler.pop(opt_index, None) != ledger.steps[opt_index]:
            return
        fresh = [(i, p) for i, p in zip(*self._params_of(opt_index, optimizer), strict=True) if ledger.is_fresh(i)]
        self._check_finite(fresh)  # a rare path: the read says which gradients overflowed
        self._outbox.findings(ledger.skipped_step(opt_index, [i for i, _ in fresh if ledger.is_nonfinite(i)]))

    def on_param_group_added(self, opt_index: int, optimizer: torch.optim.Optimizer) -> list[tuple[int, torch.Tensor]]:
        """``optimizer.add_param_group()`` ran: book the new group's parameters to it (new ones are watched under
        ``optimizer[k].param_groups[g][j]``); returns the (index, parameter) pairs the hooks must cover."""
        if self.stopped:
            return []
        ledger = self.ledger
        g = len(optimizer.param_groups) - 1
        booked: list[tuple[int, torch.Tensor]] = []
        names: list[str] = []
        for j, p in enumerate(optimizer.param_groups[g]["params"]):
            i = self._index.get(id(p))
            if i is None or self._params[i]() is not p:
                i = self._index[id(p)] = len(self._params)
                self._params.append(weakref.ref(p))
                self._grad_refs.append(None)
                self._grad_versions.append(0)
                self._weight_versions.append(p._version)
                ledger.add_param(opt_index)
                names.append(f"optimizer[{opt_index}].param_groups[{g}][{j}]")
            elif not ledger.book(i, opt_index):  # held by an optimizer already
                continue
            booked.append((i, p))
        self._outbox.new_params(names)
        if self._sinks is not None:
            self._sinks.param_group_added(opt_index, tuple(i for i, _ in booked), tuple(names))
        self.adopt_existing_gradients([i for i, _ in booked])
        return booked

    def on_unfrozen(self, indices: list[int]) -> None:
        """Parameters frozen until now are hooked from here on; a gradient they hold already is one open window."""
        if not self.stopped:
            self.adopt_existing_gradients(indices)

    def internal_error(self, error: BaseException, where: str) -> None:
        """Stop checking (the state may be inconsistent) and report once."""
        if not self.stopped:
            self.stopped = True
            self._outbox.stop(f"internal error in {where}", error)

    def unsupported(self, reason: str) -> None:
        """Stop checking: the training runs in a mode whose events cannot be read right; report once."""
        if not self.stopped:
            self.stopped = True
            self._outbox.stop(reason)

    def optimizer_lost(self, opt_index: int) -> None:
        """A watched optimizer was garbage-collected (replaced by a new one?). Called from the garbage collector:
        only note it; the next event reports it."""
        if not self.stopped and self.pending_stop is None:
            self.pending_stop = (
                f"the watched optimizer[{opt_index}] was garbage-collected (replaced by a new optimizer?), and its "
                "replacement is not watched. Call watch() with the new optimizer (detach() this watcher first)"
            )

    def report_pending_stop(self) -> None:
        """Stop checking for the reason noted by ``optimizer_lost``."""
        reason, self.pending_stop = self.pending_stop, None
        if reason is not None:
            self.unsupported(reason)

    def release(self) -> None:
        """Drop every reference to the user's tensors (after detach, or when checking stopped for good)."""
        self._params = [_dead_ref] * len(self._params)
        self._grad_refs = [None] * len(self._grad_refs)
        self._zeroed.clear()
        if self._telemetry is not None:
            self._telemetry.release()
        self._index.clear()

    def index_of(self, param: torch.Tensor) -> int | None:
        """The index of a watched parameter, or None."""
        i = self._index.get(id(param))
        return i if i is not None and self._params[i]() is param else None

    def watches_tensor(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a watched parameter or the ``.grad`` of one."""
        if self.index_of(tensor) is not None:
            return True
        return any(ref is not None and ref() is tensor for ref in self._grad_refs)

    def adopt_existing_gradients(self, indices: Iterable[int] | None = None, report: bool = False) -> None:
        """Attaching mid-run: the gradients already there (in ``indices``, default all) are one fresh window of
        unknown size; ``report``: a step that consumes them is reported."""
        adopted = []
        for i in range(len(self._params)) if indices is None else indices:
            p = self._params[i]()
            if p is not None and p.grad is not None:
                self._grad_refs[i] = weakref.ref(p.grad)
                self._grad_versions[i] = p.grad._version
                adopted.append(i)
        self.ledger.adopt(adopted, report)

    # -- end of run --------------------------------------------------------------------------------
    def finish(self) -> None:
        """Run the end-of-run checks."""
        if self.stopped:
            return
        params = [ref() for ref in self._params]
        alive = [(i, p) for i, p in enumerate(params) if p is not None]
        out = self._resolve_zeroed_fresh()
        fresh = [(i, p) for i, p in alive if self.ledger.is_fresh(i) and p.grad is not None]
        self._check_finite(fresh)
        zeroed = self._hand_zeroed(fresh, self._changed_positions(fresh))
        out += self._clear(zeroed, ZEROED_BY_HAND, before_step=True) if zeroed else []
        out += self._notice_replaced(alive, supply=False)
        trainable = [p is not None and p.requires_grad for p in params]
        self._outbox.findings(out + self.ledger.finish(trainable))

    def finish_sinks(self, findings: list) -> None:
        """Close the sinks with the final findings (also after an internal error)."""
        if self._telemetry is not None:
            self._telemetry.flush()
            self._sinks.finished(findings, self.ledger.backwards, list(self.ledger.steps))  # type: ignore[union-attr]

    # -- helpers -----------------------------------------------------------------------------------
    def _before_clear(self, indices: list[int], params: Sequence[torch.Tensor]) -> None:
        """A clear may drop unconsumed gradients: a window holding NaN/Inf may be dropped on purpose."""
        if self.stopped:
            return
        if self._zeroed_fresh:
            self._outbox.findings(self._resolve_zeroed_fresh())
        if self.ledger.has_unconsumed(indices):
            self._check_finite([(i, p) for i, p in zip(indices, params, strict=True) if self.ledger.is_fresh(i)])

    def _know_scaler(self, scaler: Any) -> None:
        if self._scaler is None or self._scaler() is None:
            self._scaler = weakref.ref(scaler)

    def _cleared(self, indices: list[int], source: str) -> None:
        if self.stopped:
            return
        if self._zeroed:
            for i in indices:
                self._zeroed.pop(i, None)
        self._outbox.findings(self._clear(indices, source))

    def _clear(
        self, indices: list[int], source: str, count: bool = True, before_step: bool = False
    ) -> list[Occurrence]:
        ledger = self.ledger
        perturbed = (  # (found at a step, the weights moved by that step: not the loop's doing)
            not before_step and ledger.has_unconsumed(indices) and self._weights_moved(ledger.fresh_among(indices))
        )
        out = ledger.clear(
            indices, source, perturbed=perturbed, count=count, before_step=before_step, where=user_location
        )
        if self._sinks is not None:
            discarded = sum(len(o.params) for o in out)
            self._sinks.cleared(self.ledger.backwards, source, len(indices), discarded)
        return out

    def _scan_after_step(
        self, indices: list[int], params: Sequence[torch.Tensor]
    ) -> tuple[list[tuple[int, torch.Tensor]], list[torch.Tensor], list[int]]:
        """One loop over a step's parameters: the (index, parameter) of the fresh gradients it consumed and those
        gradients, the positions among them changed in place since their last pass (zeroed by hand, or clipped), and
        the versions after the step, of the weights (did the loop move them later?) and of the gradients (changed in
        place before the next pass or step?)."""
        versions, grad_versions, refs, fresh = (  # once per parameter per step: the counters read as a list
            self._weight_versions,
            self._grad_versions,
            self._grad_refs,
            self.ledger.fresh,
        )
        versions_unreliable = self._versions_unreliable
        consumed: list[tuple[int, torch.Tensor]] = []
        grads: list[torch.Tensor] = []
        changed: list[int] = []
        for i, p in zip(indices, params, strict=True):
            grad = p.grad
            if grad is None:
                continue
            version = grad._version
            if fresh[i]:
                ref = refs[i]
                if not versions_unreliable and ref is not None and ref() is grad and version != grad_versions[i]:
                    changed.append(len(consumed))
                consumed.append((i, p))
                grads.append(grad)
            versions[i] = p._version
            grad_versions[i] = version
        return consumed, grads, changed

    def _weights_moved(self, indices: list[int]) -> bool:
        """Whether the loop changed any of these weights in place since their optimizer's latest step (SAM's
        perturbation): a gradient dropped then was used on purpose. Read only on the rare path of a dropped window."""
        versions = self._weight_versions
        for i in indices:
            p = self._params[i]()
            if p is not None and p._version != versions[i]:
                return True
        return False

    def _watched_params_of(self, module: torch.nn.Module) -> list[tuple[int, torch.Tensor]]:
        params = []
        for p in module.parameters():
            i = self._index.get(id(p))
            if i is not None and self._params[i]() is p:
                params.append((i, p))
        return params

    def _check_finite(self, params: list[tuple[int, torch.Tensor]], norms: list[float] | None = None) -> None:
        """Mark the fresh gradients holding NaN/Inf: queued per-backward checks, or one batched check now
        (``norms``: their gradient norms, when the caller has already read them)."""
        if self._check_every_backward:
            if len(self._finite):
                self._read_finite_checks()
            return
        if norms is not None:
            suspects = [pos for pos, n in enumerate(norms) if not math.isfinite(n)]
            if suspects:
                confirmed = confirm_nonfinite([p.grad for _, p in params], suspects)
                self._mark_nonfinite([params[pos][0] for pos in confirmed])
            return
        present = [(i, p.grad) for i, p in params if p.grad is not None]
        bad = nonfinite_positions([g for _, g in present])  # type: ignore[misc]
        self._mark_nonfinite([present[pos][0] for pos in bad])

    def _mark_nonfinite(self, indices: list[int]) -> None:
        ledger = self.ledger
        for i in indices:
            ledger.mark_nonfinite(i, ledger.steps[ledger.owners[i]], *ledger.window_of(i))

    def _notice_replaced(self, params: Iterable[tuple[int, torch.Tensor]], supply: bool = True) -> list[Occurrence]:
        """Look at each ``.grad`` before a step: set to None since we last saw it is a clear; replaced by another
        tensor is a modification of a window's gradient, or (``supply``) a gradient supplied by hand
        (``torch.autograd.grad``) when it held no fresh contribution; at the end of the run, a clear."""
        ledger = self.ledger
        cleared, supplied, replaced = [], [], []
        zeroed_consumed = []
        # once per parameter per step: the counters read as lists, the tensor we last saw checked first
        refs, versions, fresh, consumed = self._grad_refs, self._grad_versions, ledger.fresh, ledger.consumed
        rebinds, versions_unreliable = self._rebinds, self._versions_unreliable
        for i, p in params:
            grad = p.grad
            if grad is None:
                if fresh[i] or consumed[i]:
                    cleared.append(i)
                continue
            ref = refs[i]
            if ref is not None and ref() is grad:
                if consumed[i] and not fresh[i] and not versions_unreliable and grad._version != versions[i]:
                    zeroed_consumed.append((i, p))  # changed in place since its step, with no backward since
            elif not rebinds and grad.grad_fn is None:  # replaced by another tensor (see _same_grad)
                refs[i] = weakref.ref(grad)
                versions[i] = grad._version
                if not fresh[i]:
                    (supplied if supply else cleared).append(i)
                elif supply:
                    replaced.append(i)
        out = self._clear(cleared, SET_TO_NONE) if cleared else []
        if zeroed_consumed:  # a rare path (the step consumes nothing fresh): read whether they were zeroed
            ledger.clear_consumed(self._hand_zeroed(zeroed_consumed, list(range(len(zeroed_consumed)))))
        if supplied:
            ledger.supplied(supplied)
        if replaced:
            ledger.replaced(replaced)
        return out

    def _read_finite_checks(self) -> None:
        owners = self.ledger.owners
        found = self._finite.resolve()
        if not found:
            return
        # a norm of finite values can overflow: confirm on the .grad, which still holds that pass's values
        # (NaN and Inf survive accumulation) unless it was replaced since
        grads = [p.grad if (p := self._params[i]()) is not None else None for i, _, _ in found]
        for pos in confirm_nonfinite(grads, list(range(len(found)))):
            i, owner_steps, backward = found[pos]
            self.ledger.mark_nonfinite(i, owner_steps[owners[i]], backward)

    def _same_grad(self, i: int, grad: torch.Tensor) -> bool:
        ref = self._grad_refs[i]
        return self._rebinds or grad.grad_fn is not None or (ref is not None and ref() is grad)

    def _layout(self, opt_index: int, optimizer: torch.optim.Optimizer) -> Layout:
        """(parameter count, index of each parameter the optimizer books, in its own order; positions of those among
        all its parameters, or None when it books all of them)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        owners, index = self.ledger.owners, self._index
        indices = [index.get(id(p), NO_OWNER) for p in params]
        kept = [k for k, i in enumerate(indices) if i != NO_OWNER and owners[i] == opt_index]
        if len(kept) == len(params):
            return len(params), indices, None
        return len(params), [indices[k] for k in kept], kept

    def _params_of(self, opt_index: int, optimizer: torch.optim.Optimizer) -> tuple[list[int], Sequence[torch.Tensor]]:
        """The indices and the parameters (same order) of the watched parameters the optimizer books: with one
        parameter group that it books entirely, its own list, not a copy. Do not change either.

        Parameters are read from the optimizer each time: holding them here would keep the model alive.
        """
        groups = optimizer.param_groups
        size, indices, kept = self._opt_layout[opt_index]
        params = groups[0]["params"] if len(groups) == 1 else [p for group in groups for p in group["params"]]
        if len(params) != size:
            size, indices, kept = self._opt_layout[opt_index] = self._layout(opt_index, optimizer)
        return indices, params if kept is None else [params[k] for k in kept]


def _dead_ref() -> None:
    """Stands for the weak reference to a released parameter."""
    return None


def _skipped_by_grad_scaler(optimizer: torch.optim.Optimizer) -> bool:
    """A fused optimizer stepped by ``GradScaler`` on inf/NaN: the hooks fire but the kernel skips the update.

    The scaler sets ``optimizer.found_inf`` for the duration of such a step (non-fused optimizers are not
    stepped at all). Reading it is one sync, only on that AMP path.
    """
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.item())
