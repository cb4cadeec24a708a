"""Legitimate idioms that once drew false alarms (issue 10): each trains bit for bit as without gradwatch and
draws no finding of severity error or warning."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from helpers import bugs, mse, reference_data, the, watch, window_size
from torch.utils.checkpoint import checkpoint

ACC = 2


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(dtype)


def _clean_and_unchanged(
    build: Callable[[], tuple[torch.nn.Module, list[torch.optim.Optimizer]]],
    loop: Callable[[torch.nn.Module, list[torch.optim.Optimizer]], None],
    **watch_kwargs,
):
    """Run ``loop`` without and with gradwatch: no error or warning finding, the same weights bit for bit."""
    model, opts = build()
    loop(model, opts)
    plain = [p.detach().clone() for p in model.parameters()]
    model, opts = build()
    with watch(model, opts, **watch_kwargs) as w:
        loop(model, opts)
    assert bugs(w) == [], w.report()
    assert all(torch.equal(a, b) for a, b in zip(plain, model.parameters(), strict=True))
    return w


def _sgd(model=None):
    def build():
        m = model() if model is not None else _mlp()
        return m, [torch.optim.SGD(m.parameters(), lr=0.01)]

    return build


def _accumulation(data, clear_first: bool = True, before_step=None, clear=None):
    """The reference accumulation loop over ``data`` with the (only) optimizer, as a ``loop(model, opts)``;
    ``before_step(model)`` runs between the window's last backward and the step, ``clear(model)`` replaces
    ``zero_grad()`` after the step."""

    def loop(model, opts):
        (opt,) = opts
        if clear_first:
            opt.zero_grad()
        for i, (x, y) in enumerate(data):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                if before_step is not None:
                    before_step(model)
                opt.step()
                (clear or (lambda _: opt.zero_grad()))(model)

    return loop


# -- the epoch's short last window -------------------------------------------------------------------
@pytest.mark.parametrize("batches", [7, 5, 3])
def test_stepping_on_the_short_last_window_of_each_epoch(batches):
    data = reference_data(batches)

    def loop(model, opts):
        (opt,) = opts
        for _ in range(3):  # epochs
            opt.zero_grad()
            for i, (x, y) in enumerate(data):
                mse(model, x, y, window_size(i, len(data), ACC)).backward()  # the short window: its own mean
                if (i + 1) % ACC == 0 or i + 1 == len(data):  # what Trainer, Lightning and Accelerate do
                    opt.step()
                    opt.zero_grad()

    w = _clean_and_unchanged(_sgd(), loop, accumulation_steps=ACC)
    assert w.findings == []


# -- reentrant activation checkpointing, every layout ------------------------------------------------
class _SharedBlock(torch.nn.Module):
    """One block used by two checkpointed segments: the first parameter reached is inside a checkpoint."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Linear(10, 10)

    def forward(self, x):
        h = checkpoint(self.block, x.requires_grad_(), use_reentrant=True)
        return checkpoint(self.block, torch.tanh(h), use_reentrant=True).sum(dim=1, keepdim=True)


class _TiedInsideCheckpoint(torch.nn.Module):
    """An output head inside the checkpointed segment, tied to the embedding outside it: the one weight
    accumulates twice per backward, first in the nested pass, then in the outer one."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 10)
        self.block = torch.nn.Linear(10, 10)
        self.head = torch.nn.Linear(10, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        tokens = (x.abs() * 5).long().clamp(max=19)
        hidden = self.embed(tokens)
        logits = checkpoint(lambda h: self.head(torch.tanh(self.block(h))), hidden, use_reentrant=True)
        return logits.mean(dim=(1, 2)).unsqueeze(1)


class _AllInsideCheckpoints(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(10, 8), torch.nn.Linear(8, 1)

    def forward(self, x):
        h = checkpoint(self.a, x.requires_grad_(), use_reentrant=True)
        return checkpoint(self.b, torch.tanh(h), use_reentrant=True)


class _Nested(torch.nn.Module):
    """A checkpointed segment that itself checkpoints a block (nested reentrant backward passes)."""

    def __init__(self):
        super().__init__()
        self.inner, self.outer = torch.nn.Linear(10, 10), torch.nn.Linear(10, 1)

    def forward(self, x):
        segment = lambda t: self.outer(checkpoint(self.inner, t, use_reentrant=True))  # noqa: E731
        return checkpoint(segment, x.requires_grad_(), use_reentrant=True)


@pytest.mark.parametrize("model", [_SharedBlock, _TiedInsideCheckpoint, _AllInsideCheckpoints, _Nested])
def test_reentrant_checkpointing_counts_one_pass_per_backward(model):
    data = reference_data()

    loop = _accumulation(data)

    def build():
        torch.manual_seed(0)
        return _sgd(model)()

    w = _clean_and_unchanged(build, loop, accumulation_steps=ACC)
    assert w.findings == []
    assert w._tracker.ledger.backwards == len(data)
    assert w._tracker.ledger.steps == [len(data) // ACC]


# -- .grad replaced by a tensor with values ----------------------------------------------------------
REPLACEMENTS = {
    "scaled": lambda p: p.grad * 0.5,
    "divided": lambda p: p.grad / ACC,
    "nan_to_num": lambda p: torch.nan_to_num(p.grad),
    "clone": lambda p: p.grad.clone(),
}


@pytest.mark.parametrize("replace", list(REPLACEMENTS.values()), ids=list(REPLACEMENTS))
def test_grad_replaced_between_backward_and_step(replace):
    def replace_each(model):
        for p in model.parameters():
            p.grad = replace(p)

    loop = _accumulation(reference_data(), clear_first=False, before_step=replace_each)
    assert _clean_and_unchanged(_sgd(), loop, accumulation_steps=ACC).findings == []


@pytest.mark.parametrize("clear", ["zero_grad", "none"])
@pytest.mark.parametrize("how", ["autograd.grad", "torch.func"])
def test_gradients_computed_outside_backward_and_assigned(how, clear):
    """Gradient surgery, PCGrad, DP-SGD: the loop computes the gradient itself and assigns it to .grad."""
    data = reference_data()

    def grads_of(model, x, y):
        if how == "autograd.grad":
            return torch.autograd.grad(mse(model, x, y), list(model.parameters()))
        params = dict(model.named_parameters())
        loss = lambda ps: torch.nn.functional.mse_loss(torch.func.functional_call(model, ps, (x,)), y)  # noqa: E731
        grads = torch.func.grad(loss)({k: v.detach() for k, v in params.items()})
        return [grads[k] for k in params]

    def loop(model, opts):
        (opt,) = opts
        for x, y in data:
            for p, g in zip(model.parameters(), grads_of(model, x, y), strict=True):
                p.grad = g
            opt.step()
            if clear == "zero_grad":
                opt.zero_grad()

    assert _clean_and_unchanged(_sgd(), loop).findings == []


# -- clearing by hand with several dtypes --------------------------------------------------------------
class _TwoDtypes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(10, 4).double()
        self.b = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.double())).float())


def _zero_each(model):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()


def _foreach_zero(model):
    torch._foreach_zero_([p.grad for p in model.parameters() if p.grad is not None])


def _data_zero(model):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.data.zero_()


@pytest.mark.parametrize("by_hand", [_zero_each, _foreach_zero, _data_zero])
def test_clearing_by_hand_with_parameters_of_two_dtypes(by_hand):
    loop = _accumulation(reference_data(), clear_first=False, clear=by_hand)
    assert _clean_and_unchanged(_sgd(_TwoDtypes), loop, accumulation_steps=ACC).findings == []


def test_clearing_a_single_parameter_model_by_hand():
    data = reference_data()

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 1, bias=False)
        return model, [torch.optim.SGD(model.parameters(), lr=0.01)]

    def loop(model, opts):
        (opt,) = opts
        for x, y in data:
            mse(model, x, y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            _zero_each(model)

    assert _clean_and_unchanged(build, loop, accumulation_steps=1).findings == []


# -- an optimizer stepped inside the backward ---------------------------------------------------------
@pytest.mark.parametrize("hooks_first", [True, False], ids=["user-hooks-first", "watch-first"])
def test_optimizer_step_in_a_post_accumulate_grad_hook(hooks_first):
    """PyTorch's tutorial: one optimizer per parameter, stepped and cleared from a post-accumulate-grad hook."""
    data = reference_data()
    handles = []

    def build():
        model = _mlp()
        opts = {p: torch.optim.Adam([p], lr=1e-3, foreach=False) for p in model.parameters()}
        return model, list(opts.values())

    def add_hooks(model, opts):
        by_param = {id(o.param_groups[0]["params"][0]): o for o in opts}

        def step_in_backward(p):
            by_param[id(p)].step()
            by_param[id(p)].zero_grad()

        handles.extend(p.register_post_accumulate_grad_hook(step_in_backward) for p in model.parameters())

    def loop(model, opts):
        if not handles:
            add_hooks(model, opts)
        for x, y in data:
            mse(model, x, y).backward()
        for h in handles:
            h.remove()
        handles.clear()

    model, opts = build()
    loop(model, opts)
    plain = [p.detach().clone() for p in model.parameters()]
    model, opts = build()
    if hooks_first:
        add_hooks(model, opts)
    with watch(model, opts) as w:
        loop(model, opts)
    assert w.findings == [], w.report()
    assert all(torch.equal(a, b) for a, b in zip(plain, model.parameters(), strict=True))
    assert w._tracker.ledger.steps == [len(data)] * len(opts)
    assert w._tracker.ledger.backwards == len(data)


# -- two passes per step with a clear in between (SAM) ------------------------------------------------
RHO = 0.05


def _sam_iteration(model, opt, x, y):
    mse(model, x, y).backward()  # ascent pass
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
        shifts = [p.grad * (RHO / (norm + 1e-12)) for p in params]
        for p, e in zip(params, shifts, strict=True):
            p.add_(e)  # climb to w + e(w)
    opt.zero_grad()
    mse(model, x, y).backward()  # descent pass, at the perturbed weights
    with torch.no_grad():
        for p, e in zip(params, shifts, strict=True):
            p.sub_(e)  # back to w
    opt.step()
    opt.zero_grad()


class SAM(torch.optim.Optimizer):
    """The shape of the popular SAM implementation: first_step/second_step around a base optimizer."""

    def __init__(self, params, base, rho=RHO, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        norm = torch.norm(torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]]))
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()


@pytest.mark.parametrize("accumulation_steps", [None, 1])
def test_sharpness_aware_minimization_by_hand(accumulation_steps):
    data = reference_data()

    def loop(model, opts):
        for x, y in data:
            _sam_iteration(model, opts[0], x, y)

    assert _clean_and_unchanged(_sgd(), loop, accumulation_steps=accumulation_steps).findings == []


def test_sharpness_aware_minimization_optimizer_with_a_closure():
    data = reference_data()

    def build():
        model = _mlp()
        return model, [SAM(model.parameters(), torch.optim.SGD, lr=0.01)]

    def loop(model, opts):
        (opt,) = opts
        for x, y in data:

            def closure(x=x, y=y):
                loss = mse(model, x, y)
                loss.backward()
                return loss

            mse(model, x, y).backward()
            opt.step(closure)
            opt.zero_grad()

    assert _clean_and_unchanged(build, loop).findings == []


# -- passes run only to be read, then cleared: adversarial training, multi-task gradient surgery ------------------
EPSILON, ALPHA = 0.1, 0.05


def _adversarial_training(attack_passes: int, by_autograd_grad: bool = False):
    """FGSM (one attack pass) or PGD (several) adversarial training as "Fast is better than free" writes it: the
    attack's loss.backward() reads the input's gradient and fills the parameters' too, which zero_grad() drops
    before the training pass (``by_autograd_grad``: the attack asks torch.autograd.grad for the input's only)."""
    data = reference_data()

    def loop(model, opts):
        (opt,) = opts
        for x, y in data:
            delta = torch.zeros_like(x).uniform_(-EPSILON, EPSILON).requires_grad_(True)
            for _ in range(attack_passes):
                if by_autograd_grad:
                    (grad,) = torch.autograd.grad(mse(model, x + delta, y), delta)
                else:
                    mse(model, x + delta, y).backward()
                    grad = delta.grad
                delta.data = (delta + ALPHA * grad.sign()).clamp(-EPSILON, EPSILON)
                if delta.grad is not None:
                    delta.grad.zero_()
            opt.zero_grad()
            mse(model, x + delta.detach(), y).backward()
            opt.step()

    return loop


@pytest.mark.parametrize("attack_passes", [1, 3], ids=["fgsm", "pgd"])
def test_adversarial_training_with_accumulation_steps_is_clean(attack_passes):
    w = _clean_and_unchanged(_sgd(), _adversarial_training(attack_passes), accumulation_steps=1)
    assert w.findings == []


def test_adversarial_training_without_accumulation_steps_is_told_how_to_tell_its_passes():
    """Without accumulation_steps a pass dropped before every step looks like a zero_grad() at every micro-batch of
    a two-pass window (README, Limits); the message says both ways to a clean run, which the test above takes."""
    model, opts = _sgd()()
    with watch(model, opts) as w:
        _adversarial_training(1)(model, opts)
    f = the(w, "discarded-gradient")
    assert (f.params, f.step) == (("0.weight", "0.bias", "2.weight", "2.bias"), 2)
    assert "torch.autograd.grad(...)" in f.message and "pass accumulation_steps to watch()" in f.message
    assert _clean_and_unchanged(_sgd(), _adversarial_training(1, by_autograd_grad=True)).findings == []


def _gradient_logging(by_autograd_grad: bool):
    """Before each window of 2, the gradient of a probe batch is read for logging: by backward() then zero_grad()
    (a partial window dropped before each step), or by torch.autograd.grad."""
    data = reference_data()
    probe = reference_data(1, seed=1)[0]

    def loop(model, opts):
        (opt,) = opts
        for i, (x, y) in enumerate(data):
            if i % ACC == 0:
                if by_autograd_grad:
                    torch.autograd.grad(mse(model, *probe), list(model.parameters()))
                else:
                    mse(model, *probe).backward()
                    opt.zero_grad()
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()

    return loop


def test_a_gradient_read_by_backward_inside_an_accumulation_loop_is_told_to_use_autograd_grad():
    model, opts = _sgd()()
    with watch(model, opts, accumulation_steps=ACC) as w:
        _gradient_logging(by_autograd_grad=False)(model, opts)
    f = the(w, "dangling-gradient")
    assert (f.params, f.step) == (("0.weight", "0.bias", "2.weight", "2.bias"), 1)
    assert "torch.autograd.grad(...)" in f.message
    assert _clean_and_unchanged(_sgd(), _gradient_logging(by_autograd_grad=True), accumulation_steps=ACC).findings == []


class _TwoTasks(torch.nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = torch.nn.Linear(10, 4)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(heads)])

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        h = torch.tanh(self.shared(x))
        heads = [self.heads[0], self.heads[0]] if len(self.heads) == 1 else list(self.heads)
        return [torch.nn.functional.mse_loss(head(h) * (t + 1), y) for t, head in enumerate(heads)]


@pytest.mark.parametrize("accumulation_steps", [None, 1])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("heads", [1, 2], ids=["one-head", "a-head-per-task"])
def test_per_task_gradients_read_cleared_and_combined_by_hand(heads, set_to_none, accumulation_steps):
    """PCGrad's shape (and other multi-task gradient methods'): per task, zero_grad(), backward, read the
    gradients; then assign the combined gradient to .grad and step."""
    data = reference_data()

    def build():
        model = _TwoTasks(heads)
        return model, [torch.optim.SGD(model.parameters(), lr=0.01)]

    def loop(model, opts):
        (opt,) = opts
        params = list(model.parameters())
        for x, y in data:
            per_task = []
            for loss in model.losses(x, y):
                opt.zero_grad(set_to_none=set_to_none)
                loss.backward(retain_graph=True)
                per_task.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
            for p, *grads in zip(params, *per_task, strict=True):
                p.grad = torch.stack(grads).mean(0)
            opt.step()

    assert _clean_and_unchanged(build, loop, accumulation_steps=accumulation_steps).findings == []


# -- a gradient already there when watching, cleared before the loop ---------------------------------
def test_a_sanity_backward_cleared_before_the_loop():
    data = reference_data()

    def build():
        model, opts = _sgd()()
        mse(model, *data[0]).backward()  # a sanity check before training
        return model, opts

    loop = _accumulation(data)

    assert _clean_and_unchanged(build, loop, accumulation_steps=ACC).findings == []


def test_accumulation_steps_accepts_any_integral_number():
    np = pytest.importorskip("numpy")
    data = reference_data()

    loop = _accumulation(data, clear_first=False)

    for steps in (np.int64(ACC), torch.tensor(ACC).item()):
        w = _clean_and_unchanged(_sgd(), loop, accumulation_steps=steps)
        assert w.accumulation_steps == ACC


# -- a NaN window dropped by hand (issue 15) ----------------------------------------------------------
def _zero_by_hand(model):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()


def _none_by_hand(model):
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("finite_check", ["step", "backward"])
@pytest.mark.parametrize("drop", [_zero_by_hand, _none_by_hand], ids=["zero_", "None"])
@pytest.mark.parametrize("scaler", [False, True], ids=["own-check", "grad-scaler"])
def test_a_nan_window_skipped_then_dropped_by_hand(drop, finite_check, scaler):
    data = reference_data(7)
    data[1] = (torch.full_like(data[1][0], float("nan")), data[1][1])

    def loop(model, opts):
        (opt,) = opts
        grad_scaler = torch.amp.GradScaler("cpu") if scaler else None
        for i, (x, y) in enumerate(data):
            loss = mse(model, x, y, window_size(i, len(data), ACC))
            (grad_scaler.scale(loss) if scaler else loss).backward()
            if (i + 1) % ACC == 0 or i + 1 == len(data):
                if scaler:
                    grad_scaler.step(opt)  # skips the NaN window itself
                    grad_scaler.update()
                elif all(torch.isfinite(p.grad).all() for p in model.parameters()):
                    opt.step()
                drop(model)

    assert bugs(_clean_and_unchanged(_sgd(), loop, accumulation_steps=ACC, finite_check=finite_check)) == []


class _WithAZeroGradient(torch.nn.Module):
    """A parameter whose gradient is exactly zero every pass (a gate held shut), next to ordinary ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(10, 1)
        self.gate = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.body(x) + 0.0 * self.gate


def test_clipping_every_micro_batch_with_a_zero_gradient_among_them():
    data = reference_data()

    def loop(model, opts):
        (opt,) = opts
        for i, (x, y) in enumerate(data):
            mse(model, x, y, ACC).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # changes every .grad in place, each pass
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()

    assert _clean_and_unchanged(_sgd(_WithAZeroGradient), loop, accumulation_steps=ACC).findings == []


@pytest.mark.parametrize("finite_check", ["step", "backward"])
@pytest.mark.parametrize("streaming", [False, True], ids=["detect", "tensorboard"])
def test_huge_but_finite_gradients_are_not_called_non_finite(finite_check, streaming, tmp_path):
    """Gradients near 1e20 are finite, but their 2-norm overflows float32: the values are checked before accusing."""
    data = [(torch.full((4, 10), 1e19), None) for _ in range(4)]

    def loop(model, opts):
        (opt,) = opts
        for i, (x, _) in enumerate(data):
            (model(x).sum() / ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 1)
        return model, [torch.optim.SGD(model.parameters(), lr=1e-30)]

    logdir = tmp_path if streaming else None
    _clean_and_unchanged(build, loop, accumulation_steps=ACC, finite_check=finite_check, logdir=logdir)
