"""FSDP2 (``fully_shard``): its modules, and the backward passes it keeps out of ``.grad``.

With the gradient sync on, FSDP2 reduce-scatters each pass into the sharded ``.grad`` and runs the parameters'
post-accumulate-grad hooks itself: the hooks gradwatch reads everywhere. With it off
(``set_requires_gradient_sync(False)``, FSDP2's ``no_sync``) a pass accumulates into FSDP's own unsharded
gradient, leaves ``.grad`` alone and fires no hook; the next synced pass reduce-scatters everything accumulated
since, at once. A clear (``zero_grad``) in between does not touch what FSDP holds. Those *held* passes are seen
at ``FSDPParamGroup.post_backward``, patched at class level: a parameter whose unsharded gradient is new, or
changed since the group's last post-backward, was reached by the pass.
"""

from __future__ import annotations

import functools
import importlib
import sys
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from .hooks import Watches, _GlobalPatch

_FSDP2_PACKAGES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")  # public since 2.6; before
_PARAM_GROUP_MODULES = (
    "torch.distributed.fsdp._fully_shard._fsdp_param_group",
    "torch.distributed._composable.fsdp._fsdp_param_group",
)
HELD_PASSES_UNREADABLE = (
    "FSDP2 gradient accumulation without sync (set_requires_gradient_sync(False)) cannot be read with this torch "
    "version: gradwatch found no FSDPParamGroup.post_backward to see those backward passes at, which fire no "
    "post-accumulate-grad hook. Accumulate with the sync on (every pass reduce-scatters), or debug the loop unsharded"
)


def _fsdp_module_classes() -> tuple[type, ...]:
    """FSDP2's ``FSDPModule`` from each place torch has kept it, among those imported (none: nothing is sharded)."""
    return tuple(cls for name in _FSDP2_PACKAGES if (cls := getattr(sys.modules.get(name), "FSDPModule", None)))


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that ``fully_shard`` (FSDP2) made into FSDPModules."""
    classes = _fsdp_module_classes()
    return [m for m in model.modules() if isinstance(m, classes)] if classes else []


def _param_group_class() -> type | None:
    for name in _PARAM_GROUP_MODULES:
        try:
            cls = getattr(importlib.import_module(name), "FSDPParamGroup", None)
        except ImportError:
            continue
        if cls is not None and callable(getattr(cls, "post_backward", None)):
            return cls
    return None


@functools.lru_cache(maxsize=1)
def held_pass_patch() -> _GlobalPatch | None:
    """The class-level patch of ``FSDPParamGroup.post_backward`` that reports held passes, or None when this
    torch has no such method (the watch then stops at ``set_requires_gradient_sync(False)`` instead)."""
    from .hooks import _GlobalPatch

    cls = _param_group_class()
    return None if cls is None else _GlobalPatch(cls, "post_backward", _post_backward)


@functools.lru_cache(maxsize=1)
def sync_off_patch() -> _GlobalPatch:
    """Without ``held_pass_patch``: a class-level patch of ``set_requires_gradient_sync`` that stops the checks."""
    from .hooks import _GlobalPatch

    return _GlobalPatch(_fsdp_module_classes()[0], "set_requires_gradient_sync", _sync_off_stops)


# per FSDPParam: its unsharded gradient (weakly) and that gradient's version, after its group's last post-backward
_seen: weakref.WeakKeyDictionary[Any, tuple[weakref.ref[torch.Tensor] | None, int]] = weakref.WeakKeyDictionary()


def _reached(fsdp_param: Any) -> bool:
    """Whether the running pass accumulated into ``fsdp_param``'s unsharded gradient."""
    unsharded = getattr(fsdp_param, "_unsharded_param", None)
    grad = None if unsharded is None else unsharded.grad
    if grad is None:
        return False
    seen = _seen.get(fsdp_param)
    return seen is None or seen[0] is None or seen[0]() is not grad or seen[1] != grad._version


def _remember(fsdp_param: Any) -> None:
    unsharded = getattr(fsdp_param, "_unsharded_param", None)
    grad = None if unsharded is None else unsharded.grad
    _seen[fsdp_param] = (None, 0) if grad is None else (weakref.ref(grad), grad._version)


def _post_backward(original: Callable[..., Any], watches: Watches) -> Callable[..., Any]:
    def post_backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "reduce_grads", True) or not watches:
            return original(self, *args, **kwargs)  # synced: the sharded parameters' hooks fire from in there
        try:
            fsdp_params = list(self.fsdp_params)
            reached = [fp.sharded_param for fp in fsdp_params if _reached(fp)]
        except Exception as error:  # FSDP internals not as expected: say so, never break the backward
            for hooks in watches:
                hooks.internal_error(error, "FSDP2 post_backward")
            return original(self, *args, **kwargs)
        result = original(self, *args, **kwargs)
        try:
            for fsdp_param in fsdp_params:
                _remember(fsdp_param)
        except Exception as error:  # as above: contained
            for hooks in watches:
                hooks.internal_error(error, "FSDP2 post_backward")
            return result
        if reached:
            for hooks in watches:
                hooks.held(reached)
        return result

    return post_backward


def _sync_off_stops(original: Callable[..., Any], watches: Watches) -> Callable[..., Any]:
    def set_requires_gradient_sync(self: torch.nn.Module, requires_gradient_sync: bool, **kwargs: Any) -> None:
        original(self, requires_gradient_sync, **kwargs)
        if not requires_gradient_sync:
            for hooks in watches:
                if self in hooks.sync_modules:
                    hooks.unsupported(HELD_PASSES_UNREADABLE)

    return set_requires_gradient_sync
