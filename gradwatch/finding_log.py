"""Turns ledger occurrences into named, de-duplicated Findings and applies the on_finding policy."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import replace
from typing import Callable, Sequence, Union

from .findings import SEVERITY, Finding, GradientBugError, GradientWarning, format_message
from .ledger import Occurrence

OnFinding = Union[str, Callable[[Finding], None]]
POLICIES = ("warn", "raise", "record")
MAX_DISTINCT = 1000  # past this many distinct findings, new ones are counted into the first of their kind
MAX_PER_KIND = 8  # past this many distinct findings of one kind (other parameters each step), the same
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, sys.modules["torch"].__file__ or "")
)


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside gradwatch and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str) -> None:
    """Issue a GradientWarning attributed to the user's line (the backward(), step() or zero_grad() call)."""
    warnings.warn(message, GradientWarning, stacklevel=user_stacklevel())


class FindingLog:
    """Each distinct problem (kind, parameters) once, with a count; new ones go through the policy."""

    def __init__(
        self, names: Sequence[str], on_finding: OnFinding, on_new: Callable[[Finding], None] | None = None
    ) -> None:
        self._names = list(names)
        self._on_new = on_new
        self._on_finding = on_finding
        self.findings: list[Finding] = []
        self._position: dict[tuple[str, tuple[int, ...]], int] = {}
        self._first_of_kind: dict[str, int] = {}
        self._per_kind: dict[str, int] = {}
        self._callback_failed = False

    def add_names(self, names: Sequence[str]) -> None:
        """Name parameters watched from now on (their indices follow the ones already named)."""
        self._names.extend(names)

    def record(self, occurrences: list[Occurrence]) -> None:
        """Count known problems, name and dispatch new ones (may raise GradientBugError)."""
        if not occurrences:
            return
        new = []
        for occ in occurrences:
            key = (occ.kind, occ.params)
            pos = self._position.get(key)
            if pos is None and (len(self.findings) >= MAX_DISTINCT or self._per_kind.get(occ.kind, 0) >= MAX_PER_KIND):
                pos = self._first_of_kind.get(occ.kind)
            if pos is not None:
                self.findings[pos] = replace(self.findings[pos], count=self.findings[pos].count + 1)
                continue
            names = tuple(self._names[i] for i in occ.params)
            message = format_message(occ.kind, names, occ.step, occ.backward, occ.detail)
            finding = Finding(occ.kind, SEVERITY[occ.kind], occ.step, occ.backward, names, message)
            self._position[key] = len(self.findings)
            self._first_of_kind.setdefault(occ.kind, len(self.findings))
            self._per_kind[occ.kind] = self._per_kind.get(occ.kind, 0) + 1
            self.findings.append(finding)
            new.append(finding)
            if self._on_new is not None:
                self._on_new(finding)
        if new:
            self._dispatch(new)

    def _dispatch(self, new: list[Finding]) -> None:
        policy = self._on_finding
        if policy == "record":
            return
        if policy == "warn":
            for finding in new:
                warn(f"gradwatch: {finding.kind}: {finding.message}")
        elif policy == "raise":
            bugs = [f for f in new if f.severity != "info"]
            if bugs:
                raise GradientBugError("\n".join(str(f) for f in bugs), tuple(bugs))
        elif callable(policy):
            for finding in new:
                try:
                    policy(finding)
                except GradientBugError:
                    raise
                except Exception as error:  # the user's callback must not break training
                    if not self._callback_failed:
                        self._callback_failed = True
                        warn(f"gradwatch: the on_finding callback raised {error!r}; further errors from it are ignored")
