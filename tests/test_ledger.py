"""The ledger alone: no model, no torch."""

from __future__ import annotations

import ast
import pathlib
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch import findings as k
from gradwatch import ledger as ledger_module
from gradwatch.ledger import NO_OWNER, Ledger


def kinds(occurrences):
    return [o.kind for o in occurrences]


def test_ledger_does_not_import_torch():
    source = pathlib.Path(k.__file__).with_name("ledger.py").read_text()
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert "torch" not in imported


def test_one_window_consumed_once_is_clean():
    ledger = Ledger([0, 0], 1, accumulation_steps=2)
    assert ledger.backward([0, 1]) == []
    assert ledger.backward([0, 1]) == []
    ledger.step_begin(0)
    assert ledger.step_end(0, [0, 1]) == []
    assert ledger.clear([0, 1], "zero_grad") == []
    assert ledger.finish([True, True]) == []
    assert (ledger.backwards, ledger.steps, ledger.clears, ledger.uncleared) == (2, [1], 1, 0)


def test_contribution_onto_consumed_gradient_is_reported_when_a_step_consumes_it():
    ledger = Ledger([0], 1)
    ledger.backward([0])
    ledger.step_begin(0)
    ledger.step_end(0, [0])
    assert ledger.backward([0]) == []  # not yet: a clear could still come
    ledger.step_begin(0)
    (occ,) = ledger.step_end(0, [0])
    assert (occ.kind, occ.params, occ.step, occ.backward) == (k.UNCLEARED, (0,), 1, 1)


def test_contribution_onto_consumed_gradient_then_cleared_is_harmless_by_product():
    ledger = Ledger([0, 1], 2)  # param 0 belongs to optimizer 0, param 1 to optimizer 1
    ledger.backward([0])
    ledger.step_begin(0)
    ledger.step_end(0, [0])
    ledger.backward([0, 1])  # optimizer 1's backward also reaches param 0
    ledger.step_begin(1)
    assert ledger.step_end(1, [1]) == []
    assert ledger.clear([0], "zero_grad") == []  # backward 1 was consumed (for param 1): a by-product
    assert ledger.finish([True, True]) == []


def test_clear_inside_a_step_belongs_to_the_step():
    ledger = Ledger([0], 1)
    ledger.backward([0])
    ledger.step_begin(0)
    assert ledger.clear([0], "closure zero_grad") == []
    ledger.backward([0])
    assert ledger.step_end(0, [0]) == []


def test_nested_step_hooks_count_once():
    ledger = Ledger([0], 1)
    ledger.backward([0])
    ledger.step_begin(0)
    ledger.step_begin(0)  # a subclass whose step() calls super().step()
    assert ledger.step_end(0, [0]) == []
    assert ledger.step_end(0, [0]) == []
    assert ledger.steps == [1]


def _step(ledger, opt=0, params=(0, 1)):
    ledger.step_begin(opt)
    return ledger.step_end(opt, list(params))


def test_discarded_empty_stale_and_mismatch():
    ledger = Ledger([0, 0], 1, accumulation_steps=2)
    ledger.backward([0, 1])
    assert ledger.clear([0, 1], "zero_grad") == []  # part of a window dropped: judged at the next step
    empty, discarded = _step(ledger)
    assert (discarded.kind, discarded.detail["fresh"], empty.kind) == (k.DISCARDED, 1, k.EMPTY_STEP)
    ledger.backward([0, 1])
    (mismatch,) = _step(ledger)
    assert (mismatch.kind, mismatch.detail) == (k.ACCUMULATION_MISMATCH, {"window": 1, "expected": 2})
    assert kinds(_step(ledger)) == [k.STALE]
    ledger.clear([0, 1], "zero_grad")
    for _ in range(3):  # whole windows dropped before every step (a NaN guard, an attack's passes), full ones stepped
        ledger.backward([0, 1])
        ledger.backward([0, 1])
        assert ledger.clear([0, 1], "zero_grad") == []
        ledger.backward([0, 1])
        ledger.backward([0, 1])
        assert _step(ledger) == []  # clean: every step consumed the window accumulation_steps declares


def _drop_one_pass_before_each_step(ledger, steps, assign=False):
    """A window of one pass, a clear, another pass, a step (an adversarial attack's pass, or zero_grad() at every
    micro-batch of a two-pass window); ``assign``: the step's .grad assigned by hand (per-task gradients combined)."""
    found = []
    for _ in range(steps):
        ledger.backward([0, 1])
        found += ledger.clear([0, 1], "zero_grad")
        ledger.backward([0, 1])
        if assign:
            ledger.replaced([0, 1])
        found += _step(ledger)
    return found


def test_whole_windows_dropped_before_two_steps_in_a_row_without_accumulation_steps_are_a_clear_inside_them():
    (discarded,) = _drop_one_pass_before_each_step(Ledger([0, 0], 1), 3)
    assert (discarded.kind, discarded.step, discarded.detail["how"], discarded.detail["fresh"]) == (
        k.DISCARDED,
        2,  # the first drop is a set-up pass, the second may be a NaN guard
        "repeated",
        1,
    )
    assert "accumulation_steps" in k.format_message(discarded.kind, ("w",), 0, 0, discarded.detail)


def test_windows_dropped_before_every_step_are_clean_with_accumulation_steps_or_a_gradient_assigned_by_hand():
    assert _drop_one_pass_before_each_step(Ledger([0, 0], 1, accumulation_steps=1), 3) == []  # adversarial training
    assert _drop_one_pass_before_each_step(Ledger([0, 0], 1), 3, assign=True) == []  # PCGrad: read, cleared, set
    ledger = Ledger([0, 0], 1)
    assert _drop_one_pass_before_each_step(ledger, 2, assign=True) == []
    assert kinds(_drop_one_pass_before_each_step(ledger, 2)) == [k.DISCARDED] * 2  # assigned no more: judged again


def test_short_windows_between_full_ones_are_an_epoch_tail():
    ledger = Ledger([0], 1, accumulation_steps=2)
    for window in (2, 2, 1, 2, 1):  # epochs of 5 passes, the short last window stepped on
        for _ in range(window):
            ledger.backward([0])
        assert _step(ledger, params=[0]) == []
        ledger.clear([0], "zero_grad")
    ledger.backward([0])
    (mismatch,) = _step(ledger, params=[0])  # two short windows in a row: the window is wrong
    assert (mismatch.kind, mismatch.step) == (k.ACCUMULATION_MISMATCH, 5)


def test_a_partial_window_dropped_before_a_full_one_wastes_data():
    ledger = Ledger([0], 1, accumulation_steps=2)
    for _ in range(3):
        ledger.backward([0])
        ledger.backward([0])
        _step(ledger, params=[0])
        ledger.clear([0], "zero_grad")
    ledger.backward([0])  # the epoch's tail
    assert ledger.clear([0], "optimizer.zero_grad()") == []
    ledger.backward([0])
    ledger.backward([0])
    (dropped,) = _step(ledger, params=[0])
    assert (dropped.kind, dropped.step, dropped.detail["how"], dropped.detail["fresh"]) == (k.DANGLING, 3, "dropped", 1)


def test_a_partial_window_dropped_before_the_first_step_is_a_set_up_pass():
    ledger = Ledger([0], 1, accumulation_steps=2)
    ledger.backward([0])  # a sanity check
    ledger.clear([0], "zero_grad")
    ledger.backward([0])
    ledger.backward([0])
    assert _step(ledger, params=[0]) == []


def test_an_optimizer_that_never_steps_on_its_passes_is_found():
    ledger = Ledger([0, 1], 2)  # body, head: the loop forgets head.step()
    for _ in range(2):
        ledger.backward([0, 1])
        _step(ledger, opt=0, params=[0])
        out = ledger.clear([0, 1], "model.zero_grad()")
    first, forgotten = out  # the first drop might have been a GAN's by-product; the second one tells
    assert (forgotten.kind, forgotten.params, forgotten.detail["how"]) == (k.DISCARDED, (1,), "not-stepped")
    assert (first.backward, forgotten.backward) == (1, 2)
    assert ledger.finish([True, True]) == []


def test_a_gan_discriminator_drops_by_products_of_the_generator_pass():
    ledger = Ledger([0, 1], 2)  # generator 0, discriminator 1; G updated first
    for _ in range(3):
        ledger.clear([0], "opt_g.zero_grad()")
        ledger.backward([0, 1])  # G's pass reaches D
        _step(ledger, opt=0, params=[0])
        assert ledger.clear([1], "opt_d.zero_grad()") == []
        ledger.backward([1])  # D's own pass
        _step(ledger, opt=1, params=[1])
    assert ledger.finish([True, True]) == []


def test_orphans_dangling_and_unused():
    ledger = Ledger([0, NO_OWNER, 0], 1)
    (orphan,) = ledger.backward([0, 1])
    assert (orphan.kind, orphan.params) == (k.ORPHAN, (1,))
    ledger.step_begin(0)
    ledger.step_end(0, [0, 2])
    ledger.backward([0])
    dangling, unused = ledger.finish([True, True, True])
    assert (dangling.kind, dangling.params, dangling.detail["fresh"]) == (k.DANGLING, (0,), 1)
    assert (unused.kind, unused.params) == (k.UNUSED, (2,))
    assert ledger.finish([True, True, False])[1:] == []  # frozen: not unused


def test_nonfinite_window_may_be_dropped_but_not_consumed():
    ledger = Ledger([0, 0], 1)
    ledger.backward([0, 1])
    ledger.mark_nonfinite(1, 0, 0)
    assert ledger.clear([0, 1], "zero_grad") == []  # a skipped step (GradScaler, or the user's own check)
    ledger.backward([0, 1])
    ledger.mark_nonfinite(0, 0, 1)
    ledger.step_begin(0)
    (nan,) = ledger.step_end(0, [0, 1])
    assert (nan.kind, nan.params, nan.step, nan.backward) == (k.NON_FINITE, (0,), 0, 1)


def test_consumed_gradient_zeroed_in_place_is_a_clear():
    ledger = Ledger([0], 1)
    ledger.backward([0])
    ledger.step_begin(0)
    ledger.step_end(0, [0])
    ledger.backward([0])
    ledger.clear_consumed([0])
    ledger.step_begin(0)
    assert ledger.step_end(0, [0]) == []
    assert ledger.uncleared == 1  # the new window's gradient, consumed now


def test_a_step_of_an_optimizer_booking_no_parameters_is_not_empty():
    ledger = Ledger([0, 0], 2)  # optimizer 1 holds only parameters booked to optimizer 0
    ledger.backward([0, 1])
    ledger.step_begin(1)
    assert ledger.step_end(1, []) == []
    assert ledger.steps == [0, 1]


def test_all_reduces_before_the_last_backward_of_a_window_are_redundant():
    ledger = Ledger([0, 0], 1, accumulation_steps=3)
    for synced in (True, False, True):  # the first pass forgot no_sync(), the last one must all-reduce
        ledger.backward([0, 1])
        if synced:
            ledger.backward_synced()
    (occ,) = ledger.step_end(0, [0, 1])
    assert (occ.kind, occ.params, occ.step, occ.backward) == ("redundant-sync", (0, 1), 0, 0)
    assert occ.detail == {"wasted": 1, "passes": 3, "share": 50, "how": "all-reduce"}
    ledger.clear([0, 1], "zero_grad")
    for synced in (False, False, True):  # the correct pattern
        ledger.backward([0, 1])
        if synced:
            ledger.backward_synced()
    assert ledger.step_end(0, [0, 1]) == []
    assert (ledger.allreduces, ledger.wasted_allreduces) == (3, 1)


def test_passes_fsdp2_held_out_of_grad_land_with_the_next_synced_pass_whatever_cleared_in_between():
    ledger = Ledger([0, 0], 1, accumulation_steps=3)
    for _ in range(2):  # sync off: FSDP2 keeps these out of .grad
        ledger.backward([])
        ledger.hold([0, 1])
    assert ledger.clear([0, 1], "zero_grad") == []  # nothing in .grad to drop; FSDP's buffer is not cleared
    ledger.backward([0, 1])  # the synced pass reduce-scatters all three
    assert ledger.pending_window(0, [0, 1]) == (0, 2, 3)
    assert ledger.step_end(0, [0, 1]) == []
    assert ledger.n_held == 0


def test_a_step_while_fsdp2_holds_passes_is_unsynced_not_empty():
    ledger = Ledger([0, 0, NO_OWNER], 1)
    ledger.backward([])
    ledger.hold([0, 1, 2])  # the orphan is reported when its gradient lands, not here
    (occ,) = ledger.step_end(0, [0, 1])
    assert (occ.kind, occ.params, occ.backward, occ.detail) == ("unsynced-gradient", (0, 1), 0, {"held": 1})
    ledger.backward([])
    ledger.hold([0])
    (end,) = ledger.finish([True, True, True])  # never synced again: never consumed
    assert (end.kind, end.params, end.detail["fresh"]) == ("dangling-gradient", (0, 1), 2)


def test_reduce_scatters_before_the_last_pass_are_redundant_under_fsdp2():
    ledger = Ledger([0], 1, accumulation_steps=2)
    ledger.collective = "reduce-scatter"
    for _ in range(2):
        ledger.backward([0])
        ledger.backward_synced()
    (occ,) = ledger.step_end(0, [0])
    assert occ.detail == {"wasted": 1, "passes": 2, "share": 50, "how": "reduce-scatter"}


def test_pending_window_and_booking_a_parameter():
    ledger = Ledger([0, 0, NO_OWNER], 1, accumulation_steps=2)
    assert ledger.pending_window(0, [0, 1]) is None  # nothing fresh
    ledger.backward([0, 1])
    ledger.backward([1])
    assert ledger.pending_window(0, [0, 1]) == (0, 1, 2)  # passes 0..1, two of them
    assert ledger.book(2, 0) and not ledger.book(2, 0) and not ledger.book(0, 0)
    assert ledger.owners == [0, 0, 0]
    ledger.adopt([0, 1])  # already fresh: nothing adopted
    ledger.step_begin(0)
    ledger.step_end(0, [0, 1, 2])
    ledger.clear([0, 1, 2], "zero_grad")
    ledger.adopt([0])  # a gradient of unknown origin: the window's size is unknown
    assert ledger.pending_window(0, [0]) is None


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("backward"), st.sets(st.integers(0, 9))),
        st.tuples(st.just("step"), st.integers(0, 1)),
        st.tuples(st.just("clear"), st.sets(st.integers(0, 9))),
        st.tuples(st.just("nonfinite"), st.integers(0, 9)),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(EVENTS, st.sampled_from([[0] * 10, [0] * 5 + [1] * 5, [0] * 9 + [NO_OWNER]]), st.sampled_from([None, 2]))
def test_whole_list_booking_leaves_the_ledger_as_booking_each_parameter_does(events, owners, accumulation_steps):
    """Passes and clears reaching every parameter, booked by whole lists or one parameter at a time: the same
    findings and the same state, field by field, after every event."""
    ledgers = [Ledger(owners, 2, accumulation_steps) for _ in range(2)]  # (9 of 10 parameters or more: all 10)
    for event, arg in events:
        found = []
        for whole_lists_from, ledger in zip((1, 1000), ledgers, strict=True):
            with patch.object(ledger_module, "WHOLE_LISTS_FROM", whole_lists_from):
                if event == "backward":
                    found.append(ledger.backward(sorted(arg) if len(arg) < 9 else list(range(10))))
                elif event == "step":
                    ledger.step_begin(arg)
                    found.append(ledger.step_end(arg, [i for i, o in enumerate(owners) if o == arg]))
                elif event == "clear":
                    found.append(ledger.clear(sorted(arg) if len(arg) < 9 else list(range(10)), "zero_grad"))
                elif ledger.owners[arg] != NO_OWNER:
                    ledger.mark_nonfinite(arg, ledger.steps[ledger.owners[arg]], ledger.backwards - 1)
        if found:
            assert found[0] == found[1]
        assert vars(ledgers[0]) == vars(ledgers[1])
