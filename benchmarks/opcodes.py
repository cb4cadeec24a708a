"""Python bytecodes executed per optimizer step, by function, against a baseline variant (a script, not a test).

Wall-clock overhead on a busy 2-core machine moves by more than a cut saves; the bytecodes a step executes do not
move at all, so a cut to the Python bookkeeping shows here exactly, by function. It counts only Python: kernels,
allocation and the cost of a call (a C call counts as the one bytecode that makes it) are left to
``overhead.py``. The trace makes each step about a hundred times slower. A cut that moves Python work into C
calls (``map`` over slot wrappers or types) shows here as a large cut and may still cost more: count such a cut's
instructions under valgrind before keeping it (benchmarks/README.md, "Eighth session").

    python benchmarks/opcodes.py                                 # detect against floor on seed
    python benchmarks/opcodes.py --workload many-params --steps 3 --top 25
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # the workloads and variants, shared


def opcodes_per_step(workload: str, variant: str, steps: int) -> dict[str, float]:
    """Bytecodes executed per optimizer step, keyed by ``file:function:line``."""
    w = overhead.WORKLOADS[workload]
    torch.manual_seed(0)
    model, opt, loss_of = w.build()
    overhead._train(model, opt, loss_of, w.accumulation, 2)
    counts: collections.Counter[str] = collections.Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = f"{Path(code.co_filename).name}:{code.co_name}:{code.co_firstlineno}"

        def per_opcode(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] += 1
            return per_opcode

        return per_opcode

    with overhead.VARIANTS[variant](model, opt, w.accumulation):
        overhead._train(model, opt, loss_of, w.accumulation, 3)  # warm-up: first-step work is not per-step work
        sys.settrace(trace)
        try:
            overhead._train(model, opt, loss_of, w.accumulation, steps)
        finally:
            sys.settrace(None)
    return {key: n / steps for key, n in counts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="seed", choices=sorted(overhead.WORKLOADS))
    parser.add_argument("--variant", default="detect")
    parser.add_argument("--baseline", default="floor")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = opcodes_per_step(args.workload, args.baseline, args.steps)
    ours = opcodes_per_step(args.workload, args.variant, args.steps)
    extra = {key: ours.get(key, 0.0) - base.get(key, 0.0) for key in base.keys() | ours.keys()}
    print(f"{args.workload}: {sum(ours.values()):.0f} bytecodes a step under {args.variant}, ", end="")
    print(f"{sum(base.values()):.0f} under {args.baseline}: {sum(extra.values()):+.0f}")
    for key, n in sorted(extra.items(), key=lambda item: -abs(item[1]))[: args.top]:
        print(f"{n:+11.1f}  {key}")


if __name__ == "__main__":
    main()
