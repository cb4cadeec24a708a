"""The hook layer alone (hooks.py), against a fake receiver that records the events it is sent."""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

from gradwatch.hooks import HookSet, config_flag


class Recorder:
    """A Receiver that records every event as (name, details)."""

    pending_stop = None
    measuring_contributions = False
    auditing_losses = False

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_backward_start(self, index, param):
        self.events.append(("backward_start", index))

    def on_backward_end(self, grads, incoming, held):
        self.events.append(("backward_end", tuple(sorted(grads))) + ((("held", tuple(sorted(held))),) if held else ()))

    def on_step_pre(self, opt_index, optimizer):
        self.events.append(("step_pre", opt_index))

    def on_step_post(self, opt_index, optimizer):
        self.events.append(("step_post", opt_index))

    def before_optimizer_clear(self, opt_index, optimizer):
        self.events.append(("before_clear", opt_index))

    def on_optimizer_cleared(self, opt_index, optimizer):
        self.events.append(("cleared", opt_index))

    def before_module_clear(self, module):
        self.events.append(("before_module_clear", type(module).__name__))

    def on_module_cleared(self, module):
        self.events.append(("module_cleared", type(module).__name__))

    def on_clip(self, parameters, how):
        self.events.append(("clip", how))

    def on_clipped(self):
        self.events.append(("clipped",))

    def on_loss(self, loss, args, kwargs):
        self.events.append(("loss", loss))
        return loss

    def on_loss_reached(self, call, grad, task):
        self.events.append(("loss_reached", call, float(grad)))

    def internal_error(self, error, where):
        self.events.append(("internal_error", where, repr(error)))

    def unsupported(self, reason):
        self.events.append(("unsupported", reason))

    def on_param_group_added(self, opt_index, optimizer):
        return []

    def on_unfrozen(self, indices):
        pass

    def optimizer_lost(self, opt_index):
        pass

    def report_pending_stop(self):
        pass

    def watches_tensor(self, tensor):
        return False

    def index_of(self, param):
        return None

    def release(self):
        pass


def _installed(model, opt, **kwargs):
    receiver = Recorder()
    hooks = HookSet(receiver)
    hooks.install(enumerate(model.parameters()), [opt], **kwargs)
    return receiver, hooks


def _names(receiver):
    return [event[0] for event in receiver.events]


def test_one_pass_one_step_one_clear_in_order():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    receiver, hooks = _installed(model, opt)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
    model.zero_grad()
    hooks.remove()
    assert receiver.events == [
        ("backward_start", 1),  # the bias is reached first
        ("backward_end", (0, 1)),
        ("step_pre", 0),
        ("step_post", 0),
        ("before_clear", 0),
        ("cleared", 0),
        ("before_module_clear", "Linear"),
        ("module_cleared", "Linear"),
    ]


def test_removal_leaves_no_attribute_hook_or_patch():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    originals = (torch.nn.Module.zero_grad, torch.nn.utils.clip_grad_norm_, torch.nn.functional.mse_loss)
    receiver, hooks = _installed(model, opt, audit_losses=True)
    assert "zero_grad" in opt.__dict__ and torch.nn.functional.mse_loss is not originals[2]
    hooks.remove()
    assert "zero_grad" not in opt.__dict__ and "add_param_group" not in opt.__dict__
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert (torch.nn.Module.zero_grad, torch.nn.utils.clip_grad_norm_, torch.nn.functional.mse_loss) == originals
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
    assert receiver.events == []


def test_someone_elses_patch_on_top_is_kept_and_still_reaches_the_original():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    receiver, hooks = _installed(model, opt)
    ours = torch.nn.Module.zero_grad
    calls = []

    def theirs(self, set_to_none=True):  # another tool patches the dispatcher while we are installed
        calls.append("theirs")
        ours(self, set_to_none)

    torch.nn.Module.zero_grad = theirs
    try:
        hooks.remove()
        assert torch.nn.Module.zero_grad is theirs  # not restored over their patch
        model(torch.randn(2, 3)).sum().backward()
        model.zero_grad()
        assert calls == ["theirs"] and model.weight.grad is None  # ours now only calls the original
        assert receiver.events == []  # and reports nothing after removal
    finally:
        torch.nn.Module.zero_grad = ours.__wrapped__  # they remove their patch
    receiver, hooks = _installed(model, opt)  # the next watch patches again
    model.zero_grad()
    hooks.remove()
    assert ("module_cleared", "Linear") in receiver.events
    assert torch.nn.Module.zero_grad is ours.__wrapped__


def test_a_reentrant_checkpoint_is_one_pass():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    receiver, hooks = _installed(model, opt)
    x = torch.randn(2, 3, requires_grad=True)
    out = model[1](checkpoint(model[0], x, use_reentrant=True))
    out.sum().backward()
    hooks.remove()
    ends = [event for event in receiver.events if event[0] == "backward_end"]
    assert ends == [("backward_end", (0, 1, 2, 3))]  # the nested task's hooks belong to the outer pass


def test_a_loss_call_and_the_weight_that_reaches_it():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    receiver, hooks = _installed(model, opt, audit_losses=True)
    receiver.auditing_losses = True
    (torch.nn.functional.mse_loss(model(torch.randn(2, 3)), torch.zeros(2, 1)) / 4).backward()
    with torch.no_grad():
        torch.nn.functional.mse_loss(model(torch.randn(2, 3)), torch.zeros(2, 1))  # no grad: not reported
    hooks.remove()
    assert ("loss", "mse_loss") in receiver.events
    assert ("loss_reached", "mse_loss", 0.25) in receiver.events
    assert _names(receiver).count("loss") == 1


def test_an_error_in_the_receiver_is_contained_and_reported():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    receiver, hooks = _installed(model, opt)

    def broken(opt_index, optimizer):
        raise RuntimeError("bug in gradwatch")

    receiver.on_step_pre = broken
    model(torch.randn(2, 3)).sum().backward()
    opt.step()  # the training goes on
    hooks.remove()
    assert ("internal_error", "optimizer.step", "RuntimeError('bug in gradwatch')") in receiver.events


def test_held_contributions_join_the_running_pass_and_are_ignored_outside_one():
    """FSDP2's post-backward reports the parameters it kept out of .grad (sync off) through ``HookSet.held``."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    receiver, hooks = _installed(model, opt)
    receiver.index_of = lambda param: 0 if param is model.weight else None
    out = model(torch.randn(2, 3)).sum()
    out.register_hook(lambda grad: hooks.held([model.weight, torch.zeros(1)]))
    out.backward()
    hooks.held([model.weight])  # outside any backward pass
    hooks.remove()
    ends = [event for event in receiver.events if event[0] == "backward_end"]
    assert ends == [("backward_end", (0, 1), ("held", (0,)))]


def test_a_clipping_function_is_announced_before_it_runs_and_after_with_its_result():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    receiver, hooks = _installed(model, opt)
    model(torch.randn(2, 3)).sum().backward()
    receiver.events.clear()
    total = torch.nn.utils.clip_grad_norm_((p for p in model.parameters()), 1.0)  # a generator is read once
    hooks.remove()
    assert receiver.events == [("clip", "clip_grad_norm_"), ("clipped",)]
    assert float(total) > 0


def test_the_dynamo_config_flag_reader_reads_what_getattr_reads():
    import torch._dynamo.config as config

    read = config_flag(config, "compiled_autograd")
    assert read.__qualname__.endswith("read")  # this torch's layout is the fast one: it must agree below
    with config.patch(compiled_autograd=True):
        assert read() is config.compiled_autograd is True
    assert read() is config.compiled_autograd is False
    config.compiled_autograd = True
    try:
        assert read() is True
    finally:
        config.compiled_autograd = False
    assert read() is False


def test_the_config_flag_reader_falls_back_to_getattr_on_an_unknown_layout():
    layout = types.SimpleNamespace(_config={"flag": object()}, flag=True)  # an entry without a user override
    assert config_flag(layout, "flag")() is True
    assert config_flag(types.SimpleNamespace(), "flag")() is False
