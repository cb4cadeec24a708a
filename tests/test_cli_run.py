"""gradwatch run: an unmodified script, attached through PyTorch's global hooks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gradwatch.cli import main

SCRIPT = """
import sys
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(10, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


torch.manual_seed(0)
model = Net()
bug = sys.argv[1] if len(sys.argv) > 1 else "none"
params = model.body.parameters() if bug == "orphan" else model.parameters()
opt = torch.optim.SGD(params, lr=0.01)
opt.zero_grad()
for i in range(8):
    x, y = torch.randn(4, 10), torch.randn(4, 1)
    (torch.nn.functional.mse_loss(model(x), y) / (1 if bug == "unscaled" else 2)).backward()
    if (i + 1) % 2 == 0:
        opt.step()
        if bug != "missing":
            opt.zero_grad()
if bug == "exit3":
    sys.exit(3)
print("script done")
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return str(path)


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "gradwatch", "run", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_clean_script_exits_0_with_a_clean_report(script):
    result = _run("--accumulation-steps", "2", script)
    assert result.returncode == 0, result.stderr
    assert "script done" in result.stdout
    assert "no findings" in result.stderr
    assert "optimizer steps:    4" in result.stderr


def test_missing_zero_grad_in_a_plain_script(script):
    result = _run("--accumulation-steps", "2", script, "missing")
    assert result.returncode == 1
    assert "uncleared-gradient at step 1" in result.stderr
    assert "Net.body.weight, Net.body.bias, Net.head.weight, Net.head.bias" in result.stderr


def test_orphan_layer_in_a_plain_script(script):
    result = _run(script, "orphan")
    assert result.returncode == 1
    assert "orphan-gradient" in result.stderr
    assert "params: Net.head.weight, Net.head.bias" in result.stderr


def test_an_unscaled_loss_in_a_plain_script(script):
    result = _run("--accumulation-steps", "2", script, "unscaled")
    assert result.returncode == 0  # a warning: `gradwatch run` fails on errors only
    assert "loss-scale at step 1" in result.stderr  # the first window (adopted at the attach) is not weighed
    line = next(n for n, text in enumerate(SCRIPT.splitlines(), 1) if "opt.step()" in text)
    assert f"{script}:{line}: GradientWarning: gradwatch: loss-scale" in result.stderr  # the step that applied it
    assert "loss-scale" not in _run("--accumulation-steps", "2", "--no-loss-audit", script, "unscaled").stderr


def test_exit_status_of_the_script_and_no_fail(script):
    assert _run(script, "exit3").returncode == 3
    result = _run("--no-fail", "--on-finding", "record", script, "missing")
    assert result.returncode == 0
    assert "uncleared-gradient" in result.stderr


def test_global_hooks_are_removed_after_the_run(script, capsys):
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as optim_module

    before = (len(nn_module._global_forward_pre_hooks), len(optim_module._global_optimizer_pre_hooks))
    assert main(["run", "--on-finding", "record", script]) == 0
    after = (len(nn_module._global_forward_pre_hooks), len(optim_module._global_optimizer_pre_hooks))
    assert after == before
    assert len(nn_module._global_forward_hooks) == 0
    assert torch.nn.Module.zero_grad.__name__ == "zero_grad"


def test_a_script_that_never_steps(tmp_path):
    path = tmp_path / "nostep.py"
    path.write_text("import torch\nprint(torch.nn.Linear(2, 2)(torch.ones(1, 2)).sum().item())\n")
    result = _run(str(path))
    assert result.returncode == 3  # nothing was checked: never the exit status of a clean run
    assert "never called optimizer.step()" in result.stderr and "NOTHING WAS CHECKED" in result.stderr
    assert _run("--allow-unwatched", str(path)).returncode == 0
    assert _run(str(tmp_path / "missing.py")).returncode == 2


ACCELERATE_SCRIPT = """
import sys
import torch
import accelerate

torch.manual_seed(0)
accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model, opt = accelerator.prepare(model, opt)
for i in range(8):
    with accelerator.accumulate(model):
        x, y = torch.randn(4, 10), torch.randn(4, 1)
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        opt.step()
        if sys.argv[1:] != ["missing"]:
            opt.zero_grad()
print("script done")
"""

COMPILE_SCRIPT = """
import sys
import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
compiled = torch.compile(model, backend="aot_eager")
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for i in range(8):
    x, y = torch.randn(4, 10), torch.randn(4, 1)
    torch.nn.functional.mse_loss(compiled(x), y).backward()
    opt.step()
    if sys.argv[1:] != ["missing"]:
        opt.zero_grad()
print("script done")
"""


@pytest.mark.parametrize("kind", ["accelerate", "compile"])
def test_accelerate_and_compile_scripts_are_watched(kind, tmp_path):
    if kind == "accelerate":
        pytest.importorskip("accelerate")
    path = tmp_path / "train.py"
    path.write_text(ACCELERATE_SCRIPT if kind == "accelerate" else COMPILE_SCRIPT)
    clean = _run("--accumulation-steps", "2" if kind == "accelerate" else "1", str(path))
    assert clean.returncode == 0, clean.stderr
    assert "no findings" in clean.stderr and "could not attach" not in clean.stderr.lower()
    buggy = _run("--on-finding", "warn", str(path), "missing")
    assert buggy.returncode == 1, buggy.stderr
    assert "uncleared-gradient" in buggy.stderr
    assert "_orig_mod" not in buggy.stderr  # the user's module names, not torch.compile's wrapper
    # the warning points at the user's line (opt.step()), not into torch, accelerate or runpy
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "opt.step()" in text)
    assert f"{path}:{line}: GradientWarning" in buggy.stderr, buggy.stderr


def test_a_script_that_cannot_be_attached_fails_loudly(tmp_path, monkeypatch):
    from gradwatch import autoattach

    def broken(self):
        raise RuntimeError("no model found")

    monkeypatch.setattr(autoattach.AutoAttach, "_attach", broken)
    path = tmp_path / "train.py"
    path.write_text(COMPILE_SCRIPT)
    assert main(["run", str(path)]) == 3
    assert main(["run", "--allow-unwatched", str(path)]) == 0


def test_a_run_whose_checking_stopped_is_not_a_clean_run(tmp_path):
    path = tmp_path / "train.py"
    tail = [
        "import torch._dynamo.compiled_autograd as ca",
        "with ca._enable(torch.compile(backend='eager')):",
        "    torch.nn.functional.mse_loss(model(torch.randn(4, 10)), torch.randn(4, 1)).backward()",
        "    opt.step()",
    ]
    path.write_text(COMPILE_SCRIPT + "\n".join(tail) + "\n")
    result = _run(str(path))
    assert result.returncode == 3, result.stderr
    assert "CHECKING STOPPED" in result.stderr and "compiled autograd" in result.stderr


FSDP2_SCRIPT = """
import socket
import sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
opt.zero_grad()
for i in range(8):
    last = (i + 1) % 2 == 0
    model.set_requires_gradient_sync(last)  # FSDP2's no_sync on the window's first pass
    (torch.nn.functional.mse_loss(model(torch.randn(4, 10)), torch.randn(4, 1)) / 2).backward()
    if last:
        opt.step()
        if sys.argv[1:] != ["missing"]:
            opt.zero_grad()
dist.destroy_process_group()
print("script done")
"""


def test_an_fsdp2_script_accumulating_with_the_sync_off_is_watched(tmp_path):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_gloo_available():
        pytest.skip("needs FSDP2 and gloo")
    path = tmp_path / "train.py"
    path.write_text(FSDP2_SCRIPT)
    clean = _run("--accumulation-steps", "2", str(path))
    assert clean.returncode == 0, clean.stderr
    assert "no findings" in clean.stderr
    buggy = _run("--on-finding", "warn", str(path), "missing")
    assert buggy.returncode == 1, buggy.stderr
    assert "uncleared-gradient" in buggy.stderr
    assert "Sequential.0.weight" in buggy.stderr and "FSDPSequential" not in buggy.stderr  # the script's class
