"""Legitimate training idioms: no finding of severity error or warning, and the loop really trained."""

from __future__ import annotations

import pytest
import torch
from helpers import bugs, gan, gan_iteration, mse, reference_data, reference_loop, reference_model, watch

ACC = 2


def _accumulation_loop(model, opt, data, *, after_backward=None, clear=None, clear_first=False):
    """The reference loop with a hook point between backward and step, and a replaceable clear."""
    clear = clear or opt.zero_grad
    clear()
    for i, (x, y) in enumerate(data):
        if clear_first and i % ACC == 0:
            clear()
        mse(model, x, y, ACC).backward()
        if (i + 1) % ACC == 0:
            if after_backward is not None:
                after_backward()
            opt.step()
            if not clear_first:
                clear()


def _assert_clean(w):
    assert bugs(w) == [], w.report()
    w.assert_clean()


@pytest.mark.parametrize("accumulation_steps", [None, ACC])
def test_reference_loop(accumulation_steps):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=accumulation_steps) as w:
        reference_loop(model, opt, reference_data())
    assert w.findings == []
    assert "no findings" in w.report()


@pytest.mark.parametrize(
    "clip",
    [
        lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1),
        lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1, foreach=True),
        lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 0.01),
    ],
    ids=["clip_grad_norm_", "clip_grad_norm_foreach", "clip_grad_value_"],
)
def test_clipping_between_backward_and_step(clip):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        _accumulation_loop(model, opt, reference_data(), after_backward=lambda: clip(model))
    assert w.findings == []


@pytest.mark.parametrize("clear_first", [False, True], ids=["after-step", "window-start"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_either_way(set_to_none, clear_first):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        _accumulation_loop(
            model, opt, reference_data(), clear=lambda: opt.zero_grad(set_to_none=set_to_none), clear_first=clear_first
        )
    assert w.findings == []


@pytest.mark.parametrize("set_to_none", [True, False])
def test_model_zero_grad(set_to_none):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        _accumulation_loop(model, opt, reference_data(), clear=lambda: model.zero_grad(set_to_none=set_to_none))
    assert w.findings == []


def _set_none(model):
    for p in model.parameters():
        p.grad = None


def _legacy_data_zero(model):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.data.zero_()  # no version bump: only the values tell


def _inplace_zero(model):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()


@pytest.mark.parametrize("by_hand", [_set_none, _legacy_data_zero, _inplace_zero])
@pytest.mark.parametrize("clear_first", [False, True], ids=["after-step", "window-start"])
def test_clearing_by_hand(by_hand, clear_first):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, accumulation_steps=ACC) as w:
        _accumulation_loop(model, opt, reference_data(), clear=lambda: by_hand(model), clear_first=clear_first)
    assert w.findings == []


def test_clearing_the_reference_model_by_hand_with_data_zero():
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        _accumulation_loop(model, opt, reference_data(), clear=lambda: _legacy_data_zero(model))
    assert w.findings == []


def test_lbfgs_step_with_closure():
    model, _ = reference_model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)
    data = reference_data()
    with watch(model, opt) as w:
        for x, y in data:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = mse(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
    assert w.findings == []


def test_gan_two_optimizers_with_detach():
    model, opt_g, opt_d, batches = gan()
    with watch(model, [opt_g, opt_d]) as w:
        for real, z in batches:
            gan_iteration(model, opt_g, opt_d, real, z)
    assert w.findings == []


def test_two_optimizers_over_disjoint_parameters_both_stepped():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    body = torch.optim.SGD(model[0].parameters(), lr=0.01)
    head = torch.optim.Adam(model[2].parameters(), lr=1e-3)
    with watch(model, [body, head], accumulation_steps=ACC) as w:
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                body.step()
                head.step()
                body.zero_grad()
                head.zero_grad()
    assert w.findings == []


def test_tied_weights():
    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 8)
            self.head = torch.nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight  # one Parameter, used twice per forward

        def forward(self, tokens):
            return self.head(torch.tanh(self.embed(tokens)))

    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 20, (8, 4, 5))
    with watch(model, opt, accumulation_steps=ACC) as w:
        for i in range(8):
            logits = model(tokens[i])
            (torch.nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[i].reshape(-1)) / ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert w.findings == []
    assert w._tracker.ledger.backwards == 8  # the tied weight fired once per backward


@pytest.mark.parametrize("in_optimizer", [True, False])
def test_frozen_parameters(in_optimizer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    params = model.parameters() if in_optimizer else model[2].parameters()
    opt = torch.optim.SGD(params, lr=0.01)
    with watch(model, opt, accumulation_steps=ACC) as w:
        _accumulation_loop(model, opt, reference_data())
    assert w.findings == []


@pytest.mark.parametrize("finite_check", ["step", "backward"])
@pytest.mark.parametrize("clear", ["optimizer", "model"])
def test_nan_batch_skipped_by_clearing(finite_check, clear):
    model, opt = reference_model()
    data = reference_data()
    data[3] = (torch.full_like(data[3][0], float("nan")), data[3][1])
    with watch(model, opt, accumulation_steps=ACC, finite_check=finite_check) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(data):
            loss = mse(model, x, y, ACC)
            loss.backward()
            if (i + 1) % ACC == 0:
                if all(torch.isfinite(p.grad).all() for p in model.parameters()):
                    opt.step()
                (opt if clear == "optimizer" else model).zero_grad()  # a bad window is dropped on purpose
    _assert_clean(w)


def test_gradient_penalty_with_create_graph():
    model, opt = reference_model()
    with watch(model, opt) as w:
        for x, y in reference_data():
            opt.zero_grad()
            x = x.requires_grad_()
            loss = mse(model, x, y)
            (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
            (loss + grad_x.pow(2).sum()).backward()
            opt.step()
    assert w.findings == []


def test_undefined_incoming_gradient_is_not_a_contribution():
    class SkipsBias(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            return x @ weight.t() + bias

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            return grad @ weight, grad.t() @ x, None  # no gradient for the bias

    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            out = SkipsBias.apply(x, model.weight, model.bias)
            (torch.nn.functional.mse_loss(out, y) / ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert bugs(w) == []


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, accumulation_steps=ACC) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            hidden = checkpoint(model[:2], x.requires_grad_(), use_reentrant=use_reentrant)
            (torch.nn.functional.mse_loss(model[2](hidden), y) / ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert w.findings == []
    assert w._tracker.ledger.backwards == 8
