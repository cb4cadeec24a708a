"""Batched device checks (stats.py), against values computed one tensor at a time."""

from __future__ import annotations

import math
import sys
import types
from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch import stats
from gradwatch.stats import FiniteChecks, HostBatch, nonfinite_and_zero, nonfinite_positions, read_flags, zero_flags

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KINDS = ["normal", "zero", "nan", "inf"]


def _tensor(kind: str, dtype: torch.dtype, size: int) -> torch.Tensor:
    t = torch.randn(size, generator=torch.Generator().manual_seed(size)).to(dtype)
    if kind == "zero":
        return torch.zeros(size, dtype=dtype)
    if kind in ("nan", "inf"):
        t[size // 2] = float(kind)
    return t


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(DTYPES), st.integers(1, 40)), max_size=70))
def test_nonfinite_and_zero_positions_match_one_tensor_at_a_time(specs):
    tensors = [_tensor(kind, dtype, size) for kind, dtype, size in specs]
    bad = [pos for pos, t in enumerate(tensors) if not torch.isfinite(t).all()]
    zero = [pos for pos, t in enumerate(tensors) if not t.any()]
    assert sorted(nonfinite_positions(tensors)) == bad
    assert nonfinite_and_zero(tensors, list(range(len(tensors)))) == (bad, zero)
    assert nonfinite_and_zero(tensors, []) == (bad, [])


SHAPES = [(), (3,), (1, 10), (2, 3), (2, 2, 2), (0,), (2, 0)]
SPECS = st.tuples(st.sampled_from(KINDS), st.sampled_from(DTYPES), st.sampled_from(SHAPES))


def _shaped(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    """Small tensors of every rank, 0-d and empty ones too."""
    return [
        _tensor(kind, dtype, math.prod(shape)).reshape(shape) if math.prod(shape) else torch.zeros(shape, dtype=dtype)
        for kind, dtype, shape in specs
    ]


@settings(max_examples=80, deadline=None)
@given(st.lists(SPECS, max_size=12))
def test_small_cpu_tensors_checked_on_the_host_agree_with_the_kernels(specs):
    """Tensors of every rank (0-d and empty too): the host's reading and the norm kernels name the same positions."""
    tensors = _shaped(specs)
    bad = [pos for pos, t in enumerate(tensors) if not torch.isfinite(t).all()]
    zero = [pos for pos, t in enumerate(tensors) if pos not in bad and not t.any()]
    everything = list(range(len(tensors)))
    assert stats._host_checks(tensors) is not None
    with patch.object(stats, "HOST_CHECK_LIMIT", -1):
        if tensors:
            assert stats._host_checks(tensors) is None
        assert nonfinite_and_zero(tensors, everything) == (bad, zero)
    assert nonfinite_and_zero(tensors, everything) == (bad, zero)
    assert nonfinite_and_zero(tensors, everything[::2]) == (bad, [p for p in zero if p % 2 == 0])


def test_only_small_dense_floating_point_cpu_tensors_are_read_on_the_host():
    assert stats._host_checks([torch.ones(stats.HOST_CHECK_LIMIT)]) is not None
    assert stats._host_checks([torch.ones(stats.HOST_CHECK_LIMIT), torch.ones(1)]) is None  # too many values
    assert stats._host_checks([torch.sparse_coo_tensor([[0]], [1.0], (3,), check_invariants=True)]) is None
    assert stats._host_checks([torch.ones(2, dtype=torch.complex64)]) is None
    assert stats._host_checks([torch.nn.Parameter(torch.ones(2))]) is None  # a subclass (DTensor, say) may differ
    assert stats._host_checks([torch.tensor([1e-30, 0.0])]) == ([], set())  # tiny, not zero


def test_zero_flags_read_in_one_go_per_position_and_per_group():
    grads = [torch.zeros(3), torch.ones(2), torch.zeros(4, dtype=torch.float64)]
    groups = zero_flags(grads)
    flags = [(zeros, at) for _, zeros in groups for at in range(len(zeros))]
    positions = [pos for positions, _ in groups for pos in positions]
    assert dict(zip(positions, read_flags(flags), strict=True)) == {0: True, 1: False, 2: True}
    assert read_flags([(zeros, None) for _, zeros in groups]) == [False, True]  # float32 group has a non-zero


def test_host_batch_reads_norms_and_vectors_together():
    batch = HostBatch()
    tensors = [torch.tensor([3.0, 4.0]), None, torch.tensor([1.0], dtype=torch.float64), torch.zeros(2)]
    norms = batch.norms(tensors)
    vector = batch.vector(torch.tensor([0.5, 2.0]))
    batch.read()
    assert norms() == [5.0, 0.0, 1.0, 0.0]
    assert vector() == [0.5, 2.0]


@settings(max_examples=60, deadline=None)
@given(st.lists(SPECS, max_size=8))
def test_host_batch_norms_of_small_cpu_tensors_read_on_the_host_agree_with_the_kernels(specs):
    """A small model's norms are read on the host (no kernel): the kernels' values, NaN/Inf where they hold it."""
    tensors = _shaped(specs)
    on_host = HostBatch()
    host_norms = on_host.norms(tensors)
    assert host_norms() is not None  # read already, before the batch is
    with patch.object(stats, "HOST_CHECK_LIMIT", -1):
        on_device = HostBatch()
        kernel_norms = on_device.norms(tensors)
        on_device.read()
    for host, kernel, t in zip(host_norms(), kernel_norms(), tensors, strict=True):
        if torch.isfinite(t).all():
            assert host == pytest.approx(kernel, rel=1e-2 if t.dtype in (torch.float16, torch.bfloat16) else 1e-5)
        else:
            assert not math.isfinite(host)


def test_finite_checks_name_the_pass_and_the_parameter():
    checks = FiniteChecks()
    checks.add(0, (0,), [10, 11], [torch.ones(2), torch.ones(2)])
    checks.add(1, (0,), [10, 11], [torch.ones(2), torch.tensor([1.0, math.inf])])
    assert len(checks) == 2
    assert checks.resolve() == [(11, (0,), 1)]
    assert len(checks) == 0 and checks.resolve() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_overflowing_norm_of_finite_values_is_not_a_nan(dtype):
    big = torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype)  # finite, but its 2-norm overflows
    nan = torch.tensor([1.0, math.nan], dtype=dtype)
    assert nonfinite_positions([big, torch.ones(3, dtype=dtype), nan]) == [2]
    assert nonfinite_and_zero([big, nan], [0, 1]) == ([1], [])


def test_a_sparse_gradient_among_dense_ones_is_skipped_and_the_dense_ones_still_checked():
    sparse = torch.sparse_coo_tensor([[0]], [float("nan")], (3,))  # no norm kernel: not checked (README)
    tensors = [torch.tensor([1.0, float("inf")]), sparse, torch.ones(2, dtype=torch.float64), torch.ones(2)]
    assert nonfinite_positions(tensors) == [0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(KINDS),
            st.sampled_from(DTYPES[:2]),
            st.sampled_from([(4,), (2, 3), (6,), (40,), (0,), (2, 0)]),
        ),
        min_size=20,
        max_size=60,
    ),
    st.sampled_from([1, 8, 24, 40, 1000]),
)
def test_stacked_checks_of_many_small_tensors_name_the_same_positions(specs, stack_limit):
    """Many CPU tensors of a few shapes (empty ones too): stacked per shape, in chunks, beside tensors too large to
    stack."""
    tensors = _shaped(specs)
    bad = [pos for pos, t in enumerate(tensors) if not torch.isfinite(t).all()]
    with (
        patch.object(stats, "FEW_ON_CPU", 2),
        patch.object(stats, "SMALL_ON_CPU", 10),  # (40,) is "large"
        patch.object(stats, "STACK_LIMIT", stack_limit),
    ):
        assert nonfinite_positions(tensors) == bad
    assert nonfinite_positions(tensors) == bad


def test_an_overflowing_stack_of_finite_tensors_is_not_a_nan():
    big = [torch.full((8,), 1e19) for _ in range(40)]  # each norm finite, their stack's overflows float32
    assert math.isinf(torch.linalg.vector_norm(torch.stack(big)).item())
    assert nonfinite_positions(big) == []
    assert nonfinite_positions([*big, torch.tensor([1.0] * 7 + [math.nan])]) == [40]


def test_host_batch_norms_of_many_small_tensors_are_each_tensors_norm():
    """The sinks' per-parameter norms through the stacked CPU path (more tensors of one shape than FEW_ON_CPU)."""
    torch.manual_seed(0)
    tensors = [torch.randn(3, 2) if k % 3 else torch.randn(5) for k in range(40)] + [None, torch.randn(70000)]
    batch = HostBatch()
    norms = batch.norms(tensors)
    batch.read()
    expected = [0.0 if t is None else torch.linalg.vector_norm(t).item() for t in tensors]
    assert norms() == pytest.approx(expected, rel=1e-6)


SHAPES = [(4,), (2, 3), (6,), (40,), (0,)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(  # the gradients of successive steps: the same layout, or one that no longer fits the plan
        st.lists(
            st.tuples(st.sampled_from(KINDS), st.sampled_from(DTYPES[:2]), st.sampled_from(SHAPES), st.booleans()),
            min_size=18,
            max_size=24,
        ),
        min_size=1,
        max_size=4,
    ),
    st.integers(0, 3),
)
def test_a_plan_splits_later_lists_the_same_way_or_not_at_all(steps, repeats):
    """Norms through a plan learnt on earlier lists equal norms computed afresh, position by position, whether the
    next list fits the plan (the same layout again) or not (other shapes, dtypes, sparse tensors, another size)."""
    plan = stats.NormPlan()
    lists = [step for step in steps for _ in range(repeats + 1)]
    for specs in lists:
        tensors = [
            torch.zeros(3).to_sparse()
            if sparse and kind == "normal"
            else _tensor(kind, dtype, math.prod(shape)).reshape(shape)
            if math.prod(shape)
            else torch.zeros(shape, dtype=dtype)
            for kind, dtype, shape, sparse in specs
        ]
        with patch.object(stats, "FEW_ON_CPU", 2), patch.object(stats, "SMALL_ON_CPU", 10):
            planned = stats.norms_by_group(tensors, plan)
            fresh = stats.norms_by_group(tensors)
        expected = _by_position(fresh)
        assert set(_by_position(planned)) == set(expected) == {p for p, t in enumerate(tensors) if not t.is_sparse}
        assert _by_position(planned) == pytest.approx(expected, nan_ok=True)


def _by_position(groups: list[tuple[list[int], torch.Tensor]]) -> dict[int, float]:
    return {p: v for positions, norms in groups for p, v in zip(positions, norms.tolist(), strict=True)}


def test_a_plan_learnt_beside_a_sparse_tensor_is_not_reused_for_a_dense_one():
    dense = [torch.full((2, 3), float(k)) for k in range(20)]
    with_sparse = [*dense[:3], torch.zeros(6).to_sparse(), *dense[4:]]
    plan = stats.NormPlan()
    with patch.object(stats, "FEW_ON_CPU", 2):
        assert 3 not in _by_position(stats.norms_by_group(with_sparse, plan))  # a sparse tensor has no norm kernel
        dense[3] = torch.full((2, 3), math.nan)
        assert math.isnan(_by_position(stats.norms_by_group(dense, plan))[3])  # checked, not left out by the plan


def test_local_tensors_takes_each_dtensor_to_its_shard_and_leaves_other_tensors(monkeypatch):
    """Found by the tensors' types (a subclass of DTensor is one too), without asking each tensor."""

    class FakeDTensor(torch.Tensor):
        def to_local(self) -> torch.Tensor:
            return torch.zeros(1)

    class Subclass(FakeDTensor):
        pass

    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", types.SimpleNamespace(DTensor=FakeDTensor))
    plain = torch.ones(2)
    out = stats.local_tensors([plain, torch.ones(3).as_subclass(Subclass)])
    assert out[0] is plain and out[1].shape == (1,)
    assert stats.local_tensors([plain])[0] is plain
    monkeypatch.delitem(sys.modules, "torch.distributed.tensor")
    assert stats.local_tensors([torch.ones(3).as_subclass(Subclass)])[0].shape == (3,)  # no DTensor imported
