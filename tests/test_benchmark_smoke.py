"""benchmarks/overhead.py runs end to end (one tiny round; correctness of the script, no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

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
    assert {t["verdict"] for t in results["targets"]} <= {"met", "missed", "met?", "missed?", "noise"}


def _overhead_module():
    spec = importlib.util.spec_from_file_location("overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("overhead", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _judge(overhead, seconds: dict[str, list[float]]) -> dict[str, str]:
    results = {"workloads": {"many-params": overhead.summarize(seconds)}}
    return {t["target"]: t["verdict"] for t in overhead.judge_targets(results)}


FLOOR_TARGET = "detection <= 1.3x the floor's overhead on many-params"


def test_a_variant_within_the_floors_noise_is_judged_only_when_every_round_meets_the_target():
    overhead = _overhead_module()
    rows = overhead.summarize({"bare": [1.0, 1.0, 1.0], "floor": [1.02, 1.06, 1.01], "detect": [1.05, 1.03, 1.04]})
    assert rows["detect"]["outside_floor_noise"] is False
    assert rows["detect"]["ratio_range"] == pytest.approx([1.03, 1.05])
    # 2.5x, 0.5x and 4x the floor's overhead, all inside the floor's own spread: this run cannot tell
    assert _judge(overhead, {"bare": [1.0] * 3, "floor": [1.02, 1.06, 1.01], "detect": [1.05, 1.03, 1.04]}) == {
        FLOOR_TARGET: "noise"
    }
    assert _judge(overhead, {"bare": [1.0] * 3, "floor": [1.02, 1.06, 1.04], "detect": [1.02, 1.05, 1.03]}) == {
        FLOOR_TARGET: "met"
    }


@pytest.mark.parametrize(
    "detect, verdict",
    [
        ([1.12, 1.12, 1.12], "met"),  # 1.2x the floor's overhead in every round
        ([1.5, 1.6, 1.55], "missed"),
        ([1.12, 1.14, 1.2], "missed?"),  # 1.2x, 1.4x, 2x: the rounds straddle 1.3x, the median misses
        ([1.12, 1.12, 1.2], "met?"),
    ],
)
def test_the_verdict_says_whether_every_round_meets_the_target(detect, verdict):
    overhead = _overhead_module()
    seconds = {"bare": [1.0] * 3, "floor": [1.1] * 3, "detect": detect}
    assert _judge(overhead, seconds) == {FLOOR_TARGET: verdict}


def test_a_comparison_with_a_peer_stands_round_by_round_even_inside_the_floors_noise():
    overhead = _overhead_module()
    seconds = {
        "bare": [1.0] * 3,
        "floor": [0.9, 1.3, 1.0],
        "tensorboard": [1.2, 1.25, 1.1],  # inside the floor's spread
        "grad_norm-peer": [1.1, 1.2, 1.05],  # below it in every round
    }
    verdicts = {
        t["target"]: t["verdict"] for t in overhead.judge_targets({"workloads": {"mlp": overhead.summarize(seconds)}})
    }
    assert verdicts == {"TensorBoard <= Lightning's grad_norm logging on mlp": "missed"}
