"""GradwatchCallback on a real (tiny, CPU) Lightning fit."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402


class Regressor(pl.LightningModule):
    def __init__(self, manual_bug: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(10, 1)
        self.manual_bug = manual_bug
        self.automatic_optimization = not manual_bug

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.manual_bug:
            opt = self.optimizers()
            self.manual_backward(loss)
            opt.step()  # BUG: opt.zero_grad() is missing
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, module, batches=8, accumulate=2, epochs=2, before=(), after=(), **callback_kwargs):
    """A fit of ``epochs``; ``before`` and ``after``: callbacks around gradwatch's."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4 * batches, 10), torch.randn(4 * batches, 1))
    callback = GradwatchCallback(**callback_kwargs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.TensorBoardLogger(str(tmp_path)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*before, callback, *after],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return callback.watcher


@pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning")
def test_clean_fit_with_accumulation(tmp_path):
    watcher = _fit(tmp_path, Regressor())
    assert not watcher.attached  # detached in on_fit_end
    assert watcher.findings == []
    assert watcher._tracker.ledger.steps == [8]  # 2 epochs x 8 batches / 2
    assert watcher._tracker.ledger.backwards == 16
    trace = tmp_path / "lightning_logs" / "version_0" / "gradwatch" / "gradwatch-trace.jsonl"
    assert trace.exists()  # through the trainer's TensorBoard logger


@pytest.mark.parametrize("order", ["scheduler-first", "gradwatch-first"])
@pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning")
def test_an_accumulation_schedule_is_followed(tmp_path, order):
    from pytorch_lightning.callbacks import GradientAccumulationScheduler

    scheduler = [GradientAccumulationScheduler(scheduling={0: 4, 2: 2})]
    around = {"before": scheduler} if order == "scheduler-first" else {"after": scheduler}
    watcher = _fit(tmp_path, Regressor(), accumulate=1, epochs=4, on_finding="record", **around)
    assert watcher.findings == []
    assert watcher._tracker.ledger.steps == [12]  # 8 batches an epoch: 2 steps in epochs 0-1, 4 in epochs 2-3
    assert watcher.accumulation_steps == 2


def test_a_value_the_watch_cannot_take_stops_the_following_with_a_warning_not_the_fit():
    from types import SimpleNamespace

    import gradwatch

    model = torch.nn.Linear(2, 1)
    callback = GradwatchCallback()
    callback.watcher = gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, on_finding="record")
    callback._follows_trainer = True
    with pytest.warns(gradwatch.GradientWarning, match="stops following accumulate_grad_batches"):
        callback.on_train_batch_start(SimpleNamespace(accumulate_grad_batches=0), None, None, 0)
    callback.on_train_batch_start(SimpleNamespace(accumulate_grad_batches=0), None, None, 1)  # once only
    assert callback.watcher.accumulation_steps == 2
    callback.watcher.detach()


@pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning")
def test_epoch_ending_on_a_short_window_is_no_mismatch_but_lightning_scales_its_loss_by_the_full_window(tmp_path):
    watcher = _fit(tmp_path, Regressor(), batches=7, on_finding="record")
    assert watcher._tracker.ledger.steps == [8]  # 4 per epoch, the last one on a single batch
    # Lightning divides every loss by accumulate_grad_batches, the short window's too (Lightning issue 19987)
    (finding,) = watcher.findings
    assert (finding.kind, finding.step, finding.count) == ("loss-scale", 3, 2)
    assert "applied 0.5 of the window's mean gradient" in finding.message


@pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning")
def test_manual_optimization_bug_is_found(tmp_path):
    watcher = _fit(tmp_path, Regressor(manual_bug=True), accumulate=1, on_finding="record")
    (finding,) = watcher.findings
    assert (finding.kind, finding.params, finding.step, finding.backward) == (
        "uncleared-gradient",
        ("layer.weight", "layer.bias"),
        1,
        1,
    )
    assert watcher.accumulation_steps is None  # manual optimization: no window size to check
