"""DistributedDataParallel with gradient accumulation on two CPU processes (gloo, 127.0.0.1).

Run it as `python examples/ddp_accumulation.py [logdir]`. The loop forgets `model.no_sync()` for the first
backward pass of each window: every pass all-reduces, and gradwatch reports `redundant-sync` on both ranks.
Each rank writes its own TensorBoard run and trace (`<logdir>/rank0`, `<logdir>/rank1`); then
`gradwatch report <logdir>` reads both and checks that the ranks agree.
"""

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import gradwatch
from gradwatch.cli import main as gradwatch_cli

ACCUMULATION_STEPS = 2


def train(rank: int, world_size: int, port: int, logdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(10, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = torch.nn.MSELoss()
    g = torch.Generator().manual_seed(rank)  # each rank its own shard of the data
    batches = [(torch.randn(4, 10, generator=g), torch.randn(4, 1, generator=g)) for _ in range(8)]

    with gradwatch.watch(model, optimizer, ACCUMULATION_STEPS, logdir=logdir, on_finding="record") as watcher:
        optimizer.zero_grad()
        for i, (inputs, labels) in enumerate(batches):
            loss = criterion(model(inputs), labels) / ACCUMULATION_STEPS  # the bug: no `with model.no_sync():`
            loss.backward()  # ... on the first pass of the window, so it all-reduces for nothing
            if (i + 1) % ACCUMULATION_STEPS == 0:
                optimizer.step()
                optimizer.zero_grad()
    print(f"rank {rank}: {[f.kind for f in watcher.findings]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    logdir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gradwatch-ddp-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(train, args=(2, port, logdir), nprocs=2)
    print(f"\nper-rank logs in {os.path.abspath(logdir)}; across the ranks:")
    gradwatch_cli(["report", logdir])
