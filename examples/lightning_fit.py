"""A Lightning fit watched by GradwatchCallback (pip install 'gradwatch[lightning]')."""

import tempfile

import pytorch_lightning as pl
import torch

from gradwatch.integrations.lightning import GradwatchCallback


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(10, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(32, 10), torch.randn(32, 1))
callback = GradwatchCallback()  # accumulation from accumulate_grad_batches, logs next to TensorBoardLogger's
with tempfile.TemporaryDirectory() as logs:
    trainer = pl.Trainer(
        max_epochs=2,
        accumulate_grad_batches=2,
        logger=pl.loggers.TensorBoardLogger(logs),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.callbacks.append(callback)
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=4))
print(callback.watcher.report())
callback.watcher.assert_clean()
