"""The gradwatch command: demo and report, their output and exit status."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from gradwatch import KINDS
from gradwatch.cli import main
from gradwatch.demo import BUGS

EXPECTED = {
    "none": set(),
    "missing-zero-grad": {"uncleared-gradient"},
    "zero-grad-in-window": {"discarded-gradient", "accumulation-mismatch"},
    "zero-grad-before-step": {"discarded-gradient", "empty-step"},
    "no-backward": {"empty-step", "unused-parameter"},
    "double-step": {"stale-gradient"},
    "wrong-window": {"accumulation-mismatch", "dangling-gradient"},
    "partial-window": {"dangling-gradient"},
    "orphan-layer": {"orphan-gradient"},
    "nan": {"non-finite-gradient", "accumulation-mismatch"},  # later windows are all NaN and dropped: not dangling
    "unscaled-loss": {"loss-scale"},
    "mean-of-means": {"uneven-loss-weights"},
}


def test_every_demo_bug_has_an_expectation():
    assert set(EXPECTED) == set(BUGS)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_demo_and_report_agree(bug, tmp_path, capsys):
    status = main(["demo", "--bug", bug, "--logdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert {kind for kind in KINDS if f"] {kind} at step" in out} == EXPECTED[bug], out
    assert status == (0 if bug == "none" else 1)
    assert f"tensorboard --logdir {tmp_path}" in out

    status_report = main(["report", str(tmp_path)])
    report = capsys.readouterr().out
    assert status_report == status
    for kind in EXPECTED[bug]:
        assert kind in report
    if bug == "none":
        assert "no findings" in report


def test_report_on_unreadable_input_exits_2_with_a_message(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\nnor this\n")
    assert main(["report", str(bad)]) == 2
    assert "not a gradwatch trace line" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["report", "--help"]])
def test_help_on_every_command(args):
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "usage: gradwatch" in result.stdout


def test_console_script_runs_the_demo(tmp_path):
    script = shutil.which("gradwatch", path=os.path.dirname(sys.executable))
    assert script is not None, "the gradwatch console script is not installed next to this Python"
    args = [script, "demo", "--logdir", str(tmp_path), "--bug", "missing-zero-grad"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "uncleared-gradient" in result.stdout
