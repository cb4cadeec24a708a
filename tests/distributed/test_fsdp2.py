"""FSDP2 (``fully_shard`` on each layer and the root): the reference loop and the catalogue's bugs on two gloo
ranks (the spawn in conftest.py runs them with the DDP scenarios), and a few checks on one rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import LIFECYCLE_OPS, lifecycle_findings
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gradwatch
from gradwatch.cli import main
from gradwatch.traces import load_trace

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
    pytest.mark.skipif(not hasattr(fsdp, "fully_shard"), reason="needs FSDP2 (torch >= 2.6)"),
]
RANKS = (0, 1)
ALL = ["0.weight", "0.bias", "1.weight", "1.bias"]  # the model's own names, not FSDP's


def _on_every_rank(ddp_run, scenario):
    """Rank 0's outcome, after checking rank 1's agrees: the same kinds at the same steps, naming the parameters
    whose shard rank 1 holds (the second layer's bias and weight row are too small to shard over two ranks: rank
    1's shards of them are empty, so it cannot see them)."""
    _, results = ddp_run
    first, second = (results[r][scenario] for r in RANKS)
    assert [(f["kind"], f["step"]) for f in first["findings"]] == [(f["kind"], f["step"]) for f in second["findings"]]
    for mine, theirs in zip(first["findings"], second["findings"], strict=True):
        assert set(theirs["params"]) <= set(mine["params"])
    assert (first["stopped"], first["hooks_left"]) == (second["stopped"], second["hooks_left"])
    return first


def test_the_reference_loop_with_the_sync_off_inside_each_window_is_clean_on_every_rank(ddp_run):
    assert _on_every_rank(ddp_run, "fsdp2_clean") == {"findings": [], "stopped": None, "hooks_left": 0}


@pytest.mark.parametrize("reduce_dtype", ["bf16", "fp32"])
def test_mixed_precision_is_clean(ddp_run, reduce_dtype):
    """bf16 parameters reduced in bf16, or in fp32 (FSDP2 then keeps held passes in a separate fp32 buffer)."""
    assert _on_every_rank(ddp_run, f"fsdp2_mixed_precision_{reduce_dtype}")["findings"] == []


@pytest.mark.parametrize(
    ("bug", "expected"),
    [
        ("missing-zero-grad", [("uncleared-gradient", ALL, 1)]),
        ("zero-grad-in-window", [("discarded-gradient", ALL, 0), ("accumulation-mismatch", ALL, 0)]),
        ("sync-never-on", [("unsynced-gradient", ALL, 0), ("dangling-gradient", ALL, 4)]),
        ("sync-on-first-pass", [("unsynced-gradient", ALL, 0), ("accumulation-mismatch", ALL, 0)]),
        ("no-backward", [("empty-step", ALL, 0)]),
        ("declared-larger", [("accumulation-mismatch", ALL, 0)]),
        ("layer-out", [("orphan-gradient", ["1.weight", "1.bias"], 0)]),
        ("nan", [("non-finite-gradient", ALL, 1)]),
    ],
)
def test_each_bug_is_found_with_the_models_names(ddp_run, bug, expected):
    outcome = _on_every_rank(ddp_run, f"fsdp2_{bug}")
    found = [(f["kind"], f["params"], f["step"]) for f in outcome["findings"] if f["kind"] != "redundant-sync"]
    assert found[: len(expected)] == expected, found
    assert outcome["stopped"] is None and outcome["hooks_left"] == 0


def test_cpu_offload_is_watched_like_the_rest(ddp_run):
    """``CPUOffloadPolicy(pin_memory=False)``: pinned memory needs an accelerator, which this machine lacks."""
    assert _on_every_rank(ddp_run, "fsdp2_cpu_offload")["findings"] == []
    found = _on_every_rank(ddp_run, "fsdp2_cpu_offload_missing-zero-grad")["findings"]
    assert [(f["kind"], f["params"], f["step"]) for f in found] == [("uncleared-gradient", ALL, 1)]


def test_a_window_that_reduce_scatters_every_pass_is_redundant_sync(ddp_run):
    (finding,) = _on_every_rank(ddp_run, "fsdp2_sync-every-pass")["findings"]
    assert (finding["kind"], finding["params"], finding["step"], finding["count"]) == ("redundant-sync", ALL, 0, 4)
    assert "1 of the 2 backward passes" in finding["message"]
    assert "50% of the window's reduce-scatters" in finding["message"]
    assert "set_requires_gradient_sync(False)" in finding["message"]


def test_held_passes_are_counted_in_their_window_and_named_in_the_trace(ddp_run):
    out, _ = ddp_run
    trace = load_trace(out / "fsdp2_clean" / "rank0" / "gradwatch-trace.jsonl")
    assert [e["synced"] for e in trace.of("backward")] == [False, True] * 4
    assert all(sorted(e["params"]) == [0, 1, 2, 3] for e in trace.of("backward"))
    assert [e["window"] for e in trace.of("step")] == [2] * 4


def test_training_numbers_under_fsdp2_are_identical_bit_for_bit(ddp_run):
    _, results = ddp_run
    assert [results[r]["fsdp2_weights_unchanged_by_the_watch"] for r in RANKS] == [True, True]


def test_per_rank_traces_and_a_report_across_ranks(ddp_run, capsys):
    out, _ = ddp_run
    assert (out / "fsdp2_clean" / "rank0" / "gradwatch-trace.jsonl").exists()
    assert (out / "fsdp2_clean" / "rank1" / "gradwatch-trace.jsonl").exists()
    assert main(["report", str(out / "fsdp2_clean")]) == 0
    assert "rank-divergence" not in capsys.readouterr().out


def test_report_over_the_fsdp2_rank_traces_finds_rank_divergence(ddp_run, capsys):
    out, _ = ddp_run
    assert main(["report", str(out / "fsdp2_divergent")]) == 1
    text = capsys.readouterr().out
    assert "rank-divergence at step 0" in text
    assert "rank 0 consumed 2 backward pass(es), rank 1 consumed 1 backward pass(es)" in text


def test_detach_restores_fsdp_and_leaves_no_hook(one_rank):
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    original = FSDPParamGroup.post_backward
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 1))
    for layer in model:
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, 2, on_finding="record") as w:
        assert FSDPParamGroup.post_backward is not original
        for sync in (False, True):
            model.set_requires_gradient_sync(sync)
            (torch.nn.functional.mse_loss(model(torch.randn(2, 10)), torch.zeros(2, 1)) / 2).backward()
        opt.step()
        opt.zero_grad()
    assert (w.findings, w.stopped) == ([], None)
    assert FSDPParamGroup.post_backward is original
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    model.set_requires_gradient_sync(False)  # unwatched now: nothing reported, nothing raised
    torch.nn.functional.mse_loss(model(torch.randn(2, 10)), torch.zeros(2, 1)).backward()


def _sharded_model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 1))
    for layer in model:
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


@pytest.mark.parametrize("where", ["_reached", "_remember"])
def test_an_error_reading_fsdp_internals_stops_the_checks_and_spares_the_training(one_rank, monkeypatch, where):
    from gradwatch import fsdp2

    def broken(fsdp_param):
        raise AttributeError("FSDPParam changed")

    monkeypatch.setattr(fsdp2, where, broken)
    model, opt = _sharded_model_and_optimizer()
    warned = pytest.warns(gradwatch.GradientWarning, match="internal error")
    with warned, gradwatch.watch(model, opt, 2, on_finding="record") as w:
        for sync in (False, True):
            model.set_requires_gradient_sync(sync)
            torch.nn.functional.mse_loss(model(torch.randn(2, 10)), torch.zeros(2, 1)).backward()
        opt.step()
    assert "FSDPParam changed" in w.stopped


def test_without_a_way_to_see_held_passes_turning_the_sync_off_stops_the_checks_loudly(one_rank, monkeypatch):
    """A torch whose FSDP2 has no FSDPParamGroup.post_backward: never a silent all-clear."""
    import gradwatch.hooks

    monkeypatch.setattr(gradwatch.hooks, "held_pass_patch", lambda: None)
    original = fsdp.FSDPModule.set_requires_gradient_sync
    model, opt = _sharded_model_and_optimizer()
    with gradwatch.watch(model, opt, 2, on_finding="record") as w:
        model.set_requires_gradient_sync(True)
        assert w.stopped is None
        with pytest.warns(gradwatch.GradientWarning, match="set_requires_gradient_sync"):
            model.set_requires_gradient_sync(False)
    assert "cannot be read with this torch version" in w.stopped
    assert fsdp.FSDPModule.set_requires_gradient_sync is original


def test_a_conversion_that_swaps_the_sharded_parameters_works_and_stops_the_checks_loudly(one_rank):
    """``model.to(dtype)`` swaps FSDP2's DTensor parameters in place (``torch.utils.swap_tensors``), which refuses
    tensors with weak references or hooks: gradwatch lets go of them first, and says the watch ended."""
    model, opt = _sharded_model_and_optimizer()
    before = [id(p) for p in model.parameters()]
    w = gradwatch.watch(model, opt, 1, on_finding="record")
    with pytest.warns(gradwatch.GradientWarning, match="swap_tensors"):
        model.to(torch.float64)
    assert [id(p) for p in model.parameters()] == before
    assert all(p.dtype == torch.float64 and not p._post_accumulate_grad_hooks for p in model.parameters())
    assert "swap_tensors" in w.stopped
    w.detach()


def test_fsdp1_is_refused_rather_than_misreported():
    """FSDP1 needs an accelerator to wrap a model; an instance made without its __init__ is enough to show that
    watch() refuses it and leaves nothing behind."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapper)
    model = torch.nn.Sequential(torch.nn.Linear(10, 1), wrapper)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="does not support FullyShardedDataParallel"):
        gradwatch.watch(model, opt)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert "zero_grad" not in opt.__dict__


FSDP2_OPS = st.lists(st.sampled_from([*LIFECYCLE_OPS, "none_1.bias"]), max_size=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=FSDP2_OPS, accumulation_steps=st.sampled_from([None, 2]))
@example(ops=["backward", "backward", "step", "backward", "none_1.bias", "backward"], accumulation_steps=None)
def test_a_sharded_model_gets_the_findings_of_the_same_model_unsharded(one_rank, ops, accumulation_steps):
    """On one rank, every backward pass reduce-scatters and FSDP2 is only a different path into .grad: whatever
    the loop does with backward, step and the clears, the findings must be those of the unsharded model."""

    def shard(model: torch.nn.Module) -> torch.nn.Module:
        for layer in model:
            fsdp.fully_shard(layer)
        return fsdp.fully_shard(model)

    assert lifecycle_findings(ops, accumulation_steps, shard) == lifecycle_findings(ops, accumulation_steps)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(["sync_off", "sync_on", "backward", "step", "zero_grad"]), max_size=12))
@example(ops=["sync_off", "backward", "zero_grad", "backward", "sync_on", "backward", "step", "sync_off", "step"])
def test_unsynced_gradient_exactly_when_a_step_runs_while_fsdp2_holds_passes(one_rank, ops):
    """Through real FSDP2 passes: FSDP2 holds each pass run with the sync off until a synced pass lands them all in
    .grad (no clear reaches them). Each step consumes what .grad holds; a step while FSDP2 holds passes is
    ``unsynced-gradient``, first at that step; gradwatch never stops."""
    model, opt = _sharded_model_and_optimizer()
    x, y = torch.randn(2, 10), torch.zeros(2, 1)
    held = in_grad = steps = 0
    sync, first_unsynced = True, None
    with gradwatch.watch(model, opt, on_finding="record", audit_losses=False) as w:
        for op in ops:
            if op in ("sync_off", "sync_on"):
                sync = op == "sync_on"
                model.set_requires_gradient_sync(sync)
            elif op == "backward":
                torch.nn.functional.mse_loss(model(x), y).backward()
                if sync:
                    in_grad, held = in_grad + held + 1, 0
                else:
                    held += 1
            elif op == "step":
                opt.step()
                if held and first_unsynced is None:
                    first_unsynced = steps
                if in_grad:
                    assert w._tracker.ledger.last_window[0] == in_grad
                in_grad, steps = 0, steps + 1
            else:
                opt.zero_grad()
                in_grad = 0
    assert w.stopped is None
    unsynced = [f for f in w.findings if f.kind == "unsynced-gradient"]
    assert [f.step for f in unsynced] == ([] if first_unsynced is None else [first_unsynced])
