"""pytest plugin: a ``gradwatch`` fixture that fails the test when the loop it watched has a gradient bug.

    def test_training(gradwatch):
        model, optimizer = build()
        gradwatch(model, optimizer, accumulation_steps=2)   # same arguments as gradwatch.watch()
        train(model, optimizer)

    @pytest.mark.gradwatch(allow=["dangling-gradient"])  # kinds that do not fail the test
    def test_partial_epoch(gradwatch): ...

Registered through the ``pytest11`` entry point; ``-p no:gradwatch`` turns it off. gradwatch (and torch) are
imported only when a test uses the fixture.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

_WATCHERS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gradwatch(allow=()): finding kinds that do not fail a test using the gradwatch fixture",
    )


@pytest.fixture
def gradwatch(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Call it like ``gradwatch.watch(model, optimizer, ...)``; the test fails on error or warning findings."""
    import gradwatch as package

    watchers: list = []
    request.node.stash[_WATCHERS] = watchers

    def attach(model: Any, optimizer: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("on_finding", "record")
        watcher = package.watch(model, optimizer, **kwargs)
        watchers.append(watcher)
        return watcher

    yield attach
    for watcher in watchers:  # already detached after a passing call phase; detach is idempotent
        watcher.detach()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    result = yield  # a test that fails on its own raises here: its failure stands, unmasked
    watchers = item.stash.get(_WATCHERS, None)
    if not watchers:
        return result
    marker = item.get_closest_marker("gradwatch")
    allow = tuple(marker.kwargs.get("allow", ())) if marker else ()
    failures = []
    for watcher in watchers:
        try:
            watcher.detach()  # the end-of-run checks (dangling, unused) belong to the test
            watcher.assert_clean(allow=allow)
        except Exception as error:  # GradientBugError, or an unknown kind in allow=
            failures.append(str(error))
        if watcher.stopped is not None:  # never a pass for a loop that was not checked to its end
            failures.append(f"gradwatch stopped checking ({watcher.stopped}): the rest of the loop was not checked")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)
    return result
