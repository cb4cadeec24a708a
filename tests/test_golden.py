"""What a user reads, compared with files kept in tests/golden (as torchinfo keeps its printed summaries).

A change to a report or a message shows up here as a diff to review. ``GRADWATCH_UPDATE_GOLDEN=1 pytest
tests/test_golden.py`` rewrites the files; commit them with the change that explains them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradwatch.demo import run_demo
from gradwatch.sinks.tensorboard import findings_table

GOLDEN = Path(__file__).parent / "golden"
BUGS = ["none", "missing-zero-grad", "zero-grad-in-window", "orphan-layer", "nan", "unscaled-loss", "mean-of-means"]


def _compare(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("GRADWATCH_UPDATE_GOLDEN"):
        path.write_text(text + "\n", encoding="utf-8")
    assert path.exists(), f"{path} is missing: run with GRADWATCH_UPDATE_GOLDEN=1 to write it"
    assert text + "\n" == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("bug", BUGS)
def test_report_and_findings_table(bug):
    watcher = run_demo(bug)
    _compare(f"report-{bug}.out", watcher.report())
    _compare(f"findings-table-{bug}.md", findings_table(watcher.findings))
