"""Parameters that join during the run: ``add_param_group`` after ``watch()`` and progressive unfreezing."""

from __future__ import annotations

import pytest
import torch
from helpers import bugs, kinds, the, watch

import gradwatch

ACC = 2
BODY = ("0.weight", "0.bias")


def _body_and_head():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 1))
    batches = [(torch.randn(4, 6), torch.randn(4, 1)) for _ in range(8)]
    return model, batches


def _train(model, opt, batches, *, zero_grad=True, extra=None):
    """Accumulate ACC backward passes per step; ``extra`` (a tensor) joins the loss."""
    for i, (x, y) in enumerate(batches):
        loss = torch.nn.functional.mse_loss(model(x), y) / ACC
        if extra is not None:
            loss = loss + extra.square() / ACC
        loss.backward()
        if (i + 1) % ACC == 0:
            opt.step()
            if zero_grad:
                opt.zero_grad()


@pytest.mark.parametrize("unfreeze_first", [True, False], ids=["unfreeze-then-add", "add-then-unfreeze"])
@pytest.mark.parametrize("forget_zero_grad", [False, True])
def test_progressive_unfreezing_with_add_param_group(forget_zero_grad, unfreeze_first):
    model, batches = _body_and_head()
    body, head = model[0], model[1]
    body.requires_grad_(False)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    with watch(model, opt, accumulation_steps=ACC) as w:
        _train(model, opt, batches[:4])
        if unfreeze_first:
            body.requires_grad_(True)
        opt.add_param_group({"params": list(body.parameters()), "lr": 0.001})
        if not unfreeze_first:
            body.requires_grad_(True)
        _train(model, opt, batches[4:], zero_grad=not forget_zero_grad)
    if forget_zero_grad:
        finding = the(w, "uncleared-gradient")
        assert finding.params == ("1.weight", "1.bias", *BODY)  # in the optimizer's order: the body joined it
        assert (finding.step, finding.backward) == (3, 6)
    else:
        assert w.findings == []  # no orphan-gradient before, no unused-parameter after


def test_a_new_parameter_outside_the_model_is_watched_under_its_optimizer_name():
    model, batches = _body_and_head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    temperature = torch.nn.Parameter(torch.ones(()))
    with watch(model, opt, accumulation_steps=ACC) as w:
        _train(model, opt, batches[:4])
        opt.add_param_group({"params": [temperature]})
        _train(model, opt, batches[4:], zero_grad=False, extra=temperature)
    finding = the(w, "uncleared-gradient")
    assert finding.params == ("0.weight", "0.bias", "1.weight", "1.bias", "optimizer[0].param_groups[1][0]")
    assert "optimizer[0].param_groups[1][0]" in w.report()


def test_a_parameter_group_added_but_never_reached_is_unused():
    model, batches = _body_and_head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})  # e.g. built for a removed branch
        _train(model, opt, batches)
    assert bugs(w) == []
    assert the(w, "unused-parameter").params == ("optimizer[0].param_groups[1][0]",)


@pytest.mark.parametrize("forget_zero_grad", [False, True])
def test_unfreezing_parameters_the_optimizer_already_holds(forget_zero_grad):
    model, batches = _body_and_head()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # the frozen body is in the optimizer from the start
    model[0].requires_grad_(False)
    with watch(model, opt, accumulation_steps=ACC) as w:
        _train(model, opt, batches[:4])
        model[0].requires_grad_(True)
        _train(model, opt, batches[4:], zero_grad=not forget_zero_grad)
    if forget_zero_grad:
        assert set(BODY) <= set(the(w, "uncleared-gradient").params)
    else:
        assert w.findings == []


def test_unfreezing_parameters_no_optimizer_holds_is_an_orphan():
    model, batches = _body_and_head()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.01)
    with watch(model, opt, accumulation_steps=ACC) as w:
        _train(model, opt, batches[:4])
        model[0].requires_grad_(True)  # but the body is never added to the optimizer
        _train(model, opt, batches[4:])
    assert kinds(w) == {"orphan-gradient"}
    assert the(w, "orphan-gradient").params == BODY


def test_added_parameters_reach_the_trace_and_tensorboard(tmp_path):
    model, batches = _body_and_head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    temperature = torch.nn.Parameter(torch.ones(()))
    with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path) as w:
        _train(model, opt, batches[:4])
        opt.add_param_group({"params": [temperature]})
        _train(model, opt, batches[4:], extra=temperature)
    assert w.findings == []
    trace = gradwatch.load_trace(tmp_path)
    assert trace.params[-1] == "optimizer[0].param_groups[1][0]"
    (added,) = trace.of("param_group")
    assert (added["optimizer"], added["params"]) == (0, [4])
    assert trace.of("step")[-1]["params"] == [0, 1, 2, 3, 4]
