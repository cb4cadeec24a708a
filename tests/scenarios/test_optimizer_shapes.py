"""Optimizer shapes users bring: framework wrappers, subclasses, sparse gradients, a failed backward."""

from __future__ import annotations

import pytest
import torch
from helpers import bugs, kinds, mse, reference_data, reference_loop, reference_model, watch

ACC = 2


class AccumulatingWrapper:
    """Like Accelerate's AcceleratedOptimizer: step()/zero_grad() are no-ops except on a window's last batch."""

    def __init__(self, optimizer, accumulation_steps):
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.calls = 0

    @property
    def sync_gradients(self):
        return self.calls % self.accumulation_steps == 0

    def step(self):
        self.calls += 1
        if self.sync_gradients:
            self.optimizer.step()

    def zero_grad(self):
        if self.sync_gradients:
            self.optimizer.zero_grad()


@pytest.mark.parametrize("forget_zero_grad", [False, True])
def test_framework_wrapper_is_unwrapped_and_its_no_op_calls_are_fine(forget_zero_grad):
    model, opt = reference_model()
    wrapper = AccumulatingWrapper(opt, ACC)
    with watch(model, wrapper, accumulation_steps=ACC) as w:
        for x, y in reference_data():
            mse(model, x, y, ACC).backward()
            wrapper.step()  # called every micro-batch, as with accelerator.accumulate()
            if not forget_zero_grad:
                wrapper.zero_grad()
    assert w._tracker.ledger.steps == [4]
    assert kinds(w) == ({"uncleared-gradient"} if forget_zero_grad else set())


def test_optimizer_subclass_calling_super_step_counts_one_step():
    class LoggingSGD(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)  # both step() methods fire the step hooks

    model, _ = reference_model()
    opt = LoggingSGD(model.parameters(), lr=0.01)
    with watch(model, opt, accumulation_steps=ACC) as w:
        reference_loop(model, opt, reference_data())
    assert w.findings == []
    assert w._tracker.ledger.steps == [4]


def test_sparse_embedding_gradients():
    torch.manual_seed(0)
    model = torch.nn.Embedding(50, 4, sparse=True)
    opt = torch.optim.SparseAdam(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 50, (8, 6))
    with watch(model, opt, accumulation_steps=ACC) as w:
        for i in range(8):
            model(tokens[i]).pow(2).mean().backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert w.findings == []


def test_a_backward_that_fails_midway_does_not_confuse_the_watch():
    class FailsOnce(torch.autograd.Function):
        armed = True

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            if FailsOnce.armed:
                FailsOnce.armed = False
                raise RuntimeError("a broken custom op")
            return grad

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = reference_data()
    with watch(model, opt) as w:
        mse(model, *data[0]).backward()
        opt.step()
        opt.zero_grad()
        x, y = data[1]
        with pytest.raises(RuntimeError, match="broken custom op"):
            mse(torch.nn.Sequential(model[0], _Apply(FailsOnce), model[1]), x, y).backward()
        opt.zero_grad()  # the user drops the failed batch: the head's part of it is a window skipped on purpose
        for x, y in data[2:]:
            mse(model, x, y).backward()
            opt.step()
            opt.zero_grad()
    assert bugs(w) == []
    assert w._tracker.ledger.steps == [7]
    assert w._tracker.ledger.backwards == 8  # the failed pass counts as one, closed at the next zero_grad
    assert not w._tracker.stopped


class _Apply(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)
