"""AMP with torch.amp.GradScaler (on the CPU): skipped steps are info, clipping scaled gradients is a bug."""

from __future__ import annotations

import pytest
import torch
from helpers import bugs, mse, reference_data, reference_model, the, watch

import gradwatch

ACC = 2
OVERFLOWING_BATCH = 3  # the second backward of the second window: step 1, backward passes 2-3


def _amp_loop(model, opt, scaler, data, *, clip=None, clip_first=False):
    """The reference loop under GradScaler, optionally clipping before or (correctly) after ``unscale_``."""
    opt.zero_grad()
    for i, (x, y) in enumerate(data):
        scaler.scale(mse(model, x, y, ACC)).backward()
        if (i + 1) % ACC == 0:
            if clip is not None and clip_first:
                clip(model.parameters())
            scaler.unscale_(opt)
            if clip is not None and not clip_first:
                clip(model.parameters())
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()


def _overflowing_data():
    data = reference_data()
    x, y = data[OVERFLOWING_BATCH]
    data[OVERFLOWING_BATCH] = (x * 1e30, y)  # finite in float32, Inf once scaled: the scaler skips that step
    return data


CLIPS = {
    "clip_grad_norm_": lambda params: torch.nn.utils.clip_grad_norm_(params, 1.0),
    "clip_grad_value_": lambda params: torch.nn.utils.clip_grad_value_(params, 0.1),
}


@pytest.mark.parametrize("given", [True, False], ids=["scaler-given", "scaler-detected"])
@pytest.mark.parametrize("fused", [False, True], ids=["stepped-by-scaler", "fused-skips-in-kernel"])
@pytest.mark.parametrize("finite_check", ["step", "backward"])
def test_a_step_the_scaler_skips_is_info_not_a_bug(finite_check, fused, given):
    model, _ = reference_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with watch(model, opt, accumulation_steps=ACC, finite_check=finite_check, scaler=scaler if given else None) as w:
        _amp_loop(model, opt, scaler, _overflowing_data())
    assert scaler.get_scale() < 2.0**16  # a step really was skipped
    assert bugs(w) == [], w.report()  # no empty-step, discarded-gradient, non-finite-gradient or mismatch
    skipped = the(w, "skipped-step")
    assert skipped.severity == "info"
    assert (skipped.params, skipped.step) == (("weight", "bias"), 1)
    assert skipped.backward == (3 if finite_check == "backward" else 2)  # the exact pass, or the window's first
    assert w._tracker.ledger.steps == [3]


def test_every_skip_of_an_optimizer_counts_into_one_finding():
    model, opt = reference_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    data = reference_data()
    data[1] = (data[1][0] * 1e30, data[1][1])
    data[5] = (data[5][0] * 1e30, data[5][1])
    with watch(model, opt, accumulation_steps=ACC) as w:
        _amp_loop(model, opt, scaler, data)
    assert [(f.kind, f.count) for f in w.findings] == [("skipped-step", 2)]


@pytest.mark.parametrize("given", [True, False], ids=["scaler-given", "scaler-detected"])
@pytest.mark.parametrize("clip", list(CLIPS))
def test_clipping_after_unscale_is_clean(clip, given):
    model, opt = reference_model()
    scaler = torch.amp.GradScaler("cpu")
    with watch(model, opt, accumulation_steps=ACC, scaler=scaler if given else None) as w:
        _amp_loop(model, opt, scaler, reference_data(), clip=CLIPS[clip])
    assert w.findings == []


@pytest.mark.parametrize("given", [True, False], ids=["scaler-given", "scaler-detected"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("clip", list(CLIPS))
def test_clipping_before_unscale_is_reported(clip, fused, given):
    model, _ = reference_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu")
    with watch(model, opt, accumulation_steps=ACC, scaler=scaler if given else None) as w:
        _amp_loop(model, opt, scaler, reference_data(), clip=CLIPS[clip], clip_first=True)
    finding = the(w, "clip-before-unscale")
    assert (finding.severity, finding.params, finding.step, finding.backward) == ("error", ("weight", "bias"), 0, 2)
    assert clip in finding.message and "scaler.unscale_(optimizer)" in finding.message
    assert finding.count == 4  # every window
    assert [f.kind for f in bugs(w)] == ["clip-before-unscale"]


def test_raise_mode_raises_from_the_clipping_call_when_the_scaler_is_given():
    model, opt = reference_model()
    scaler = torch.amp.GradScaler("cpu")
    data = reference_data(2)
    with watch(model, opt, scaler=scaler, on_finding="raise"):
        for x, y in data:
            scaler.scale(mse(model, x, y, ACC)).backward()
        with pytest.raises(gradwatch.GradientBugError, match="clip-before-unscale"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


def test_clipping_is_not_judged_without_scaling():
    model, opt = reference_model()
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # e.g. an AMP switch turned off: nothing is scaled
    with watch(model, opt, accumulation_steps=ACC, scaler=scaler) as w:
        _amp_loop(model, opt, scaler, reference_data(), clip=CLIPS["clip_grad_norm_"], clip_first=True)
    assert w.findings == []


def test_training_numbers_under_amp_are_identical_bit_for_bit():
    results = []
    for watched in (False, True):
        model, opt = reference_model()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        w = watch(model, opt, scaler=scaler) if watched else None
        _amp_loop(model, opt, scaler, _overflowing_data(), clip=CLIPS["clip_grad_norm_"])
        if w:
            w.detach()
        results.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale()))
    (weights_a, scale_a), (weights_b, scale_b) = results
    assert scale_a == scale_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
