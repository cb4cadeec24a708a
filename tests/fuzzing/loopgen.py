"""A grammar of legitimate training-loop idioms, single-bug mutations of them, and a runner.

``draw(rng)`` picks each idiom independently; ``render(spec)`` writes the loop as a standalone Python script
(what ran is what a failure report shows); ``run(spec)`` executes it without and then with gradwatch and
returns the findings and whether the training numbers stayed bit for bit the same.
"""

from __future__ import annotations

import random
import textwrap
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

CLEARS = ("opt-none", "opt-keep", "model-none", "model-keep", "p-none", "p-zero", "foreach-zero")
OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw")
MUTATIONS = (
    "no-clear",
    "clear-in-window",
    "double-step",
    "window-no-backward",
    "declared-larger",
    "layer-out",
    "nan-kept",
    "clip-before-unscale",
    "head-never-stepped",
    "head-every-other",
    "tail-never-stepped",
    "unscaled-loss",
    "short-window-by-acc",
)
BODY = ("inp.weight", "inp.bias", "mid.weight", "mid.bias", "mid2.weight", "mid2.bias")
HEAD = ("out.weight", "out.bias")


@dataclass(frozen=True)
class LoopSpec:
    """One training loop: each field an idiom drawn independently (defaults: the plainest loop)."""

    acc: int = 1
    epoch_len: int = 4
    epochs: int = 1
    declare: bool = True
    clear_at: str = "after-step"  # or "window-start"
    clear_how: str = "opt-none"
    optim: str = "sgd"
    foreach: bool | None = None
    groups: int = 1
    scheduler: bool = False
    two_opts: bool = False
    clip: str | None = None  # "norm" | "value"
    scaler: bool = False
    autocast: bool = False
    tied: bool = False
    frozen: str | None = None  # "in-opt" | "out-of-opt"
    dropout: bool = False
    checkpoint: str | None = None  # "reentrant" | "non-reentrant"
    validation: str | None = None  # "no_grad" | "inference_mode"
    nan: str | None = None  # "scaler-skip" | "check-zero_grad" | "check-by-hand" | "check-zero_"
    grad_edit: str | None = None  # before the step: "replace" (p.grad = p.grad * 1.0) | "in-place" (p.grad.mul_)
    finite_check: str = "step"
    mutation: str | None = None
    seed: int = 0

    def idioms(self) -> dict[str, Any]:
        """The fields that differ from the plainest loop (what a report groups by)."""
        plain = LoopSpec()
        skip = ("mutation", "seed")
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in skip and getattr(self, f.name) != getattr(plain, f.name)
        }


def draw(rng: random.Random, mutate: bool = False) -> LoopSpec:
    """A random legitimate loop; with ``mutate``, one bug planted in it (a mutation that fits the loop)."""
    scaler = rng.random() < 0.3
    nan_choices = [None, None, None, "check-zero_grad", "check-by-hand", "check-zero_"] + (
        ["scaler-skip"] if scaler else []
    )
    spec = LoopSpec(
        acc=(acc := rng.randint(1, 4)),
        epoch_len=rng.randint(acc, 9),  # an epoch shorter than one window never steps a full one: a README limit
        epochs=rng.randint(1, 3),
        declare=rng.random() < 0.7,
        clear_at=rng.choice(["after-step", "window-start"]),
        clear_how=rng.choice(CLEARS),
        optim=rng.choice(OPTIMIZERS),
        foreach=rng.choice([None, True, False]),
        groups=rng.choice([1, 2]),
        scheduler=rng.random() < 0.3,
        two_opts=rng.random() < 0.3,
        clip=rng.choice([None, None, "norm", "value"]),
        scaler=scaler,
        autocast=rng.random() < 0.2,
        tied=rng.random() < 0.3,
        frozen=rng.choice([None, None, "in-opt", "out-of-opt"]),
        dropout=rng.random() < 0.3,
        checkpoint=rng.choice([None, None, "reentrant", "non-reentrant"]),
        validation=rng.choice([None, None, "no_grad", "inference_mode"]),
        nan=rng.choice(nan_choices),
        finite_check=rng.choice(["step", "backward"]),
        grad_edit=rng.choice([None, None, "replace", "in-place"]),
        seed=rng.randrange(1 << 16),
    )
    if not mutate:
        return spec
    fitting = [m for m in MUTATIONS if applicable(spec, m)]
    # one bug at a time: no NaN batch around it (a NaN window skipped may hide the one window it shows in)
    return replace(spec, mutation=rng.choice(fitting), nan=None)


def total_steps(spec: LoopSpec) -> int:
    per_epoch = -(-spec.epoch_len // spec.acc)
    return per_epoch * spec.epochs


def applicable(spec: LoopSpec, mutation: str) -> bool:
    """Whether ``mutation`` can be planted in ``spec`` and shows within its length."""
    full_windows = spec.epoch_len // spec.acc
    if mutation == "no-clear":
        return total_steps(spec) >= 2
    if mutation == "clear-in-window":
        return spec.acc >= 2 and full_windows >= 1 and spec.declare
    if mutation == "double-step":
        return not spec.scaler
    if mutation == "window-no-backward":
        return not spec.scaler
    if mutation == "declared-larger":
        return full_windows >= 1
    if mutation == "layer-out":
        return True
    if mutation == "nan-kept":
        return not spec.scaler
    if mutation == "clip-before-unscale":
        return spec.scaler and spec.clip is not None
    if mutation in ("head-never-stepped", "head-every-other"):
        return spec.two_opts and total_steps(spec) >= 2 + (mutation == "head-every-other")
    if mutation == "tail-never-stepped":
        return spec.acc >= 2 and spec.epoch_len % spec.acc != 0 and full_windows >= 1
    if mutation == "unscaled-loss":
        return spec.acc >= 2 and full_windows >= 1
    if mutation == "short-window-by-acc":  # a short window is one only against the declared window size
        return spec.declare and spec.acc >= 2 and spec.epoch_len % spec.acc != 0 and full_windows >= 1
    raise ValueError(mutation)


@dataclass(frozen=True)
class Expectation:
    """What a mutated loop must produce: one of ``kinds`` naming at least ``params``."""

    kinds: tuple[str, ...]
    params: tuple[str, ...] = ()


def expected(spec: LoopSpec) -> Expectation | None:
    m = spec.mutation
    if m is None:
        return None
    first = ("inp.weight",)  # in the first optimizer (the body, or the only one) of every loop
    return {
        "no-clear": Expectation(("uncleared-gradient",), first),
        "clear-in-window": Expectation(("discarded-gradient",), first),
        "double-step": Expectation(("stale-gradient",), first),
        "window-no-backward": Expectation(("empty-step",), first),
        "declared-larger": Expectation(("accumulation-mismatch",), first),
        "layer-out": Expectation(("orphan-gradient",), HEAD),
        "nan-kept": Expectation(("non-finite-gradient",), first),
        "clip-before-unscale": Expectation(("clip-before-unscale",), first),
        "head-never-stepped": Expectation(("discarded-gradient",), HEAD),
        "head-every-other": Expectation(("discarded-gradient",), HEAD),
        "tail-never-stepped": Expectation(("dangling-gradient",), first),
        "unscaled-loss": Expectation(("loss-scale",)),
        "short-window-by-acc": Expectation(("loss-scale",)),
    }[m]


# -- the script --------------------------------------------------------------------------------------
def render(spec: LoopSpec) -> str:
    """The loop as a standalone script: ``build()``, ``train(...)``, and a main that runs it watched."""
    s, m = spec, spec.mutation
    declared = (s.acc + 1 if m == "declared-larger" else s.acc) if s.declare or m == "declared-larger" else None
    lines = [
        "import torch",
        "from torch.utils.checkpoint import checkpoint",
        "",
        "import gradwatch",
        "",
        f"# {asdict(s)}",
        f"ACC, EPOCHS, EPOCH_LEN, DECLARED, GROUPS = {s.acc}, {s.epochs}, {s.epoch_len}, {declared}, {s.groups}",
        "",
        "",
        "class Net(torch.nn.Module):",
        "    def __init__(self):",
        "        super().__init__()",
        "        self.inp = torch.nn.Linear(6, 8)",
        "        self.mid = torch.nn.Linear(8, 8)",
        "        self.mid2 = torch.nn.Linear(8, 8)",
    ]
    if s.tied:
        lines.append("        self.mid2.weight = self.mid.weight  # tied weights")
    if s.frozen:
        lines += ["        self.frozen = torch.nn.Linear(8, 8)", "        self.frozen.requires_grad_(False)"]
    lines += [
        f"        self.drop = torch.nn.Dropout({0.2 if s.dropout else 0.0})",
        "        self.out = torch.nn.Linear(8, 1)",
    ]
    lines += ["", "    def block(self, h):", "        return torch.tanh(self.mid2(torch.tanh(self.mid(h))))", ""]
    lines += ["    def forward(self, x):", "        h = torch.tanh(self.inp(x))"]
    if s.checkpoint:
        lines.append(f"        h = checkpoint(self.block, h, use_reentrant={s.checkpoint == 'reentrant'})")
    else:
        lines.append("        h = self.block(h)")
    if s.frozen:
        lines.append("        h = torch.tanh(self.frozen(h))")
    lines += ["        return self.out(self.drop(h))", "", ""]

    head_out = m == "layer-out"
    opt_cls = {"sgd": "SGD", "sgd-momentum": "SGD", "adam": "Adam", "adamw": "AdamW"}[s.optim]
    kwargs = {"sgd": "lr=0.01", "sgd-momentum": "lr=0.01, momentum=0.9", "adam": "lr=1e-3", "adamw": "lr=1e-3"}[s.optim]
    kwargs += f", foreach={s.foreach}"
    lines += ["def groups(params):", "    params = list(params)"]
    lines.append(
        "    return [{'params': params[0::2]}, {'params': params[1::2]}] if len(params) > 1 and GROUPS == 2 else params"
    )
    lines += ["", "", "def build():", f"    torch.manual_seed({s.seed})", "    model = Net()"]
    body = "[model.inp, model.mid, model.mid2" + (", model.frozen" if s.frozen == "in-opt" else "") + "]"
    if s.two_opts:
        lines.append(f"    body = [p for layer in {body} for p in layer.parameters()]")
        lines.append(f"    opts = [torch.optim.{opt_cls}(groups(dict.fromkeys(body)), {kwargs})]")
        if not head_out:
            lines.append(f"    opts.append(torch.optim.{opt_cls}(groups(model.out.parameters()), {kwargs}))")
    else:
        layers = body[:-1] + ("" if head_out else ", model.out") + "]"
        lines.append(f"    params = [p for layer in {layers} for p in layer.parameters()]")
        lines.append(f"    opts = [torch.optim.{opt_cls}(groups(dict.fromkeys(params)), {kwargs})]")
    lines.append(
        "    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]"
        if s.scheduler
        else "    scheds = []"
    )
    lines.append("    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)" if s.scaler else "    scaler = None")
    lines.append(f"    g = torch.Generator().manual_seed({s.seed + 1})")
    lines.append(
        "    data = [(torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g)) for _ in range(EPOCH_LEN)]"
    )
    lines += ["    return model, opts, scheds, scaler, data", "", ""]

    clear = {
        "opt-none": "for o in opts:\n    o.zero_grad()",
        "opt-keep": "for o in opts:\n    o.zero_grad(set_to_none=False)",
        "model-none": "model.zero_grad()",
        "model-keep": "model.zero_grad(set_to_none=False)",
        "p-none": "for p in model.parameters():\n    p.grad = None",
        "p-zero": "for p in model.parameters():\n    if p.grad is not None:\n        p.grad.zero_()",
        "foreach-zero": "grads = [p.grad for p in model.parameters() if p.grad is not None]\nif grads:\n"
        "    torch._foreach_zero_(grads)",
    }[s.clear_how]
    lines += ["def clear(model, opts):", textwrap.indent(clear, "    "), "", ""]
    drop = {
        "check-zero_grad": "for o in opts:\n    o.zero_grad()",
        "check-by-hand": "for p in model.parameters():\n    p.grad = None",
        "check-zero_": "for p in model.parameters():\n    if p.grad is not None:\n        p.grad.zero_()",
    }
    clip = {
        "norm": "torch.nn.utils.clip_grad_norm_([p for o in opts for g in o.param_groups for p in g['params']], 1.0)",
        "value": "torch.nn.utils.clip_grad_value_([p for o in opts for g in o.param_groups for p in g['params']], 0.5)",
        None: "",
    }[s.clip]

    step_lines = []  # one optimizer step of the loop, `k` counts the steps so far
    if s.grad_edit:  # a gradient edited between backward and step (denoised, rescaled): numbers unchanged here
        edit = "p.grad = p.grad * 1.0" if s.grad_edit == "replace" else "p.grad.mul_(1.0)"
        step_lines.append(f"for p in model.parameters():\n    if p.grad is not None:\n        {edit}")
    if s.scaler:
        unscale = ["for o in opts:", "    scaler.unscale_(o)"]
        if s.clip:
            step_lines += [clip, *unscale] if m == "clip-before-unscale" else [*unscale, clip]
        else:
            step_lines += unscale
        step_lines += stepping(s, "scaler.step({o})")
        step_lines.append("scaler.update()")
    else:
        if s.clip:
            step_lines.append(clip)
        step_lines += stepping(s, "{o}.step()")
    if m == "double-step":
        step_lines.append("if k == 0:\n    opts[0].step()  # the same gradient again")
    step_lines += ["for sched in scheds:", "    sched.step()"] if s.scheduler else []
    if s.nan and s.nan.startswith("check"):
        finite = "all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)"
        step_lines = [
            f"if {finite}:",
            textwrap.indent("\n".join(step_lines), "    "),
            "else:",
            textwrap.indent(drop[s.nan], "    "),
        ]
    if s.clear_at == "after-step" and m != "no-clear":
        step_lines.append("clear(model, opts)")
    if m == "window-no-backward":
        step_lines.append("if k == 0:\n    clear(model, opts)\n    opts[0].step()  # a window with no backward pass")
    step_lines.append("k += 1")

    # each micro-batch's loss divided by the size of its window (an epoch's short last one too)
    scale = {"unscaled-loss": "", "short-window-by-acc": " / ACC"}.get(m, " / min(ACC, len(data) - i // ACC * ACC)")  # type: ignore[arg-type]
    forward = f"    loss = torch.nn.functional.mse_loss(model(x), y){scale}"
    if s.autocast:
        forward = "\n".join(
            [
                "    with torch.autocast('cpu', dtype=torch.bfloat16):",
                "        out = model(x)",
                f"    loss = torch.nn.functional.mse_loss(out.float(), y){scale}",
            ]
        )
    backward = "    scaler.scale(loss).backward()" if s.scaler else "    loss.backward()"
    last = "(i + 1) % ACC == 0" if m == "tail-never-stepped" else "(i + 1) % ACC == 0 or i + 1 == len(data)"
    lines += ["def train(model, opts, scheds, scaler, data):", "    k = 0", "    for epoch in range(EPOCHS):"]
    loop = ["for i, (x, y) in enumerate(data):"]
    if s.clear_at == "window-start" and m != "no-clear":
        loop.append("    if i % ACC == 0:\n        clear(model, opts)")
    elif s.clear_at == "after-step" and m != "no-clear":
        loop.insert(0, "if epoch == 0:\n    clear(model, opts)")
    if s.nan or m == "nan-kept":  # one NaN batch: the last of the first window
        nan_at = min(s.acc, s.epoch_len) - 1
        loop.append(f"    if epoch == 0 and i == {nan_at}:\n        x = torch.full_like(x, float('nan'))")
    loop += [forward, backward]
    if m == "clear-in-window":
        loop.append("    if i % ACC == 0 and i + 1 < len(data):\n        clear(model, opts)  # inside the window")
    loop.append(f"    if {last}:")
    loop.append(textwrap.indent("\n".join(step_lines), "        "))
    if s.validation:
        ctx = "torch.no_grad()" if s.validation == "no_grad" else "torch.inference_mode()"
        loop.append(f"        with {ctx}:\n            model(data[0][0])")
    lines.append(textwrap.indent("\n".join(loop), "        "))
    lines += ["", "", "if __name__ == '__main__':", "    model, opts, scheds, scaler, data = build()"]
    lines.append(
        f"    with gradwatch.watch(model, opts, accumulation_steps=DECLARED, finite_check={s.finite_check!r}) as w:"
    )
    lines += ["        train(model, opts, scheds, scaler, data)", "    print(w.report())", ""]
    return "\n".join(lines)


def stepping(spec: LoopSpec, call: str) -> list[str]:
    """The step of each optimizer; the head's forgotten or skipped under those mutations."""
    if spec.mutation == "head-never-stepped":
        return [call.format(o="opts[0]") + "  # opts[1].step() forgotten"]
    if spec.mutation == "head-every-other":
        return [call.format(o="opts[0]"), "if k % 2 == 0:", "    " + call.format(o="opts[1]")]
    return ["for o in opts:", "    " + call.format(o="o")]


# -- running -----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    spec: LoopSpec
    findings: list = field(default_factory=list)
    same_numbers: bool = True
    error: str | None = None

    @property
    def alarms(self) -> list:
        """Findings of severity error or warning."""
        return [f for f in self.findings if f.severity != "info"]

    def ok(self) -> bool:
        if self.error or not self.same_numbers:
            return False
        want = expected(self.spec)
        if want is None:
            return not self.alarms
        return any(f.kind in want.kinds and set(want.params) <= set(f.params) for f in self.alarms)


def run(spec: LoopSpec) -> Outcome:
    """Run the rendered loop without gradwatch, then with it; compare the weights bit for bit."""
    import warnings

    import torch

    import gradwatch

    namespace: dict[str, Any] = {"__name__": "gradwatch_fuzz_loop"}
    exec(compile(render(spec), f"<loop seed={spec.seed}>", "exec"), namespace)
    outcome = Outcome(spec)
    try:
        torch.manual_seed(spec.seed)
        model, opts, scheds, scaler, data = namespace["build"]()
        namespace["train"](model, opts, scheds, scaler, data)
        plain = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(spec.seed)
        model, opts, scheds, scaler, data = namespace["build"]()
        declared = namespace["DECLARED"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with gradwatch.watch(
                model, opts, accumulation_steps=declared, on_finding="record", finite_check=spec.finite_check
            ) as w:
                namespace["train"](model, opts, scheds, scaler, data)
        outcome.findings = w.findings
        outcome.same_numbers = all(
            torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
            for a, b in zip(plain, model.parameters(), strict=True)
        )
        if w._internal_error:
            outcome.error = w._internal_error
    except Exception as error:  # the generated loop itself failed: a generator bug, reported as such
        outcome.error = f"{type(error).__name__}: {error}"
    return outcome


def shrink(spec: LoopSpec) -> LoopSpec:
    """The failing ``spec`` with as many idioms reset to the plainest loop's as keep it failing."""
    plain = LoopSpec()
    current = spec
    changed = True
    while changed:
        changed = False
        for f in fields(LoopSpec):
            if f.name in ("mutation", "seed") or getattr(current, f.name) == getattr(plain, f.name):
                continue
            candidate = replace(current, **{f.name: getattr(plain, f.name)})
            if candidate.mutation is not None and not applicable(candidate, candidate.mutation):
                continue
            if candidate.nan == "scaler-skip" and not candidate.scaler:
                continue
            if not run(candidate).ok():
                current, changed = candidate, True
    return current
