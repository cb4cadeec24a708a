"""The trace file: one JSON object per line per lifecycle event, flushed at each finding and at least once a
second."""

from __future__ import annotations

import json
import math
import os
import time
from typing import IO, Callable, Sequence

from ..findings import Finding
from . import LossWeights, RunInfo, Sink, StepRecord

SCHEMA_VERSION = 1
TRACE_NAME = "gradwatch-trace.jsonl"  # the trace's name in a logdir
FLUSH_SECONDS = 1.0  # a run killed outright loses at most this much of its trace (a flush per line cost 10 us)


def _line_encoder() -> Callable[[dict], str]:
    """``json.dumps(record, separators=(",", ":"))``: with the C encoder built once (``JSONEncoder.encode`` builds
    one per call, a third of a line's cost), where this Python has it and it writes what the encoder writes."""
    encoder = json.JSONEncoder(separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    try:
        chunks = make(None, encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
        sample = {"event": "é", "n": [1, 2.5, math.nan, -math.inf], "b": True, "none": None}
        if "".join(chunks(sample, 0)) != encoder.encode(sample):
            return encoder.encode
    except Exception:  # another signature: the encoder's own path
        return encoder.encode
    return lambda record: "".join(chunks(record, 0))


_encode = _line_encoder()


class TraceSink(Sink):
    """Writes the JSON-lines trace (schema in the README); a crash leaves every line up to the latest finding, and
    all but the last second's lines when the process is killed outright."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - lives with the watch
        self._flushed = time.monotonic()

    def _write(self, record: dict, flush: bool = False) -> None:
        assert self._file is not None
        self._file.write(_encode(record) + "\n")
        now = time.monotonic()
        if flush or now - self._flushed >= FLUSH_SECONDS:
            self._file.flush()
            self._flushed = now

    def started(self, info: RunInfo) -> None:
        optimizers = [{"type": kind, "params": list(params)} for kind, params in info.optimizers]
        self._write(
            {
                "event": "run",
                "schema": SCHEMA_VERSION,
                "time": time.time(),
                "params": list(info.params),
                "optimizers": optimizers,
                "accumulation_steps": info.accumulation_steps,
                **({"rank": info.rank, "world_size": info.world_size} if info.rank is not None else {}),
            },
            flush=True,
        )

    def backward(self, backward: int, params: Sequence[int], synced: bool | None) -> None:
        line = {"event": "backward", "backward": backward, "params": list(params)}
        if synced is not None:
            line["synced"] = synced
        self._write(line)

    def step(self, record: StepRecord) -> None:
        line = {
            "event": "step",
            "optimizer": record.optimizer,
            "step": record.step,
            "backward": record.backward,
            "window": record.window,
            "params": list(record.params),
        }
        if record.adopted:
            line["adopted"] = True  # the window began before the watch: its size is unknown
        if record.grad_norms:
            line["grad_norms"] = list(record.grad_norms)
        self._write(line)

    def loss_weights(self, weights: LossWeights) -> None:
        passes = [
            {"backward": b, "losses": [{"loss": f, "reduction": r, "elements": n, "weight": w} for f, r, n, w in calls]}
            for b, calls in weights.passes
        ]
        line = {"event": "loss_weights", "optimizer": weights.optimizer, "step": weights.step, "passes": passes}
        line.update({"weight_sum": weights.weight_sum, "weight_ratio": weights.weight_ratio})
        self._write(line)

    def param_group_added(self, optimizer: int, params: Sequence[int], new_names: Sequence[str]) -> None:
        line = {"event": "param_group", "optimizer": optimizer, "params": list(params), "new_params": list(new_names)}
        self._write(line)

    def cleared(self, backward: int, source: str, params: int, discarded: int) -> None:
        line = {"event": "clear", "backward": backward, "source": source, "params": params, "discarded": discarded}
        self._write(line)

    def finding(self, finding: Finding) -> None:
        self._write({"event": "finding", **_finding_fields(finding)}, flush=True)

    def finished(self, findings: Sequence[Finding], backwards: int, steps: Sequence[int]) -> None:
        self._write(
            {
                "event": "end",
                "backwards": backwards,
                "steps": list(steps),
                "findings": [_finding_fields(f) for f in findings],
            }
        )
        self.abandon()

    def abandon(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _finding_fields(f: Finding) -> dict:
    return {
        "kind": f.kind,
        "severity": f.severity,
        "step": f.step,
        "backward": f.backward,
        "params": list(f.params),
        "message": f.message,
        "count": f.count,
    }
