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
    (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
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
    assert result.returncode == 0
    assert "never called optimizer.step()" in result.stderr
    assert _run(str(tmp_path / "missing.py")).returncode == 2
