"""gradwatch overhead against the bare training loop (a script, not a test).

Variants run round-robin in one process (rotated each round, same seeds), so machine drift hits them alike;
each round's time per optimizer step is divided by the bare loop's of the same round, and the table shows
medians. Peak RSS is measured in a child process per variant (a 20,000-step `seed` run by default).

    python benchmarks/overhead.py                       # all workloads, 7 rounds
    python benchmarks/overhead.py --workloads seed mlp --rounds 3 --json out.json
    python benchmarks/overhead.py --quick               # one tiny round of everything (CI smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

import gradwatch


@dataclass
class Workload:
    build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[torch.nn.Module], torch.Tensor]]]
    accumulation: int
    steps: int  # optimizer steps timed per round


def _seed():
    model = torch.nn.Linear(10, 1)
    x, y = torch.randn(4, 10), torch.randn(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), lambda m: torch.nn.functional.mse_loss(m(x), y)


def _mlp():
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    x = torch.randn(64, 1024)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4), lambda m: m(x).pow(2).mean()


class _Transformer(torch.nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 256) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, 4, 1024, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def _transformer():
    model = _Transformer()
    tokens = torch.randint(0, 1000, (8, 128))

    def loss(m):
        return torch.nn.functional.cross_entropy(m(tokens).reshape(-1, 1000), tokens.reshape(-1))

    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), loss


def _many_params():
    blocks: list[torch.nn.Module] = []
    for _ in range(250):
        blocks += [torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)]
    model = torch.nn.Sequential(*blocks)
    x = torch.randn(16, 32)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3), lambda m: m(x).pow(2).mean()


WORKLOADS = {
    "seed": Workload(_seed, 2, 400),
    "mlp": Workload(_mlp, 4, 20),
    "transformer": Workload(_transformer, 4, 4),
    "many-params": Workload(_many_params, 4, 10),
}


# -- variants: each returns a context manager around the timed loop --------------------------------------
@contextlib.contextmanager
def bare(model, opt, accumulation):
    yield


@contextlib.contextmanager
def floor(model, opt, accumulation):
    """The cheapest possible per-parameter instrumentation: one counter per post-accumulate hook."""
    count = [0]

    def hook(param):
        count[0] += 1

    handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def detect(model, opt, accumulation):
    with gradwatch.watch(model, opt, accumulation_steps=accumulation, on_finding="record"):
        yield


@contextlib.contextmanager
def detect_no_audit(model, opt, accumulation):
    """Detection with the loss-weight audit off (``audit_losses=False``): what the audit costs is the difference."""
    with gradwatch.watch(model, opt, accumulation_steps=accumulation, on_finding="record", audit_losses=False):
        yield


@contextlib.contextmanager
def tensorboard(model, opt, accumulation):
    with (
        tempfile.TemporaryDirectory() as logdir,
        gradwatch.watch(model, opt, accumulation_steps=accumulation, logdir=logdir, on_finding="record") as w,
    ):
        yield lambda: _write_out(w)


def _write_out(watcher) -> None:
    """Hand the TensorBoard sink's held events to its writer and wait until they are on disk (the writer's thread
    checksums them): a timed round shorter than the sink's one-second hand-off would leave that work out."""
    from gradwatch.sinks.tensorboard import TensorBoardSink

    for sink in watcher._sinks._sinks:  # a benchmark may look inside
        if isinstance(sink, TensorBoardSink):
            sink._write_scalars(now=True)
            sink._writer.flush()


@contextlib.contextmanager
def _logging_before_each_step(opt, log):
    """A peer's logging, as users write it: ``log(writer, step)`` from a step pre-hook into a SummaryWriter."""
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        state = {"step": 0}

        def hook(optimizer, args, kwargs):
            log(writer, state["step"])
            state["step"] += 1

        handle = opt.register_step_pre_hook(hook)
        try:
            yield writer.flush  # what its writer's thread has not written yet counts too
        finally:
            handle.remove()
            writer.close()


def histogram_peer(model, opt, accumulation):
    """What users write today: SummaryWriter.add_histogram of every gradient at every step."""
    names = {p: n for n, p in model.named_parameters()}

    def log(writer, step):
        for p in names:
            if p.grad is not None:
                writer.add_histogram(f"grad/{names[p]}", p.grad, step)

    return _logging_before_each_step(opt, log)


def lightning_grad_norm_peer(model, opt, accumulation):
    """Lightning's documented recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``,
    every step, to TensorBoard (here without a Trainer: the same function and one scalar per entry)."""
    from pytorch_lightning.utilities import grad_norm

    def log(writer, step):
        for tag, value in grad_norm(model, norm_type=2).items():
            writer.add_scalar(tag, value, step)

    return _logging_before_each_step(opt, log)


@contextlib.contextmanager
def wandb_peer(model, opt, accumulation):
    import wandb  # only listed when installed

    os.environ.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory() as d:
        run = wandb.init(dir=d, mode="offline", reinit=True)
        wandb.watch(model, log="gradients", log_freq=100)
        try:
            yield
        finally:
            wandb.unwatch(model)
            run.finish()


VARIANTS: dict[str, Callable] = {
    "bare": bare,
    "floor": floor,
    "detect": detect,
    "detect-no-audit": detect_no_audit,
    "tensorboard": tensorboard,
    "add_histogram-peer": histogram_peer,
}
try:
    import pytorch_lightning  # noqa: F401

    VARIANTS["grad_norm-peer"] = lightning_grad_norm_peer
except ImportError:
    pass
try:
    import wandb  # noqa: F401

    VARIANTS["wandb-peer"] = wandb_peer
except ImportError:
    pass


def _train(model, opt, loss_of, accumulation: int, steps: int) -> None:
    opt.zero_grad()
    for _ in range(steps):
        for _ in range(accumulation):
            (loss_of(model) / accumulation).backward()
        opt.step()
        opt.zero_grad()


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_variant(
    workload: Workload, variant: Callable, steps: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds per optimizer step of one variant, on a fresh model with fixed seeds."""
    torch.manual_seed(0)
    model, opt, loss_of = workload.build()
    _train(model, opt, loss_of, workload.accumulation, 2)  # warm-up, outside the instrumentation
    with variant(model, opt, workload.accumulation) as write_out:
        _train(model, opt, loss_of, workload.accumulation, 1)  # warm the hooks
        if write_out is not None:
            write_out()
        start = clock()
        _train(model, opt, loss_of, workload.accumulation, steps)
        if write_out is not None:  # a logger's deferred writing is part of its cost
            write_out()
        return (clock() - start) / steps


def _high_water_mark_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child_peak_rss_mb(variant: str, steps: int) -> float:
    """In this process: peak RSS while ``seed`` runs ``steps`` optimizer steps under ``variant``.

    The kernel's high-water mark is reset after the warm-up (imports and set-up peak higher than a small loop).
    """
    workload = WORKLOADS["seed"]
    torch.manual_seed(0)
    model, opt, loss_of = workload.build()
    _train(model, opt, loss_of, workload.accumulation, 2)
    with VARIANTS[variant](model, opt, workload.accumulation):
        _train(model, opt, loss_of, workload.accumulation, 2)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _train(model, opt, loss_of, workload.accumulation, steps)
        return _high_water_mark_mb()


def peak_rss_mb(variant: str, steps: int) -> float:
    """Peak RSS of a child process running ``steps`` optimizer steps of ``seed`` under ``variant``."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import overhead; "
    code += f"print(overhead.child_peak_rss_mb({variant!r}, {steps}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800)
    return float(out.stdout.strip().splitlines()[-1])


def summarize(times: dict[str, list[float]]) -> dict[str, dict]:
    """Per variant: medians over the rounds, the spread of the per-round ratios, and whether the variant stands
    outside the floor's noise (its per-round ratios all above, or all below, the floor's)."""
    bare = times["bare"]
    floor_ratios = [t / b for t, b in zip(times.get("floor", []), bare, strict=False)]
    rows: dict[str, dict] = {}
    for v, ts in times.items():
        ratios = [t / b for t, b in zip(ts, bare, strict=True)]
        over = [(t - b) * 1e6 for t, b in zip(ts, bare, strict=True)]
        rows[v] = {
            "seconds_per_step": statistics.median(ts),
            "ratio_to_bare": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "over_bare_us": statistics.median(over),
            "over_bare_us_range": [min(over), max(over)],
            "rounds": ts,
        }
        if len(floor_ratios) >= 3 and v not in ("bare", "floor"):  # fewer rounds have no spread to speak of
            rows[v]["outside_floor_noise"] = min(ratios) > max(floor_ratios) or max(ratios) < min(floor_ratios)
    if "floor" in rows:
        floor_over = rows["floor"]["over_bare_us"]
        for v, row in rows.items():
            if v not in ("bare", "floor") and floor_over > 0:
                row["floor_overhead_multiple"] = row["over_bare_us"] / floor_over
    return rows


@dataclass
class Target:
    target: str
    workload: str
    variant: str
    measure: str  # "ratio" (x bare), "us" (per step over bare), "floor" (x the floor's overhead), "peer" (x the peer's)
    limit: float
    peer: str = ""


TARGETS = [
    Target("detection <= 1.3x the floor's overhead on many-params", "many-params", "detect", "floor", 1.3),
    Target("detection <= 40 us per step on seed", "seed", "detect", "us", 40.0),
    Target("detection <= 5 % on mlp", "mlp", "detect", "ratio", 1.05),
    Target("detection <= 5 % on transformer", "transformer", "detect", "ratio", 1.05),
    Target("TensorBoard <= 2x bare on seed", "seed", "tensorboard", "ratio", 2.0),
    *[
        Target(f"TensorBoard <= Lightning's grad_norm logging on {w}", w, "tensorboard", "peer", 1.0, "grad_norm-peer")
        for w in ("seed", "mlp", "transformer", "many-params")
    ],
]
RSS_LIMIT_MB = 20.0


def _verdict(values: list[float], limit: float) -> str:
    if max(values) <= limit:
        return "met"
    if min(values) > limit:
        return "missed"
    return "met?" if statistics.median(values) <= limit else "missed?"  # the rounds straddle the line


def judge_targets(results: dict) -> list[dict]:
    """Each target whose workload and variants were measured: met (every round), missed (no round), or met? /
    missed? (the rounds straddle the limit; the median decides the sign). A variant within the floor's noise
    that does not meet the target in every round is "noise": this run cannot tell its cost from the cheapest
    possible instrumentation's, so its number does not count either way (a comparison with a peer is made round
    by round, on the same machine state, and stands as it is)."""
    verdicts = []
    for t in TARGETS:
        rows = results["workloads"].get(t.workload, {})
        row, bare = rows.get(t.variant), rows.get("bare")
        if (
            row is None
            or bare is None
            or (t.peer and t.peer not in rows)
            or (t.measure == "floor" and "floor" not in rows)
        ):
            continue
        within_floor = row.get("outside_floor_noise") is False
        if t.measure == "ratio":
            values, shown = [t_ / b for t_, b in zip(row["rounds"], bare["rounds"], strict=True)], "{:.3f}x bare"
        elif t.measure == "us":
            values, shown = [(t_ - b) * 1e6 for t_, b in zip(row["rounds"], bare["rounds"], strict=True)], "{:.0f} us"
        elif t.measure == "floor":
            floor = rows["floor"]["rounds"]
            values = [
                (t_ - b) / (f - b) for t_, b, f in zip(row["rounds"], bare["rounds"], floor, strict=True) if f > b
            ] or [math.inf]
            shown = "{:.2f}x the floor's overhead"
        else:
            peer = rows[t.peer]["rounds"]
            values = [t_ / p for t_, p in zip(row["rounds"], peer, strict=True)]
            shown = "{:.2f}x " + t.peer
        verdict = _verdict(values, t.limit)
        if within_floor and verdict != "met" and t.measure != "peer":  # a peer is compared round by round
            verdict = "noise"
        spread = f"{shown.format(statistics.median(values))} (rounds {min(values):.3g} - {max(values):.3g})"
        verdicts.append(
            {"target": t.target, "verdict": verdict, "measured": spread + (", within floor's noise" * within_floor)}
        )
    rss = results.get("peak_rss_mb", {})
    for v in ("detect", "tensorboard"):
        if v in rss and "bare" in rss:
            over = rss[v] - rss["bare"]
            verdict = "met" if over <= RSS_LIMIT_MB else "missed"
            verdicts.append(
                {
                    "target": f"peak RSS of {v} within {RSS_LIMIT_MB:.0f} MB of bare",
                    "verdict": verdict,
                    "measured": f"{over:+.1f} MB",
                }
            )
    return verdicts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory-steps", type=int, default=20000, help="0 skips the peak-RSS measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: the process's CPU time, all threads (steadier on a shared VM)",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="one tiny round of everything (a smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    rounds, scale = (1, 0) if args.quick else (args.rounds, 1)
    memory_steps = 50 if args.quick else args.memory_steps
    variants = ["bare", *[v for v in args.variants if v != "bare"]]

    results: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
        },
        "clock": args.clock,
        "workloads": {},
    }
    threads = torch.get_num_threads()
    print(
        f"gradwatch {gradwatch.__version__} overhead, torch {torch.__version__}, {threads} threads, {args.clock} clock"
    )
    for name in args.workloads:
        workload = WORKLOADS[name]
        steps = max(1, workload.steps * scale)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                times[v].append(time_variant(workload, VARIANTS[v], steps, clock))
        rows = summarize(times)
        results["workloads"][name] = rows
        print(f"\n{name} (accumulation {workload.accumulation}, {rounds} rounds x {steps} steps)")
        print(
            f"  {'variant':<20} {'s/step':>10} {'x bare':>7} {'(min - max)':>15} {'us/step over bare':>18}"
            f" {'x floor overhead':>17}  vs floor's noise"
        )
        for v, row in rows.items():
            low, high = row["ratio_range"]
            multiple = row.get("floor_overhead_multiple")
            vs_floor = f"{multiple:17.2f}" if multiple is not None else " " * 17
            noise = {True: "outside", False: "within"}.get(row.get("outside_floor_noise"), "")
            spread = f"({low:.3f} - {high:.3f})"
            print(
                f"  {v:<20} {row['seconds_per_step']:10.6f} {row['ratio_to_bare']:7.3f} {spread:>15}"
                f" {row['over_bare_us']:18.1f} {vs_floor}  {noise}"
            )
    if memory_steps:
        results["peak_rss_mb"] = {}
        print(f"\npeak RSS, seed, {memory_steps} steps in a child process")
        for v in variants:
            results["peak_rss_mb"][v] = rss = peak_rss_mb(v, memory_steps)
            print(f"  {v:<20} {rss:8.1f} MB  ({rss - results['peak_rss_mb']['bare']:+.1f} MB vs bare)")
    verdicts = judge_targets(results)
    if verdicts:
        print("\ntargets (issue 11): met only where every round meets it; the spread is the rounds' min - max;")
        print("noise: within the floor's noise and not met in every round, so this run cannot judge it")
        for verdict in verdicts:
            print(f"  {verdict['verdict']:<8} {verdict['target']}: {verdict['measured']}")
    results["targets"] = verdicts
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
