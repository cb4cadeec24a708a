"""Reading a trace file back: ``gradwatch.load_trace``."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

from .findings import Finding, GradientWarning
from .sinks.trace import SCHEMA_VERSION, TRACE_NAME


@dataclass(frozen=True)
class Trace:
    """A trace read back: the run header, every event, and the findings (final counts when the run ended)."""

    path: str
    run: dict[str, Any]
    events: tuple[dict[str, Any], ...]
    findings: tuple[Finding, ...]
    complete: bool

    @property
    def params(self) -> tuple[str, ...]:
        """Parameter names by index: the run's, then those added with ``add_param_group`` during it."""
        added = [name for e in self.of("param_group") for name in e.get("new_params", ())]
        return (*self.run.get("params", ()), *added)

    def of(self, event: str) -> list[dict[str, Any]]:
        """The events of one type ("backward", "step", "clear", "param_group", "finding")."""
        return [e for e in self.events if e.get("event") == event]


def find_trace(path: str | os.PathLike[str]) -> str:
    """The trace file itself, or the newest one under a log directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(root, TRACE_NAME) for root, _, files in os.walk(path) if TRACE_NAME in files]
        if not found:
            raise FileNotFoundError(f"no {TRACE_NAME} under {path!r}; pass the trace file or the watch's logdir")
        return max(found, key=os.path.getmtime)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trace file at {path!r}")
    return path


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a gradwatch trace (a file, or a logdir holding one). A torn last line is skipped with a warning."""
    path = find_trace(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    events: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as error:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}:{number}: not a gradwatch trace line ({error})") from None
            message = f"{path}:{number}: torn last line skipped (the run did not end cleanly)"
            warnings.warn(message, GradientWarning, stacklevel=2)
    if not events or events[0].get("event") != "run":
        raise ValueError(f"{path}: not a gradwatch trace (it must start with a 'run' record)")
    schema = events[0].get("schema")
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        raise ValueError(f"{path}: trace schema {schema!r} is newer than this gradwatch reads ({SCHEMA_VERSION})")
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)
    records = end["findings"] if end is not None else [e for e in events if e.get("event") == "finding"]
    findings = tuple(_finding(r) for r in records)
    return Trace(path, events[0], tuple(events[1:]), findings, end is not None)


def _finding(record: dict[str, Any]) -> Finding:
    return Finding(
        kind=record["kind"],
        severity=record["severity"],
        step=record["step"],
        backward=record["backward"],
        params=tuple(record["params"]),
        message=record["message"],
        count=record.get("count", 1),
    )
