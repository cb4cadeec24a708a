"""FSDP2 (`fully_shard`) with gradient accumulation on two CPU processes (gloo, 127.0.0.1).

Run it as `python examples/fsdp2_accumulation.py [logdir]`. Each layer and the root are sharded; the
gradient sync is off for every backward pass of a window but its last (FSDP2's `no_sync`: only the last
pass reduce-scatters, the window's whole gradient at once). The loop forgets `optimizer.zero_grad()` after
the second step, and gradwatch names the parameters each rank holds a shard of. Each rank writes its own
TensorBoard run and trace (`<logdir>/rank0`, `<logdir>/rank1`); `gradwatch report <logdir>` then checks that
the ranks agree.
"""

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import gradwatch
from gradwatch.cli import main as gradwatch_cli

ACCUMULATION_STEPS = 2


def train(rank: int, world_size: int, port: int, logdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # over the sharded parameters
    g = torch.Generator().manual_seed(rank)  # each rank its own shard of the data
    batches = [(torch.randn(4, 10, generator=g), torch.randn(4, 2, generator=g)) for _ in range(8)]

    with gradwatch.watch(model, optimizer, ACCUMULATION_STEPS, logdir=logdir, on_finding="record") as watcher:
        optimizer.zero_grad()
        for i, (inputs, labels) in enumerate(batches):
            last_of_window = (i + 1) % ACCUMULATION_STEPS == 0
            model.set_requires_gradient_sync(last_of_window)
            loss = torch.nn.functional.mse_loss(model(inputs), labels) / ACCUMULATION_STEPS
            loss.backward()
            if last_of_window:
                optimizer.step()
                if i != 3:  # the bug: no zero_grad() after the second step
                    optimizer.zero_grad()
    print(f"rank {rank}: {[(f.kind, f.params) for f in watcher.findings]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    logdir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gradwatch-fsdp2-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(train, args=(2, port, logdir), nprocs=2)
    print(f"\nper-rank logs in {os.path.abspath(logdir)}; across the ranks:")
    gradwatch_cli(["report", logdir])
