"""The ``gradwatch`` command: ``demo`` runs the reference loop, ``report`` reads a trace, ``run`` runs a script."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Sequence

from .findings import Finding
from .report import render_report

if TYPE_CHECKING:
    from .traces import Trace

EXIT_CLEAN, EXIT_FINDINGS, EXIT_UNREADABLE, EXIT_UNWATCHED = 0, 1, 2, 3


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

    run = commands.add_parser(
        "run",
        help="run an unmodified training script with gradwatch attached",
        description="Run a Python training script as __main__ with gradwatch attached at its first "
        "optimizer.step() to every optimizer alive then and the top-level modules holding their parameters "
        "(found through PyTorch's global module and optimizer hooks). Prints the report at the end. Exit "
        "status: the script's own, or 1 when it succeeded but an error finding was recorded.",
    )
    run.add_argument("--accumulation-steps", type=int, default=None, help="backward passes per step")
    run.add_argument("--logdir", default=None, help="stream TensorBoard logs and the trace here")
    run.add_argument("--on-finding", choices=("warn", "raise", "record"), default="warn")
    run.add_argument("--no-fail", action="store_true", help="keep the script's exit status whatever was found")
    run.add_argument("--no-loss-audit", action="store_true", help="leave the loss functions unwrapped (no loss-scale)")
    run.add_argument(
        "--allow-unwatched",
        action="store_true",
        help=f"keep the script's exit status when gradwatch could not watch it (otherwise {EXIT_UNWATCHED})",
    )
    run.add_argument("script", help="the training script")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")

    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args.bug, args.logdir)
    if args.command == "run":
        return _run_script(args)
    return _report(args.path)


def _run_script(args: argparse.Namespace) -> int:
    import runpy
    import traceback

    from . import finding_log
    from .autoattach import AutoAttach

    if not os.path.isfile(args.script):
        print(f"gradwatch run: no such script: {args.script!r}", file=sys.stderr)
        return EXIT_UNREADABLE
    auto = AutoAttach(
        accumulation_steps=args.accumulation_steps,
        logdir=args.logdir,
        on_finding=args.on_finding,
        audit_losses=not args.no_loss_audit,
    )
    finding_log.FALLBACK_LOCATION = (os.path.abspath(args.script), 1)  # end-of-run warnings: the script, not runpy
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [args.script, *args.script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    status = EXIT_CLEAN
    auto.install()
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # the script's own error: show it as Python would, and fail
        traceback.print_exc()
        status = EXIT_FINDINGS
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        try:
            auto.remove()
        except Exception as error:  # e.g. on_finding="raise" at the end-of-run checks
            print(f"gradwatch: {error}", file=sys.stderr)
    unwatched = status if status != EXIT_CLEAN or args.allow_unwatched else EXIT_UNWATCHED
    if auto.error is not None:
        print(
            f"gradwatch run: COULD NOT ATTACH ({auto.error}); the script ran unwatched and NOTHING WAS CHECKED "
            f"(exit status {unwatched}; --allow-unwatched keeps the script's own)",
            file=sys.stderr,
        )
        return unwatched
    if auto.watcher is None:
        print(
            "gradwatch run: the script never called optimizer.step(); NOTHING WAS CHECKED "
            f"(exit status {unwatched}; --allow-unwatched keeps the script's own)",
            file=sys.stderr,
        )
        return unwatched
    print(auto.watcher.report(), file=sys.stderr)
    if auto.watcher.stopped is not None:
        print(
            f"gradwatch run: CHECKING STOPPED part-way ({auto.watcher.stopped}); the rest of the run was not checked "
            f"(exit status {unwatched}; --allow-unwatched keeps the script's own)",
            file=sys.stderr,
        )
        return unwatched
    errors = any(f.severity == "error" for f in auto.watcher.findings)
    return EXIT_FINDINGS if status == EXIT_CLEAN and errors and not args.no_fail else status


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
    from .ranks import load_rank_traces, rank_divergence
    from .traces import load_trace

    try:
        traces = load_rank_traces(path) or [load_trace(path)]
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"gradwatch report: cannot read {path!r}: {error}", file=sys.stderr)
        return EXIT_UNREADABLE
    findings = [f for trace in traces for f in trace.findings]
    for trace in traces:
        if len(traces) > 1:
            print(f"rank {trace.run['rank']}:")
        print(_trace_report(trace))
    if len(traces) > 1:
        across = rank_divergence(traces)
        findings += across
        if across:
            print(render_report(0, [0], 0, 0, across, f"across {len(traces)} ranks", totals=False))
        else:
            print(f"across {len(traces)} ranks: every step consumed the same number of backward passes on every rank")
    return EXIT_FINDINGS if _has_bugs(findings) else EXIT_CLEAN


def _trace_report(trace: Trace) -> str:
    end = next((e for e in reversed(trace.events) if e.get("event") == "end"), None)
    n_optimizers = max(len(trace.run.get("optimizers", [])), 1)
    if end is not None:
        backwards, steps = end["backwards"], end["steps"]
    else:
        backwards = len(trace.of("backward"))
        steps = [sum(1 for s in trace.of("step") if s["optimizer"] == o) for o in range(n_optimizers)]
    status = f"trace {trace.path}" + ("" if trace.complete else ", incomplete: the run did not end cleanly")
    return render_report(backwards, steps, len(trace.of("clear")), len(trace.params), trace.findings, status)


def _has_bugs(findings: Sequence[Finding]) -> bool:
    """Error or warning findings: what assert_clean() fails on."""
    return any(f.severity != "info" for f in findings)
