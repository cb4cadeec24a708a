"""A torch.compile'd model: AOTAutograd's backward feeds the ordinary AccumulateGrad nodes, so the hooks hold."""

from __future__ import annotations

import pytest
import torch
from helpers import kinds, mse, reference_data, reference_loop, reference_model, the, watch

ACC = 2


@pytest.mark.parametrize("forget_zero_grad", [False, True])
def test_compiled_model(forget_zero_grad):
    model, opt = reference_model()
    compiled = torch.compile(model, backend="aot_eager")  # inductor needs a C++ toolchain; aot_eager does not
    with watch(model, opt, accumulation_steps=ACC) as w:
        reference_loop(compiled, opt, reference_data(), ACC, zero_grad=not forget_zero_grad)
    if forget_zero_grad:
        f = the(w, "uncleared-gradient")
        assert (f.params, f.step, f.backward) == (("weight", "bias"), 1, 2)
    else:
        assert kinds(w) == set()


def test_hooks_cause_no_recompilation():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, opt = reference_model()
    compiled = torch.compile(model, backend="aot_eager")
    data = reference_data(16)

    def train(first, last):
        for i in range(first, last):
            mse(compiled, *data[i], ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()

    with watch(model, opt, accumulation_steps=ACC) as w:
        train(0, 4)
        compiled_after_warm_up = (counters["stats"]["unique_graphs"], counters["frames"]["total"])
        train(4, 16)  # six more steps, with clears, hooks and findings bookkeeping in between
        assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == compiled_after_warm_up
    assert compiled_after_warm_up == (1, 1)
    assert w.findings == []
