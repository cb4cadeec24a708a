"""Checks across the per-rank traces of one distributed run: ranks must agree on every step's window."""

from __future__ import annotations

import os
from typing import Sequence

from .findings import RANK_DIVERGENCE, SEVERITY, Finding, format_message
from .traces import TRACE_NAME, Trace, load_trace


def load_rank_traces(path: str | os.PathLike[str]) -> list[Trace]:
    """The traces of every rank under a log directory (``<logdir>/rank<r>/``), by rank; [] if it holds none."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return []
    files = [os.path.join(root, TRACE_NAME) for root, _, names in os.walk(path) if TRACE_NAME in names]
    traces = [load_trace(f) for f in files]
    ranked = {t.run["rank"]: t for t in traces if isinstance(t.run.get("rank"), int)}
    return [ranked[r] for r in sorted(ranked)] if len(ranked) > 1 else []


def rank_divergence(traces: Sequence[Trace]) -> list[Finding]:
    """One ``rank-divergence`` finding per optimizer whose ranks consumed different numbers of backward passes
    at some step (first such step; ``count`` = how many steps disagree), or took different numbers of steps."""
    findings = []
    n_optimizers = max(len(t.run.get("optimizers", ())) for t in traces)
    for o in range(n_optimizers):
        windows = [{e["step"]: e for e in t.of("step") if e["optimizer"] == o} for t in traces]
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
