"""Hugging Face Trainer: ``GradwatchCallback`` on a tiny GPT-2 built from a config (no download; optional)."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradwatch  # noqa: E402
from gradwatch import GradientBugError, GradientWarning  # noqa: E402
from gradwatch.integrations.transformers import GradwatchCallback  # noqa: E402

ACC = 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _train(tmp_path, n_examples=8, trainer_cls=None, optimizer=None, eval_too=False, **args):
    model = _model()
    training_args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=ACC,
        num_train_epochs=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        eval_strategy="steps" if eval_too else "no",
        eval_steps=1,
        **args,
    )
    callback = GradwatchCallback(on_finding="record")
    trainer = (trainer_cls or transformers.Trainer)(
        model=model,
        args=training_args,
        train_dataset=Tokens(n_examples),
        eval_dataset=Tokens(4) if eval_too else None,
        callbacks=[callback],
        optimizers=(optimizer(model) if optimizer else None, None),
    )
    trainer.train()
    assert not callback.watcher.attached  # detached at the end of training
    return callback.watcher, model


@pytest.mark.parametrize("n_examples", [8, 10], ids=["epoch-of-full-windows", "short-last-window"])
def test_trainer_with_gradient_accumulation_is_clean(tmp_path, n_examples):
    w, _ = _train(tmp_path, n_examples)
    assert w.findings == [], w.report()
    assert w._tracker.ledger.steps == [2 * -(-n_examples // (2 * ACC))]  # two epochs, the short window stepped


def test_trainer_with_gradient_checkpointing_and_evaluation_is_clean(tmp_path):
    w, _ = _train(tmp_path, 10, eval_too=True, gradient_checkpointing=True)
    assert w.findings == [], w.report()


def test_an_optimizer_that_leaves_out_the_position_embeddings(tmp_path):
    def without_wpe(model):
        return torch.optim.AdamW([p for n, p in model.named_parameters() if "wpe" not in n], lr=1e-3)

    w, _ = _train(tmp_path, optimizer=without_wpe)
    (f,) = [f for f in w.findings if f.kind == "orphan-gradient"]
    assert f.params == ("transformer.wpe.weight",)


def test_a_custom_training_step_that_clears_the_window(tmp_path):
    class ClearsEveryMicroBatch(transformers.Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            model.zero_grad()  # wipes the window's earlier micro-batches
            return super().training_step(model, inputs, num_items_in_batch)

    w, _ = _train(tmp_path, trainer_cls=ClearsEveryMicroBatch)
    f = next(f for f in w.findings if f.kind == "discarded-gradient")
    assert "transformer.wte.weight" in f.params and f.step == 0


def test_the_trainers_own_zero_grad_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "zero_grad", lambda self, set_to_none=True: None)
    w, _ = _train(tmp_path)
    f = next(f for f in w.findings if f.kind == "uncleared-gradient")
    assert "transformer.wte.weight" in f.params and f.step == 1


class PaddedTokens(Tokens):
    """Sequences of 3 to 12 real tokens, the rest of the labels -100 (padding): micro-batches of unequal counts."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[3 + (5 * i) % 10 :] = -100
        return {"input_ids": self.ids[i], "labels": labels}


@pytest.mark.parametrize("fixed", [True, False], ids=["num_items_in_batch", "mean-of-means"])
def test_the_trainers_token_weights_and_the_mean_of_means_it_had_until_2024(tmp_path, fixed):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=ACC, max_steps=3,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_drop_last=True,
    )  # fmt: skip
    callback = GradwatchCallback(on_finding="record", logdir=tmp_path / "logs")
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=PaddedTokens(16), callbacks=[callback])
    if not fixed:  # the Trainer before transformers 34191: each micro-batch's token mean, divided by the steps
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    weighed = gradwatch.load_trace(tmp_path / "logs").of("loss_weights")
    assert len(weighed) == 3  # every window audited, each through GPT-2's own cross_entropy call
    if fixed:
        assert callback.watcher.findings == [], callback.watcher.report()
        assert all(e["weight_ratio"] == pytest.approx(1.0) for e in weighed)  # every token weighs the same
        # the weights sum to a little under 1: for GPT2LMHeadModel (no "ForCausalLM" in its class name) the Trainer
        # counts num_items_in_batch over the unshifted labels, one token per sequence more than the loss counts
        assert all(0.75 < e["weight_sum"] <= 1.0 for e in weighed)
    else:
        (f,) = callback.watcher.findings
        assert f.kind == "uneven-loss-weights" and "cross_entropy" in f.message and "a mean of means" in f.message


def _failing_trainer(tmp_path, callback, fail_at_call=3):
    class FailsMidEpoch(transformers.Trainer):
        calls = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            FailsMidEpoch.calls += 1
            if FailsMidEpoch.calls == fail_at_call:
                raise RuntimeError("out of memory (simulated)")
            return super().training_step(model, inputs, num_items_in_batch)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=ACC, max_steps=4,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    return FailsMidEpoch(model=_model(), args=args, train_dataset=Tokens(16), callbacks=[callback])


def test_detaches_and_closes_the_trace_when_train_raises(tmp_path):
    callback = GradwatchCallback(on_finding="record", logdir=tmp_path / "logs")
    trainer = _failing_trainer(tmp_path, callback)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    assert not callback.watcher.attached
    trace = gradwatch.load_trace(tmp_path / "logs")
    assert len(trace.of("step")) == 1  # the one step before the failure
    assert trace.complete  # the end record written: detached, sinks closed


def test_raise_mode_propagates_out_of_train_and_detaches(tmp_path):
    def without_wpe(model):
        return torch.optim.SGD([p for n, p in model.named_parameters() if "wpe" not in n], lr=1e-3)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=ACC, max_steps=2,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    model = _model()
    callback = GradwatchCallback(on_finding="raise")
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(8), callbacks=[callback], optimizers=(without_wpe(model), None)
    )
    with pytest.raises(GradientBugError, match="orphan-gradient"):
        trainer.train()
    assert not callback.watcher.attached


def test_warnings_point_at_the_users_train_call(tmp_path):
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=ACC, max_steps=2,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if "wpe" not in n], lr=1e-3)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(8), callbacks=[GradwatchCallback()], optimizers=(optimizer, None)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    (orphan,) = [c for c in caught if issubclass(c.category, GradientWarning) and "orphan" in str(c.message)]
    assert orphan.filename == __file__  # this test's trainer.train() line, not transformers' or accelerate's


TRAINER_SCRIPT = """
import sys
import tempfile

import torch
import transformers


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
config.bos_token_id = config.eos_token_id = 0
model = transformers.GPT2LMHeadModel(config)
bug = sys.argv[1] if len(sys.argv) > 1 else None
if bug == "missing":
    model.zero_grad = lambda set_to_none=True: None  # the Trainer's own clear removed
optimizer = None
if bug == "orphan":
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "wpe" not in n], lr=1e-3)


class ClearsEveryMicroBatch(transformers.Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        model.zero_grad()
        return super().training_step(model, inputs, num_items_in_batch)


trainer_cls = ClearsEveryMicroBatch if bug == "clears" else transformers.Trainer
with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
    )
    trainer_cls(model=model, args=args, train_dataset=Tokens(10), optimizers=(optimizer, None)).train()
"""


def test_the_trainer_through_gradwatch_run(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(TRAINER_SCRIPT)

    def run(*args):
        command = [sys.executable, "-m", "gradwatch", "run", "--accumulation-steps", "2", str(script), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)

    clean = run()
    assert clean.returncode == 0, clean.stderr
    assert "no findings" in clean.stderr
    lines = TRAINER_SCRIPT.splitlines()
    train_line = next(n for n, text in enumerate(lines, 1) if ".train()" in text)
    clear_line = next(n for n, text in enumerate(lines, 1) if "model.zero_grad()" in text)
    for bug, kind, line in [
        ("missing", "uncleared-gradient", train_line),
        ("orphan", "orphan-gradient", train_line),
        ("clears", "discarded-gradient", clear_line),
    ]:
        buggy = run(bug)
        assert buggy.returncode == 1, (bug, buggy.stderr)
        assert f"{script}:{line}: GradientWarning: gradwatch: {kind}" in buggy.stderr, (bug, buggy.stderr)
