"""The sinks a watch writes to, from ``watch()``'s ``logdir``/``trace``/``tensorboard`` arguments."""

from __future__ import annotations

import os

from . import Sink
from .tensorboard import TensorBoardOptions, TensorBoardSink
from .trace import TRACE_NAME, TraceSink

PathLike = str | os.PathLike[str]


def open_sinks(
    logdir: PathLike | None, trace: PathLike | None, tensorboard: TensorBoardOptions | None, rank: int | None
) -> list[Sink]:
    """The trace (``trace``, else ``<logdir>/gradwatch-trace.jsonl``) and the TensorBoard run (``logdir``); under
    torch.distributed each rank writes its own (``<logdir>/rank<r>``, ``<trace stem>.rank<r><ext>``).
    Raises ValueError, with nothing left open, when a path cannot be written."""
    if rank is not None:
        logdir = os.path.join(os.fspath(logdir), f"rank{rank}") if logdir is not None else None
        if trace is not None:
            base, ext = os.path.splitext(os.fspath(trace))
            trace = f"{base}.rank{rank}{ext}"
    if trace is None and logdir is not None:
        trace = os.path.join(os.fspath(logdir), TRACE_NAME)
    sinks: list[Sink] = []
    try:
        if trace is not None:
            sinks.append(TraceSink(trace))
        if logdir is not None:
            sinks.append(TensorBoardSink(logdir, tensorboard))
    except OSError as error:
        for sink in sinks:
            sink.abandon()
        where = os.fspath(logdir if logdir is not None else trace)  # type: ignore[arg-type]
        raise ValueError(f"cannot write gradwatch's logs at {where!r}: {error}") from None
    return sinks
