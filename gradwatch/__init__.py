"""gradwatch: catch gradient-lifecycle bugs (missing or misplaced zero_grad, stale steps, orphan
parameters, NaN gradients) in PyTorch training loops, at the call where they happen."""

from .findings import KINDS, Finding, GradientBugError, GradientWarning
from .sinks.tensorboard import TensorBoardOptions
from .traces import Trace, load_trace
from .watcher import Watcher, watch

__all__ = [
    "KINDS",
    "Finding",
    "GradientBugError",
    "GradientWarning",
    "TensorBoardOptions",
    "Trace",
    "Watcher",
    "load_trace",
    "watch",
]
__version__ = "0.1.0"
