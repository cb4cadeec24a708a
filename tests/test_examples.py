"""The examples run as users run them, as scripts."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_reference_loop_example_is_clean():
    result = _run("reference_loop.py")
    assert result.returncode == 0, result.stderr
    assert "no findings" in result.stdout
    assert "GradientWarning" not in result.stderr


def test_missing_zero_grad_example_names_the_bug():
    result = _run("missing_zero_grad.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GradientWarning: gradwatch: uncleared-gradient: backward pass 2" in result.stderr
    assert "found: ['uncleared-gradient']" in result.stdout
    assert "gradient clears:    1" in result.stdout


def test_pytest_suite_example_catches_the_missing_zero_grad():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(EXAMPLES / "pytest_suite")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 xfailed" in result.stdout


def test_transformer_amp_clipping_example_is_clean():
    result = _run("transformer_amp_clipping.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[info] skipped-step at step 1, backward 2" in result.stdout  # the spike's window, taken for what it is
    assert "[error]" not in result.stdout and "[warning]" not in result.stdout


def test_lightning_example_is_clean():
    pytest.importorskip("pytorch_lightning")
    result = _run("lightning_fit.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no findings" in result.stdout


def test_ddp_example_reports_the_redundant_sync_on_both_ranks(tmp_path):
    result = _run("ddp_accumulation.py", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0: ['redundant-sync']" in result.stdout and "rank 1: ['redundant-sync']" in result.stdout
    assert "across 2 ranks: every step consumed the same number of backward passes" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]


def test_hugging_face_trainer_example_is_clean():
    pytest.importorskip("transformers")
    result = _run("hf_trainer.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no findings" in result.stdout
    assert "optimizer steps:    6" in result.stdout  # 3 windows per epoch, the last one short
    assert "gradwatch-trace.jsonl" in result.stdout  # the trace next to the Trainer's TensorBoard logs


def test_fsdp2_example_names_the_bug_on_both_ranks(tmp_path):
    result = _run("fsdp2_accumulation.py", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    found = "[('uncleared-gradient', ('0.weight', '0.bias', '2.weight', '2.bias'))]"  # every shard is non-empty
    assert f"rank 0: {found}" in result.stdout and f"rank 1: {found}" in result.stdout
    assert "across 2 ranks: every step consumed the same number of backward passes" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]
