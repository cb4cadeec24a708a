"""DistributedDataParallel: two gloo ranks on 127.0.0.1, spawned once for every scenario, bounded in time."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import LIFECYCLE_OPS, lifecycle_findings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.parallel import DistributedDataParallel as DDP

import gradwatch
from gradwatch import load_trace
from gradwatch.cli import main
from gradwatch.ranks import load_rank_traces, rank_divergence

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
RANKS = (0, 1)
PARAMS = ["0.weight", "0.bias", "1.weight", "1.bias"]  # the wrapped module's names, without DDP's "module."


def _kinds(findings):
    return [(f["kind"], f["step"], f["backward"], f["count"]) for f in findings]


@pytest.mark.parametrize("scenario", ["no_sync", "no_sync_bucket_view", "no_sync_bucket_view_zeroed"])
def test_accumulation_with_no_sync_is_clean_on_every_rank(ddp_run, scenario):
    _, results = ddp_run
    assert [results[r][scenario] for r in RANKS] == [[], []]


@pytest.mark.parametrize("scenario", ["missing_zero_grad_plain", "missing_zero_grad"], ids=["copies", "bucket-views"])
def test_missing_zero_grad_is_found_on_every_rank(ddp_run, scenario):
    _, results = ddp_run
    for r in RANKS:
        (finding,) = results[r][scenario]
        assert _kinds([finding]) == [("uncleared-gradient", 1, 2, 3)]
        assert finding["params"] == PARAMS


def test_the_loss_weight_audit_judges_each_rank_on_its_own(ddp_run):
    """DDP averages the gradients across ranks after the loss: each rank's window must still be its own mean."""
    _, results = ddp_run
    for r in RANKS:
        (finding,) = results[r]["unscaled_loss"]
        assert (finding["kind"], finding["step"]) == ("loss-scale", 0)
        assert "2x the window's mean" in finding["message"]


def test_all_reduce_on_every_backward_of_a_window_is_a_redundant_sync(ddp_run):
    _, results = ddp_run
    for r in RANKS:
        (finding,) = results[r]["sync_every_backward"]
        assert (finding["kind"], finding["severity"]) == ("redundant-sync", "warning")
        assert _kinds([finding]) == [("redundant-sync", 0, 0, 4)]  # every window; backward 0 wasted first
        assert "1 of the 2 backward passes" in finding["message"] and "50%" in finding["message"]
        assert "model.no_sync()" in finding["message"]


def test_zero_grad_inside_a_no_sync_window_discards_it(ddp_run):
    _, results = ddp_run
    for r in RANKS:
        assert _kinds(results[r]["zero_grad_in_window"]) == [
            ("discarded-gradient", 0, 1, 4),
            ("accumulation-mismatch", 0, 2, 4),
        ]


def test_each_rank_writes_its_own_tensorboard_run_and_trace(ddp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = ddp_run
    for r in RANKS:
        run = out / "no_sync" / f"rank{r}"
        trace = load_trace(run)
        assert (trace.run["rank"], trace.run["world_size"], list(trace.params)) == (r, 2, PARAMS)
        assert [e["synced"] for e in trace.of("backward")] == [False, True] * 4  # no_sync, then the last pass
        events = EventAccumulator(str(run))
        events.Reload()
        assert [e.value for e in events.Scalars("lifecycle/allreduce")] == [0.0, 1.0] * 4


def test_report_over_the_rank_traces_finds_rank_divergence(ddp_run, capsys):
    out, results = ddp_run
    assert results[0]["divergent"] == []  # rank 0 alone sees nothing wrong
    assert _kinds(results[1]["divergent"]) == [("accumulation-mismatch", 1, 5, 1)]
    assert main(["report", str(out / "divergent")]) == 1
    text = capsys.readouterr().out
    assert "rank-divergence at step 1" in text
    assert "rank 0 consumed 2 backward pass(es), rank 1 consumed 3 backward pass(es)" in text
    (finding,) = rank_divergence(load_rank_traces(out / "divergent"))
    assert (finding.kind, finding.severity, finding.step) == ("rank-divergence", "error", 1)
    assert finding.params == tuple(PARAMS)


def test_report_over_agreeing_ranks_is_clean(ddp_run, capsys):
    out, _ = ddp_run
    assert main(["report", str(out / "no_sync")]) == 0
    assert "across 2 ranks: every step consumed the same number of backward passes" in capsys.readouterr().out


def test_training_numbers_under_ddp_are_identical_bit_for_bit(ddp_run):
    _, results = ddp_run
    assert [results[r]["weights_unchanged_by_the_watch"] for r in RANKS] == [True, True]


def test_a_raise_from_backward_leaves_ddp_usable(ddp_run):
    _, results = ddp_run
    for r in RANKS:
        assert results[r]["raise_then_train"] == {"raised": 1, "steps": [8], "kinds": ["orphan-gradient"]}


def test_one_rank_has_no_communication_to_waste(tmp_path, one_rank):
    """DDP over a world of one: no redundant-sync about ranks."""
    from ddp_scenarios import _loop

    w, _ = _loop(0, str(tmp_path), use_no_sync=False)
    assert w is not None and w.findings == []


def _set_to_none_inside_each_window(wrap) -> list[tuple]:
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1)
    wrapped = wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(wrapped, opt, 2, on_finding="record", audit_losses=False) as w:
        for i in range(8):
            if i % 2:
                model.weight.grad = None  # inside the window: drops the weight's first pass
            wrapped(torch.randn(4, 10)).sum().backward()
            if i % 2:
                opt.step()
                opt.zero_grad()
    return [(f.kind, f.params, f.step, f.count) for f in w.findings]


@pytest.mark.parametrize("bucket_view", [False, True])
def test_a_grad_set_to_none_by_hand_inside_the_window_is_seen_unless_ddp_rebinds_it(one_rank, bucket_view):
    """Without ``gradient_as_bucket_view`` DDP keeps the .grad tensor until a clear, so a new one after
    ``p.grad = None`` tells the clear, and the findings are the unsharded model's; with it DDP hands back the same
    bucket view after the clear, which cannot be told (README)."""
    unsharded = _set_to_none_inside_each_window(lambda model: model)
    under_ddp = _set_to_none_inside_each_window(lambda model: DDP(model, gradient_as_bucket_view=bucket_view))
    assert unsharded == [("discarded-gradient", ("weight",), 0, 4)]  # each window loses the weight's first pass
    assert under_ddp == ([] if bucket_view else unsharded)


DDP_LOOP_OPS = st.lists(st.sampled_from([*LIFECYCLE_OPS, "none_1.bias"]), max_size=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=DDP_LOOP_OPS, accumulation_steps=st.sampled_from([None, 2]))
def test_ddp_over_one_rank_gets_the_findings_of_the_model_alone(one_rank, ops, accumulation_steps):
    """DDP (without bucket views, over one rank: no communication to waste) is only another path into .grad: any
    loop of backward, step, clears and clips gets the findings the model alone gets."""

    assert lifecycle_findings(ops, accumulation_steps, DDP) == lifecycle_findings(ops, accumulation_steps)
