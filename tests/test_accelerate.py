"""Hugging Face Accelerate: ``accelerator.accumulate(model)`` loops (optional: skipped without accelerate)."""

from __future__ import annotations

import pytest
import torch
from helpers import kinds, reference_data, reference_model, the, watch

accelerate = pytest.importorskip("accelerate")
ACC = 2


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: a Trainer run earlier in the session (the
    transformers tests) would leave them configured for its own accumulation."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield


def _fit(*, use_accumulate=True, zero_grad=True):
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=ACC, cpu=True)
    model, opt = reference_model()
    model, opt = accelerator.prepare(model, opt)  # opt becomes an AcceleratedOptimizer wrapping the SGD
    w = watch(model, opt, accumulation_steps=ACC)
    for x, y in reference_data():
        with accelerator.accumulate(model) if use_accumulate else accelerator.no_sync(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)  # divides by the accumulation steps
            opt.step()  # a no-op until the window's last micro-batch
            if zero_grad:
                opt.zero_grad()  # likewise
    w.detach()
    return w


def test_accumulate_loop_is_clean():
    w = _fit()
    assert w.findings == []
    assert w._tracker.ledger.steps == [4]


def test_missing_zero_grad_in_an_accumulate_loop():
    w = _fit(zero_grad=False)
    finding = the(w, "uncleared-gradient")
    assert (finding.params, finding.step, finding.backward) == (("weight", "bias"), 1, 2)


def test_forgetting_accelerator_accumulate_steps_every_micro_batch():
    w = _fit(use_accumulate=False)  # gradient_accumulation_steps is set, but nothing tells Accelerate the windows
    assert kinds(w) == {"accumulation-mismatch"}
    assert the(w, "accumulation-mismatch").message.startswith("optimizer step 0 consumed 1 backward pass(es)")


def test_the_epochs_short_window_is_divided_by_the_full_count():
    """With a DataLoader, Accelerate steps on the epoch's short last window, but ``accelerator.backward`` divides
    every loss by ``gradient_accumulation_steps``, that window's too: its step applies half its mean."""
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=ACC, cpu=True)
    model, opt = reference_model()
    data = torch.utils.data.DataLoader(reference_data(7), batch_size=None)  # 7 micro-batches: 3 windows and 1
    model, opt, data = accelerator.prepare(model, opt, data)
    with watch(model, opt, accumulation_steps=ACC) as w:
        for x, y in data:
            with accelerator.accumulate(model):
                accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                opt.step()
                opt.zero_grad()
    assert kinds(w) == {"loss-scale"}
    f = the(w, "loss-scale")
    assert f.step == 3 and "applied 0.5 of the window's mean gradient" in f.message
