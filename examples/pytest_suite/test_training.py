"""Catch a missing zero_grad in your own test suite: `pytest examples/pytest_suite` (the plugin loads itself)."""

import pytest
import torch


def train(model, optimizer, accumulation_steps=2, zero_grad=True):
    torch.manual_seed(0)
    optimizer.zero_grad()
    for i in range(8):
        inputs, labels = torch.randn(4, 10), torch.randn(4, 1)
        loss = torch.nn.functional.mse_loss(model(inputs), labels) / accumulation_steps
        loss.backward()
        if (i + 1) % accumulation_steps == 0:
            optimizer.step()
            if zero_grad:
                optimizer.zero_grad()


def test_training_loop_is_clean(gradwatch):
    model = torch.nn.Linear(10, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gradwatch(model, optimizer, accumulation_steps=2)
    train(model, optimizer)


@pytest.mark.xfail(strict=True, reason="the loop forgets zero_grad(): gradwatch fails this test")
def test_training_loop_without_zero_grad(gradwatch):
    model = torch.nn.Linear(10, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gradwatch(model, optimizer, accumulation_steps=2)
    train(model, optimizer, zero_grad=False)
