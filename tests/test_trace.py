"""The JSON-lines trace: written as the run goes, read back by load_trace, robust to crashes and full disks."""

from __future__ import annotations

import json

import pytest
from helpers import mse, reference_data, reference_loop, reference_model, watch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradwatch
from gradwatch import GradientWarning
from gradwatch.sinks import trace as trace_module
from gradwatch.sinks.trace import TraceSink

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), JSON, max_size=6))
def test_a_trace_line_is_what_json_dumps_writes(record):
    assert trace_module._encode(record) == json.dumps(record, separators=(",", ":"))


def _missing_zero_grad_run(trace, at_first_finding=None):
    """The reference loop without zero_grad after its steps; ``at_first_finding``: called once the first finding
    is reported, while the watch runs, and the loop stops there."""
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=2, trace=trace) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, 2).backward()
            if (i + 1) % 2 == 0:
                opt.step()
            if at_first_finding is not None and w.findings:
                at_first_finding()
                break
    return w


def test_trace_round_trips_through_load_trace(tmp_path):
    path = tmp_path / "run" / "trace.jsonl"
    w = _missing_zero_grad_run(path)
    trace = gradwatch.load_trace(path)
    assert trace.complete
    assert trace.run["schema"] == 1
    assert trace.params == ("weight", "bias")
    assert trace.run["optimizers"] == [{"type": "SGD", "params": [0, 1]}]
    assert [e["backward"] for e in trace.of("backward")] == list(range(8))
    steps = trace.of("step")
    assert [(s["step"], s["window"], s["backward"]) for s in steps] == [(0, 2, 2), (1, 2, 4), (2, 2, 6), (3, 2, 8)]
    assert [c["source"] for c in trace.of("clear")] == ["optimizer.zero_grad()"]
    assert trace.findings == tuple(w.findings)  # final counts from the end record
    assert trace.findings[0].count == 3


def test_logdir_gets_the_trace_by_default(tmp_path):
    model, opt = reference_model()
    with gradwatch.watch(model, opt, logdir=tmp_path) as w:
        reference_loop(model, opt, reference_data())
    trace = gradwatch.load_trace(tmp_path)  # a logdir is searched for the trace
    assert trace.path == str(tmp_path / "gradwatch-trace.jsonl")
    assert trace.findings == () and w.findings == []


def test_every_line_up_to_a_finding_is_on_disk_when_the_finding_is_reported(tmp_path):
    path = tmp_path / "trace.jsonl"
    on_disk = []
    _missing_zero_grad_run(path, lambda: on_disk.extend(json.loads(line) for line in path.read_text().splitlines()))
    assert [e["event"] for e in on_disk][:3] == ["run", "clear", "backward"]
    assert on_disk[-1]["event"] == "finding" and on_disk[-1]["kind"] == "uncleared-gradient"
    assert len([e for e in on_disk if e["event"] == "backward"]) == 4  # every pass before the step that found it


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "trace.jsonl"
    _missing_zero_grad_run(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # the end record is torn
    with pytest.warns(GradientWarning, match="torn last line skipped"):
        trace = gradwatch.load_trace(path)
    assert not trace.complete
    assert [f.kind for f in trace.findings] == ["uncleared-gradient"]  # from the finding events
    assert len(trace.of("step")) == 4


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "trace.jsonl"
    _missing_zero_grad_run(path)
    lines = path.read_text().splitlines()
    lines[3] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"trace.jsonl:4: not a gradwatch trace line"):
        gradwatch.load_trace(path)
    path.write_text(json.dumps({"event": "step"}) + "\n")
    with pytest.raises(ValueError, match="must start with a 'run' record"):
        gradwatch.load_trace(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no gradwatch-trace\.jsonl under"):
        gradwatch.load_trace(empty)


def test_an_unwritable_trace_fails_at_watch(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model, opt = reference_model()
    with pytest.raises(ValueError, match="cannot write gradwatch's logs"):
        gradwatch.watch(model, opt, trace=blocker / "trace.jsonl")
    gradwatch.watch(model, opt, on_finding="record").detach()  # nothing was left attached


def test_a_sink_failing_mid_run_is_reported_once_and_training_goes_on(tmp_path, monkeypatch):
    path = tmp_path / "trace.jsonl"
    writes = {"n": 0}
    original = TraceSink._write

    def disk_fills_up(self, record, **flush):
        writes["n"] += 1
        if writes["n"] > 5:
            raise OSError(28, "No space left on device")
        original(self, record, **flush)

    monkeypatch.setattr(TraceSink, "_write", disk_fills_up)
    with pytest.warns(GradientWarning, match="TraceSink failed") as caught:
        w = _missing_zero_grad_run(path)
    assert len([c for c in caught if "failed" in str(c.message)]) == 1
    assert w.findings[0].count == 3  # the checks went on
    assert len(path.read_text().splitlines()) == 5
