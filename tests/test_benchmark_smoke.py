"""benchmarks/overhead.py runs end to end (one tiny round; correctness of the script, no timing assertions)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"


def test_benchmark_runs_one_quick_round(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["workloads"]) == {"seed", "mlp", "transformer", "many-params"}
    for rows in results["workloads"].values():
        assert {"bare", "floor", "detect", "tensorboard", "add_histogram-peer"} <= set(rows)
        assert rows["bare"]["ratio_to_bare"] == 1.0
        assert all(row["seconds_per_step"] > 0 for row in rows.values())
    assert set(results["peak_rss_mb"]) >= {"bare", "detect", "tensorboard"}
    assert "x floor overhead" in result.stdout
