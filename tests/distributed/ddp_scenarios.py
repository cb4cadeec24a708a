"""Training loops run by each rank of the DDP and FSDP2 tests (imported by the spawned processes, not collected)."""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradwatch

ACC = 2
N_BATCHES = 8
FSDP2_BUGS = (
    None,
    "missing-zero-grad",
    "zero-grad-in-window",
    "no-backward",
    "declared-larger",
    "layer-out",
    "nan",
    "sync-every-pass",
    "sync-never-on",
    "sync-on-first-pass",
)


def _setup(rank: int, bucket_view: bool = False) -> tuple[DDP, torch.optim.Optimizer, list]:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Linear(8, 1)), gradient_as_bucket_view=bucket_view)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
    data = [(torch.randn(4, 10, generator=g), torch.randn(4, 1, generator=g)) for _ in range(N_BATCHES)]
    return model, torch.optim.SGD(model.parameters(), lr=0.01), data


def _micro_batch(model: DDP, x: torch.Tensor, y: torch.Tensor, sync: bool, divisor: int = ACC) -> None:
    if sync:
        (torch.nn.functional.mse_loss(model(x), y) / divisor).backward()
    else:
        with model.no_sync():
            (torch.nn.functional.mse_loss(model(x), y) / divisor).backward()


def _loop(
    rank: int,
    logdir: str,
    *,
    bucket_view: bool = False,
    set_to_none: bool = True,
    use_no_sync: bool = True,
    zero_grad: bool = True,
    zero_grad_in_window: bool = False,
    extra_backward_on_rank1: bool = False,
    watched: bool = True,
    loss_divisor: int = ACC,
) -> tuple[gradwatch.Watcher | None, list[torch.Tensor]]:
    model, opt, data = _setup(rank, bucket_view)
    w = gradwatch.watch(model, opt, accumulation_steps=ACC, logdir=logdir, on_finding="record") if watched else None
    with w or contextlib.nullcontext():
        opt.zero_grad(set_to_none=set_to_none)
        for i, (x, y) in enumerate(data):
            last_of_window = (i + 1) % ACC == 0
            if extra_backward_on_rank1 and rank == 1 and i == 2:
                _micro_batch(model, x, y, sync=False)  # a rank-dependent extra pass (local: no collective)
            _micro_batch(model, x, y, sync=last_of_window or not use_no_sync, divisor=loss_divisor)
            if zero_grad_in_window and not last_of_window:
                opt.zero_grad(set_to_none=set_to_none)
            if last_of_window:
                opt.step()
                if zero_grad:
                    opt.zero_grad(set_to_none=set_to_none)
    return w, [p.detach().clone() for p in model.parameters()]


def _findings(rank: int, logdir: str, **loop: bool) -> list[dict]:
    w, _ = _loop(rank, logdir, **loop)
    assert w is not None
    return [
        {
            "kind": f.kind,
            "severity": f.severity,
            "step": f.step,
            "backward": f.backward,
            "params": list(f.params),
            "count": f.count,
            "message": f.message,
        }
        for f in w.findings
    ]


def _unchanged(rank: int, logdir: str) -> bool:
    """The same buggy DDP run with and without the watch ends with the same weights, bit for bit."""
    _, plain = _loop(rank, logdir, bucket_view=True, zero_grad=False, watched=False)
    _, watched = _loop(rank, logdir, bucket_view=True, zero_grad=False)
    return all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


def _raise_then_train(rank: int, logdir: str) -> dict:
    """on_finding="raise" from the end of a backward pass under DDP: caught, then training goes on."""
    model, _, data = _setup(rank)
    opt = torch.optim.SGD(model.module[1].parameters(), lr=0.01)  # the first layer is left out: an orphan
    w = gradwatch.watch(model, opt, on_finding="raise")
    raised = 0
    for x, y in data:
        try:
            torch.nn.functional.mse_loss(model(x), y).backward()
        except gradwatch.GradientBugError:
            raised += 1
        opt.step()
        opt.zero_grad()
        model.module[0].zero_grad()
    w.detach()
    return {"raised": raised, "steps": w._tracker.ledger.steps, "kinds": [f.kind for f in w.findings]}


def _fsdp2_loop(
    rank: int,
    logdir: str | None,
    *,
    bug: str | None = None,
    watched: bool = True,
    mixed_precision: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> tuple[gradwatch.Watcher | None, list[torch.Tensor]]:
    """The reference accumulation loop on a model sharded with ``fully_shard`` (each layer and the root), with the
    gradient sync off for every backward pass of a window but its last (FSDP2's ``no_sync``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Linear(8, 1))
    policy = {}
    if mixed_precision is not None:  # bf16 parameters, gradients reduced in ``mixed_precision``
        policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=mixed_precision)}
    if cpu_offload:  # pinned memory needs an accelerator
        policy["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    for layer in model:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    params = model[0].parameters() if bug == "layer-out" else model.parameters()
    opt = torch.optim.SGD(params, lr=0.01)
    g = torch.Generator().manual_seed(100 + rank)
    data = [(torch.randn(4, 10, generator=g), torch.randn(4, 1, generator=g)) for _ in range(N_BATCHES)]
    if bug == "nan":
        data[3] = (torch.full((4, 10), float("nan")), data[3][1])
    declared = ACC + 1 if bug == "declared-larger" else ACC
    w = gradwatch.watch(model, opt, declared, logdir=logdir, on_finding="record") if watched else None
    with w or contextlib.nullcontext():
        opt.zero_grad()
        for i, (x, y) in enumerate(data):
            last = (i + 1) % ACC == 0
            sync = {"sync-never-on": False, "sync-on-first-pass": i % ACC == 0}.get(bug, last)
            if bug not in ("sync-every-pass", "zero-grad-in-window"):  # (held passes survive a clear: no bug there)
                model.set_requires_gradient_sync(sync)
            if bug == "zero-grad-in-window":
                opt.zero_grad()
            if not (bug == "no-backward" and i < ACC):
                (torch.nn.functional.mse_loss(model(x), y) / ACC).backward()
            if last:
                opt.step()
                if bug != "missing-zero-grad":
                    opt.zero_grad()
    return w, [p.full_tensor().detach().clone() for p in model.parameters()]


def _fsdp2(rank: int, logdir: str, **loop: Any) -> dict:
    w, _ = _fsdp2_loop(rank, logdir, **loop)
    assert w is not None
    left = [p for p in w._tracker._params if p() is not None and p()._post_accumulate_grad_hooks]
    return {
        "findings": [
            {"kind": f.kind, "params": list(f.params), "step": f.step, "count": f.count, "message": f.message}
            for f in w.findings
        ],
        "stopped": w.stopped,
        "hooks_left": len(left),
    }


def _fsdp2_unchanged(rank: int, logdir: str) -> bool:
    _, plain = _fsdp2_loop(rank, None, bug="missing-zero-grad", watched=False)
    _, watched = _fsdp2_loop(rank, None, bug="missing-zero-grad")
    return all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


SCENARIOS: dict[str, Callable[[int, str], Any]] = {
    "raise_then_train": _raise_then_train,
    "no_sync": lambda rank, logdir: _findings(rank, logdir),
    "no_sync_bucket_view": lambda rank, logdir: _findings(rank, logdir, bucket_view=True),
    "no_sync_bucket_view_zeroed": lambda rank, logdir: _findings(rank, logdir, bucket_view=True, set_to_none=False),
    "missing_zero_grad": lambda rank, logdir: _findings(rank, logdir, bucket_view=True, zero_grad=False),
    "missing_zero_grad_plain": lambda rank, logdir: _findings(rank, logdir, zero_grad=False),
    "sync_every_backward": lambda rank, logdir: _findings(rank, logdir, use_no_sync=False),
    "zero_grad_in_window": lambda rank, logdir: _findings(rank, logdir, bucket_view=True, zero_grad_in_window=True),
    "divergent": lambda rank, logdir: _findings(rank, logdir, extra_backward_on_rank1=True),
    "unscaled_loss": lambda rank, logdir: _findings(rank, logdir, loss_divisor=1),
    "weights_unchanged_by_the_watch": _unchanged,
    **{f"fsdp2_{bug or 'clean'}": functools.partial(_fsdp2, bug=bug) for bug in FSDP2_BUGS},
    "fsdp2_mixed_precision_bf16": lambda rank, logdir: _fsdp2(rank, logdir, mixed_precision=torch.bfloat16),
    "fsdp2_mixed_precision_fp32": lambda rank, logdir: _fsdp2(rank, logdir, mixed_precision=torch.float32),
    "fsdp2_cpu_offload": lambda rank, logdir: _fsdp2(rank, logdir, cpu_offload=True),
    "fsdp2_cpu_offload_missing-zero-grad": lambda rank, logdir: _fsdp2(
        rank, logdir, bug="missing-zero-grad", cpu_offload=True
    ),
    "fsdp2_weights_unchanged_by_the_watch": _fsdp2_unchanged,
    # every pass reduce-scatters on both ranks (the collectives must match); rank 1 clears inside each window
    "fsdp2_divergent": lambda rank, logdir: _fsdp2(
        rank, logdir, bug="zero-grad-in-window" if rank else "sync-every-pass"
    ),
}


def run_rank(rank: int, world_size: int, port: int, out_dir: str, names: list[str]) -> None:
    """Entry point of one spawned rank: run the scenarios, write this rank's findings as JSON."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    try:
        for name in names:
            results[name] = SCENARIOS[name](rank, os.path.join(out_dir, name))
        path = os.path.join(out_dir, f"rank{rank}.json")
        with open(path + ".part", "w") as f:  # complete or absent: the teardown below has been seen to abort
            json.dump(results, f)
        os.replace(path + ".part", path)
    finally:
        dist.destroy_process_group()
