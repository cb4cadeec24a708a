"""Random sequences of backward / step / zero_grad / p.grad = None / clip, against a reference model of the rules."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from helpers import run_lifecycle_ops, watch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch import ledger as ledger_module
from gradwatch.ledger import Ledger

NAMES = ("weight", "bias")
OPS = st.sampled_from(["backward", "step", "zero_none", "zero_keep", "none_weight", "none_bias", "clip"])


class ReferenceRules:
    """An independent, deliberately naive model of the contract for one optimizer over every parameter."""

    def __init__(self, accumulation_steps):
        self.k = accumulation_steps
        self.fresh = dict.fromkeys(NAMES, 0)
        self.consumed = dict.fromkeys(NAMES, 0)
        self.mixed = {}
        self.has_grad = dict.fromkeys(NAMES, False)
        self.received = False
        self.steps = self.backwards = 0
        self.last_window = None  # passes the latest consuming step took
        self.dropped = None  # (passes, step, backward, names) of contributions cleared, judged at the next step
        self.skipped = False  # the latest step came after a whole window was dropped
        self.first = {}  # kind -> (step, backward)
        self.params = {}  # kind -> names
        self.set_to_none = set()  # .grad set to None by hand, not noticed yet: that needs a look at the tensors
        self.since = {}  # name -> the pass of its oldest fresh contribution

    def _found(self, kind, names, step=None, backward=None):
        step = self.steps if step is None else step
        self.first.setdefault(kind, (step, self.backwards if backward is None else backward))
        self.params.setdefault(kind, set()).update(names)

    def _clear(self, names):
        lost = [n for n in names if self.fresh[n]]
        if lost:
            passes = max(self.fresh[n] for n in lost)
            if self.dropped is None or self.dropped[0] < passes:  # the next step tells what it was
                self.dropped = (passes, self.steps, self.backwards, lost)
            elif self.dropped[0] == passes:
                self.dropped = (*self.dropped[:3], [*self.dropped[3], *lost])
        for n in names:
            self.fresh[n] = self.consumed[n] = 0
            self.mixed.pop(n, None)

    def apply(self, op):
        if op.startswith("none_"):
            name = op[len("none_") :]
            self.set_to_none.add(name)
            self.has_grad[name] = False
            return
        if op == "clip":  # changes values in place: not a clear, nothing to book
            return
        if op in ("backward", "step") and self.set_to_none:  # noticed on the tensors before the pass or step
            self._clear(sorted(self.set_to_none))
        self.set_to_none.clear()  # (a zero_grad clears them with the rest, in one clear)
        if op == "backward":
            for n in NAMES:
                if self.consumed[n] and not self.fresh[n]:
                    self.mixed.setdefault(n, (self.steps, self.backwards))
                if not self.fresh[n]:
                    self.since[n] = self.backwards
                self.fresh[n] += 1
                self.has_grad[n] = True
            self.received = True
            self.backwards += 1
        elif op == "step":
            fresh = [n for n in NAMES if self.fresh[n]]
            stale = [n for n in NAMES if self.consumed[n] and not self.fresh[n]]
            if not fresh and not stale:
                self._found("empty-step", NAMES)
            if stale:
                self._found("stale-gradient", stale)
            mixed = [n for n in fresh if n in self.mixed]
            if mixed:
                self._found("uncleared-gradient", mixed, *min(self.mixed[n] for n in mixed))
            window = max((self.fresh[n] for n in fresh), default=0)
            previous = self.last_window
            expected = self.k if self.k is not None else previous
            skipped_before, self.skipped = self.skipped, False
            if self.dropped is not None:
                passes, step, backward, names = self.dropped
                self.dropped = None
                whole = expected is None or passes >= expected
                own = max(self.fresh[n] for n in names)  # what the dropped parameters hold at this step
                kept = any(self.since[n] < backward for n in fresh if n not in names)  # others kept those passes
                if kept or window == 0 or (not whole and (window != expected or own != expected)):  # inside
                    self._found("discarded-gradient", names, step, backward)
                elif not whole and step > 0:  # a full window followed: a partial one was dropped (wasted)
                    self._found("dangling-gradient", names, step, backward)
                elif whole and step > 0 and skipped_before and self.k is None:  # dropped before two steps in a row
                    self._found("discarded-gradient", names, step, backward)
                    self.skipped = True
                elif whole and step > 0:
                    self.skipped = True  # one window skipped on purpose
                if whole:
                    previous = passes
            if window:
                self.last_window = window
            short_tail = previous is not None and previous >= (self.k or 0) and window < (self.k or 0)
            if self.k is not None and fresh and window != self.k and not short_tail:
                self._found("accumulation-mismatch", fresh)
            for n in fresh:
                self.consumed[n] += self.fresh[n]
                self.fresh[n] = 0
                self.mixed.pop(n, None)
            self.steps += 1
        elif op in ("zero_none", "zero_keep"):
            self._clear(NAMES)

    def finish(self):
        if self.set_to_none:  # detach() looks at the tensors one last time
            self._clear(sorted(self.set_to_none))
        expected = self.k or self.last_window
        if self.dropped is not None and self.dropped[1] > 0 and expected is not None and self.dropped[0] < expected:
            _, step, backward, names = self.dropped
            self._found("dangling-gradient", names, step, backward)
        fresh = [n for n in NAMES if self.fresh[n]]
        if fresh:
            self._found("dangling-gradient", fresh)
        if self.steps and not self.received:
            self._found("unused-parameter", NAMES)


def _run(ops, accumulation_steps):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    # the lifecycle rules alone (the loss weights have their own property test in test_loss_weights.py)
    with watch(model, opt, accumulation_steps=accumulation_steps, audit_losses=False) as w:
        run_lifecycle_ops(model, model, opt, ops, x, y)
    return w


@pytest.mark.parametrize("whole_lists_from", [1, ledger_module.WHOLE_LISTS_FROM], ids=["whole-lists", "per-param"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=14), accumulation_steps=st.sampled_from([None, 1, 2]))
def test_findings_match_the_reference_rules(ops, accumulation_steps, whole_lists_from):
    """Both ways of booking a pass or a clear that reaches every parameter: whole lists (models from
    ``WHOLE_LISTS_FROM`` parameters) and a loop over them (this two-parameter model otherwise)."""
    with patch.object(ledger_module, "WHOLE_LISTS_FROM", whole_lists_from):
        w = _run(ops, accumulation_steps)
    ref = ReferenceRules(accumulation_steps)
    for op in ops:
        ref.apply(op)
    ref.finish()

    found_first, found_params = {}, {}
    for f in w.findings:
        found_first.setdefault(f.kind, (f.step, f.backward))
        found_params.setdefault(f.kind, set()).update(f.params)
    assert found_params == ref.params, (ops, w.findings)
    assert found_first == ref.first, (ops, w.findings)
    counts = {f.kind: f.count for f in w.findings}
    assert all(c >= 1 for c in counts.values())


DDP_EVENTS = st.lists(st.sampled_from(["synced", "local", "step", "clear"]), max_size=40)


@given(DDP_EVENTS)
def test_redundant_syncs_are_the_all_reduces_before_the_last_pass_of_each_consumed_window(events):
    from gradwatch.ledger import Ledger

    ledger = Ledger([0, 0], 1)
    window: list[bool] = []  # the naive model: sync flags of the backward passes since the last step or clear
    expected_steps, expected_wasted, reported_steps = [], 0, []
    for event in events:
        if event in ("synced", "local"):
            ledger.backward([0, 1])
            if event == "synced":
                ledger.backward_synced()
            window.append(event == "synced")
        elif event == "clear":
            ledger.clear([0, 1], "zero_grad")
            window = []
        else:
            wasted = sum(window[:-1])
            if wasted:
                expected_steps.append(ledger.steps[0])
                expected_wasted += wasted
            window = []
            reported_steps += [o.step for o in ledger.step_end(0, [0, 1]) if o.kind == "redundant-sync"]
    assert reported_steps == expected_steps
    assert ledger.wasted_allreduces == expected_wasted
    assert ledger.allreduces == events.count("synced")


AMP_EVENTS = st.lists(st.sampled_from(["backward", "clip", "unscale", "step", "clear"]), max_size=40)


@given(AMP_EVENTS)
def test_a_clip_is_reported_exactly_when_a_backward_pass_came_after_the_last_unscale(events):
    from gradwatch.ledger import Ledger

    ledger = Ledger([0, 0], 1)
    scaled = False  # the naive model: the .grad holds a contribution that no unscale_ has divided yet
    expected, reported = [], []
    for event in events:
        if event == "backward":
            ledger.backward([0, 1])
            scaled = True
        elif event == "clip":
            expected.append(scaled)
            reported.append(bool(ledger.clip(0, [0, 1], "clip_grad_norm_", scaled=True)))
        elif event == "unscale":
            ledger.unscaled(0)
            scaled = False
        elif event == "step":
            ledger.step_end(0, [0, 1])
        else:
            ledger.clear([0, 1], "zero_grad")
            scaled = False
    assert reported == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["held", "synced", "clear", "step"]), max_size=40))
def test_fsdp2_held_passes_land_whole_with_the_next_synced_pass(ops):
    """FSDP2 with the gradient sync off: a pass's contribution waits in FSDP's buffer (no clear reaches it) and
    lands in .grad with the next synced pass. Each step consumes exactly what .grad holds, and is
    ``unsynced-gradient`` exactly when the buffer is not empty."""
    ledger = Ledger([0], 1)
    buffer = in_grad = 0  # passes waiting in FSDP's buffer, fresh passes in .grad
    for op in ops:
        if op == "held":
            ledger.backward([])
            ledger.hold([0])
            buffer += 1
        elif op == "synced":
            ledger.backward([0])
            in_grad, buffer = in_grad + buffer + 1, 0
        elif op == "clear":
            ledger.clear([0], "zero_grad")
            in_grad = 0
        else:
            kinds = {occ.kind for occ in ledger.step_end(0, [0])}
            assert ("unsynced-gradient" in kinds) == (buffer > 0)
            if in_grad:
                assert ledger.last_window[0] == in_grad
            in_grad = 0
    left = {occ.kind: occ for occ in ledger.finish([True])}
    if buffer:  # never synced again: never consumed
        assert left["dangling-gradient"].detail["fresh"] >= buffer


GRADIENT_OPS = st.sampled_from(
    [
        "backward",
        "backward_head",  # a pass that reaches only the last layer
        "backward_nan",
        "step",
        "zero_none",
        "zero_keep",
        "none_0.weight",
        "replace_1.bias",  # p.grad = p.grad.clone()
        "zero_by_hand_0.bias",  # p.grad.zero_()
        "clip",
    ]
)


def _run_booked(ops: list[str], accumulation_steps: int | None, whole_lists_from: int) -> list[tuple]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    params = dict(model.named_parameters())
    with (
        patch.object(ledger_module, "WHOLE_LISTS_FROM", whole_lists_from),
        watch(model, opt, accumulation_steps=accumulation_steps, audit_losses=False) as w,
    ):
        for op in ops:
            if op == "backward":
                torch.nn.functional.mse_loss(model(x), y).backward()
            elif op == "backward_nan":
                (model(x).sum() * float("nan")).backward()
            elif op == "backward_head":
                torch.nn.functional.mse_loss(model[1](model[0](x).detach()), y).backward()
            elif op == "step":
                opt.step()
            elif op in ("zero_none", "zero_keep"):
                opt.zero_grad(set_to_none=op == "zero_none")
            elif op == "clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            else:
                how, name = op.rsplit("_", 1)
                p = params[name]
                if how == "none":
                    p.grad = None
                elif p.grad is not None:
                    p.grad = p.grad.clone() if how == "replace" else p.grad.zero_()
    assert w.stopped is None
    return [(f.kind, f.params, f.step, f.backward, f.count) for f in w.findings]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(GRADIENT_OPS, max_size=16), accumulation_steps=st.sampled_from([None, 1, 2]))
def test_whole_list_booking_finds_what_per_parameter_booking_finds(ops, accumulation_steps):
    """The ledger's booking of passes, clears and steps over whole lists (models from ``WHOLE_LISTS_FROM``
    parameters) and one parameter at a time give the same findings, step and pass included, whatever happened to
    the gradients in between (passes reaching part of the model, NaN, hand clears, replaced gradients, clips)."""
    assert _run_booked(ops, accumulation_steps, 1) == _run_booked(ops, accumulation_steps, 10**9)
