"""Hugging Face: ``GradwatchCallback`` watches ``Trainer.train()`` (``pip install 'gradwatch[transformers]'``).

    trainer = Trainer(model, args, train_dataset=data, callbacks=[GradwatchCallback()])
    trainer.train()
    print(trainer.callback_handler.callbacks[-1].watcher.report())

It attaches in ``on_train_begin`` to the Trainer's model and optimizer (the one handed to the callbacks, or
else the live optimizer over the model's parameters: the Trainer builds its own after the callbacks are
made; Accelerate's ``AcceleratedOptimizer`` is unwrapped), takes the accumulation steps from
``args.gradient_accumulation_steps``, writes to ``<TensorBoard's logging directory>/gradwatch`` (``logging_dir``,
else ``TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs``) when the Trainer reports to TensorBoard, and detaches
in ``on_train_end``, or when ``train()`` raises (an error, ``KeyboardInterrupt``, ``on_finding="raise"``): no
Trainer event marks that, so the callback finds its Trainer when it is called from ``Trainer.__init__`` (or from
``train()`` when it was added later) and guards the instance's ``train``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any

from transformers import Trainer, TrainerCallback

from ..autoattach import optimizers_over
from ..finding_log import warn
from ..findings import GradientBugError
from ..watcher import UnsupportedSetup, Watcher, watch

AUTO = "auto"


class GradwatchCallback(TrainerCallback):
    """Watch the Trainer's gradient lifecycle. ``logdir="auto"`` follows ``report_to`` (TensorBoard), None writes
    nothing. The other keyword arguments go to ``gradwatch.watch`` (``on_finding``, ``finite_check``, ...)."""

    def __init__(self, accumulation_steps: int | str | None = AUTO, logdir: Any = AUTO, **watch_kwargs: Any) -> None:
        self.accumulation_steps = accumulation_steps
        self.logdir = logdir
        self.watch_kwargs = watch_kwargs
        self.watcher: Watcher | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._guard_train(_calling_trainer())

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.watcher is not None:  # a second train() call: a new watch
            self.watcher.detach()
        self._guard_train(_calling_trainer())  # added after __init__: guards the next train() calls
        optimizer = kwargs.get("optimizer")
        optimizers = [optimizer] if optimizer is not None else optimizers_over(model)
        if not optimizers:
            raise ValueError(
                "GradwatchCallback found no optimizer over the model's parameters at the start of training; "
                "pass optimizers=(optimizer, scheduler) to the Trainer, or use gradwatch.watch() yourself"
            )
        accumulation = args.gradient_accumulation_steps if self.accumulation_steps == AUTO else self.accumulation_steps
        logdir = self.logdir
        if logdir == AUTO:
            report_to = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or ())
            logdir = os.path.join(_tensorboard_dir(args), "gradwatch") if "tensorboard" in report_to else None
        try:
            self.watcher = watch(model, optimizers, accumulation, logdir=logdir, **self.watch_kwargs)
        except UnsupportedSetup as error:  # (FSDP) say so loudly, and never stop the training for it
            warn(f"gradwatch cannot watch this training, which runs unwatched (NOTHING IS CHECKED): {error}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watcher is not None:
            self.watcher.detach()

    def _guard_train(self, trainer: Trainer | None) -> None:
        """Detach (end-of-run checks, sinks flushed and closed) when ``trainer.train()`` raises."""
        if trainer is None or getattr(trainer.train, "_gradwatch_guarded", False):
            return
        train = trainer.train

        @functools.wraps(train)
        def train_then_detach_on_error(*args: Any, **kwargs: Any) -> Any:
            try:
                return train(*args, **kwargs)
            except BaseException:
                if self.watcher is not None:
                    with contextlib.suppress(GradientBugError):  # do not mask the error already raised
                        self.watcher.detach()
                raise

        train_then_detach_on_error._gradwatch_guarded = True  # type: ignore[attr-defined]
        trainer.train = train_then_detach_on_error  # type: ignore[method-assign]


def _calling_trainer(max_frames: int = 8) -> Trainer | None:
    """The Trainer whose method (``__init__``, ``train``) is running a callback event, found in the caller frames."""
    frame = sys._getframe(1)
    for _ in range(max_frames):
        frame = frame.f_back
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
    return None


def _tensorboard_dir(args: Any) -> str:
    """Where the Trainer's TensorBoard callback writes (``logging_dir`` was dropped from TrainingArguments in 5.0)."""
    given = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    return given or os.path.join(args.output_dir, "runs")
