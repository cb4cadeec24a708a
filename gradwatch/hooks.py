"""Every hook, handle and wrapper gradwatch puts on the user's objects, and their removal.

PyTorch calls in here; the calls go out to a ``Receiver`` as plain events. Hooks capture only small
objects (indices, the receiver, weak references), never a parameter, model or gradient: a
post-accumulate-grad hook that captures its parameter is never collected.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
import weakref
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from .findings import GradientBugError
from .fsdp2 import held_pass_patch, sync_off_patch
from .loss_audit import LOSS_ARGUMENTS
from .stats import host_norm, host_values

LOSS_FUNCTIONS = tuple(LOSS_ARGUMENTS)

_current_task: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: 0)


def current_graph_task() -> int:
    """The autograd graph task running on this thread (-1 outside a backward pass)."""
    return _current_task()


_queue_callback = torch.autograd.Variable._execution_engine.queue_callback
COMPILED_AUTOGRAD = (
    "compiled autograd is not supported: its traced backward replays the hooks outside the autograd engine's "
    "graph tasks, so backward passes cannot be told apart. Turn it off while debugging with gradwatch "
    "(torch.compile(model) alone is fine)"
)
GRAD_SCALER: type = getattr(torch.amp, "GradScaler", None) or torch.cuda.amp.GradScaler  # torch.amp's since 2.3


class Receiver(Protocol):
    """What the hooks report to."""

    def on_backward_start(self, index: int, param: torch.Tensor) -> None: ...
    def on_backward_end(
        self, grads: dict[int, torch.Tensor | None], incoming: dict[int, torch.Tensor | float], held: list[int]
    ) -> None: ...
    def on_step_pre(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None: ...
    def on_step_post(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None: ...
    def before_optimizer_clear(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None: ...
    def on_optimizer_cleared(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None: ...
    def before_module_clear(self, module: torch.nn.Module) -> None: ...
    def on_module_cleared(self, module: torch.nn.Module) -> None: ...
    def on_clip(self, parameters: list[torch.Tensor], how: str) -> None: ...
    def on_clipped(self) -> None: ...
    def on_unscale(self, opt_index: int, scaler: Any) -> None: ...
    def before_scaler_step(self, opt_index: int, scaler: Any) -> None: ...
    def after_scaler_step(self, opt_index: int, optimizer: torch.optim.Optimizer) -> None: ...
    def on_param_group_added(self, opt_index: int, optimizer: torch.optim.Optimizer) -> list[tuple[int, Any]]: ...
    def on_unfrozen(self, indices: list[int]) -> None: ...
    def on_step_in_backward(
        self, grads: dict[int, torch.Tensor | None], opt_index: int, optimizer: torch.optim.Optimizer
    ) -> None: ...
    def on_loss(self, loss: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...
    def on_loss_reached(self, call: Any, grad: torch.Tensor, task: int) -> None: ...
    def internal_error(self, error: BaseException, where: str) -> None: ...
    def unsupported(self, reason: str) -> None: ...
    def optimizer_lost(self, opt_index: int) -> None: ...
    def report_pending_stop(self) -> None: ...
    def watches_tensor(self, tensor: torch.Tensor) -> bool: ...
    def index_of(self, param: torch.Tensor) -> int | None: ...
    def release(self) -> None: ...

    pending_stop: str | None  # a reason to stop checking, noted where no warning may be issued

    measuring_contributions: bool  # whether the window to come is measured: the pre-hooks go on or off by it

    auditing_losses: bool  # whether the loss calls of the coming window are audited


def _guard(receiver: Receiver, where: str, call: Callable[..., Any], *args: Any) -> Any:
    """Run a receiver (or hook-installing) call; only GradientBugError (on_finding="raise") may reach the
    training loop, any other error stops the checks through ``receiver.internal_error``."""
    try:
        if receiver.pending_stop is not None:
            receiver.report_pending_stop()
        return call(*args)
    except (GradientBugError, Warning):  # on_finding="raise", or the user turned warnings into errors
        raise
    except Exception as error:  # a debugging tool must never break training
        receiver.internal_error(error, where)
        return None


def _raise_at_backward_end(error: BaseException) -> None:
    """Raise ``error`` from ``backward()`` once the pass has done all its own work: from a callback queued after
    every other one (DDP's reducer queues its own), never from a hook in the middle of the pass."""
    if _current_task() == -1:  # outside any backward pass (a stale pass closed by step() or zero_grad())
        raise error
    _queue_callback(functools.partial(_reraise, error))


def _reraise(error: BaseException) -> None:
    raise error


def _guard_in_backward(receiver: Receiver, call: Callable[..., Any], *args: Any) -> None:
    """``_guard`` for calls made inside a backward pass: a GradientBugError (or a warning turned into an error)
    is raised at the end of the pass instead, so autograd and DDP finish their own work first."""
    try:
        if receiver.pending_stop is not None:
            receiver.report_pending_stop()
        call(*args)
    except (GradientBugError, Warning) as error:
        _raise_at_backward_end(error)
    except Exception as error:  # a debugging tool must never break training
        receiver.internal_error(error, "backward")


_FUNCTION_BACKWARD = torch.autograd.function.BackwardCFunction.apply.__code__


_NESTING_REACH = 10  # frames between a hook (or a Function's backward) and the Function.backward calling backward()


def _enclosing_function_node() -> Any:
    """The outermost autograd node of a Python ``Function`` whose ``backward`` is running on this thread (a
    reentrant checkpoint runs a nested backward from there), or None. Looks a few frames up from the hook,
    then as far again from each such node: a pass that is not nested costs a bounded walk, not the stack."""
    node, frame, reach = None, sys._getframe(2), _NESTING_REACH
    while frame is not None and reach:
        if frame.f_code is _FUNCTION_BACKWARD:
            node, reach = frame.f_locals.get("self", node), _NESTING_REACH
        frame, reach = frame.f_back, reach - 1
    return node


def config_flag(config: Any, name: str) -> Callable[[], bool]:
    """A reader of the boolean ``config.<name>`` of a torch config module, for a check made at every backward pass.

    The module's ``__getattr__`` costs about 1.5 µs (5 in a training loop); where the entry is a plain user
    override over a default (no alias, no forcing environment variable: torch 2.5 and later), this reads that
    override the same way for a tenth of it; any other layout is read through ``getattr``.
    """
    entry = getattr(config, "_config", {}).get(name)
    unset = getattr(sys.modules.get(getattr(type(config), "__module__", "")), "_UNSET_SENTINEL", None)
    override = getattr(entry, "user_override", None)
    if (
        unset is None
        or not isinstance(override, contextvars.ContextVar)
        or getattr(entry, "alias", 0) is not None
        or getattr(entry, "justknob", 0) is not None
        or getattr(entry, "env_value_force", None) is not unset
        or getattr(entry, "hide", True)
    ):
        return lambda: bool(getattr(config, name, False))
    default = entry.default if entry.env_value_default is unset else entry.env_value_default

    def read() -> bool:
        value = override.get()
        return bool(default if value is unset else value)

    return read


@functools.lru_cache(maxsize=1)
def _compiled_autograd_flag(config: Any) -> Callable[[], bool]:
    return config_flag(config, "compiled_autograd")


_dynamo_modules: list[Any] = []  # torch._dynamo's compiled_autograd and config modules, once both are imported


def _compiled_autograd_active() -> bool:
    """Whether compiled autograd is on (``compiled_autograd._enable`` or ``torch._dynamo.config``)."""
    if not _dynamo_modules:
        compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")  # never imported: never enabled
        config = sys.modules.get("torch._dynamo.config")
        if compiled_autograd is None or config is None:
            return config is not None and _compiled_autograd_flag(config)()
        _dynamo_modules[:] = [compiled_autograd, _compiled_autograd_flag(config)]
    compiled_autograd, flag = _dynamo_modules
    return bool(
        getattr(compiled_autograd, "compiled_autograd_enabled", False)
        or getattr(compiled_autograd, "in_compiled_autograd_region", False)
        or flag()
    )


class BackwardGrouper:
    """Groups post-accumulate-grad hook calls into backward passes.

    A backward pass is a graph task; the first hook of one queues an end-of-backward callback. A reentrant
    checkpoint (or any ``Function`` whose backward calls ``backward()``) runs nested graph tasks inside the outer
    one: they belong to the same backward pass, which ends with the outer task. When the first hook of a pass
    fires in a nested task, a hook on the enclosing ``Function`` node queues the end callback on the outer task.
    """

    __slots__ = ("_awaiting_root", "_nested", "_open", "_receiver", "_task", "grads", "held", "incoming")

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._open: list[int] = []  # tasks of the running pass whose end calls _task_done
        self._nested: set[int] = set()  # nested tasks of the running pass (no end callback of their own)
        self._awaiting_root = False  # the pass began in a nested task; its outer task is not known yet
        self._task: int | None = None
        self.grads: dict[int, torch.Tensor | None] = {}
        # contribution norms (TensorBoard only): on the device, or read already for a small CPU gradient
        self.incoming: dict[int, torch.Tensor | float] = {}
        self.held: list[int] = []  # parameters whose contribution FSDP2 kept out of .grad (sync off)

    def record_incoming(self, index: int, grad: torch.Tensor | None) -> None:
        """Tensor pre-hook, on while a window is measured: the norm of the gradient about to be accumulated (kept on
        the device, not the grad; a small CPU gradient's read now, cheaper than a kernel). A pass that began measured
        is measured to its end, though a step taken inside it ends the measured window."""
        if grad is not None and grad.layout is torch.strided:
            try:
                on_host = host_values((grad,))
                if on_host is not None:
                    self.incoming[index] = host_norm(on_host[0])
                    return
                with torch.no_grad():
                    self.incoming[index] = torch.linalg.vector_norm(grad)
            except Exception as error:  # it runs inside the user's backward(): never let it escape
                self._receiver.internal_error(error, "backward")

    def hook_for(self, index: int) -> Callable[[torch.Tensor], None]:
        """The post-accumulate-grad hook of parameter ``index``: the hot path, one call per parameter per backward
        pass (a closure: about 35 ns a call less than a ``partial`` of a bound method)."""
        grouper = self

        def record(param: torch.Tensor) -> None:
            task = _current_task()
            if task != grouper._task:
                grouper._enter(task, index, param)
            grouper.grads[index] = param.grad

        return record

    def record_held(self, index: int, param: torch.Tensor) -> None:
        """FSDP2 kept this pass's contribution to parameter ``index`` out of its ``.grad`` (gradient sync off)."""
        task = _current_task()
        if task == -1:  # FSDP's post-backward called outside any backward pass: no pass to join
            return
        if task != self._task:
            self._enter(task, index, param)
        self.held.append(index)

    @property
    def in_pass(self) -> bool:
        """Whether a backward pass is running and has reached a watched parameter."""
        return bool(self._open or self._awaiting_root) and _current_task() != -1

    def take(self) -> dict[int, torch.Tensor | None]:
        """The gradients recorded so far in the running pass (a step inside the backward books them now)."""
        grads, self.grads = self.grads, {}
        return grads

    def _enter(self, task: int, index: int, param: torch.Tensor) -> None:
        self._task = task
        if task in self._open or task in self._nested:
            return
        starting = not self._open and not self._awaiting_root
        node = _enclosing_function_node() if starting else None  # a later task joins the running pass anyway
        if node is None:
            self._open.append(task)
            _queue_callback(functools.partial(self._task_done, task))
        else:
            self._nested.add(task)
            if starting:
                self._await_root(node)
        if starting:
            _guard_in_backward(self._receiver, self._receiver.on_backward_start, index, param)

    def _await_root(self, node: Any) -> None:
        """Queue the end callback on the task that runs ``node`` once ``node`` has finished."""
        self._awaiting_root = True
        handles: list[Any] = []

        def node_done(grad_inputs: Any, grad_outputs: Any) -> None:
            for handle in handles:
                handle.remove()
            self._awaiting_root = False
            task = _current_task()
            if task != -1 and task not in self._open:
                self._open.append(task)
                _queue_callback(functools.partial(self._task_done, task))

        try:
            handles.append(node.register_hook(node_done))
        except Exception:  # a node that takes no hook: the pass ends with its nested task at the latest
            self._awaiting_root = False

    def _task_done(self, task: int) -> None:
        if task in self._open:
            self._open.remove(task)
        self._task = None
        if not self._open and not self._awaiting_root:
            self._close()

    def _close(self) -> None:
        grads, self.grads = self.grads, {}
        incoming, self.incoming = self.incoming, {}
        held, self.held = self.held, []
        self._open.clear()
        self._nested.clear()
        self._awaiting_root = False
        self._task = None
        if _compiled_autograd_active():
            _guard_in_backward(self._receiver, self._receiver.unsupported, COMPILED_AUTOGRAD)
            return
        _guard_in_backward(self._receiver, self._receiver.on_backward_end, grads, incoming, held)

    def close_stale(self) -> None:
        """Close a backward pass whose end callback never ran (it raised); call outside any backward."""
        if (self._open or self._awaiting_root) and _current_task() == -1:
            self._close()


class _StepHook:
    __slots__ = ("hooks", "opt_index", "post")

    def __init__(self, hooks: HookSet, opt_index: int, post: bool) -> None:
        self.hooks, self.opt_index, self.post = hooks, opt_index, post

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        hooks = self.hooks
        grouper = hooks.grouper
        grouper.close_stale()
        if not self.post and hooks.frozen:
            _guard(hooks.receiver, "optimizer.step", hooks.hook_unfrozen)
        receiver = hooks.receiver
        if not grouper.in_pass:
            call = receiver.on_step_post if self.post else receiver.on_step_pre
            _guard(receiver, "optimizer.step", call, self.opt_index, optimizer)
            if self.post:
                hooks.sync_measuring_after_step()
            return
        # stepped from a hook inside the backward: the pass so far is what it consumes; raise at its end
        if not self.post:
            _guard_in_backward(receiver, receiver.on_step_in_backward, grouper.take(), self.opt_index, optimizer)
        call = receiver.on_step_post if self.post else receiver.on_step_pre
        _guard_in_backward(receiver, call, self.opt_index, optimizer)
        if self.post:
            hooks.sync_measuring_after_step()


OptimizerEvent = Callable[["HookSet", int, torch.optim.Optimizer], None]


def _wrap_method(
    optimizer: torch.optim.Optimizer,
    name: str,
    opt_index: int,
    hooks: HookSet,
    before: OptimizerEvent | None,
    after: OptimizerEvent,
) -> Callable[..., Any]:
    """An instance attribute wrapping ``optimizer.<name>``; it holds the optimizer and the watch weakly."""
    previous = optimizer.__dict__.get(name)  # someone else's instance wrapper: chain to it
    unbound = getattr(type(optimizer), name)
    optimizer_ref = weakref.ref(optimizer)
    hooks_ref = weakref.ref(hooks)

    @functools.wraps(unbound)
    def method(*args: Any, **kwargs: Any) -> Any:
        opt = optimizer_ref()
        owner = hooks_ref()
        watching = owner is not None and owner.active and opt is not None
        if watching and before is not None:
            before(owner, opt_index, opt)  # type: ignore[arg-type]
        result = previous(*args, **kwargs) if previous is not None else unbound(opt, *args, **kwargs)
        if watching:
            after(owner, opt_index, opt)  # type: ignore[arg-type]
        return result

    method.__signature__ = inspect.signature(getattr(optimizer, name))  # type: ignore[attr-defined]
    method._gradwatch_previous = previous  # type: ignore[attr-defined]
    return method


def _before_zero_grad(hooks: HookSet, opt_index: int, optimizer: torch.optim.Optimizer) -> None:
    hooks.grouper.close_stale()
    _guard(hooks.receiver, "optimizer.zero_grad", hooks.receiver.before_optimizer_clear, opt_index, optimizer)


def _after_zero_grad(hooks: HookSet, opt_index: int, optimizer: torch.optim.Optimizer) -> None:
    if hooks.grouper.in_pass:  # cleared from a hook inside the backward: raise at the end of the pass
        _guard_in_backward(hooks.receiver, hooks.receiver.on_optimizer_cleared, opt_index, optimizer)
        return
    _guard(hooks.receiver, "optimizer.zero_grad", hooks.receiver.on_optimizer_cleared, opt_index, optimizer)


def _after_add_param_group(hooks: HookSet, opt_index: int, optimizer: torch.optim.Optimizer) -> None:
    added = _guard(hooks.receiver, "add_param_group", hooks.receiver.on_param_group_added, opt_index, optimizer)
    _guard(hooks.receiver, "add_param_group", hooks.hook_params, added or ())


class _GlobalPatch:
    """A function of a PyTorch class or module replaced, while any watch is live, by one dispatcher to them all.

    An instance attribute on a module would break ``torch.save(model)``, and some objects (a ``GradScaler``, the
    clipping functions) are never handed to ``watch()``. The original is restored when the last watch detaches,
    unless someone patched over the dispatcher meanwhile (theirs then keeps calling it, and it calls the original).
    """

    def __init__(self, owner: Any, name: str, make: Callable[[Callable[..., Any], Watches], Callable[..., Any]]):
        self.owner, self.name, self._make = owner, name, make
        self.watches = Watches(self._restore_if_unused)
        self._original: Callable[..., Any] | None = None
        self._dispatcher: Callable[..., Any] | None = None

    def add(self, hooks: HookSet) -> None:
        if self._original is not None and not self.watches and getattr(self.owner, self.name) is not self._dispatcher:
            # our dispatcher was left under someone else's patch, which is gone or still calls it: start over on
            # top of what is there now (the old dispatcher keeps its empty Watches and only passes calls through)
            self._original = self._dispatcher = None
            self.watches = Watches(self._restore_if_unused)
        if self._original is None:
            self._original = getattr(self.owner, self.name)
            self._dispatcher = functools.wraps(self._original)(self._make(self._original, self.watches))
            setattr(self.owner, self.name, self._dispatcher)
        self.watches.add(hooks)

    def discard(self, hooks: HookSet) -> None:
        self.watches.discard(hooks)
        self._restore_if_unused()

    def _restore_if_unused(self) -> None:
        if not self.watches and self._original is not None and getattr(self.owner, self.name) is self._dispatcher:
            setattr(self.owner, self.name, self._original)
            self._original = self._dispatcher = None


class Watches:
    """The live watches a global patch dispatches to, held weakly: a watch nobody detached goes with its model
    and optimizer, and ``on_empty`` runs when the last one is collected."""

    def __init__(self, on_empty: Callable[[], None]) -> None:
        self._refs: list[weakref.ref[HookSet]] = []
        self._on_empty = on_empty

    def add(self, hooks: HookSet) -> None:
        self._refs = [ref for ref in self._refs if ref() is not None] + [weakref.ref(hooks, self._collected)]

    def _collected(self, _: Any) -> None:
        if not self:
            self._on_empty()

    def discard(self, hooks: HookSet) -> None:
        self._refs = [ref for ref in self._refs if ref() is not None and ref() is not hooks]

    def __bool__(self) -> bool:
        return any(ref() is not None for ref in self._refs)

    def __iter__(self) -> Iterator[HookSet]:
        for ref in list(self._refs):
            hooks = ref()
            if hooks is not None and hooks.active:
                yield hooks


def _module_zero_grad(original: Callable[..., Any], watches: Watches) -> Callable[..., Any]:
    def zero_grad(self: torch.nn.Module, set_to_none: bool = True) -> None:
        watching = list(watches)
        for hooks in watching:
            hooks.grouper.close_stale()
            _guard(hooks.receiver, "model.zero_grad", hooks.receiver.before_module_clear, self)
        original(self, set_to_none)
        for hooks in watching:
            _guard(hooks.receiver, "model.zero_grad", hooks.receiver.on_module_cleared, self)

    return zero_grad


def _watching(watches: Watches, optimizer: Any) -> list[tuple[HookSet, int]]:
    """(watch, optimizer index) of every live watch over ``optimizer``."""
    found = []
    for hooks in watches:
        index = hooks.optimizer_index(optimizer)
        if index is not None:
            found.append((hooks, index))
    return found


def _scaler_unscale(original: Callable[..., Any], watches: Watches) -> Callable[..., Any]:
    def unscale_(self: Any, optimizer: torch.optim.Optimizer) -> None:
        original(self, optimizer)
        for hooks, index in _watching(watches, optimizer):
            _guard(hooks.receiver, "GradScaler.unscale_", hooks.receiver.on_unscale, index, self)

    return unscale_


def _scaler_step(original: Callable[..., Any], watches: Watches) -> Callable[..., Any]:
    def step(self: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        watching = _watching(watches, optimizer)
        for hooks, index in watching:
            hooks.grouper.close_stale()
            _guard(hooks.receiver, "GradScaler.step", hooks.receiver.before_scaler_step, index, self)
        result = original(self, optimizer, *args, **kwargs)
        for hooks, index in watching:
            _guard(hooks.receiver, "GradScaler.step", hooks.receiver.after_scaler_step, index, optimizer)
        return result

    return step


def _clipping(how: str) -> Callable[[Callable[..., Any], Watches], Callable[..., Any]]:
    def make(original: Callable[..., Any], watches: Watches) -> Callable[..., Any]:
        def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
            watching = list(watches)
            if not watching:
                return original(parameters, *args, **kwargs)
            parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            for hooks in watching:
                _guard(hooks.receiver, how, hooks.receiver.on_clip, parameters, how)
            try:
                return original(parameters, *args, **kwargs)
            finally:  # (error_if_nonfinite raises before it changes anything)
                for hooks in watching:
                    _guard(hooks.receiver, how, hooks.receiver.on_clipped)

        return clip

    return make


def _loss_function(name: str) -> Callable[[Callable[..., Any], Watches], Callable[..., Any]]:
    def make(original: Callable[..., Any], watches: Watches) -> Callable[..., Any]:
        def loss(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            auditing = [hooks.receiver for hooks in watches if hooks.receiver.auditing_losses]
            if not auditing or not isinstance(output, torch.Tensor) or not output.requires_grad or _is_compiling():
                return output
            for receiver in auditing:
                call = _guard(receiver, name, receiver.on_loss, name, args, kwargs)
                if call is not None:
                    _guard(receiver, name, output.register_hook, functools.partial(_loss_reached, receiver, call))
            return output

        return loss

    return make


def _loss_reached(receiver: Receiver, call: Any, grad: torch.Tensor) -> None:
    _guard_in_backward(receiver, receiver.on_loss_reached, call, grad, _current_task())


_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)  # since 2.3


def is_compiling() -> bool:
    """Whether dynamo is tracing the running code (hooks then do nothing: their Python would be traced)."""
    return _is_compiling()


def global_module_hooks(
    pre: Callable[[torch.nn.Module, Any], None], post: Callable[[torch.nn.Module, Any, Any], None]
) -> list[Any]:
    """A forward pre/post hook pair on every module of the process (``gradwatch run``); returns the handles."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    return [register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True)]


def global_step_pre_hook(hook: Callable[[torch.optim.Optimizer, Any, Any], None]) -> Any:
    """A step pre-hook on every optimizer of the process (``gradwatch run``); returns the handle."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    return register_optimizer_step_pre_hook(hook)


SWAPPED = (
    "torch.utils.swap_tensors swapped a watched parameter or gradient (model.to() or load_state_dict() under "
    "torch.__future__.set_swap_module_params_on_conversion(True), FSDP2, parametrizations), which takes the "
    "hooks off it; gradwatch let go of the model so that the swap works. Call watch() again after the conversion"
)


def _swap_tensors(original: Callable[..., Any], watches: Watches) -> Callable[..., Any]:
    def swap_tensors(t1: Any, t2: Any) -> None:
        released = [hooks for hooks in watches if any(hooks.receiver.watches_tensor(t) for t in (t1, t2))]
        for hooks in released:  # swap_tensors refuses tensors with weak references: let go of them all first
            hooks.release_tensors()
        original(t1, t2)
        for hooks in released:
            _guard(hooks.receiver, "swap_tensors", hooks.receiver.unsupported, SWAPPED)

    return swap_tensors


def _global_patches() -> list[_GlobalPatch]:
    patches = [_GlobalPatch(torch.nn.Module, "zero_grad", _module_zero_grad)]
    patches.append(_GlobalPatch(torch.utils, "swap_tensors", _swap_tensors))
    patches += [_GlobalPatch(GRAD_SCALER, "unscale_", _scaler_unscale), _GlobalPatch(GRAD_SCALER, "step", _scaler_step)]
    clip_grad = torch.nn.utils.clip_grad
    for module, name in [
        (torch.nn.utils, "clip_grad_norm_"),
        (torch.nn.utils, "clip_grad_value_"),
        (torch.nn.utils, "clip_grads_with_norm_"),  # since 2.6
        (clip_grad, "clip_grad_norm_"),  # also reached by the deprecated clip_grad_norm
        (clip_grad, "clip_grad_value_"),
    ]:
        if hasattr(module, name):
            patches.append(_GlobalPatch(module, name, _clipping(name)))
    return patches


_GLOBAL_PATCHES = _global_patches()
# the losses of torch.nn.functional (nn.*Loss modules and Hugging Face models call them through the module)
LOSS_PATCHES = [_GlobalPatch(torch.nn.functional, name, _loss_function(name)) for name in LOSS_FUNCTIONS]


def _optimizer_gone(hooks_ref: weakref.ref[HookSet], opt_index: int, _: Any) -> None:
    hooks = hooks_ref()
    if hooks is not None:
        with contextlib.suppress(Exception):  # called by the garbage collector: nowhere to report to
            hooks.optimizer_gone(opt_index)


class HookSet:
    """All hooks of one watch; ``remove()`` takes every one of them off again."""

    def __init__(self, receiver: Receiver, on_all_optimizers_gone: Callable[[], None] = lambda: None) -> None:
        self.receiver = receiver
        self.grouper = BackwardGrouper(receiver)
        self.active = False
        self._on_all_optimizers_gone = on_all_optimizers_gone
        self.frozen: dict[int, weakref.ref[torch.Tensor]] = {}  # watched, not requiring grad: not hooked
        self._contribution_norms = False
        self._hooked: dict[int, weakref.ref[torch.Tensor]] = {}
        # the contribution pre-hooks, on every hooked parameter while a window is being measured (one in ten), else
        # none: a Python call per parameter per pass less
        self._measuring: dict[int, Any] | None = None
        self._handles: list[Any] = []
        self._wrapped: list[tuple[weakref.ref[torch.optim.Optimizer], str, Callable[..., Any]]] = []
        self._optimizer_indices: dict[int, tuple[weakref.ref[torch.optim.Optimizer], int]] = {}
        self.sync_modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # FSDP2 modules of the model
        self._extra_patches: list[_GlobalPatch] = []  # global patches only some watches need

    def optimizer_index(self, optimizer: Any) -> int | None:
        """The index of ``optimizer`` in this watch, or None."""
        entry = self._optimizer_indices.get(id(optimizer))
        return entry[1] if entry is not None and entry[0]() is optimizer else None

    def install(
        self,
        params: Iterable[tuple[int, torch.Tensor]],
        optimizers: Sequence[torch.optim.Optimizer],
        contribution_norms: bool = False,
        audit_losses: bool = False,
    ) -> None:
        """Hook each (index, parameter) that requires grad, each optimizer's step, zero_grad and add_param_group,
        and the global patches. Frozen parameters are hooked before the first step that finds them unfrozen.

        ``contribution_norms`` adds a tensor pre-hook per parameter that measures each incoming gradient;
        ``audit_losses`` wraps the loss functions of ``torch.nn.functional``.
        """
        self.active = True
        self._contribution_norms = contribution_norms
        try:
            self.hook_params(params)
            self.sync_measuring()
            for opt_index, optimizer in enumerate(optimizers):
                # disabled for dynamo: a compiled optimizer.step() runs them eagerly instead of tracing into them
                # (done here, not at import: torch.compiler.disable imports dynamo, as the first step does anyway)
                pre, post = (torch.compiler.disable(_StepHook(self, opt_index, post)) for post in (False, True))
                self._handles.append(optimizer.register_step_pre_hook(pre))
                self._handles.append(optimizer.register_step_post_hook(post))
                self._wrap(optimizer, "zero_grad", opt_index, _before_zero_grad, _after_zero_grad)
                self._wrap(optimizer, "add_param_group", opt_index, None, _after_add_param_group)
                gone = functools.partial(_optimizer_gone, weakref.ref(self), opt_index)
                self._optimizer_indices[id(optimizer)] = (weakref.ref(optimizer, gone), opt_index)
            for patch in _GLOBAL_PATCHES + (LOSS_PATCHES if audit_losses else []):
                patch.add(self)
        except BaseException:
            self.remove()
            raise

    def hook_params(self, params: Iterable[tuple[int, torch.Tensor]]) -> None:
        """Hook the parameters not hooked yet; remember those that do not require grad."""
        for index, param in params:
            if index in self._hooked:
                continue
            if not param.requires_grad:
                self.frozen[index] = weakref.ref(param)
                continue
            self.frozen.pop(index, None)
            hook = self.grouper.hook_for(index)  # captures no tensor: see module doc
            self._handles.append(param.register_post_accumulate_grad_hook(hook))
            self._hooked[index] = weakref.ref(param)
            if self._measuring is not None:
                self._measuring[index] = self._measure(index, param)

    def sync_measuring_after_step(self) -> None:
        """After a step: the contribution pre-hooks on or off for the window to come; from inside a backward pass (a
        step taken from a hook), once that pass is over."""
        if not self._contribution_norms:
            return
        sync = functools.partial(_guard, self.receiver, "optimizer.step", self.sync_measuring)
        if _current_task() == -1:
            sync()
        else:
            _queue_callback(sync)

    def sync_measuring(self) -> None:
        """Put the contribution pre-hooks on every hooked parameter while the receiver measures contributions, else
        take them off. Outside a backward pass only."""
        self.measure_contributions(self.receiver.measuring_contributions)

    def measure_contributions(self, on: bool) -> None:
        """Put the contribution pre-hooks on every hooked parameter (``on``, and the watch measures them at all),
        or take them off."""
        on = on and self._contribution_norms
        if on == (self._measuring is not None):
            return
        if not on:
            for handle in self._measuring.values():  # type: ignore[union-attr]
                handle.remove()
            self._measuring = None
            return
        self._measuring = {}
        for index, ref in self._hooked.items():
            param = ref()
            if param is not None:
                self._measuring[index] = self._measure(index, param)

    def _measure(self, index: int, param: torch.Tensor) -> Any:
        return param.register_hook(functools.partial(self.grouper.record_incoming, index))

    def hook_unfrozen(self) -> None:
        """Before a step: hook the frozen parameters that require grad now (unfrozen during the run)."""
        unfrozen = [(i, p) for i, ref in self.frozen.items() if (p := ref()) is not None and p.requires_grad]
        if unfrozen:
            self.hook_params(unfrozen)
            _guard(self.receiver, "optimizer.step", self.receiver.on_unfrozen, [i for i, _ in unfrozen])

    def _wrap(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        opt_index: int,
        before: OptimizerEvent | None,
        after: OptimizerEvent,
    ) -> None:
        wrapper = _wrap_method(optimizer, name, opt_index, self, before, after)
        setattr(optimizer, name, wrapper)
        self._wrapped.append((weakref.ref(optimizer), name, wrapper))

    def watch_sharded(self, modules: Iterable[torch.nn.Module]) -> None:
        """FSDP2: see the backward passes that ``modules`` run with the gradient sync off, which fire no
        post-accumulate-grad hook (``fsdp2.held_pass_patch``); where this torch offers no way to, turning the sync
        off stops the checks, loudly, instead of misreading them. Patched at class level, as
        ``nn.Module.zero_grad`` is (an instance attribute would break ``torch.save(model)``)."""
        self.sync_modules.update(modules)
        if self.sync_modules:
            patch = held_pass_patch() or sync_off_patch()
            patch.add(self)
            self._extra_patches.append(patch)

    def held(self, params: Sequence[torch.Tensor]) -> None:
        """FSDP2 kept the running pass's contributions to ``params`` (watched or not) out of their ``.grad``."""
        _guard_in_backward(self.receiver, self._record_held, params)

    def _record_held(self, params: Sequence[torch.Tensor]) -> None:
        index_of = self.receiver.index_of
        for param in params:
            index = index_of(param)
            if index is not None and index in self._hooked:
                self.grouper.record_held(index, param)

    def internal_error(self, error: BaseException, where: str) -> None:
        self.receiver.internal_error(error, where)

    def unsupported(self, reason: str) -> None:
        _guard(self.receiver, "FSDP2", self.receiver.unsupported, reason)

    def optimizer_gone(self, opt_index: int) -> None:
        """A watched optimizer was garbage-collected (from the garbage collector: note it, report it later)."""
        if not self.active:
            return
        self.receiver.optimizer_lost(opt_index)
        if all(ref() is None for ref, _ in self._optimizer_indices.values()):
            for patch in _GLOBAL_PATCHES + LOSS_PATCHES + self._extra_patches:  # nothing left to step: forget it
                patch.discard(self)
            self._on_all_optimizers_gone()

    def release_tensors(self) -> None:
        """Take the hooks off the parameters and drop every reference to them (the watch cannot go on)."""
        self._remove_param_hooks()
        self.receiver.release()

    def _remove_param_hooks(self) -> None:
        self.measure_contributions(False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        self.frozen.clear()

    def remove(self) -> None:
        """Idempotent: remove every handle, wrapper and dispatcher entry."""
        self.active = False
        self._remove_param_hooks()
        for optimizer_ref, name, wrapper in reversed(self._wrapped):
            optimizer = optimizer_ref()
            if optimizer is not None and optimizer.__dict__.get(name) is wrapper:
                previous = wrapper._gradwatch_previous  # type: ignore[attr-defined]
                if previous is None:
                    delattr(optimizer, name)
                else:
                    setattr(optimizer, name, previous)
        self._wrapped.clear()
        self._optimizer_indices.clear()
        for patch in _GLOBAL_PATCHES + LOSS_PATCHES + self._extra_patches:
            patch.discard(self)
        self._extra_patches.clear()
