"""The loop fuzzer, bounded for CI: random legitimate loops stay clean and train bit for bit the same; each
planted bug is caught with the right kind. ``make fuzz`` runs many more (``tests/fuzzing/fuzz.py``)."""

from __future__ import annotations

import random

import pytest
from loopgen import LoopSpec, draw, render, run

LEGIT, MUTATED = 100, 60


def _failures(specs: list[LoopSpec]) -> list[str]:
    failed = []
    for spec in specs:
        outcome = run(spec)
        if not outcome.ok():
            found = [(f.kind, f.params) for f in outcome.findings]
            failed.append(f"{spec}\n  error={outcome.error} same_numbers={outcome.same_numbers} findings={found}")
    return failed


def test_random_legitimate_loops_are_clean_and_train_the_same():
    rng = random.Random(20261126)
    failed = _failures([draw(rng) for _ in range(LEGIT)])
    assert not failed, f"{len(failed)} of {LEGIT} legitimate loops failed:\n" + "\n".join(failed[:5])


def test_every_planted_bug_is_caught_with_its_kind():
    rng = random.Random(7)
    failed = _failures([draw(rng, mutate=True) for _ in range(MUTATED)])
    assert not failed, f"{len(failed)} of {MUTATED} planted bugs were missed:\n" + "\n".join(failed[:5])


@pytest.mark.parametrize("spec", [LoopSpec(), LoopSpec(acc=2, epoch_len=5, epochs=2, mutation="tail-never-stepped")])
def test_a_rendered_loop_is_a_standalone_script(spec, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "loop.py"
    script.write_text(render(spec))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "gradwatch report" in done.stdout
    assert ("dangling-gradient" in done.stdout) == (spec.mutation is not None)
