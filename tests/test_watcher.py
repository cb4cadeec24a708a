"""The public API: arguments, on_finding modes, report, assert_clean, detach, and never breaking training."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import tracemalloc
import warnings
import weakref

import pytest
import torch
from helpers import mse, reference_data, reference_loop, reference_model, watch

import gradwatch
from gradwatch import GradientBugError, GradientWarning


def _missing_zero_grad(model, opt, data):
    for x, y in data:
        mse(model, x, y).backward()
        opt.step()


# -- arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"model": "not a model"}, TypeError, "torch.nn.Module"),
        ({"optimizer": "sgd"}, TypeError, "torch.optim.Optimizer"),
        ({"optimizer": []}, ValueError, "at least one optimizer"),
        ({"accumulation_steps": 0}, ValueError, "accumulation_steps must be >= 1"),
        ({"accumulation_steps": 2.0}, TypeError, "accumulation_steps must be an int"),
        ({"accumulation_steps": True}, TypeError, "accumulation_steps must be an int"),
        ({"accumulation_steps": torch.tensor(2.0)}, TypeError, "accumulation_steps must be an int"),
        ({"on_finding": "print"}, ValueError, "on_finding must be one of"),
        ({"on_finding": 3}, TypeError, "on_finding must be one of"),
        ({"logdir": 3}, TypeError, "logdir must be a str or os.PathLike"),
        ({"finite_check": "never"}, ValueError, "finite_check must be one of"),
        ({"scaler": "amp"}, TypeError, "scaler must be a torch.amp.GradScaler"),
    ],
)
def test_bad_arguments_fail_fast_with_a_message(kwargs, error, text):
    model, opt = reference_model()
    args = {"model": model, "optimizer": opt, **kwargs}
    with pytest.raises(error, match=text):
        gradwatch.watch(args.pop("model"), args.pop("optimizer"), **args)
    assert model.weight._post_accumulate_grad_hooks in (None, {})  # nothing was left attached


def test_accumulation_steps_can_change_between_windows_and_is_checked_like_at_watch():
    model, opt = reference_model()
    data = reference_data()
    with watch(model, opt, accumulation_steps=2) as w:
        reference_loop(model, opt, data[:4], 2)  # two windows of 2
        w.accumulation_steps = 4  # an accumulation schedule
        reference_loop(model, opt, data, 4)  # two windows of 4: clean
        assert w.findings == []
        reference_loop(model, opt, data[:4], 2)  # the loop went on with windows of 2
        for bad, error in [("4", TypeError), (0, ValueError), (True, TypeError)]:
            with pytest.raises(error, match="accumulation_steps must be"):
                w.accumulation_steps = bad
    mismatch = w.findings[0]
    assert (mismatch.kind, mismatch.step) == ("accumulation-mismatch", 5)  # step 4 could be an epoch's short end
    assert w.accumulation_steps == 4


def test_optimizer_of_another_model_is_refused():
    model, _ = reference_model()
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        gradwatch.watch(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_optimizer_only_parameters_are_watched_under_a_synthesized_name():
    model, _ = reference_model()
    temperature = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.01)
    with watch(model, opt) as w:
        for x, y in reference_data(3):
            torch.nn.functional.mse_loss(model(x) * temperature, y).backward()
            opt.step()  # missing zero_grad
    (f,) = w.findings
    assert f.params == ("weight", "bias", "optimizer[0].param_groups[0][2]")


def test_watching_the_same_model_twice_is_refused_until_detached():
    model, opt = reference_model()
    w = watch(model, opt)
    with pytest.raises(ValueError, match="already watched"):
        gradwatch.watch(model, opt)
    w.detach()
    watch(model, opt).detach()


# -- on_finding modes -------------------------------------------------------------------------------
def test_warn_mode_warns_once_per_distinct_finding():
    model, opt = reference_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt) as w:
            _missing_zero_grad(model, opt, reference_data())
    ours = [c for c in caught if issubclass(c.category, GradientWarning)]
    assert len(ours) == 1
    assert "uncleared-gradient" in str(ours[0].message)
    assert ours[0].filename == __file__  # attributed to the user's step() call, not to gradwatch or torch
    with open(__file__) as source:
        assert "opt.step()" in source.read().splitlines()[ours[0].lineno - 1]
    assert w.findings[0].count == 7


def test_a_clear_inside_the_window_is_reported_at_the_clear_not_at_the_step_that_judges_it():
    model, opt = reference_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt, accumulation_steps=2) as w:
            for i, (x, y) in enumerate(reference_data()):
                mse(model, x, y, 0.5).backward()
                if i % 2 == 0:
                    opt.zero_grad()  # inside the window: drops the first micro-batch
                else:
                    opt.step()
    (discarded,) = [c for c in caught if "discarded-gradient" in str(c.message)]
    assert [f.kind for f in w.findings if f.kind == "discarded-gradient"] == ["discarded-gradient"]
    assert discarded.filename == __file__
    with open(__file__) as source:
        assert "opt.zero_grad()  # inside the window" in source.read().splitlines()[discarded.lineno - 1]


def test_callable_mode_receives_each_new_finding():
    model, opt = reference_model()
    seen = []
    with gradwatch.watch(model, opt, on_finding=seen.append):
        _missing_zero_grad(model, opt, reference_data())
    assert [f.kind for f in seen] == ["uncleared-gradient"]


def test_a_failing_callback_is_reported_once_and_training_goes_on():
    model, opt = reference_model()

    def broken(finding):
        raise RuntimeError("callback bug")

    with (
        pytest.warns(GradientWarning, match="on_finding callback raised"),
        gradwatch.watch(model, opt, on_finding=broken) as w,
    ):
        _missing_zero_grad(model, opt, reference_data())
    assert w.findings[0].count == 7


def test_raise_mode_raises_from_zero_grad_for_a_forgotten_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 1))
    body, head = (torch.optim.SGD(m.parameters(), lr=0.1) for m in model)
    w = watch(model, [body, head], on_finding="raise")
    x, y = reference_data(1)[0]
    for i in range(2):
        mse(model, x, y).backward()
        body.step()
        if i == 0:
            head.step()
            model.zero_grad()
    with pytest.raises(GradientBugError) as info:
        model.zero_grad()  # head.step() forgotten on this window
    assert info.value.findings[0].kind == "discarded-gradient"
    assert info.value.findings[0].params == ("1.weight", "1.bias")
    assert model[1].weight.grad is None  # the user's zero_grad itself ran
    w.detach()


def test_raise_mode_raises_from_the_step_that_consumes_what_a_clear_left_of_its_window():
    model, opt = reference_model()
    w = watch(model, opt, accumulation_steps=2, on_finding="raise")
    data = reference_data()
    for x, y in data[:2]:
        opt.zero_grad()  # inside the window
        mse(model, x, y, 2).backward()
    with pytest.raises(GradientBugError, match="discarded-gradient"):
        opt.step()
    opt.zero_grad()
    w.detach()


def test_raise_mode_raises_from_backward_for_an_orphan_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    w = watch(model, opt, on_finding="raise")
    x, y = reference_data(1)[0]
    with pytest.raises(GradientBugError, match="orphan-gradient"):
        mse(model, x, y).backward()
    opt.step()  # the watcher still works after the raise
    opt.zero_grad()
    w.detach()
    assert [f.kind for f in w.findings] == ["orphan-gradient"]


def test_raise_mode_raises_at_detach_for_a_dangling_window_but_not_over_another_exception():
    model, opt = reference_model()
    w = watch(model, opt, on_finding="raise")
    mse(model, *reference_data(1)[0]).backward()
    with pytest.raises(GradientBugError, match="dangling-gradient"):
        w.detach()
    assert not w.attached

    model, opt = reference_model()
    with pytest.raises(KeyError), watch(model, opt, on_finding="raise"):
        mse(model, *reference_data(1)[0]).backward()
        raise KeyError("the user's own error wins")


# -- report and assert_clean ------------------------------------------------------------------------
def test_report_and_assert_clean():
    model, opt = reference_model()
    with watch(model, opt) as w:
        _missing_zero_grad(model, opt, reference_data())
    text = w.report()
    assert "uncleared-gradient at step 1, backward 1, 7 times" in text
    assert "backward passes:    8" in text
    with pytest.raises(GradientBugError, match="1 gradient bug") as info:
        w.assert_clean()
    assert info.value.findings == tuple(w.findings)
    w.assert_clean(allow=["uncleared-gradient"])
    with pytest.raises(ValueError, match="unknown kind"):
        w.assert_clean(allow=["uncleared-gradients"])


def test_finding_is_frozen_and_exported():
    model, opt = reference_model()
    with watch(model, opt) as w:
        _missing_zero_grad(model, opt, reference_data(3))
    finding = w.findings[0]
    with pytest.raises(AttributeError):
        finding.count = 0
    assert set(gradwatch.__all__) >= {"watch", "Finding", "GradientBugError", "GradientWarning"}
    contract = ("uncleared-gradient", "stale-gradient", "discarded-gradient", "empty-step", "accumulation-mismatch")
    contract += ("orphan-gradient", "non-finite-gradient", "dangling-gradient", "unused-parameter")
    assert gradwatch.KINDS[: len(contract)] == contract
    assert len(set(gradwatch.KINDS)) == len(gradwatch.KINDS)


# -- never break the training -----------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True], ids=["detection", "tensorboard"])
@pytest.mark.parametrize("bug", [False, True])
def test_training_numbers_are_identical_bit_for_bit(bug, streaming, tmp_path):
    data = reference_data()
    results = []
    logdir = tmp_path if streaming else None
    for watched in (False, True):
        model, opt = reference_model()
        w = watch(model, opt, accumulation_steps=2, logdir=logdir) if watched else None
        if bug:
            _missing_zero_grad(model, opt, data)
        else:
            reference_loop(model, opt, data)
        if w:
            w.detach()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def _global_functions():
    """What gradwatch patches while any watch is live (classes and modules it is not handed)."""
    scaler, utils = torch.amp.GradScaler, torch.nn.utils
    return [
        torch.nn.Module.zero_grad,
        scaler.step,
        scaler.unscale_,
        utils.clip_grad_norm_,
        utils.clip_grad_value_,
        torch.utils.swap_tensors,
        torch.nn.functional.cross_entropy,  # the loss functions the loss-weight audit wraps
        torch.nn.functional.mse_loss,
        torch.nn.functional.binary_cross_entropy_with_logits,
    ]


def test_detach_removes_every_hook_wrapper_and_reference():
    gc.collect()  # watches of earlier tests that were never detached go now
    model, opt = reference_model()
    originals = _global_functions()
    w = watch(model, opt)
    assert "zero_grad" in opt.__dict__
    assert all(patched is not original for patched, original in zip(_global_functions(), originals, strict=True))
    reference_loop(model, opt, reference_data())
    w.detach()
    w.detach()  # idempotent
    assert "zero_grad" not in opt.__dict__ and "add_param_group" not in opt.__dict__
    assert all(restored is original for restored, original in zip(_global_functions(), originals, strict=True))
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())

    model_ref, opt_ref = weakref.ref(model), weakref.ref(opt)
    del model, opt
    gc.collect()
    assert model_ref() is None and opt_ref() is None  # the watcher, still alive, does not pin them
    assert "detached" in w.report()


def test_model_is_collected_while_watched_when_the_user_drops_it():
    model, opt = reference_model()
    w = watch(model, opt)
    reference_loop(model, opt, reference_data(2))
    model_ref = weakref.ref(model)
    del model, opt
    gc.collect()
    assert model_ref() is None
    w.detach()


def test_internal_error_is_reported_once_and_contained(monkeypatch):
    model, opt = reference_model()
    w = watch(model, opt)

    def broken(*args, **kwargs):
        raise RuntimeError("ledger bug")

    monkeypatch.setattr(w._tracker.ledger, "step_end", broken)
    with pytest.warns(GradientWarning, match="stopped checking after an internal error") as caught:
        reference_loop(model, opt, reference_data())  # four steps: one warning
        w.detach()
    assert len([c for c in caught if "internal error" in str(c.message)]) == 1
    assert "stopped checking: internal error in optimizer.step" in w.report()


def test_an_error_while_hooking_an_added_parameter_group_is_contained(monkeypatch):
    model, opt = reference_model()
    w = watch(model, opt)

    def broken(*args, **kwargs):
        raise RuntimeError("hook registration failed")

    monkeypatch.setattr(w._hooks, "hook_params", broken)
    with pytest.warns(GradientWarning, match="internal error in add_param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})  # the user's call still succeeds
    assert len(opt.param_groups) == 2
    reference_loop(model, opt, reference_data())
    w.detach()


def test_pickling_and_saving_work_while_watched():
    model, opt = reference_model()
    with watch(model, opt):
        reference_loop(model, opt, reference_data(2))
        torch.save(model, io.BytesIO())
        restored = pickle.loads(pickle.dumps(opt))
        assert "zero_grad" not in restored.__dict__
        copy.deepcopy(opt)


def test_memory_stays_bounded_on_a_long_buggy_run():
    model, opt = reference_model()
    x, y = reference_data(1)[0]
    with watch(model, opt, accumulation_steps=2) as w:

        def run(n):
            for _ in range(n):
                mse(model, x, y).backward()  # missing zero_grad and a window of 1: two findings every step
                opt.step()

        run(3000)  # past torch's own warm-up allocations
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        run(3000)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert growth < 32 * 1024, growth
    assert len(w.findings) == 2 and w.findings[0].count > 5000
    assert len(w._tracker._finite) == 0 and len(w._tracker._zeroed) <= 2


def test_context_manager_detaches():
    model, opt = reference_model()
    with watch(model, opt) as w:
        assert w.attached
    assert not w.attached
    assert repr(w).startswith("<gradwatch.Watcher detached")


@pytest.mark.parametrize("where", ["kernel", "host"])
def test_an_error_in_the_contribution_pre_hook_is_contained(tmp_path, monkeypatch, where):
    """The norm of a gradient on the device (a kernel) or, for a small CPU one, read on the host."""
    model, opt = reference_model()

    def broken(*args, **kwargs):
        raise RuntimeError("norm kernel missing for this dtype")

    options = gradwatch.TensorBoardOptions(contribution_every=1)
    with pytest.warns(GradientWarning, match="stopped checking after an internal error in backward"):
        w = watch(model, opt, logdir=tmp_path, tensorboard=options)
        if where == "kernel":
            monkeypatch.setattr(gradwatch.stats, "HOST_CHECK_LIMIT", -1)
            monkeypatch.setattr(torch.linalg, "vector_norm", broken)
        else:
            monkeypatch.setattr(gradwatch.hooks, "host_norm", broken)
        reference_loop(model, opt, reference_data())  # the user's backward() calls do not raise
        monkeypatch.undo()
        w.detach()
    assert w._tracker.ledger.steps == [0]  # checking stopped at the first backward; training went on
    assert model.weight.grad is None and not torch.equal(model.weight, reference_model()[0].weight)


# -- raise mode and warnings-as-errors leave training usable (issue 10) --------------------------------
def _set_none_then_step(model, opt, x, y):
    mse(model, x, y).backward()
    for p in model.parameters():
        p.grad = None  # drops the window's gradient by hand, right before the step
    opt.step()


@pytest.mark.parametrize("mode", ["raise", "warn-as-error"])
def test_a_raise_from_step_leaves_the_watch_consistent(mode):
    model, opt = reference_model()
    data = reference_data()
    w = gradwatch.watch(model, opt, on_finding="raise" if mode == "raise" else "warn")
    expected = GradientBugError if mode == "raise" else GradientWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        mse(model, *data[0]).backward()
        opt.step()
        opt.zero_grad()
        with pytest.raises(expected, match="empty-step"):
            _set_none_then_step(model, opt, *data[1])
        opt.zero_grad()
        for x, y in data[2:5]:  # training goes on, and so does checking
            mse(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        assert w._tracker.ledger.steps == [5]  # every step booked, the raising one included
        mse(model, *data[5]).backward()
        opt.step()  # then a missing zero_grad: found as usual
        with pytest.raises(expected, match="uncleared-gradient"):
            mse(model, *data[6]).backward()
            opt.step()
        opt.zero_grad()
        w.detach()  # no false dangling-gradient from a step left open
    assert sorted(f.kind for f in w.findings) == ["discarded-gradient", "empty-step", "uncleared-gradient"]


def test_a_raise_at_the_end_of_backward_comes_after_every_other_end_of_backward_callback():
    engine = torch.autograd.Variable._execution_engine
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # model[1] is an orphan: found at the backward
    ran = []
    model[1].weight.register_post_accumulate_grad_hook(lambda p: engine.queue_callback(lambda: ran.append(True)))
    w = watch(model, opt, on_finding="raise")
    x, y = reference_data(1)[0]
    with pytest.raises(GradientBugError, match="orphan-gradient"):
        mse(model, x, y).backward()
    assert ran == [True]  # the user's (or DDP's) callback queued after gradwatch's still ran
    opt.step()
    opt.zero_grad()
    w.detach()


# -- resources (issue 10) -----------------------------------------------------------------------------
def _gradwatch_threads():
    import threading

    return [t for t in threading.enumerate() if "EventFileWriter" in type(t).__name__ or "Async" in type(t).__name__]


def test_watches_never_detached_go_with_their_model_and_optimizer(tmp_path):
    threads_before = len(_gradwatch_threads())
    originals = [torch.nn.Module.zero_grad, torch.utils.swap_tensors]
    for run in range(20):  # a sweep, or a notebook cell run again and again
        model, opt = reference_model()
        w = watch(model, opt, logdir=tmp_path / str(run))
        reference_loop(model, opt, reference_data(2))
        del model, opt, w
    gc.collect()
    assert len(_gradwatch_threads()) == threads_before  # every TensorBoard writer closed
    assert [torch.nn.Module.zero_grad, torch.utils.swap_tensors] == originals  # the dispatchers are gone
    module = torch.nn.Linear(2, 2)
    module.zero_grad()  # an unrelated call costs what it did


def test_a_watch_whose_optimizers_are_gone_closes_its_writer_even_if_the_watcher_is_kept(tmp_path):
    threads_before = len(_gradwatch_threads())
    model, opt = reference_model()
    w = watch(model, opt, logdir=tmp_path)
    reference_loop(model, opt, reference_data(2))
    del model, opt
    gc.collect()
    assert len(_gradwatch_threads()) == threads_before
    w.detach()  # still fine afterwards


@pytest.mark.parametrize("how", ["to", "load_state_dict"])
def test_swap_tensors_paths_work_after_detach_and_while_watched(how):
    swap_before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model, opt = reference_model()
        convert = {
            "to": lambda m: m.to(torch.float64),
            "load_state_dict": lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}),
        }[how]
        w = watch(model, opt)
        reference_loop(model, opt, reference_data(2))
        w.detach()
        convert(model)  # nothing of gradwatch is left on the parameters

        model, opt = reference_model()
        w = gradwatch.watch(model, opt)
        reference_loop(model, opt, reference_data(2))
        with pytest.warns(GradientWarning, match="swap_tensors swapped a watched parameter"):
            convert(model)  # works while watched: gradwatch lets go of the model and says so
        assert "stopped checking: torch.utils.swap_tensors" in w.report()
        w.detach()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap_before)


def test_a_watch_that_fails_half_way_leaves_no_writer_and_says_what_to_do(tmp_path):
    threads_before = len(_gradwatch_threads())
    model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="run one forward pass"):
        gradwatch.watch(model, opt, logdir=tmp_path)
    assert len(_gradwatch_threads()) == threads_before


# -- smaller ones (issue 10) ---------------------------------------------------------------------------
def test_a_clear_by_hand_is_counted_once():
    model, opt = reference_model()
    with watch(model, opt) as w:
        for x, y in reference_data(7):
            mse(model, x, y).backward()
            opt.step()
            for p in model.parameters():
                p.grad = None
    assert "gradient clears:    7" in w.report()  # each noticed once (it was 13: at the backward start and end)


def test_a_finding_whose_parameters_change_every_step_does_not_flood():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(12)])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = gradwatch.watch(model, opt)
        for i in range(12):
            mse(model, torch.randn(2, 3), torch.randn(2, 3)).backward()
            with torch.no_grad():
                model[i].weight.grad[0, 0] = float("nan")  # a different parameter each step
            opt.step()
            opt.zero_grad()
        w.detach()
    nan_warnings = [c for c in caught if "non-finite-gradient" in str(c.message)]
    assert 1 <= len(nan_warnings) <= gradwatch.finding_log.MAX_PER_KIND
    assert sum(f.count for f in w.findings if f.kind == "non-finite-gradient") == 12


def test_complex_parameters_with_a_logdir_cast_nothing(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, dtype=torch.complex64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    options = gradwatch.TensorBoardOptions(histogram_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradwatch.watch(model, opt, logdir=tmp_path, tensorboard=options) as w:
            for _ in range(3):
                x = torch.randn(2, 4, dtype=torch.complex64)
                model(x).abs().sum().backward()
                opt.step()
                opt.zero_grad()
    assert w.findings == []
