"""Several optimizers and schedulers, foreach and fused implementations."""

from __future__ import annotations

import pytest
import torch
from helpers import kinds, reference_data, reference_loop, reference_model, the, watch

from gradwatch import GradientWarning

ACC = 2


def test_overlapping_optimizers_warn_once_and_raise_no_false_alarm():
    model, opt = reference_model()
    second = torch.optim.SGD(model.parameters(), lr=0.0)  # e.g. a second optimizer over the same weights
    with pytest.warns(GradientWarning, match=r"2 parameter\(s\) belong to more than one optimizer: weight"):
        w = watch(model, [opt, second], accumulation_steps=ACC)
    reference_loop(model, opt, reference_data(), ACC, after_step=second.step)
    w.detach()
    assert w.findings == []
    assert w._tracker.ledger.steps == [4, 4]


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4),
}


@pytest.mark.parametrize("forget_zero_grad", [False, True])
@pytest.mark.parametrize("make", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_lr_schedulers(make, forget_zero_grad):
    model, opt = reference_model()
    scheduler = make(opt)
    lrs = []

    def schedule():
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])

    with watch(model, opt, accumulation_steps=ACC) as w:
        reference_loop(model, opt, reference_data(), ACC, zero_grad=not forget_zero_grad, after_step=schedule)
    assert len(set(lrs)) > 1  # the schedule really moved the learning rate
    if forget_zero_grad:
        assert kinds(w) == {"uncleared-gradient"}
        assert the(w, "uncleared-gradient").step == 1
    else:
        assert w.findings == []


IMPLEMENTATIONS = {
    "sgd-foreach": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, foreach=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.01, fused=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "adamw-for-loop": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False),
}


@pytest.mark.parametrize("make", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_foreach_and_fused_optimizers(make):
    model, _ = reference_model()
    opt = make(model.parameters())
    with watch(model, opt, accumulation_steps=ACC) as w:
        reference_loop(model, opt, reference_data())
    assert w.findings == []

    model, _ = reference_model()
    opt = make(model.parameters())
    with watch(model, opt, accumulation_steps=ACC) as w:
        reference_loop(model, opt, reference_data(), zero_grad=False)
    assert kinds(w) == {"uncleared-gradient"}
    assert the(w, "uncleared-gradient").step == 1
