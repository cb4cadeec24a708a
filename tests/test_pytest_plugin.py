"""The pytest plugin, exercised with pytester: a clean test passes, a buggy one fails listing the kinds."""

from __future__ import annotations

import pytest

LOOP = """
import pytest
import torch


def train(model, optimizer, zero_grad=True, batches=8):
    torch.manual_seed(0)
    optimizer.zero_grad()
    for i in range(batches):
        x, y = torch.randn(4, 10), torch.randn(4, 1)
        (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
        if (i + 1) % 2 == 0:
            optimizer.step()
            if zero_grad:
                optimizer.zero_grad()


def build():
    model = torch.nn.Linear(10, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)
"""


@pytest.fixture
def suite(pytester):
    pytester.makeconftest("")
    return pytester


def test_clean_loop_passes_and_buggy_loop_fails_with_the_kinds(suite):
    suite.makepyfile(
        LOOP
        + """
def test_clean(gradwatch):
    model, optimizer = build()
    gradwatch(model, optimizer, accumulation_steps=2)
    train(model, optimizer)


def test_missing_zero_grad(gradwatch):
    model, optimizer = build()
    gradwatch(model, optimizer, accumulation_steps=2)
    train(model, optimizer, zero_grad=False)
"""
    )
    result = suite.runpytest_subprocess()  # the plugin comes from the pytest11 entry point
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_missing_zero_grad*", "*uncleared-gradient*weight, bias*"])
    assert "test_clean FAILED" not in result.stdout.str()


def test_marker_allows_kinds_and_end_of_run_checks_count(suite):
    suite.makepyfile(
        LOOP
        + """
@pytest.mark.gradwatch(allow=["dangling-gradient"])
def test_partial_window_allowed(gradwatch):
    model, optimizer = build()
    gradwatch(model, optimizer, accumulation_steps=2)
    train(model, optimizer, batches=7)


def test_partial_window_fails(gradwatch):
    model, optimizer = build()
    gradwatch(model, optimizer, accumulation_steps=2)
    train(model, optimizer, batches=7)


@pytest.mark.gradwatch(allow=["no-such-kind"])
def test_unknown_kind_in_marker(gradwatch):
    model, optimizer = build()
    gradwatch(model, optimizer)
    train(model, optimizer)
"""
    )
    result = suite.runpytest_subprocess()  # the plugin comes from the pytest11 entry point
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*dangling-gradient*", "*unknown kind*no-such-kind*"])


def test_a_test_that_fails_on_its_own_is_not_masked(suite):
    suite.makepyfile(
        LOOP
        + """
def test_own_failure(gradwatch):
    model, optimizer = build()
    watcher = gradwatch(model, optimizer)
    train(model, optimizer, zero_grad=False)
    assert False, "the test's own assertion"
"""
    )
    result = suite.runpytest_subprocess()  # the plugin comes from the pytest11 entry point
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the test's own assertion*"])


def test_a_watch_that_stopped_checking_fails_the_test(suite):
    suite.makepyfile(
        LOOP
        + """
def test_compiled_autograd(gradwatch):
    import torch._dynamo.compiled_autograd as compiled_autograd

    model, optimizer = build()
    gradwatch(model, optimizer)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        train(model, optimizer)
"""
    )
    result = suite.runpytest_subprocess("-W", "ignore")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*gradwatch stopped checking*compiled autograd*not checked*"])
