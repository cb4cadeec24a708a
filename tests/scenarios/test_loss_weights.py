"""The loss-weight audit (issue 12): each counted element of a loss must weigh the same within a window, and
the window's weights must sum to its mean. Real loops; each asserts the kind, the step and the factor or ratio."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import bugs, mse, reference_data, reference_model, watch, window_size
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradwatch

ACC = 2
VOCAB, PAD = 16, -100


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def _padded_batches(lengths_per_batch: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of sequences of the given lengths, padded to 8; labels -100 on the padding."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for lengths in lengths_per_batch:
        tokens = torch.randint(0, VOCAB, (len(lengths), 8), generator=g)
        labels = tokens.roll(-1, dims=1)
        for row, n in enumerate(lengths):
            labels[row, n:] = PAD
        batches.append((tokens, labels))
    return batches


# 4 windows of 2 micro-batches; the token counts differ within each window (12 vs 5, 16 vs 7, ...)
LENGTHS = [[6, 6], [3, 2], [8, 8], [4, 3], [2, 2], [7, 7], [5, 5], [5, 4]]


def _lm_loop(per_batch_loss, lengths=LENGTHS, **watch_kwargs):
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _padded_batches(lengths)
    with watch(model, opt, accumulation_steps=ACC, **watch_kwargs) as w:
        for start in range(0, len(data), ACC):
            window = data[start : start + ACC]
            tokens_in_window = sum(int((labels != PAD).sum()) for _, labels in window)
            for tokens, labels in window:
                logits = model(tokens).reshape(-1, VOCAB)
                per_batch_loss(logits, labels.reshape(-1), tokens_in_window).backward()
            opt.step()
            opt.zero_grad()
    return w


def _reference_loop(scale, batches=8, **watch_kwargs):
    model, opt = reference_model()
    data = reference_data(batches)
    with watch(model, opt, accumulation_steps=ACC, **watch_kwargs) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(data):
            mse(model, x, y, scale(i, len(data))).backward()
            if (i + 1) % ACC == 0 or i + 1 == len(data):
                opt.step()
                opt.zero_grad()
    return w


def _only(w, kind):
    assert [f.kind for f in bugs(w)] == [kind], w.report()
    return bugs(w)[0]


# -- clean ---------------------------------------------------------------------------------------------
def test_the_reference_loop_is_clean():
    assert _reference_loop(lambda i, n: ACC).findings == []


def test_token_sum_over_the_window_count_is_clean():
    def loss(logits, labels, window_tokens):
        return F.cross_entropy(logits, labels, ignore_index=PAD, reduction="sum") / window_tokens

    assert _lm_loop(loss).findings == []


def test_per_token_losses_masked_by_hand_and_divided_by_the_window_count_are_clean():
    def loss(logits, labels, window_tokens):
        per_token = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        return (per_token * (labels != PAD)).sum() / window_tokens

    assert _lm_loop(loss).findings == []


def test_label_smoothing_is_clean_when_every_micro_batch_has_the_same_count():
    def loss(logits, labels, _):
        return F.cross_entropy(logits, labels, ignore_index=PAD, label_smoothing=0.1) / ACC

    assert _lm_loop(loss, lengths=[[5, 5]] * 8).findings == []


def test_class_weights_summed_and_divided_by_the_windows_weight_sum_are_clean():
    weights = torch.linspace(0.5, 1.5, VOCAB)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _padded_batches(LENGTHS)
    with watch(model, opt, accumulation_steps=ACC) as w:
        for start in range(0, len(data), ACC):
            window = data[start : start + ACC]
            weight_sum = sum(float(weights[labels[labels != PAD]].sum()) for _, labels in window)
            for tokens, labels in window:
                logits = model(tokens).reshape(-1, VOCAB)
                loss = F.cross_entropy(logits, labels.reshape(-1), weight=weights, ignore_index=PAD, reduction="sum")
                (loss / weight_sum).backward()
            opt.step()
            opt.zero_grad()
    assert w.findings == []


def test_class_weights_count_by_their_sum():
    """A weighted mean divides by the sum of the targets' class weights: equal token counts, unequal sums."""
    weights = torch.linspace(0.5, 1.5, VOCAB)

    def loss(logits, labels, _):
        return F.cross_entropy(logits, labels, weight=weights, ignore_index=PAD) / ACC

    f = _only(_lm_loop(loss, lengths=[[5, 5]] * 8), "uneven-loss-weights")
    _, labels_0 = _padded_batches([[5, 5]] * 2)[0]
    _, labels_1 = _padded_batches([[5, 5]] * 2)[1]
    sums = [float(weights[lab[lab != PAD]].sum()) for lab in (labels_0, labels_1)]
    ratio = float(re.search(r"weigh ([0-9.]+)x", f.message).group(1))
    assert ratio == pytest.approx(max(sums) / min(sums), rel=1e-2)


def test_a_multi_task_loss_with_a_coefficient_stays_quiet():
    def loss(logits, labels, window_tokens):
        ce = F.cross_entropy(logits, labels, ignore_index=PAD, reduction="sum") / window_tokens
        aux = F.mse_loss(logits.mean(dim=1), torch.zeros(logits.shape[0])) / ACC
        return ce + 0.1 * aux

    assert _lm_loop(loss).findings == []


def test_a_coefficient_on_the_only_loss_stays_quiet():
    assert _reference_loop(lambda i, n: ACC / 0.3).findings == []


def test_without_accumulation_nothing_to_weigh_against():
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=1) as w:
        for x, y in reference_data():
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert w.findings == []


def test_a_short_last_window_divided_by_its_own_size_is_clean():
    assert _reference_loop(lambda i, n: window_size(i, n, ACC), batches=7).findings == []


def test_a_loss_computed_for_logging_in_some_passes_only_takes_no_slot():
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        for i, (x, y) in enumerate(reference_data()):
            if i % 3 == 0:
                F.mse_loss(model(x), y)  # an evaluation with grad on, never backwarded
            F.mse_loss(model(x), y).backward()  # never divided
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert _only(w, "loss-scale").count == 4  # every window, the logging calls notwithstanding


def test_validation_losses_and_autograd_grad_are_not_counted():
    model, opt = reference_model()
    data = reference_data()
    with watch(model, opt, accumulation_steps=ACC) as w:
        for i, (x, y) in enumerate(data):
            mse(model, x, y, ACC).backward()
            out = model(x)
            torch.autograd.grad(F.mse_loss(out, y), out)  # a gradient read, not accumulated
            with torch.no_grad():
                F.mse_loss(model(x), y)  # validation
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert w.findings == []


@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["mean", "none-then-mean"])
def test_the_epochs_short_last_batch_in_a_full_window_is_clean(reduction):
    """A DataLoader without drop_last: 30 samples in batches of 4 end each epoch on a batch of 2, accumulated with a
    full one; each micro-batch's mean weighs the short batch's samples twice in that window, as every such loop does."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 10, generator=g), torch.randn(30, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        for _ in range(3):
            for i, (xb, yb) in enumerate(loader):
                (F.mse_loss(model(xb), yb, reduction=reduction).mean() / ACC).backward()
                if (i + 1) % ACC == 0 or i + 1 == len(loader):
                    opt.step()
                    opt.zero_grad()
    assert w.findings == []


@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["mean", "none-then-mean"])
def test_a_short_batch_inside_the_window_or_of_counted_tokens_is_still_a_mean_of_means(reduction):
    """The short batch first in its window is no epoch's last; fewer tokens counted in the last batch than in the
    others (padding ignored) is the token mean of means."""
    data = reference_data(4)
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC) as w:
        for i, (x, y) in enumerate(data):
            if i % ACC == 0:
                x, y = x[:2], y[:2]
            (F.mse_loss(model(x), y, reduction=reduction).mean() / ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert _only(w, "uneven-loss-weights").step == 0

    def loss(logits, labels, _):
        return F.cross_entropy(logits, labels, ignore_index=PAD) / ACC

    f = _only(_lm_loop(loss, lengths=[[8, 8], [8, 7]] * 4), "uneven-loss-weights")  # 16 tokens, then 15
    assert (f.step, f.count) == (0, 4)


# -- caught --------------------------------------------------------------------------------------------
def test_a_mean_of_means_over_padded_sequences():
    def loss(logits, labels, _):
        return F.cross_entropy(logits, labels, ignore_index=PAD) / ACC  # each micro-batch its own mean

    f = _only(_lm_loop(loss), "uneven-loss-weights")
    assert (f.step, f.backward, f.params) == (0, 1, ())
    assert "backward pass 1 weigh 2.4x those of backward pass 0" in f.message  # 5 tokens vs 12
    assert "mean over its own 5 vs 12 elements" in f.message
    assert f.count == 4  # every window


def test_the_loss_never_divided_by_the_accumulation_steps():
    f = _only(_reference_loop(lambda i, n: 1), "loss-scale")
    assert (f.step, f.backward, f.count) == (0, 1, 4)
    assert "2x the window's mean" in f.message


def test_the_loss_divided_twice():
    f = _only(_reference_loop(lambda i, n: ACC * ACC), "loss-scale")
    assert f.step == 0 and "applied 0.5 of its window's mean gradient" in f.message and "twice" in f.message


def test_a_short_last_window_divided_by_the_full_count():
    w = _reference_loop(lambda i, n: ACC, batches=7)
    f = _only(w, "loss-scale")
    assert (f.step, f.backward) == (3, 6)
    assert "short window of 1 backward pass(es)" in f.message and "applied 0.5 of the window's mean" in f.message


def test_the_short_window_of_long_epochs_is_audited_once_its_period_shows():
    """Epochs of 20 full windows and a short one: the sample (first 8 steps, every 32nd) misses the short windows
    at steps 20 and 41; their period schedules the one at step 62."""
    model, opt = reference_model()
    data = reference_data(41)
    with watch(model, opt, accumulation_steps=ACC) as w:
        for _ in range(3):
            for i, (x, y) in enumerate(data):
                mse(model, x, y, ACC).backward()
                if (i + 1) % ACC == 0 or i + 1 == len(data):
                    opt.step()
                    opt.zero_grad()
    f = _only(w, "loss-scale")
    assert f.step == 62 and "short window of 1 backward pass(es)" in f.message


def test_warn_mode_points_at_the_step_and_the_audit_can_be_turned_off():
    assert _reference_loop(lambda i, n: 1, audit_losses=False).findings == []
    with pytest.warns(gradwatch.GradientWarning, match="loss-scale") as caught:
        _reference_loop(lambda i, n: 1, on_finding="warn")
    assert caught[0].filename == __file__


def test_audit_off_leaves_the_loss_functions_alone():
    original = F.cross_entropy
    model, opt = reference_model()
    with watch(model, opt, audit_losses=False):
        assert F.cross_entropy is original
    with watch(model, opt):
        assert F.cross_entropy is not original
    assert F.cross_entropy is original


def test_bad_audit_argument_fails_fast():
    model, opt = reference_model()
    with pytest.raises(TypeError, match="audit_losses must be True or False"):
        gradwatch.watch(model, opt, audit_losses="yes")


def test_the_loss_modules_are_audited_through_the_functions():
    model, opt = reference_model()
    criterion = torch.nn.MSELoss()
    with watch(model, opt, accumulation_steps=ACC) as w:
        for i, (x, y) in enumerate(reference_data()):
            criterion(model(x), y).backward()  # never divided
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    assert _only(w, "loss-scale").step == 0


# -- property: the audit against a naive model of the weights ------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    windows=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=4),
    normalisation=st.sampled_from(["window-count", "own-mean", "own-mean-by-k", "unscaled-mean"]),
)
def test_findings_match_a_naive_model_of_the_weights(windows, normalisation):
    """Windows of micro-batches of random token counts (K=3); the loss normalised one of four ways."""
    k = 3
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    expected_uneven, expected_scale = False, False
    batch_size = None  # the count of the latest window whose micro-batches all held the same
    with watch(model, opt, accumulation_steps=k) as w:
        for window in windows:
            total = sum(window)
            weights = []  # naive model: the weight of one token of each micro-batch, and the window's sum
            for count in window:
                tokens = torch.randint(0, VOCAB, (1, count), generator=g)
                logits = model(tokens).reshape(-1, VOCAB)
                labels = tokens.reshape(-1)
                if normalisation == "window-count":
                    loss, w_token = F.cross_entropy(logits, labels, reduction="sum") / total, 1 / total
                elif normalisation == "own-mean":
                    loss, w_token = F.cross_entropy(logits, labels) / len(window), 1 / (len(window) * count)
                elif normalisation == "own-mean-by-k":
                    loss, w_token = F.cross_entropy(logits, labels) / k, 1 / (k * count)
                else:
                    loss, w_token = F.cross_entropy(logits, labels), 1 / count
                loss.backward()
                weights.append((w_token, count))
            opt.step()
            opt.zero_grad()
            units = [unit for unit, _ in weights]
            weight_sum = sum(unit * count for unit, count in weights)
            m = len(window)
            counts = [count for _, count in weights]
            # the epoch's last batch, shorter than the window's others, which hold an earlier even window's count
            short_last_batch = m > 1 and counts[-1] < counts[0] == batch_size and counts[:-1] == [counts[0]] * (m - 1)
            expected_uneven |= max(units) > min(units) * 1.02 and not short_last_batch
            if counts == [counts[0]] * m:
                batch_size = counts[0]
            mistake = (m > 1 and math.isclose(weight_sum, m)) or (m > 1 and math.isclose(weight_sum, 1 / m))
            mistake |= m < k and math.isclose(weight_sum, m / k)
            expected_scale |= mistake and not math.isclose(weight_sum, 1)
    kinds = {f.kind for f in bugs(w)}
    # a window of the wrong size (not the epoch's last) is an accumulation-mismatch and is not weighed
    if "accumulation-mismatch" in kinds:
        return
    assert ("uneven-loss-weights" in kinds) == expected_uneven, (windows, normalisation, w.report())
    assert ("loss-scale" in kinds) == expected_scale, (windows, normalisation, w.report())
    for f in bugs(w):
        if f.kind == "uneven-loss-weights":
            ratio = float(re.search(r"weigh ([0-9.]+)x", f.message).group(1))
            assert ratio > 1.02


def test_passes_without_a_step_are_not_held_without_bound():
    model, opt = reference_model()
    x, y = reference_data(1)[0]
    with watch(model, opt) as w:
        for _ in range(200):  # gradients collected, never stepped on (the audit is due: no step yet)
            F.mse_loss(model(x), y).backward()
        assert len(w._tracker._audit._by_pass) == 64


# -- what the user sees: the trace and TensorBoard -------------------------------------------------------
def test_the_trace_and_tensorboard_show_the_weights(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _reference_loop(lambda i, n: 1, logdir=tmp_path)  # every window weighs 2 (never divided)
    trace = gradwatch.load_trace(tmp_path)
    weighed = trace.of("loss_weights")
    assert [e["step"] for e in weighed] == [0, 1, 2, 3]  # the first windows are all audited
    first = weighed[0]
    assert first["weight_sum"] == pytest.approx(2.0) and first["weight_ratio"] == pytest.approx(1.0)
    assert [p["backward"] for p in first["passes"]] == [0, 1]
    assert first["passes"][0]["losses"] == [
        {"loss": "mse_loss", "reduction": "mean", "elements": 4.0, "weight": pytest.approx(1.0)}
    ]
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    sums = [(e.step, e.value) for e in acc.Scalars("loss_weights/window_weight_sum")]
    assert sums == [(s, pytest.approx(2.0)) for s in range(4)]
    assert {e.value for e in acc.Scalars("loss_weights/max_min_ratio")} == {1.0}
