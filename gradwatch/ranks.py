"""Checks across the per-rank traces of one distributed run: ranks must agree on every step's window."""

from __future__ import annotations

import json
import os
from typing import Sequence

from .findings import RANK_DIVERGENCE, SEVERITY, Finding, format_message
from .traces import TRACE_NAME, Trace, load_trace


def load_rank_traces(path: str | os.PathLike[str]) -> list[Trace]:
    """The traces of every rank under a log directory (``<logdir>/rank<r>/``), by rank; [] unless it holds the
    traces of two ranks or more. Only their first lines are read to tell."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return []
    files = [os.path.join(root, TRACE_NAME) for root, _, names in os.walk(path) if TRACE_NAME in names]
    ranked = {rank: f for f in files if (rank := _rank_of(f)) is not None}
    return [load_trace(ranked[r]) for r in sorted(ranked)] if len(ranked) > 1 else []


def _rank_of(trace_file: str) -> int | None:
    """The rank in a trace's run header, without reading the rest (None when absent or unreadable)."""
    with open(trace_file, encoding="utf-8") as f:
        try:
            header = json.loads(f.readline())
        except json.JSONDecodeError:
            return None
    rank = header.get("rank") if isinstance(header, dict) else None
    return rank if isinstance(rank, int) else None


def rank_divergence(traces: Sequence[Trace]) -> list[Finding]:
    """One ``rank-divergence`` finding per optimizer whose ranks consumed different numbers of backward passes
    at some step (first such step; ``count`` = how many steps disagree), or took different numbers of steps."""
    findings = []
    n_optimizers = max(len(t.run.get("optimizers", ())) for t in traces)
    for o in range(n_optimizers):
        windows = [{e["step"]: e for e in t.of("step") if e["optimizer"] == o and not e.get("adopted")} for t in traces]
        steps = sorted(set().union(*windows))
        differing = [s for s in steps if len({w[s]["window"] if s in w else None for w in windows}) > 1]
        if not differing:
            continue
        first = differing[0]
        ranks = [t.run["rank"] for t in traces]
        detail = ", ".join(
            f"rank {r} consumed {w[first]['window']} backward pass(es)" if first in w else f"rank {r} took no such step"
            for r, w in zip(ranks, windows, strict=True)
        )
        at = [w[first] for w in windows if first in w]
        params = tuple(traces[0].params[i] for i in at[0]["params"] if i < len(traces[0].params))
        backward = min(e["backward"] for e in at)
        message = format_message(RANK_DIVERGENCE, params, first, backward, {"detail": detail})
        findings.append(
            Finding(RANK_DIVERGENCE, SEVERITY[RANK_DIVERGENCE], first, backward, params, message, len(differing))
        )
    return findings
