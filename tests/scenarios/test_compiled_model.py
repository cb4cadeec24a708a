"""A torch.compile'd model: AOTAutograd's backward feeds the ordinary AccumulateGrad nodes, so the hooks hold."""

from __future__ import annotations

import pytest
import torch
from helpers import kinds, mse, reference_data, reference_loop, reference_model, the, watch

from gradwatch import GradientWarning

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


def _graphs_of_a_compiled_step(watched: bool, forget_zero_grad: bool = False):
    """Train with ``torch.compile(optimizer.step)``; return the dynamo counters and the watcher."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, opt = reference_model()
    step = torch.compile(opt.step, backend="aot_eager")
    w = watch(model, opt, accumulation_steps=ACC) if watched else None
    opt.zero_grad()
    for i, (x, y) in enumerate(reference_data()):
        mse(model, x, y, ACC).backward()
        if (i + 1) % ACC == 0:
            step()
            if not forget_zero_grad:
                opt.zero_grad()
    if w is not None:
        w.detach()
    return (counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]), w


@pytest.mark.parametrize("forget_zero_grad", [False, True])
def test_compiled_optimizer_step(forget_zero_grad):
    bare, _ = _graphs_of_a_compiled_step(watched=False)
    watched, w = _graphs_of_a_compiled_step(watched=True, forget_zero_grad=forget_zero_grad)
    assert watched == bare  # the step hooks run eagerly: dynamo neither traces nor breaks on them
    if forget_zero_grad:
        f = the(w, "uncleared-gradient")
        assert (f.params, f.step, f.backward) == (("weight", "bias"), 1, 2)
    else:
        assert w.findings == []


@pytest.mark.parametrize("switch", ["enable-context", "dynamo-config"])
def test_compiled_autograd_is_refused_with_one_warning_instead_of_false_findings(switch):
    import torch._dynamo
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    model, opt = reference_model()
    compiled = torch.compile(model, backend="aot_eager")

    @torch.compile(backend="aot_eager")
    def micro_batch(x, y):
        mse(compiled, x, y, ACC).backward()

    if switch == "enable-context":
        compiled_autograd_on = compiled_autograd._enable(torch.compile(backend="aot_eager"))
    else:
        compiled_autograd_on = torch._dynamo.config.patch(compiled_autograd=True)
    with (
        pytest.warns(GradientWarning, match="compiled autograd is not supported") as caught,
        watch(model, opt, accumulation_steps=ACC, on_finding="warn") as w,
        compiled_autograd_on,
    ):
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            micro_batch(x, y)
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert len([c for c in caught if issubclass(c.category, GradientWarning)]) == 1
    assert w.findings == []  # it would have counted 4 backward passes out of 8: accumulation-mismatch
    assert "stopped checking: compiled autograd is not supported" in w.report()
