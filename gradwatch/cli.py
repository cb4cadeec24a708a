"""The ``gradwatch`` command: ``demo`` runs the reference loop, ``report`` reads a trace."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .findings import Finding
from .report import render_report

EXIT_CLEAN, EXIT_FINDINGS, EXIT_UNREADABLE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m gradwatch``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gradwatch", description="Catch gradient-lifecycle bugs in PyTorch loops.")
    commands = parser.add_subparsers(dest="command", required=True)

    from .demo import BUGS

    demo = commands.add_parser(
        "demo",
        help="run the reference accumulation loop with gradwatch attached",
        description="Run the reference gradient-accumulation loop (Linear(10, 1), SGD, 8 batches of 4, "
        "accumulation_steps=2) with gradwatch attached, optionally with a planted bug. Prints the findings "
        "and the report, writes TensorBoard logs and the trace. Exit status 1 when an error or warning finding "
        "was made, 0 otherwise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="bugs:\n" + "\n".join(f"  {name:<22} {text}" for name, text in BUGS.items()),
    )
    demo.add_argument("--logdir", default=os.path.join("runs", "gradwatch-demo"), help="where the logs go")
    demo.add_argument("--bug", choices=sorted(BUGS), default="none", help="the bug to plant (default: none)")

    report = commands.add_parser(
        "report",
        help="summarise a trace file or logdir",
        description="Print the run summary and findings of a gradwatch trace (a trace file, or a logdir holding "
        "one). Exit status: 0 clean, 1 when it holds an error or warning finding, 2 when it cannot be read.",
    )
    report.add_argument("path", help="a gradwatch-trace.jsonl file, or the logdir of a watch")

    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args.bug, args.logdir)
    return _report(args.path)


def _demo(bug: str, logdir: str) -> int:
    from .demo import BUGS, run_demo

    print(f"gradwatch demo: the reference accumulation loop, {BUGS[bug]}")
    watcher = run_demo(bug, logdir)
    for finding in watcher.findings:
        print(f"  {finding}")
    print(watcher.report())
    from .sinks.tensorboard import TIMELINE_NAME
    from .timeline import INSTALL_HINT, available

    print(f"\nTensorBoard logs and the trace are in {logdir}; view them with:\n  tensorboard --logdir {logdir}")
    if available():
        print(f"timeline picture: {os.path.join(logdir, TIMELINE_NAME)}")
    else:
        print(f"no timeline picture: {INSTALL_HINT}")
    return EXIT_FINDINGS if _has_bugs(watcher.findings) else EXIT_CLEAN


def _report(path: str) -> int:
    from .traces import load_trace

    try:
        trace = load_trace(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"gradwatch report: cannot read {path!r}: {error}", file=sys.stderr)
        return EXIT_UNREADABLE
    end = next((e for e in reversed(trace.events) if e.get("event") == "end"), None)
    n_optimizers = max(len(trace.run.get("optimizers", [])), 1)
    if end is not None:
        backwards, steps = end["backwards"], end["steps"]
    else:
        backwards = len(trace.of("backward"))
        steps = [sum(1 for s in trace.of("step") if s["optimizer"] == o) for o in range(n_optimizers)]
    status = f"trace {trace.path}" + ("" if trace.complete else ", incomplete: the run did not end cleanly")
    print(render_report(backwards, steps, len(trace.of("clear")), len(trace.params), trace.findings, status))
    return EXIT_FINDINGS if _has_bugs(trace.findings) else EXIT_CLEAN


def _has_bugs(findings: Sequence[Finding]) -> bool:
    """Error or warning findings: what assert_clean() fails on."""
    return any(f.severity != "info" for f in findings)
