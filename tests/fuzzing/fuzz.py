"""The loop fuzzer at scale (``make fuzz``): false-alarm rate by idiom, catch rate by mutation, and each
failure shrunk to the fewest idioms that still fail, written out as a standalone script.

    python tests/fuzzing/fuzz.py --loops 2000 --seed 0 1 2 --out runs/fuzz
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loopgen import LoopSpec, draw, render, run, shrink


def _rate(bad: int, total: int) -> str:
    return f"{bad}/{total} ({100 * bad / total:.1f} %)" if total else "0/0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=1000, help="legitimate loops per seed, and as many mutated")
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/fuzz", help="where the failing loops are written as scripts")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    started = time.monotonic()
    by_idiom: dict[tuple[str, Any], list[int]] = {}  # (idiom, value) -> [loops, false alarms]
    by_mutation: dict[str, list[int]] = {}  # mutation -> [loops, caught]
    weight_differences = 0
    failures: list[LoopSpec] = []
    for seed in args.seed:
        rng = random.Random(seed)
        for mutate in (False, True):
            for _ in range(args.loops):
                spec = draw(rng, mutate=mutate)
                outcome = run(spec)
                ok = outcome.ok()
                weight_differences += not outcome.same_numbers
                if mutate:
                    counts = by_mutation.setdefault(spec.mutation or "", [0, 0])
                    counts[0] += 1
                    counts[1] += ok
                else:
                    for idiom in spec.idioms().items() or [("plainest loop", True)]:
                        counts = by_idiom.setdefault(idiom, [0, 0])
                        counts[0] += 1
                        counts[1] += not ok
                if not ok:
                    failures.append(spec)

    total = len(args.seed) * args.loops
    alarms = sum(1 for f in failures if f.mutation is None)
    print(f"gradwatch loop fuzzer: seeds {args.seed}, {total} legitimate and {total} mutated loops")
    print(f"  false alarms: {_rate(alarms, total)}; weight differences: {weight_differences}")
    print("  false-alarm rate by idiom:")
    for (name, value), (n, bad) in sorted(by_idiom.items(), key=lambda kv: (-kv[1][1], str(kv[0]))):
        print(f"    {f'{name}={value}':<28} {_rate(bad, n)}")
    print("  catch rate by mutation (the right kind, naming the affected parameters):")
    for name, (n, caught) in sorted(by_mutation.items()):
        print(f"    {name:<22} {_rate(caught, n)}")

    if failures:
        os.makedirs(args.out, exist_ok=True)
        print(f"  {len(failures)} failure(s), shrunk, written to {args.out}:")
        for number, spec in enumerate(failures):
            smallest = shrink(spec)
            path = os.path.join(args.out, f"failure{number}.py")
            with open(path, "w") as f:
                f.write(render(smallest))
            print(f"    {path}: {smallest.idioms()} mutation={smallest.mutation}")
    print(f"  {time.monotonic() - started:.0f} s")
    return 1 if failures or weight_differences else 0


if __name__ == "__main__":
    sys.exit(main())
