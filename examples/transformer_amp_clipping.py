"""A small transformer trained with AMP (GradScaler), clipping after unscale_, and gradient accumulation.

The correct recipe stays clean, including the step the scaler skips when a loss spike overflows.
"""

import torch

import gradwatch

torch.manual_seed(0)
vocab, d_model, accumulation_steps = 100, 32, 2
model = torch.nn.Sequential(
    torch.nn.Embedding(vocab, d_model),
    torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.0, batch_first=True),
        2,
        enable_nested_tensor=False,
    ),
    torch.nn.Linear(d_model, vocab),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler("cpu")
batches = [torch.randint(0, vocab, (4, 16)) for _ in range(12)]

with gradwatch.watch(model, optimizer, accumulation_steps=accumulation_steps, scaler=scaler) as watcher:
    optimizer.zero_grad()
    for i, tokens in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), tokens.reshape(-1))
        if i == 2:
            loss = loss * 1e35  # a loss spike: its scaled gradients overflow and the scaler skips that step
        scaler.scale(loss / accumulation_steps).backward()
        if (i + 1) % accumulation_steps == 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
            optimizer.zero_grad()

print(watcher.report())
watcher.assert_clean()  # the skipped step is recorded as an info finding, not a bug
