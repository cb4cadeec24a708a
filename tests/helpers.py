"""Shared loops and assertions for the tests: the reference loop and its bug variants."""

from __future__ import annotations

from typing import Callable

import torch

import gradwatch
from gradwatch import Finding, Watcher


def reference_data(n_batches: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 10, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n_batches)]


def reference_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(10, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def reference_loop(
    model, optimizer, data, accumulation_steps: int = 2, zero_grad: bool = True, after_step: Callable | None = None
) -> None:
    """The loop of shared/reference_loop.py, without the prints; ``zero_grad=False`` plants the classic bug,
    ``after_step`` runs right after each ``optimizer.step()`` (a scheduler, a second optimizer)."""
    criterion = torch.nn.MSELoss()
    optimizer.zero_grad()
    for i, (inputs, labels) in enumerate(data):
        loss = criterion(model(inputs), labels) / accumulation_steps
        loss.backward()
        if (i + 1) % accumulation_steps == 0:
            optimizer.step()
            if after_step is not None:
                after_step()
            if zero_grad:
                optimizer.zero_grad()


def watch(model, optimizer, **kwargs) -> Watcher:
    kwargs.setdefault("on_finding", "record")
    return gradwatch.watch(model, optimizer, **kwargs)


def bugs(w: Watcher) -> list[Finding]:
    """Findings of severity error or warning."""
    return [f for f in w.findings if f.severity != "info"]


def kinds(w: Watcher) -> set[str]:
    return {f.kind for f in w.findings}


def the(w: Watcher, kind: str) -> Finding:
    """The single finding of ``kind``."""
    found = [f for f in w.findings if f.kind == kind]
    assert len(found) == 1, f"expected one {kind} finding, got {w.findings}"
    return found[0]


def mse(model, inputs, labels, scale: float = 1.0) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(inputs), labels) / scale


def window_size(i: int, n: int, accumulation: int) -> int:
    """Micro-batches in the window holding micro-batch ``i`` of an epoch of ``n`` (the last one may be short):
    what each micro-batch's loss is divided by, so that every window's gradient is its mean."""
    return min(accumulation, n - (i // accumulation) * accumulation)


def gan():
    """A tiny GAN container (generator 'g', discriminator 'd') with one optimizer each, and its batches."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"g": torch.nn.Linear(4, 8), "d": torch.nn.Linear(8, 1)})
    opt_g = torch.optim.Adam(model["g"].parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(model["d"].parameters(), lr=1e-3)
    batches = [(torch.randn(6, 8), torch.randn(6, 4)) for _ in range(4)]
    return model, opt_g, opt_d, batches


def gan_iteration(model, opt_g, opt_d, real, z, zero_generator=True):
    """One DCGAN-style iteration: D on real and detached fake, then G through D."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    g, d = model["g"], model["d"]
    opt_d.zero_grad()
    fake = g(z)
    d_loss = bce(d(real), torch.ones(6, 1)) + bce(d(fake.detach()), torch.zeros(6, 1))
    d_loss.backward()
    opt_d.step()
    if zero_generator:
        opt_g.zero_grad()
    g_loss = bce(d(fake), torch.ones(6, 1))  # reaches the discriminator too: a by-product, cleared next time
    g_loss.backward()
    opt_g.step()


LIFECYCLE_OPS = ("backward", "step", "zero_none", "zero_keep", "model_zero", "clip")  # and "none_<parameter name>"


def run_lifecycle_ops(model, forward, optimizer, ops, inputs, labels) -> None:
    """Run named gradient-lifecycle operations on ``model``, its passes through ``forward`` (a wrapper, or the
    model itself): ``LIFECYCLE_OPS``, and ``none_<name>`` for ``<name>.grad = None`` by hand."""
    params = dict(model.named_parameters())
    for op in ops:
        if op == "backward":
            torch.nn.functional.mse_loss(forward(inputs), labels).backward()
        elif op == "step":
            optimizer.step()
        elif op in ("zero_none", "zero_keep"):
            optimizer.zero_grad(set_to_none=op == "zero_none")
        elif op == "model_zero":
            model.zero_grad()
        elif op == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        elif op.startswith("none_"):
            params[op[len("none_") :]].grad = None
        else:
            raise ValueError(f"unknown lifecycle op {op!r}")


def lifecycle_findings(ops, accumulation_steps, wrap: Callable = lambda model: model) -> list[tuple]:
    """(kind, params, step, count) of each finding the named lifecycle ops get on a two-layer model, its passes
    through ``wrap(model)`` (which may also shard it in place: the optimizer is built after it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 1))
    wrapped = wrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, labels = torch.randn(2, 10), torch.zeros(2, 1)
    with gradwatch.watch(wrapped, optimizer, accumulation_steps, on_finding="record", audit_losses=False) as w:
        run_lifecycle_ops(model, wrapped, optimizer, ops, inputs, labels)
    assert w.stopped is None
    return [(f.kind, f.params, f.step, f.count) for f in w.findings]
