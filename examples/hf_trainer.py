"""A Hugging Face Trainer watched by GradwatchCallback (pip install 'gradwatch[transformers]').

A tiny GPT-2 built from a config (nothing downloaded), 10 sequences in batches of 2 with
gradient_accumulation_steps=2: each epoch ends on a short window of one micro-batch, which the Trainer steps on.
"""

import tempfile
from pathlib import Path

import torch
import transformers

from gradwatch.integrations.transformers import GradwatchCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


torch.manual_seed(0)
config = transformers.GPT2Config(
    vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
)
callback = GradwatchCallback()  # accumulation from gradient_accumulation_steps; logs under logging_dir with TensorBoard
with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        report_to="tensorboard",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=Tokens(10), callbacks=[callback]
    )
    trainer.train()
    print(callback.watcher.report())
    print("trace and TensorBoard run:", sorted(p.name for p in (Path(out) / "runs" / "gradwatch").iterdir()))
    callback.watcher.assert_clean()
