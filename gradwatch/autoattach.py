"""Zero-code attach for ``gradwatch run script.py``: PyTorch's global hooks find the model and optimizers.

A global forward pre/post hook pair records the top-level modules the script calls; the global optimizer
step pre-hook fires at the first ``optimizer.step()``, where gradwatch watches every optimizer alive then and
the top-level modules holding their parameters. The forward hooks are then removed (they cost a little on
every module call).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Any

import torch

from .hooks import global_module_hooks, global_step_pre_hook, is_compiling
from .watcher import Watcher, unwrap_optimizer, watch


class AutoAttach:
    """Global hooks that attach one ``Watcher`` at the first optimizer step of the process."""

    def __init__(self, **watch_kwargs: Any) -> None:
        self.watch_kwargs = watch_kwargs
        self.watcher: Watcher | None = None
        self.error: BaseException | None = None
        self._roots: list[weakref.ref[torch.nn.Module]] = []
        self._seen: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._depth = 0
        self._module_handles: list[Any] = []
        self._step_handle: Any = None

    def install(self) -> None:
        self._module_handles = global_module_hooks(self._forward_pre, self._forward_post)
        self._step_handle = global_step_pre_hook(self._first_step)

    def remove(self) -> None:
        """Remove the global hooks and detach the watcher (its end-of-run checks run here)."""
        for handle in self._module_handles:
            handle.remove()
        self._module_handles = []
        if self._step_handle is not None:
            self._step_handle.remove()
            self._step_handle = None
        if self.watcher is not None:
            self.watcher.detach()

    def _forward_pre(self, module: torch.nn.Module, args: Any) -> None:
        if is_compiling():
            return
        if self._depth == 0 and module not in self._seen:
            self._seen.add(module)
            self._roots.append(weakref.ref(module))
        self._depth += 1

    def _forward_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not is_compiling():
            self._depth = max(0, self._depth - 1)

    def _first_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.watcher is not None or self.error is not None:
            return
        try:
            self.watcher = self._attach()
        except Exception as error:  # never break the user's script
            self.error = error
        finally:
            for handle in self._module_handles:
                handle.remove()
            self._module_handles = []

    def _attach(self) -> Watcher:
        optimizers = _live_optimizers()
        held = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
        roots = [m for m in (ref() for ref in self._roots) if m is not None]
        roots = [m for m in roots if any(id(p) in held for p in m.parameters())]
        roots = [m for m in roots if not any(m is not other and _contains(other, m) for other in roots)]
        model = torch.nn.Module()
        names: dict[str, int] = {}
        for module in roots:
            base = _written_class(module).__name__
            names[base] = names.get(base, 0) + 1
            model.add_module(base if names[base] == 1 else f"{base}{names[base]}", module)
        in_model = {id(p) for p in model.parameters()}
        optimizers = [o for o in optimizers if any(id(p) in in_model for g in o.param_groups for p in g["params"])]
        watcher = watch(model, optimizers, **self.watch_kwargs)
        watcher.adopt_existing_gradients()
        return watcher


def _live_optimizers() -> list[torch.optim.Optimizer]:
    """Every optimizer alive, wrappers (Accelerate's ``AcceleratedOptimizer``) replaced by the optimizer they
    wrap, each once."""
    found: dict[int, torch.optim.Optimizer] = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.optim.Optimizer):
                    continue
            except ReferenceError:  # a dead weakref.proxy (dynamo leaves some): not an optimizer anyway
                continue
            inner = unwrap_optimizer(obj)
            if isinstance(inner, torch.optim.Optimizer):
                found.setdefault(id(inner), inner)
    return list(found.values())


def optimizers_over(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The live optimizers (unwrapped) that hold any of ``model``'s parameters."""
    held = {id(p) for p in model.parameters()}
    return [o for o in _live_optimizers() if any(id(p) in held for g in o.param_groups for p in g["params"])]


def _written_class(module: torch.nn.Module) -> type:
    """The module's class as the script wrote it: FSDP2 swaps in a subclass (``FSDPSequential``) made on the fly."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch.distributed.fsdp"):
            return cls
    return type(module)


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())
