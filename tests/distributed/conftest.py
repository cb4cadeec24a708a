"""Two gloo ranks on 127.0.0.1, spawned once for every scenario of ddp_scenarios.py (DDP and FSDP2), bounded
in time and always cleaned up; and a process group of one rank in this process."""

from __future__ import annotations

import datetime
import json
import socket
import time
import warnings

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from ddp_scenarios import SCENARIOS, run_rank

RANKS = (0, 1)
DEADLINE_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """Run every scenario on two ranks; return the output directory and each rank's findings per scenario.

    A rank killed by a signal (gloo aborting in its teardown, "terminate called without an active exception": seen
    in about 1 run of 15 on the 2-core machine under load) after every rank wrote its results does not matter; one
    killed before that is run again once; a scenario that raises fails at once."""
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp("ddp")
        try:
            _spawn(out)
        except mp.ProcessExitedException as error:
            if all((out / f"rank{r}.json").exists() for r in RANKS):
                warnings.warn(f"a rank died in its teardown ({error}), after writing its results", stacklevel=1)
            elif attempt == 2:
                raise
            else:
                warnings.warn(f"a rank died ({error}); running the two ranks again", stacklevel=1)
                continue
        return out, {r: json.loads((out / f"rank{r}.json").read_text()) for r in RANKS}
    raise AssertionError("unreachable")


def _spawn(out) -> None:
    args = (len(RANKS), _free_port(), str(out), list(SCENARIOS))
    context = mp.start_processes(run_rank, args=args, nprocs=len(RANKS), join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=2):  # re-raises a rank's exception with its traceback
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)


@pytest.fixture
def one_rank():
    """A process group of one gloo rank in this process (a debugging run of a distributed script)."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    yield
    dist.destroy_process_group()
