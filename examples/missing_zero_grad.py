"""The reference loop with its most common bug: no zero_grad() after step(). gradwatch names it."""

import sys

import torch

import gradwatch

torch.manual_seed(0)
model = torch.nn.Linear(10, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
criterion = torch.nn.MSELoss()
dataloader = [(torch.randn(4, 10), torch.randn(4, 1)) for _ in range(8)]
accumulation_steps = 2

with gradwatch.watch(model, optimizer, accumulation_steps=accumulation_steps) as watcher:
    optimizer.zero_grad()
    for i, (inputs, labels) in enumerate(dataloader):
        loss = criterion(model(inputs), labels) / accumulation_steps
        loss.backward()
        if (i + 1) % accumulation_steps == 0:
            optimizer.step()  # BUG: optimizer.zero_grad() is missing here

print(watcher.report())
kinds = sorted({f.kind for f in watcher.findings})
print(f"found: {kinds}")
sys.exit(0 if kinds == ["uncleared-gradient"] else 1)  # the demo fails if the bug went unnoticed
