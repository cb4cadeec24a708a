"""The reference gradient-accumulation loop with gradwatch attached: a correct loop, so no findings."""

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
            optimizer.step()
            optimizer.zero_grad()

print(watcher.report())
watcher.assert_clean()
