"""Every scenario runs twice: with the ledger booking passes, clears and steps one parameter at a time (models
under ``WHOLE_LISTS_FROM`` parameters, as most of these are) and over whole lists (larger models)."""

from __future__ import annotations

import pytest

from gradwatch import ledger as ledger_module


@pytest.fixture(autouse=True, params=["per-param", "whole-lists"])
def bookkeeping(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "whole-lists":
        monkeypatch.setattr(ledger_module, "WHOLE_LISTS_FROM", 1)
    return request.param
