"""The reference accumulation loop (shared/reference_loop.py), with one bug planted on request."""

from __future__ import annotations

import os

import torch

from .watcher import Watcher, watch

ACCUMULATION_STEPS = 2
BUGS = {
    "none": "a correct loop",
    "missing-zero-grad": "no optimizer.zero_grad() after optimizer.step()",
    "zero-grad-in-window": "optimizer.zero_grad() before every backward, inside the accumulation window",
    "zero-grad-before-step": "optimizer.zero_grad() between the last backward and optimizer.step()",
    "no-backward": "loss.backward() forgotten",
    "double-step": "optimizer.step() called twice on one gradient",
    "wrong-window": "stepping every 3 batches while accumulation_steps=2",
    "partial-window": "7 batches: the last window is never stepped on",
    "orphan-layer": "a second layer whose parameters are not in the optimizer",
    "nan": "a NaN batch whose gradient is kept and consumed",
    "unscaled-loss": "the loss never divided by accumulation_steps (each step applies twice the mean gradient)",
    "mean-of-means": "batches of 4, 2, 4, 3, ...: each batch's mean loss / 2 (small batches weigh more)",
}


def run_demo(bug: str = "none", logdir: str | os.PathLike[str] | None = None, seed: int = 0) -> Watcher:
    """Run the reference loop with gradwatch attached (on_finding="record") and return the detached watcher."""
    if bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; choose one of {sorted(BUGS)}")
    torch.manual_seed(seed)
    layer = torch.nn.Linear(10, 1)
    model = torch.nn.Sequential(layer, torch.nn.Linear(1, 1)) if bug == "orphan-layer" else layer
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    criterion = torch.nn.MSELoss()
    batches = 7 if bug == "partial-window" else 8
    sizes = [4, 2, 4, 3, 4, 1, 4, 4] if bug == "mean-of-means" else [4] * batches
    dataloader = [(torch.randn(n, 10), torch.randn(n, 1)) for n in sizes]
    if bug == "nan":
        dataloader[3] = (torch.full((4, 10), float("nan")), dataloader[3][1])
    every = 3 if bug == "wrong-window" else ACCUMULATION_STEPS

    with watch(model, optimizer, ACCUMULATION_STEPS, logdir=logdir, on_finding="record") as watcher:
        optimizer.zero_grad()
        for i, (inputs, labels) in enumerate(dataloader):
            if bug == "zero-grad-in-window":
                optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            if bug != "unscaled-loss":
                loss = loss / ACCUMULATION_STEPS
            if bug != "no-backward":
                loss.backward()
            if bug == "nan" and not torch.isfinite(loss):
                continue  # "skip" the bad batch, but its gradient stays in .grad
            if (i + 1) % every == 0:
                if bug == "zero-grad-before-step":
                    optimizer.zero_grad()
                optimizer.step()
                if bug == "double-step":
                    optimizer.step()
                if bug != "missing-zero-grad":
                    optimizer.zero_grad()
    return watcher
