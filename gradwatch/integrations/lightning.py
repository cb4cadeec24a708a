"""PyTorch Lightning: ``GradwatchCallback`` watches a ``Trainer.fit`` (``pip install 'gradwatch[lightning]'``).

    trainer = Trainer(accumulate_grad_batches=2, callbacks=[GradwatchCallback()])

It attaches in ``on_fit_start`` to the LightningModule and the trainer's optimizers, takes the accumulation
steps from ``accumulate_grad_batches`` (and follows it when a ``GradientAccumulationScheduler`` changes it),
writes to ``<TensorBoardLogger.log_dir>/gradwatch`` when the trainer logs to TensorBoard, and detaches in
``on_fit_end`` (or when the fit raises).
"""

from __future__ import annotations

import os
from typing import Any

try:  # the standalone package first, then the unified one
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
except ImportError:  # pragma: no cover - depends on what is installed
    import lightning.pytorch as pl  # type: ignore[no-redef]
    from lightning.pytorch.loggers import TensorBoardLogger  # type: ignore[no-redef]

from ..finding_log import warn
from ..watcher import UnsupportedSetup, Watcher, watch

AUTO = "auto"


class GradwatchCallback(pl.Callback):
    """Watch the fit's gradient lifecycle. ``logdir="auto"`` follows the TensorBoard logger, None writes nothing.

    The other keyword arguments go to ``gradwatch.watch`` (``on_finding``, ``finite_check``, ``tensorboard``).
    """

    def __init__(self, accumulation_steps: int | str | None = AUTO, logdir: Any = AUTO, **watch_kwargs: Any) -> None:
        super().__init__()
        self.accumulation_steps = accumulation_steps
        self.logdir = logdir
        self.watch_kwargs = watch_kwargs
        self.watcher: Watcher | None = None
        self._follows_trainer = False  # the accumulation steps are the trainer's, which a scheduler may change

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        accumulation = self.accumulation_steps
        self._follows_trainer = accumulation == AUTO and pl_module.automatic_optimization
        if accumulation == AUTO:
            # manual optimization does its own accumulation, outside Lightning's setting
            accumulation = trainer.accumulate_grad_batches if pl_module.automatic_optimization else None
        logdir = self.logdir
        if logdir == AUTO:
            logger = trainer.logger
            logdir = os.path.join(logger.log_dir, "gradwatch") if isinstance(logger, TensorBoardLogger) else None
        try:
            self.watcher = watch(pl_module, list(trainer.optimizers), accumulation, logdir=logdir, **self.watch_kwargs)
        except UnsupportedSetup as error:  # (FSDP) say so loudly, and never stop the training for it
            warn(f"gradwatch cannot watch this fit, which runs unwatched (NOTHING IS CHECKED): {error}")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # a GradientAccumulationScheduler sets accumulate_grad_batches when an epoch starts, between two windows
        steps, watcher = trainer.accumulate_grad_batches, self.watcher
        if self._follows_trainer and watcher is not None and watcher.accumulation_steps != steps:
            try:
                watcher.accumulation_steps = steps
            except (TypeError, ValueError) as error:  # never break the fit: stop following, say so once
                self._follows_trainer = False
                warn(
                    f"gradwatch stops following accumulate_grad_batches ({error}); windows are checked against "
                    f"{watcher.accumulation_steps}"
                )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        if self.watcher is not None:
            self.watcher.detach()
