"""TensorBoard event files, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from helpers import gan, gan_iteration, mse, reference_data, reference_loop, reference_model, watch
from hypothesis import given
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch
from gradwatch.sinks.telemetry import gradient_histograms
from gradwatch.sinks.tensorboard import Polyline

ACC = 2


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _chart(points, steps):
    """The value TensorBoard's line through ``points`` shows at each of ``steps`` (linear between points)."""
    values = []
    for x in steps:
        right = next(k for k, (px, _) in enumerate(points) if px >= x)
        (x1, y1), (x0, y0) = points[right], points[max(right - 1, 0)]
        values.append(y1 if x1 == x else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return values


def _text(acc, tag):
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


def test_reference_loop_streams_lifecycle_and_gradient_norms(tmp_path):
    model, opt = reference_model()
    expected_norms = []
    with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                expected_norms.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
                opt.step()
                opt.zero_grad()
    assert w.findings == []
    acc = _events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"lifecycle/backward_passes_per_step", "lifecycle/params_per_backward", "lifecycle/clears"} <= tags
    assert _scalars(acc, "lifecycle/backward_passes_per_step") == [(s, 2.0) for s in range(4)]
    assert _chart(_scalars(acc, "lifecycle/params_per_backward"), range(8)) == [2.0] * 8
    assert _scalars(acc, "lifecycle/params_per_backward") == [(0, 2.0), (7, 2.0)]  # a flat line: its two ends
    assert _chart(_scalars(acc, "lifecycle/clears"), [0, 2, 4, 6, 8]) == [1.0, 2.0, 3.0, 4.0, 5.0]
    for name in ("weight", "bias"):
        logged = _scalars(acc, f"grad_norm/{name}")
        assert [s for s, _ in logged] == [0, 1, 2, 3]
        assert [v for _, v in logged] == pytest.approx([n[name] for n in expected_norms], rel=1e-5)
    total = [math.hypot(n["weight"], n["bias"]) for n in expected_norms]
    assert [v for _, v in _scalars(acc, "grad_norm/total")] == pytest.approx(total, rel=1e-5)
    assert "no findings" in _text(acc, "gradwatch/findings")[-1]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_findings_are_written_as_a_markdown_table_when_they_occur(tmp_path):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path):
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()  # missing zero_grad
    acc = _events(tmp_path)
    assert _scalars(acc, "lifecycle/findings") == [(1, 1.0)]
    tables = _text(acc, "gradwatch/findings")
    assert tables[0].startswith("| kind | severity | step | backward | count | parameters | what to do |")
    assert "| uncleared-gradient | error | 1 | 2 | 1 | weight, bias |" in tables[0]
    assert "| uncleared-gradient | error | 1 | 2 | 3 | weight, bias |" in tables[-1]  # final counts at detach


def test_a_finding_brings_the_charts_up_to_date_on_disk_while_the_run_goes_on(tmp_path):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path) as w:
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                opt.step()  # missing zero_grad: found at step 1
            if w.findings:
                break
        acc = _events(tmp_path)  # read while the watch runs: the scalars are held up to a second otherwise
    assert _scalars(acc, "lifecycle/findings") == [(1, 1.0)]
    assert [s for s, _ in _scalars(acc, "grad_norm/weight")] == [0, 1]
    assert [s for s, _ in _scalars(acc, "lifecycle/backward_passes_per_step")] == [0, 1]


def test_many_parameters_are_grouped_per_layer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])  # 40 parameter tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, logdir=tmp_path):
        x = torch.randn(2, 4)
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
    tags = set(_events(tmp_path).Tags()["scalars"])
    assert {f"grad_norm/{i}" for i in range(20)} <= tags
    assert "grad_norm/0.weight" not in tags


def test_two_optimizers_get_their_own_step_axis(tmp_path):

    model, opt_g, opt_d, batches = gan()
    with watch(model, [opt_g, opt_d], logdir=tmp_path):
        for real, z in batches:
            gan_iteration(model, opt_g, opt_d, real, z)
    acc = _events(tmp_path)
    assert _scalars(acc, "lifecycle/opt0/backward_passes_per_step") == [(s, 1.0) for s in range(4)]
    assert [s for s, _ in _scalars(acc, "grad_norm/opt1/d.weight")] == [0, 1, 2, 3]


def test_an_unwritable_logdir_fails_at_watch(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model, opt = reference_model()
    with pytest.raises(ValueError, match="cannot write gradwatch's logs"):
        gradwatch.watch(model, opt, logdir=blocker / "logs")


def test_update_ratios_and_histograms_on_their_schedule(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = gradwatch.TensorBoardOptions(update_ratio_every=2, histogram_every=3)
    expected = {}
    with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path, tensorboard=options):
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            mse(model, x, y, ACC).backward()
            if (i + 1) % ACC == 0:
                before = [p.detach().clone() for p in model[0].parameters()]
                opt.step()
                after = list(model[0].parameters())
                dw = math.sqrt(sum((a - b).pow(2).sum().item() for a, b in zip(after, before, strict=True)))
                w = math.sqrt(sum(a.pow(2).sum().item() for a in after))
                expected[i // ACC] = dw / w
                opt.zero_grad()
    acc = _events(tmp_path)
    ratios = _scalars(acc, "update_ratio/0")
    assert [s for s, _ in ratios] == [0, 2]  # every 2 steps
    assert [v for _, v in ratios] == pytest.approx([expected[0], expected[2]], rel=1e-4)
    assert "update_ratio/2" in acc.Tags()["scalars"]
    histograms = acc.Histograms("grad/0")
    assert [h.step for h in histograms] == [0, 3]
    histogram = histograms[0].histogram_value
    assert histogram.num == 10 * 4 + 4  # weight and bias of layer 0
    assert sum(histogram.bucket) == histogram.num
    # 30 equal-width buckets, as TensorBoard's own summary writes them, and an empty one marking the lowest edge
    assert len(histogram.bucket) <= 31
    widths = [b - a for a, b in zip(histogram.bucket_limit, histogram.bucket_limit[1:], strict=False)]
    assert max(widths) == pytest.approx(min(widths), rel=1e-6)


def test_tensorboard_options_are_checked():
    with pytest.raises(ValueError, match="group_by must be"):
        gradwatch.TensorBoardOptions(group_by="module")
    with pytest.raises(ValueError, match="histogram_every must be an int >= 0"):
        gradwatch.TensorBoardOptions(histogram_every=-1)
    model, opt = reference_model()
    with pytest.raises(TypeError, match="TensorBoardOptions"):
        gradwatch.watch(model, opt, tensorboard={"histogram_every": 5})


def test_timeline_picture_is_saved_and_logged(tmp_path):
    pytest.importorskip("matplotlib")
    from gradwatch.demo import run_demo

    run_demo("zero-grad-before-step", tmp_path)
    png = tmp_path / "gradwatch-timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = _events(tmp_path).Images("gradwatch/timeline")
    assert len(images) == 1 and images[0].width > 300


def test_without_matplotlib_everything_else_works(tmp_path, monkeypatch, capsys):
    from gradwatch import timeline
    from gradwatch.cli import main

    monkeypatch.setattr(timeline, "available", lambda: False)
    assert main(["demo", "--bug", "missing-zero-grad", "--logdir", str(tmp_path)]) == 1
    assert "no timeline picture: install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "gradwatch-timeline.png").exists()
    assert gradwatch.load_trace(tmp_path).findings[0].kind == "uncleared-gradient"
    assert "grad_norm/weight" in _events(tmp_path).Tags()["scalars"]


def test_contribution_norms_per_backward_pass(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {"0.weight": [], "2.bias": []}
    options = gradwatch.TensorBoardOptions(contribution_every=1)
    with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path, tensorboard=options):
        opt.zero_grad()
        for i, (x, y) in enumerate(reference_data()):
            before = {n: (p.grad.clone() if p.grad is not None else 0) for n, p in model.named_parameters()}
            mse(model, x, y, ACC).backward()
            for name, p in model.named_parameters():
                if name in expected:
                    expected[name].append((p.grad - before[name]).norm().item())
            if (i + 1) % ACC == 0:
                opt.step()
                opt.zero_grad()
    acc = _events(tmp_path)
    for name, norms in expected.items():
        logged = _scalars(acc, f"contribution_norm/{name}")
        assert [b for b, _ in logged] == list(range(8))  # x axis: the backward pass
        assert [v for _, v in logged] == pytest.approx(norms, rel=1e-5)


def test_contribution_norms_default_to_every_tenth_window(tmp_path):
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path):
        reference_loop(model, opt, reference_data(n_batches=24))  # 12 steps
    logged = _scalars(_events(tmp_path), "contribution_norm/weight")
    assert [b for b, _ in logged] == [0, 1, 20, 21]  # the windows of steps 0 and 10


def test_the_contribution_pre_hooks_are_on_the_parameters_only_while_a_window_is_measured(tmp_path, monkeypatch):
    calls = []
    record_incoming = gradwatch.hooks.BackwardGrouper.record_incoming
    monkeypatch.setattr(
        gradwatch.hooks.BackwardGrouper,
        "record_incoming",
        lambda self, index, grad: calls.append(index) or record_incoming(self, index, grad),
    )
    model, opt = reference_model()
    with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path):
        reference_loop(model, opt, reference_data(n_batches=24))  # 12 steps: the windows of steps 0 and 10 measured
        assert model.weight._backward_hooks is None or not model.weight._backward_hooks
    assert len(calls) == 2 * 2 * ACC  # weight and bias, two windows of ACC passes
    assert [b for b, _ in _scalars(_events(tmp_path), "contribution_norm/bias")] == [0, 1, 20, 21]
    assert not model.weight._backward_hooks


@pytest.mark.parametrize("hooks_first", [True, False], ids=["user-hooks-first", "watch-first"])
def test_the_contribution_pre_hooks_follow_steps_taken_inside_the_backward(tmp_path, monkeypatch, hooks_first):
    """Optimizers stepped from post-accumulate-grad hooks: the pre-hooks go on or off at the end of each pass (never
    during it), as the window to come is measured or not, and none is left on a parameter after the watch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Linear(8, 1))
    opts = {p: torch.optim.SGD([p], lr=1e-2) for p in model.parameters()}

    stepped = []  # parameters stepped in the running pass

    def step_in_backward(p):
        opts[p].step()
        opts[p].zero_grad()
        stepped.append(p)

    synced_after = []  # how many parameters their pass had stepped when the pre-hooks were synced
    sync = gradwatch.hooks.HookSet.sync_measuring
    monkeypatch.setattr(
        gradwatch.hooks.HookSet, "sync_measuring", lambda self: synced_after.append(len(stepped)) or sync(self)
    )

    def add_hooks():
        return [p.register_post_accumulate_grad_hook(step_in_backward) for p in model.parameters()]

    handles = add_hooks() if hooks_first else []
    options = gradwatch.TensorBoardOptions(contribution_every=3)
    measured = []
    with watch(model, list(opts.values()), logdir=tmp_path, tensorboard=options) as w:
        handles = handles or add_hooks()
        for _ in range(7):
            stepped.clear()
            model(torch.randn(4, 10)).pow(2).mean().backward()
            hooked = [bool(p._backward_hooks) for p in model.parameters()]
            assert hooked == [w._tracker.measuring_contributions] * 4
            measured.append(hooked[0])
    for h in handles:
        h.remove()
    assert w.findings == []
    assert measured == [s % 3 == 0 for s in range(1, 8)]  # after pass k, the window of step k is next
    assert not any(p._backward_hooks for p in model.parameters())
    assert synced_after[0] == 0 and set(synced_after[1:]) == {4}  # at the watch, then only once a pass was over
    # the sinks hear of each pass once, when it is over, with the parts the steps inside it booked (the
    # parameter stepped before the pass reached a watched hook is a gradient supplied outside any pass)
    passes = gradwatch.load_trace(tmp_path).of("backward")
    assert [e["backward"] for e in passes] == list(range(7))
    assert all({0, 1, 2} <= set(e["params"]) for e in passes)
    # a pass that began measured is measured to its end, though the steps inside it end its window
    assert [b for b, _ in _scalars(_events(tmp_path), "contribution_norm/0.weight")] == [0, 3, 6]


def test_group_choice():
    from gradwatch.sinks.tensorboard import choose_groups

    names = [f"blocks.{i}.{kind}" for i in range(100) for kind in ("weight", "bias")]
    assert choose_groups(names[:20], "auto") == names[:20]
    assert choose_groups(names[:80], "auto") == [n.rsplit(".", 1)[0] for n in names[:80]]
    ranges = choose_groups(names, "auto")  # 100 layers: 32 contiguous ranges
    assert len(set(ranges)) == 25 and ranges[0] == ranges[7] == "blocks.0..blocks.3"
    assert choose_groups(names, "layer")[-1] == "blocks.99"
    assert choose_groups(names[:80], "param") == names[:80]


@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(0, 4)), min_size=1, max_size=80),
    st.integers(1, 8),
)
def test_a_polyline_leaves_out_only_points_on_the_charts_line(series, refresh):
    steps = [sum(gap for gap, _ in series[: k + 1]) for k in range(len(series))]
    values = [float(v) for _, v in series]
    line = Polyline(refresh)
    written = [point for step, v in zip(steps, values, strict=True) for point in line.add(step, v)] + line.end()
    assert written[0] == (steps[0], values[0]) and written[-1] == (steps[-1], values[-1])
    assert set(written) <= set(zip(steps, values, strict=True))
    assert _chart(written, steps) == pytest.approx(values)
    positions = [steps.index(step) for step, _ in written]
    assert all(b - a - 1 <= refresh for a, b in itertools.pairwise(positions))  # the live chart keeps moving


def test_parameters_per_backward_pass_follow_a_loop_that_reaches_part_of_the_model(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reached = []
    with watch(model, opt, logdir=tmp_path) as w:
        for k in range(30):
            x = torch.randn(2, 4)
            partial = k % 7 in (3, 4)  # some passes only reach the first layer
            (model[0](x).sum() if partial else model(x).sum()).backward()
            reached.append(2.0 if partial else 4.0)
            opt.step()
            opt.zero_grad()
    assert w.findings == []
    points = _scalars(_events(tmp_path), "lifecycle/params_per_backward")
    assert _chart(points, range(30)) == reached
    assert len(points) < 30


def _numpy_histogram(values, buckets=30):
    from torch.utils.tensorboard.summary import make_histogram

    return make_histogram(values.double().numpy(), buckets)


@pytest.mark.parametrize("by_comparison", [False, True])
def test_histograms_are_counted_on_the_device_as_numpy_counts_them(by_comparison):
    """One histogram per group (two parameters in one): its buckets, range and sums as TensorBoard's own histogram
    of the values computes them on the host (a value on a bucket's edge may land on either side: numpy corrects
    rounding there, the kernels do not). ``by_comparison``: the deterministic path CUDA takes when histc has none."""
    g = torch.Generator().manual_seed(3)
    grads = {
        0: torch.randn(40, 30, generator=g),
        1: torch.randn(30, generator=g) * 3,
        2: torch.rand(7, generator=g, dtype=torch.float64),
    }
    histograms = gradient_histograms(grads, ["layer", "layer", "other"], 30, by_comparison=by_comparison)
    assert set(histograms) == {"layer", "other"}
    for name, values in (("layer", torch.cat([grads[0].reshape(-1), grads[1]])), ("other", grads[2])):
        ours, theirs = histograms[name], _numpy_histogram(values)
        assert (ours.num, ours.min, ours.max) == (theirs.num, theirs.min, theirs.max)
        assert (ours.sum, ours.sum_squares) == pytest.approx((theirs.sum, theirs.sum_squares), rel=1e-5)
        assert ours.limits == pytest.approx(list(theirs.bucket_limit), rel=1e-9)
        assert sum(abs(a - b) for a, b in zip(ours.counts, theirs.bucket, strict=True)) <= 2
        assert sum(ours.counts) == ours.num


def test_histograms_leave_nan_and_inf_out_and_take_every_dtype():
    grads = {
        0: torch.tensor([1.0, math.nan, 2.0, -math.inf]),
        1: torch.full((3,), math.nan),  # nothing finite: no histogram
        2: torch.full((4,), 7.0, dtype=torch.bfloat16),  # one value: a bucket of width 1 around it, as numpy's
        3: torch.tensor([1 + 2j, 3 - 1j]),  # real and imaginary parts
        4: torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),  # its extremes read as float32 would lose 0.1
    }
    histograms = gradient_histograms(grads, ["a", "b", "c", "d", "e"], 30)
    assert set(histograms) == {"a", "c", "d", "e"}
    assert (histograms["e"].num, histograms["e"].min, histograms["e"].max) == (3, 0.1, 0.3)
    assert (histograms["a"].num, histograms["a"].min, histograms["a"].max, histograms["a"].sum) == (2, 1.0, 2.0, 3.0)
    c = histograms["c"]
    assert (c.num, c.min, c.max) == (4, 7.0, 7.0)
    assert c.limits == pytest.approx(list(_numpy_histogram(torch.full((4,), 7.0)).bucket_limit))
    assert (histograms["d"].num, histograms["d"].min, histograms["d"].max) == (4, -1.0, 3.0)


def test_a_sparse_gradient_is_left_out_of_the_statistics_and_the_checks_go_on(tmp_path):
    """An embedding with sparse gradients: its gradient norm (duplicate entries summed), no histogram of it (no
    kernel takes it), the rest as usual."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(20, 4, sparse=True), "lin": torch.nn.Linear(4, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    options = gradwatch.TensorBoardOptions(histogram_every=1, update_ratio_every=1, contribution_every=1)
    expected = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradientWarning)  # a stop or a sink turned off would warn
        with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path, tensorboard=options, on_finding="record") as w:
            opt.zero_grad()
            for i in range(8):
                (model["lin"](model["emb"](torch.randint(0, 20, (4,)))).pow(2).mean() / ACC).backward()
                if (i + 1) % ACC == 0:
                    expected.append(model["emb"].weight.grad.to_dense().norm().item())
                    opt.step()
                    opt.zero_grad()
    assert w.findings == [] and w._tracker.ledger.steps == [4]
    acc = _events(tmp_path)
    assert sorted(acc.Tags()["histograms"]) == ["grad/lin"]
    assert [s for s, _ in _scalars(acc, "grad_norm/lin.weight")] == [0, 1, 2, 3]
    assert [v for _, v in _scalars(acc, "grad_norm/emb.weight")] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("value", [math.nan, 1e19])
def test_a_histogram_of_nan_or_all_but_equal_huge_gradients_keeps_the_sink_on(tmp_path, value):
    """30 equal-width buckets cannot split NaN or a range below the values' own precision: NaN is left out (nothing
    left: no histogram), and a range too narrow takes one bucket; the sink goes on."""
    model, opt = reference_model()
    options = gradwatch.TensorBoardOptions(histogram_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradientWarning)  # a sink turned off would warn
        with watch(model, opt, accumulation_steps=ACC, logdir=tmp_path, tensorboard=options, on_finding="record"):
            opt.zero_grad()
            for i, (x, y) in enumerate(reference_data()):
                mse(model, x, y, ACC).backward()
                if (i + 1) % ACC == 0:
                    if i == 3:  # the window of step 1
                        for p in model.parameters():
                            p.grad.fill_(value)
                    opt.step()
                    opt.zero_grad()
    histograms = _events(tmp_path).Histograms("grad/weight")
    # NaN: from step 1 on every gradient is NaN (step 1 spread it into the weights), so no histogram of them
    assert [h.step for h in histograms] == ([0] if math.isnan(value) else [0, 1, 2, 3])
