"""Each bug pattern as a real training loop: the finding kind, the parameter names and the step."""

from __future__ import annotations

import pytest
import torch
from helpers import gan, gan_iteration, kinds, mse, reference_data, reference_loop, reference_model, the, watch

import gradwatch

ACC = 2


@pytest.mark.parametrize("accumulation_steps", [None, ACC])
def test_missing_zero_grad(accumulation_steps):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=accumulation_steps) as w:
        reference_loop(model, opt, reference_data(), ACC, zero_grad=False)  # no zero_grad after step
    f = the(w, "uncleared-gradient")
    assert kinds(w) == {"uncleared-gradient"}
    assert f.params == ("weight", "bias")
    assert (f.step, f.backward) == (1, 2)  # the first backward after step 0
    assert f.count == 3  # steps 1, 2 and 3 each consumed an old gradient again
    assert "zero_grad()" in f.message


def _zero_grad_every_micro_batch(accumulation_steps):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=accumulation_steps) as w:
        for i, (x, y) in enumerate(reference_data()):
            opt.zero_grad()  # wipes the previous micro-batch of the window
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
    return w


def test_zero_grad_every_micro_batch_inside_the_window():
    w = _zero_grad_every_micro_batch(ACC)
    f = the(w, "discarded-gradient")
    assert f.params == ("weight", "bias")
    assert (f.step, f.backward) == (0, 1)
    assert f.count == 4
    mismatch = the(w, "accumulation-mismatch")
    assert (mismatch.step, mismatch.backward) == (0, 2)
    assert "consumed 1 backward pass(es) but accumulation_steps=2" in mismatch.message


def test_zero_grad_every_micro_batch_inside_the_window_without_accumulation_steps():
    w = _zero_grad_every_micro_batch(None)
    f = the(w, "discarded-gradient")
    assert kinds(w) == {"discarded-gradient"}
    assert (f.params, f.step, f.count) == (("weight", "bias"), 2, 2)  # step 0: a set-up pass, 1: a NaN guard?, 2, 3
    assert "move zero_grad() after optimizer.step()" in f.message


def test_zero_grad_between_last_backward_and_step():
    model, opt = reference_model()
    with watch(model, opt) as w:
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.zero_grad()
                opt.step()
    assert kinds(w) == {"discarded-gradient", "empty-step"}
    discarded, empty = the(w, "discarded-gradient"), the(w, "empty-step")
    assert discarded.params == empty.params == ("weight", "bias")
    assert (discarded.step, discarded.backward) == (0, 2)
    assert (empty.step, empty.backward) == (0, 2)
    assert "optimizer.zero_grad() cleared 2 backward pass(es)" in discarded.message


def test_step_with_no_backward():
    model, opt = reference_model()
    with watch(model, opt) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC)  # loss.backward() forgotten
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    f = the(w, "empty-step")
    assert kinds(w) == {"empty-step", "unused-parameter"}  # and no parameter ever got a gradient (info)
    assert (f.params, f.step, f.backward, f.count) == (("weight", "bias"), 0, 0, 4)


def test_stepping_twice_on_one_gradient():
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.step()  # e.g. a scheduler/optimizer mix-up
                opt.zero_grad()
    f = the(w, "stale-gradient")
    assert kinds(w) == {"stale-gradient"}
    assert (f.params, f.step, f.backward, f.count) == (("weight", "bias"), 1, 2, 4)


def test_window_of_the_wrong_size():
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if (i + 1) % 3 == 0:  # off by one: steps every 3 micro-batches
                opt.step()
                opt.zero_grad()
    f = the(w, "accumulation-mismatch")
    assert (f.params, f.step, f.backward, f.count) == (("weight", "bias"), 0, 3, 2)
    assert "consumed 3 backward pass(es)" in f.message
    dangling = the(w, "dangling-gradient")  # batches 7 and 8 never reach a step
    assert (dangling.step, dangling.backward) == (2, 8)


def test_partial_final_window_at_detach():
    model, opt = reference_model()
    w = watch(model, opt, accumulation_steps=ACC)
    opt.zero_grad()
    for i, (x, y) in enumerate(reference_data(n_batches=7)):
        mse(model, x, y, ACC).backward()
        if (i + 1) % ACC == 0:
            opt.step()
            opt.zero_grad()
    assert w.findings == []  # only known at the end of the run
    w.detach()
    f = the(w, "dangling-gradient")
    assert kinds(w) == {"dangling-gradient"}
    assert (f.severity, f.params, f.step, f.backward) == ("warning", ("weight", "bias"), 3, 7)
    assert "1 backward pass(es)" in f.message


def test_layer_missing_from_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.01)  # the head was forgotten
    with watch(model, opt, accumulation_steps=ACC) as w:
        reference_loop(model, opt, reference_data())
    f = the(w, "orphan-gradient")
    assert kinds(w) == {"orphan-gradient"}
    assert (f.params, f.step, f.backward, f.count) == (("2.weight", "2.bias"), 0, 0, 8)


def test_unused_layer_is_info():
    class WithUnusedHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(10, 1)
            self.unused = torch.nn.Linear(10, 1)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = WithUnusedHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, accumulation_steps=ACC) as w:
        reference_loop(model, opt, reference_data())
    f = the(w, "unused-parameter")
    assert kinds(w) == {"unused-parameter"}
    assert (f.severity, f.params, f.step) == ("info", ("unused.weight", "unused.bias"), 4)
    w.assert_clean()  # info findings do not fail assert_clean


@pytest.mark.parametrize("finite_check", ["step", "backward"])
@pytest.mark.parametrize("k", [0, 3, 5])
def test_nan_entering_at_micro_batch_k(k, finite_check):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    micro_batch = {"i": 0}
    # a numerically broken backward of one layer, at micro-batch k only
    model[2].weight.register_hook(lambda g: g * float("nan") if micro_batch["i"] == k else g)
    with watch(model, opt, accumulation_steps=ACC, finite_check=finite_check) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            micro_batch["i"] = i
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    f = next(f for f in w.findings if f.kind == "non-finite-gradient")
    window_start = k - k % ACC
    if finite_check == "backward":  # exact: the micro-batch that produced it
        assert (f.params, f.step, f.backward) == (("2.weight",), k // ACC, k)
        assert f"backward pass {k} put NaN" in f.message
    else:  # once per step: the window that holds it
        assert (f.params, f.step, f.backward) == (("2.weight",), k // ACC, window_start)
        assert f"backward passes {window_start}-{window_start + 1} (one of them) put NaN" in f.message


def test_gan_whose_generator_is_never_zeroed():
    model, opt_g, opt_d, batches = gan()
    with watch(model, [opt_g, opt_d]) as w:
        for real, z in batches:
            gan_iteration(model, opt_g, opt_d, real, z, zero_generator=False)
    f = the(w, "uncleared-gradient")
    assert kinds(w) == {"uncleared-gradient"}
    assert f.params == ("g.weight", "g.bias")  # the discriminator is zeroed each iteration: not accused
    assert (f.step, f.backward) == (1, 3)  # iteration 1's generator backward, after opt_g's step 0


def test_zero_grad_once_per_epoch_instead_of_per_step():
    model, opt = reference_model()
    data = reference_data()
    with watch(model, opt, accumulation_steps=ACC) as w:
        for _epoch in range(2):
            opt.zero_grad()
            for i, (x, y) in enumerate(data):
                mse(model, x, y, ACC).backward()
                if (i + 1) % ACC == 0:
                    opt.step()
    f = the(w, "uncleared-gradient")
    assert kinds(w) == {"uncleared-gradient"}
    assert (f.step, f.backward, f.count) == (1, 2, 6)


def test_stray_backward_before_the_loop_is_consumed_by_the_first_step():
    model, opt = reference_model()
    data = reference_data()
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.zero_grad()
        mse(model, *data[0]).backward()  # a sanity pass "to check the graph", never cleared
        for i, (x, y) in enumerate(data):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    f = the(w, "accumulation-mismatch")
    assert kinds(w) == {"accumulation-mismatch"}
    assert (f.params, f.step, f.backward, f.count) == (("weight", "bias"), 0, 3, 1)
    assert "consumed 3 backward pass(es)" in f.message


def test_backward_in_the_validation_loop():
    model, opt = reference_model()
    data, val = reference_data(), reference_data(n_batches=2, seed=1)
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.zero_grad()
        for _epoch in range(2):
            for i, (x, y) in enumerate(data):
                mse(model, x, y, ACC).backward()
                if (i + 1) % ACC == 0:
                    opt.step()
                    opt.zero_grad()
            for x, y in val:  # validation, but with a copy-pasted backward and no torch.no_grad()
                mse(model, x, y).backward()
    f = the(w, "accumulation-mismatch")
    assert (f.step, f.backward) == (4, 12)  # epoch 1's first step took 2 validation + 2 training passes
    assert "consumed 4 backward pass(es)" in f.message
    assert the(w, "dangling-gradient").params == ("weight", "bias")  # epoch 1's validation passes


def test_skipping_step_and_zero_grad_on_a_nan_batch_keeps_accumulating():
    model, opt = reference_model()
    data = reference_data()
    data[3] = (torch.full_like(data[3][0], float("nan")), data[3][1])
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(data):
            loss = mse(model, x, y, ACC)
            loss.backward()
            if not torch.isfinite(loss):
                continue  # "skip the bad batch": its NaN gradient stays in .grad
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    nan = next(f for f in w.findings if f.kind == "non-finite-gradient")
    assert (nan.params, nan.step, nan.backward) == (("weight", "bias"), 1, 2)  # the window of backward 2 to 5
    mismatch = the(w, "accumulation-mismatch")
    assert (mismatch.step, mismatch.backward) == (1, 6)
    assert "consumed 4 backward pass(es)" in mismatch.message


def test_raise_mode_raises_from_the_step_that_consumes_an_uncleared_gradient():
    model, opt = reference_model()
    data = reference_data()
    w = watch(model, opt, on_finding="raise")
    mse(model, *data[0]).backward()
    opt.step()
    mse(model, *data[1]).backward()  # onto the consumed gradient: harmless until a step uses it
    with pytest.raises(gradwatch.GradientBugError) as info:
        opt.step()
    assert [f.kind for f in info.value.findings] == ["uncleared-gradient"]
    w.detach()


# -- issue 10: the bugs around the legitimate idioms ------------------------------------------------------
def _epochs(model, opt, data, epochs=2, step_on_tail=False, window=ACC):
    for _ in range(epochs):
        opt.zero_grad()  # at each epoch's start: it wipes a tail left by the previous epoch
        for i, (x, y) in enumerate(data):
            mse(model, x, y, ACC).backward()
            if (i + 1) % window == 0 or (step_on_tail and i + 1 == len(data)):
                opt.step()
                opt.zero_grad()


def test_dropping_the_partial_last_window_of_an_epoch_wastes_batches():
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        _epochs(model, opt, reference_data(7))
    f = the(w, "dangling-gradient")
    assert kinds(w) == {"dangling-gradient"}  # no discarded-gradient, no accumulation-mismatch: nothing is an error
    assert (f.severity, f.params, f.step, f.backward) == ("warning", ("weight", "bias"), 3, 7)
    assert "never trained on" in f.message and "i + 1 == len(loader)" in f.message
    assert f.count == 2  # dropped by the next epoch's zero_grad, then left at the end of the run


def test_stepping_short_windows_all_the_time_is_a_mismatch():
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=3) as w:  # declared 3, the loop steps every 2 passes
        _epochs(model, opt, reference_data(8), window=2)
    f = the(w, "accumulation-mismatch")
    assert (f.params, f.step, f.count) == (("weight", "bias"), 0, 8)


def test_two_short_windows_in_a_row_are_a_mismatch():
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        _epochs(model, opt, reference_data(1), epochs=3, step_on_tail=True)  # epochs shorter than one window
    f = the(w, "accumulation-mismatch")
    assert (f.step, f.count) == (0, 3)


@pytest.mark.parametrize("how", ["never", "every-other-iteration"])
@pytest.mark.parametrize("clear", ["model", "both-optimizers"])
def test_one_of_several_optimizers_never_steps(how, clear):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    body = torch.optim.SGD(model[0].parameters(), lr=0.01)
    head = torch.optim.SGD(model[2].parameters(), lr=0.01)
    with watch(model, [body, head]) as w:
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y).backward()
            body.step()
            if how == "every-other-iteration" and i % 2 == 0:
                head.step()
            if clear == "model":
                model.zero_grad()
            else:
                body.zero_grad()
                head.zero_grad()
    f = the(w, "discarded-gradient")
    assert kinds(w) == {"discarded-gradient"}
    assert f.params == ("2.weight", "2.bias")
    assert f.step == (0 if how == "never" else 1)  # steps of the optimizer concerned
    assert "optimizer[1] never stepped" in f.message


def test_an_optimizer_never_stepped_nor_cleared_is_found_at_the_end():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    body = torch.optim.SGD(model[0].parameters(), lr=0.01)
    head = torch.optim.SGD(model[2].parameters(), lr=0.01)
    with watch(model, [body, head]) as w:
        for x, y in reference_data():
            mse(model, x, y).backward()
            body.step()
            body.zero_grad()
    f = the(w, "discarded-gradient")
    assert (f.params, f.step) == (("2.weight", "2.bias"), 0)


def test_a_gradient_left_in_grad_before_watch_is_reported_when_a_step_consumes_it():
    model, opt = reference_model()
    data = reference_data()
    mse(model, *data[0]).backward()  # a sanity pass before attaching, never cleared
    with watch(model, opt, accumulation_steps=ACC) as w:
        for i, (x, y) in enumerate(data):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    f = the(w, "pre-existing-gradient")
    assert kinds(w) == {"pre-existing-gradient"}
    assert (f.severity, f.params, f.step) == ("warning", ("weight", "bias"), 0)
    assert "zero_grad()" in f.message


def test_the_watched_optimizer_replaced_mid_run_is_said_plainly():
    model, opt = reference_model()
    data = reference_data()
    with pytest.warns(gradwatch.GradientWarning, match="garbage-collected") as caught, watch(model, opt) as w:
        for i, (x, y) in enumerate(data):
            if i == 4:
                opt = torch.optim.Adam(model.parameters())  # the watched SGD is collected here
            mse(model, x, y).backward()
            opt.step()
            opt.zero_grad()
    assert w.findings == []  # no discarded-gradient with advice to move zero_grad
    assert len([c for c in caught if "garbage-collected" in str(c.message)]) == 1
    assert "stopped checking: the watched optimizer[0] was garbage-collected" in w.report()


@pytest.mark.parametrize("by_hand", ["zero_", "foreach_zero_"])
def test_a_clear_by_hand_inside_the_window_is_seen(by_hand):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if i % ACC == 0:  # after the window's first micro-batch
                if by_hand == "zero_":
                    for p in model.parameters():
                        p.grad.zero_()
                else:
                    torch._foreach_zero_([p.grad for p in model.parameters()])
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    f = the(w, "discarded-gradient")
    assert (f.params, f.step, f.count) == (("weight", "bias"), 0, 4)
    assert "zeroed in place by hand" in f.message


@pytest.mark.parametrize(
    "how, name",
    # not "zero_" on the bias: a pass reaches it first, so it has accumulated onto the zeros before any hook can
    # look (README, Limits)
    [("set-to-none", "weight"), ("set-to-none", "bias"), ("zero_", "weight")],
)
def test_one_parameter_cleared_inside_each_window_is_a_discard_of_that_parameter(how, name):
    """The window's other parameters are full, so this is not an epoch's partial window dropped: the parameter
    loses the first pass of every window (judged on what the dropped parameters hold at the step, not the
    others)."""
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if i % ACC == 0:
                if how == "set-to-none":
                    getattr(model, name).grad = None
                else:
                    getattr(model, name).grad.zero_()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    f = the(w, "discarded-gradient")
    assert kinds(w) == {"discarded-gradient"}
    assert (f.severity, f.params, f.step, f.count) == ("error", (name,), 0, 4)
    assert f.backward == (1 if how == "set-to-none" else 2)  # passes seen when it was noticed


@pytest.mark.parametrize("how", ["set-to-none", "zero_"])
def test_some_parameters_cleared_before_each_step_are_found_at_the_first_and_the_advice_leads_to_a_clean_run(how):
    """Clearing some parameters' gradients between backward() and step() (a way of freezing them) discards those
    passes while the step consumes the others': not a skipped window, so it is found at the first step, and the
    message's advice (requires_grad_(False)) gives a clean run."""

    def train(freeze_by_clearing: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        if not freeze_by_clearing:
            model[0].requires_grad_(False)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with watch(model, opt, accumulation_steps=ACC) as w:
            opt.zero_grad()
            for i in range(8):
                model(torch.randn(2, 4)).pow(2).mean().div(ACC).backward()
                if (i + 1) % ACC == 0:
                    if freeze_by_clearing:
                        for p in model[0].parameters():
                            if how == "set-to-none":
                                p.grad = None
                            else:
                                p.grad.zero_()
                    opt.step()
                    opt.zero_grad()
        return w

    w = train(freeze_by_clearing=True)
    f = the(w, "discarded-gradient")
    assert kinds(w) == {"discarded-gradient"}
    assert (f.severity, f.params, f.step, f.count) == ("error", ("0.weight", "0.bias"), 0, 4)
    assert "requires_grad_(False)" in f.message and "other parameters kept theirs" in f.message
    assert train(freeze_by_clearing=False).findings == []


def test_one_layer_zeroed_in_place_inside_each_window_is_found_on_a_larger_model_too():
    """The rotating probes reach the zeroed layer within a few windows; the finding names only it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])  # 12 parameter tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.zero_grad()
        for i in range(40):
            model(torch.randn(2, 4)).pow(2).mean().div(ACC).backward()
            if i % ACC == 0:
                for p in model[3].parameters():
                    p.grad.zero_()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    f = the(w, "discarded-gradient")
    assert kinds(w) == {"discarded-gradient"}
    assert f.params == ("3.weight", "3.bias") and f.step < 6


def test_a_step_without_backward_after_a_clear_by_hand_is_an_empty_step():
    model, opt = reference_model()
    x, y = reference_data(1)[0]
    with watch(model, opt) as w:
        mse(model, x, y).backward()
        opt.step()
        for p in model.parameters():
            p.grad.zero_()
        opt.step()  # nothing fresh: the window had no backward
    f = the(w, "empty-step")
    assert kinds(w) == {"empty-step"}
    assert (f.params, f.step) == (("weight", "bias"), 1)


@pytest.mark.parametrize("clip", ["clip_grad_norm_", "clip_grad_value_"])
def test_missing_zero_grad_with_clipping_on_a_model_of_one_parameter_tensor(clip):
    """A clip after the step changes the consumed gradient in place, as a hand-made ``p.grad.zero_()`` would; with
    no other parameter to compare with, that change must not be taken for a clear (gradwatch saw the clip run)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt) as w:
        for x, y in reference_data():
            mse(model, x, y, 1).backward()
            opt.step()  # zero_grad() forgotten
            getattr(torch.nn.utils, clip)(model.parameters(), 0.01)  # (too late to matter, too)
    f = the(w, "uncleared-gradient")
    assert kinds(w) == {"uncleared-gradient"}
    assert (f.params, f.step, f.backward) == (("weight",), 1, 1)


def test_a_clear_by_hand_inside_the_window_is_still_seen_when_a_clip_follows_it():
    """The clip's own in-place change is forgiven only on gradients it found unchanged since gradwatch last saw them."""
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        for i, (x, y) in enumerate(reference_data()):
            if i % ACC:
                for p in model.parameters():
                    p.grad.zero_()  # inside the window
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert kinds(w) == {"discarded-gradient", "accumulation-mismatch"}
    assert the(w, "discarded-gradient").params == ("weight", "bias")
