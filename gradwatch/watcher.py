"""``watch()`` and the ``Watcher``: argument checks, wiring, and the attach/detach lifecycle."""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
import weakref
from types import TracebackType
from typing import Any, Iterable, Sequence, Union

import torch

from .finding_log import POLICIES, FindingLog, OnFinding, warn
from .findings import KINDS, Finding, GradientBugError
from .fsdp2 import fsdp2_modules
from .hooks import GRAD_SCALER, HookSet
from .ledger import NO_OWNER, Ledger, Occurrence
from .report import render_report
from .sinks import RunInfo, Sink, Sinks
from .sinks.build import open_sinks
from .sinks.tensorboard import TensorBoardOptions
from .tracker import Tracker

DDP = torch.nn.parallel.DistributedDataParallel
Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]]

FINITE_CHECKS = ("step", "backward")
COMPILED_MODULE = "_orig_mod"  # torch.compile's OptimizedModule holds the user's module under this name
_watched: weakref.WeakSet = weakref.WeakSet()  # models and optimizers under a live watch


class Watcher:
    """A live watch over one model and its optimizer(s). Use ``detach()`` or a ``with`` block to end it."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        accumulation_steps: int | None,
        on_finding: OnFinding,
        finite_check: str = "step",
        sinks: Sequence[Sink] = (),
        scaler: Any = None,
        audit_losses: bool = True,
    ) -> None:
        ddp = model if isinstance(model, DDP) else None
        sharded = fsdp2_modules(model)
        params, names, owners = _collect(model.module if ddp is not None else model, optimizers)
        rank, world_size = _distributed()
        self._sinks = Sinks(sinks, warn)
        self._log = FindingLog(names, on_finding, self._finding_to_sinks if sinks else None)
        self._on_finding = on_finding
        self._internal_error: str | None = None
        self._tracker = Tracker(
            params,
            Ledger(owners, len(optimizers), accumulation_steps),
            _Outbox(self),
            finite_check=finite_check,
            sinks=self._sinks,
            scaler=scaler,
            ddp=ddp,
            count_syncs=world_size is not None,  # one rank: DDP's all-reduce communicates nothing
            audit_losses=audit_losses,
            sharded=bool(sharded),
        )
        self._tracker.adopt_existing_gradients(report=True)  # reported if a step consumes it
        # closes the sinks once, whichever comes first: detach(), or every optimizer (and the watch) collected
        self._close_sinks = weakref.finalize(self, _close_sinks, self._sinks)
        if sinks:
            layout = tuple(
                (type(opt).__name__, tuple(i for i, owner in enumerate(owners) if owner == o))
                for o, opt in enumerate(optimizers)
            )
            self._sinks.started(RunInfo(tuple(names), layout, accumulation_steps, rank, world_size))
        self._hooks = HookSet(self._tracker, on_all_optimizers_gone=self._close_sinks)
        self._targets = [weakref.ref(model), *(weakref.ref(o) for o in optimizers)]
        self._hooks.install(
            enumerate(params),
            optimizers,
            contribution_norms=self._sinks.wants_contributions,
            audit_losses=audit_losses,
        )
        self._hooks.watch_sharded(sharded)
        _watched.update([model, *optimizers])
        self._attached = True

    # -- public API --------------------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        """The findings so far: each distinct problem once, with its ``count``."""
        return list(self._log.findings)

    @property
    def stopped(self) -> str | None:
        """Why gradwatch stopped checking part-way (an internal error, an unsupported mode), or None: a run
        with a reason here was not fully checked, whatever ``findings`` say."""
        return self._internal_error

    @property
    def attached(self) -> bool:
        """Whether the hooks are still in place."""
        return self._attached

    def report(self) -> str:
        """A human-readable summary of the run and its findings."""
        ledger = self._tracker.ledger
        if self._internal_error:
            status = f"stopped checking: {self._internal_error}"
        else:
            status = "attached" if self._attached else "detached"
        return render_report(ledger.backwards, ledger.steps, ledger.clears, len(ledger.owners), self.findings, status)

    def assert_clean(self, allow: Iterable[str] = ()) -> None:
        """Raise ``GradientBugError`` listing every error/warning finding whose kind is not in ``allow``."""
        allowed = set([allow] if isinstance(allow, str) else allow)
        unknown = allowed - set(KINDS)
        if unknown:
            raise ValueError(f"assert_clean(allow=...) got unknown kind(s) {sorted(unknown)}; known kinds: {KINDS}")
        bugs = tuple(f for f in self._log.findings if f.severity != "info" and f.kind not in allowed)
        if bugs:
            listing = "\n".join(f"  - {f}" for f in bugs)
            raise GradientBugError(f"gradwatch found {len(bugs)} gradient bug(s):\n{listing}", bugs)

    def detach(self) -> None:
        """Run the end-of-run checks and remove every hook. Idempotent."""
        if not self._attached:
            return
        self._attached = False
        self._tracker.pending_stop = None  # an optimizer collected at the end of the run stops nothing
        try:
            self._hooks.grouper.close_stale()
            self._tracker.finish()
        finally:
            self._hooks.remove()
            if self._close_sinks.alive:
                self._tracker.finish_sinks(self.findings)
                self._close_sinks.detach()
            self._tracker.release()
            for ref in self._targets:
                target = ref()
                if target is not None:
                    _watched.discard(target)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.detach()
            return
        with contextlib.suppress(GradientBugError):  # do not mask the exception already leaving the block
            self.detach()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        n_params = len(self._tracker.ledger.owners)
        return f"<gradwatch.Watcher {state}: {n_params} parameters, {len(self._log.findings)} findings>"

    def adopt_existing_gradients(self) -> None:
        """For an integration that attaches mid-run (``gradwatch run`` at the first step): the gradients already in
        ``.grad`` are one open window of unknown size, expected, not a ``pre-existing-gradient``."""
        self._tracker.adopt_existing_gradients()

    @property
    def accumulation_steps(self) -> int | None:
        """The backward passes each step is meant to consume (None: not checked). Settable between two windows (an
        accumulation schedule, such as Lightning's ``GradientAccumulationScheduler``): the next step is judged by the
        new value."""
        return self._tracker.ledger.accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, steps: int | None) -> None:
        self._tracker.ledger.accumulation_steps = _checked_accumulation_steps(steps)

    def _finding_to_sinks(self, finding: Finding) -> None:
        self._sinks.finding(finding)


class _Outbox:
    """The tracker's outbox: findings to the log (and from there to the sinks), a stop reported once. It holds
    its watcher, so a watch whose ``Watcher`` the caller dropped keeps reporting while the model lives."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def findings(self, occurrences: list[Occurrence]) -> None:
        if occurrences:  # five calls a step, nearly all empty
            self._watcher._log.record(occurrences)

    def new_params(self, names: list[str]) -> None:
        self._watcher._log.add_names(names)

    def stop(self, reason: str, error: BaseException | None = None) -> None:
        if error is None:
            self._watcher._internal_error = reason
            warn(f"gradwatch stopped checking: {reason}. Training is not affected.")
            return
        self._watcher._internal_error = f"{reason}: {error!r}"
        warn(
            f"gradwatch stopped checking after an {reason}: {error!r}. Training is not "
            "affected; please report this with the traceback of the error."
        )


def watch(
    model: torch.nn.Module,
    optimizer: Optimizers,
    accumulation_steps: int | None = None,
    logdir: str | os.PathLike[str] | None = None,
    on_finding: OnFinding = "warn",
    *,
    finite_check: str = "step",
    trace: str | os.PathLike[str] | None = None,
    tensorboard: TensorBoardOptions | None = None,
    scaler: Any = None,
    audit_losses: bool = True,
) -> Watcher:
    """Watch ``model``'s gradients from ``backward()`` through ``optimizer.step()`` to ``zero_grad()``.

    ``accumulation_steps`` is the number of backward passes each step should consume (None: not checked).
    ``on_finding`` is "warn", "raise", "record" or a callable taking a ``Finding``.
    ``logdir`` streams the run to TensorBoard event files there, and the trace file goes there too by default.
    ``trace`` is the path of the JSON-lines trace (``load_trace`` reads it). ``tensorboard`` tunes what the
    TensorBoard stream holds (``TensorBoardOptions``: grouping, update ratios, histograms).
    ``finite_check`` is when gradients are checked for NaN/Inf: "step" (once per optimizer step; the finding
    names the window of backward passes) or "backward" (after every backward pass: names the exact one, at
    the cost of one batched norm per backward pass).
    ``scaler`` is the run's ``torch.amp.GradScaler``: optional (any GradScaler that steps a watched optimizer is
    recognised), it lets a clip before ``scaler.unscale_()`` be reported at the clipping call from the first step.
    ``audit_losses`` weighs the loss functions of ``torch.nn.functional`` (``loss-scale``,
    ``uneven-loss-weights``): each window's elements must weigh the same and sum to the window's mean.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"watch() expects a torch.nn.Module as model, got {type(model).__name__}")
    _refuse_sharded(model)
    optimizers = _optimizers(optimizer)
    accumulation_steps = _checked_accumulation_steps(accumulation_steps)
    if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
        raise TypeError(f"logdir must be a str or os.PathLike, got {type(logdir).__name__}")
    if isinstance(on_finding, str):
        if on_finding not in POLICIES:
            raise ValueError(f"on_finding must be one of {POLICIES} or a callable(Finding), got {on_finding!r}")
    elif not callable(on_finding):
        raise TypeError(f"on_finding must be one of {POLICIES} or a callable(Finding), got {type(on_finding).__name__}")
    if finite_check not in FINITE_CHECKS:
        raise ValueError(f"finite_check must be one of {FINITE_CHECKS}, got {finite_check!r}")
    if tensorboard is not None and not isinstance(tensorboard, TensorBoardOptions):
        raise TypeError(f"tensorboard must be a gradwatch.TensorBoardOptions, got {type(tensorboard).__name__}")
    if trace is not None and not isinstance(trace, (str, os.PathLike)):
        raise TypeError(f"trace must be a str or os.PathLike path, got {type(trace).__name__}")
    if not isinstance(audit_losses, bool):
        raise TypeError(f"audit_losses must be True or False, got {type(audit_losses).__name__}")
    if scaler is not None and not isinstance(scaler, GRAD_SCALER):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    for target in (model, *optimizers):
        if target in _watched:
            raise ValueError(
                f"this {type(target).__name__} is already watched by a live gradwatch watcher; "
                "detach() that watcher first (one watcher per model and optimizer)"
            )
    sinks = open_sinks(logdir, trace, tensorboard, _distributed()[0])
    try:
        return Watcher(model, optimizers, accumulation_steps, on_finding, finite_check, sinks, scaler, audit_losses)
    except BaseException:
        for sink in sinks:  # nothing may outlive a watch() that failed: no writer thread, no open file
            with contextlib.suppress(Exception):
                sink.abandon()
        raise


def _checked_accumulation_steps(steps: Any) -> int | None:
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"accumulation_steps must be an int >= 1 or None, got {type(steps).__name__}")
    steps = int(steps)  # numpy and torch integers too
    if steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1 (backward passes per step), got {steps}")
    return steps


def _close_sinks(sinks: Sinks) -> None:
    """Close the sinks of a watch that was never detached (its optimizers and the watch were collected)."""
    sinks.abandon()


class UnsupportedSetup(ValueError):
    """A training set-up gradwatch cannot watch correctly (it refuses rather than report false findings)."""


def _refuse_sharded(model: torch.nn.Module) -> None:
    """FSDP reduce-scatters gradients into sharded ``.grad`` tensors outside the accumulation path the hooks
    read: gradwatch would report false findings there, so it refuses to watch rather than mislead."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing sharded
    if fsdp is None:
        return
    legacy = getattr(fsdp, "FullyShardedDataParallel", None)
    if legacy is not None and any(isinstance(m, legacy) for m in model.modules()):
        raise UnsupportedSetup(
            "gradwatch does not support FullyShardedDataParallel (FSDP1): its flat parameters accumulate gradients "
            "outside the hooks it reads, so it would report false findings. Use fully_shard (FSDP2), "
            "DistributedDataParallel, or watch the model unsharded"
        )


def _distributed() -> tuple[int | None, int | None]:
    """(rank, world size) under torch.distributed with more than one process, else (None, None). No collective."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None, None


def _optimizers(optimizer: Optimizers) -> list[torch.optim.Optimizer]:
    given = [optimizer] if not isinstance(optimizer, (list, tuple)) else list(optimizer)
    if not given:
        raise ValueError("watch() needs at least one optimizer; got an empty sequence")
    optimizers = []
    for opt in given:
        inner = unwrap_optimizer(opt)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                "watch() expects a torch.optim.Optimizer or a list/tuple of them as optimizer, "
                f"got {type(opt).__name__}"
            )
        optimizers.append(inner)
    if len({id(o) for o in optimizers}) != len(optimizers):
        raise ValueError("the same optimizer was passed twice to watch()")
    return optimizers


def unwrap_optimizer(opt: Any) -> Any:
    """The optimizer a framework's wrapper (Accelerate's ``AcceleratedOptimizer``, Lightning's) holds in
    ``.optimizer``, or ``opt`` itself: the hooks go on the real one."""
    inner = opt
    while not isinstance(inner, torch.optim.Optimizer) and isinstance(
        getattr(inner, "optimizer", None), torch.optim.Optimizer
    ):
        inner = inner.optimizer
    # a wrapper that derives from Optimizer without its state (AcceleratedOptimizer skips Optimizer.__init__)
    if isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer) and not hasattr(
        inner, "_optimizer_step_pre_hooks"
    ):
        inner = inner.optimizer
    return inner


def _collect(
    model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]
) -> tuple[list[torch.Tensor], list[str], list[int]]:
    """Watched parameters (the model's, then optimizer-only ones), their names and owning optimizer."""
    params: list[torch.Tensor] = []
    names: list[str] = []
    index: dict[int, int] = {}
    for name, p in model.named_parameters():  # tied weights appear once, under their first name
        name = ".".join(part for part in name.split(".") if part != COMPILED_MODULE)  # the user's module names
        if isinstance(p, torch.nn.parameter.UninitializedParameter):
            raise ValueError(
                f"parameter {name!r} is not initialized yet (a lazy module such as LazyLinear): run one forward "
                "pass (or the model's dry run) before watch(), then build the optimizer and call watch()"
            )
        index[id(p)] = len(params)
        params.append(p)
        names.append(name)
    owners = [NO_OWNER] * len(params)
    shared: dict[int, list[int]] = {}
    for o, opt in enumerate(optimizers):
        in_model = 0
        for g, group in enumerate(opt.param_groups):
            for j, p in enumerate(group["params"]):
                i = index.get(id(p))
                if i is None:
                    i = index[id(p)] = len(params)
                    params.append(p)
                    names.append(f"optimizer[{o}].param_groups[{g}][{j}]")
                    owners.append(NO_OWNER)
                else:
                    in_model += 1
                if owners[i] == NO_OWNER:
                    owners[i] = o
                elif owners[i] != o:
                    shared.setdefault(i, [owners[i]]).append(o)
        if in_model == 0:
            raise ValueError(
                f"optimizer[{o}] ({type(opt).__name__}) holds none of the model's parameters; "
                "pass the model whose parameters the optimizer updates"
            )
    if shared:
        listing = ", ".join(f"{names[i]} (optimizers {', '.join(map(str, opts))})" for i, opts in shared.items())
        warn(
            f"gradwatch: {len(shared)} parameter(s) belong to more than one optimizer: {listing}. Each of their "
            "gradients is consumed by every one of those steps; gradwatch books them to the first optimizer only."
        )
    return params, names, owners
