"""The human-readable run summary behind ``Watcher.report()``."""

from __future__ import annotations

from typing import Sequence

from .findings import Finding

_ORDER = {"error": 0, "warning": 1, "info": 2}


def render_report(
    backwards: int,
    steps: Sequence[int],
    clears: int,
    n_watched: int,
    findings: Sequence[Finding],
    status: str,
    *,
    totals: bool = True,
) -> str:
    """A short text: what was watched, what ran (unless not ``totals``), and each finding with its fix."""
    steps_text = ", ".join(f"optimizer[{i}]: {n}" for i, n in enumerate(steps)) if len(steps) > 1 else str(steps[0])
    lines = [f"gradwatch report ({status})"]
    if totals:
        lines += [
            f"  watched parameters: {n_watched}",
            f"  backward passes:    {backwards}",
            f"  optimizer steps:    {steps_text}",
            f"  gradient clears:    {clears}",
        ]
    if not findings:
        lines.append("  no findings: every gradient contribution was consumed by exactly one step.")
        return "\n".join(lines)
    counts = {sev: sum(1 for f in findings if f.severity == sev) for sev in _ORDER}
    lines.append(f"  findings: {counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info")
    for f in sorted(findings, key=lambda f: (_ORDER[f.severity], f.step, f.backward)):
        times = f", {f.count} times" if f.count > 1 else ""
        lines.append(f"  - [{f.severity}] {f.kind} at step {f.step}, backward {f.backward}{times}")
        if f.params:  # a finding about the loss concerns every parameter of the window
            lines.append(f"      params: {', '.join(f.params)}")
        lines.append(f"      {f.message}")
    return "\n".join(lines)
