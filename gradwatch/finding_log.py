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
# the frameworks between the user's call and the optimizer: a warning points past them, at the user's line
FRAMEWORKS = ("torch", "accelerate", "transformers", "lightning", "pytorch_lightning", "lightning_fabric", "deepspeed")
FALLBACK_LOCATION: tuple[str, int] | None = None  # where a warning with no user frame points (`gradwatch run`)


def _internal_dirs() -> tuple[str, ...]:
    paths = [__file__] + [getattr(sys.modules.get(name), "__file__", None) or "" for name in FRAMEWORKS]
    return tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in paths if path)


def _is_internal(filename: str, internal: tuple[str, ...]) -> bool:
    return filename.startswith(internal) or filename.startswith("<frozen ")


def user_frame() -> tuple[int, str, int] | None:
    """(stacklevel, file, line) of the first frame outside gradwatch, torch and the training frameworks."""
    internal = _internal_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and _is_internal(frame.f_code.co_filename, internal):
        frame, level = frame.f_back, level + 1
    return None if frame is None else (level, frame.f_code.co_filename, frame.f_lineno)


def user_location() -> tuple[str, int] | None:
    """(file, line) of the user's call running now, for a finding judged later (at the next step)."""
    found = user_frame()
    return FALLBACK_LOCATION if found is None else found[1:]


def warn(message: str, where: tuple[str, int] | None = None) -> None:
    """Issue a GradientWarning attributed to the user's line (the backward(), step() or zero_grad() call), or to
    ``where`` when the finding was caused by an earlier line."""
    if where is not None:
        warnings.warn_explicit(message, GradientWarning, *where)
        return
    found = user_frame()
    if found is None and FALLBACK_LOCATION is not None:
        warnings.warn_explicit(message, GradientWarning, *FALLBACK_LOCATION)
        return
    warnings.warn(message, GradientWarning, stacklevel=found[0] if found else 1)


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
            new.append((finding, occ.where))
            if self._on_new is not None:
                self._on_new(finding)
        if new:
            self._dispatch(new)

    def _dispatch(self, new: list[tuple[Finding, tuple[str, int] | None]]) -> None:
        policy = self._on_finding
        if policy == "record":
            return
        if policy == "warn":
            for finding, where in new:
                warn(f"gradwatch: {finding.kind}: {finding.message}", where)
        elif policy == "raise":
            bugs = [f for f, _ in new if f.severity != "info"]
            if bugs:
                raise GradientBugError("\n".join(str(f) for f in bugs), tuple(bugs))
        elif callable(policy):
            for finding, _ in new:
                try:
                    policy(finding)
                except GradientBugError:
                    raise
                except Exception as error:  # the user's callback must not break training
                    if not self._callback_failed:
                        self._callback_failed = True
                        warn(f"gradwatch: the on_finding callback raised {error!r}; further errors from it are ignored")
