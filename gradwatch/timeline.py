"""The timeline picture: producer / consumer / cleaner lanes over the run, findings marked (needs matplotlib)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

from .findings import CATALOGUE

INSTALL_HINT = "install matplotlib (pip install 'gradwatch[plot]') for the timeline picture"
LANES = {"backward": 2, "step": 1, "clear": 0}
MAX_EVENTS = 400  # a picture of the first events; the trace has them all


def available() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def render(events: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Any:
    """Draw the lanes for trace-format ``events`` into a PNG at ``path``; returns the RGBA pixels (H, W, 4)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    lifecycle = [e for e in events if e.get("event") in LANES][:MAX_EVENTS]
    findings = [e for e in events if e.get("event") == "finding"]
    fig, ax = plt.subplots(figsize=(max(6.0, min(18.0, 0.12 * len(lifecycle) + 3)), 3.2), dpi=100)
    styles = {"backward": ("tab:blue", "o"), "step": ("tab:green", "s"), "clear": ("tab:gray", "v")}
    x_of_backward: dict[int, int] = {}
    x_of_step: dict[tuple[int, int], int] = {}
    x_of_clear: dict[int, int] = {}
    for x, e in enumerate(lifecycle):
        kind = e["event"]
        color, marker = styles[kind]
        ax.scatter([x], [LANES[kind]], color=color, marker=marker, s=36, zorder=3)
        if kind == "backward":
            x_of_backward.setdefault(e["backward"], x)
        elif kind == "clear":
            x_of_clear.setdefault(e["backward"], x)
        elif kind == "step":
            x_of_step.setdefault((e["optimizer"], e["step"]), x)
            ax.annotate(
                str(e["window"]),
                (x, LANES["step"]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=7,
                color="tab:green",
            )
    for f in findings:
        info = CATALOGUE.get(f["kind"])
        lane = info.lane if info is not None else "step"
        last = len(lifecycle) - 1
        if lane == "clear":  # the clear made when this many backward passes had run
            x = x_of_clear.get(f["backward"], last)
        elif lane == "backward":
            x = x_of_backward.get(f["backward"], last)
        else:
            x = min((v for (_, s), v in x_of_step.items() if s == f["step"]), default=last)
        ax.scatter([x], [LANES[lane]], facecolors="none", edgecolors="tab:red", s=220, linewidths=2, zorder=4)
        ax.annotate(
            f["kind"], (x, LANES[lane]), textcoords="offset points", xytext=(4, -16), fontsize=8, color="tab:red"
        )
    ax.set_yticks([2, 1, 0], ["backward\n(produces)", "step\n(consumes)", "zero_grad\n(clears)"])
    ax.set_ylim(-0.8, 2.8)
    ax.set_xlabel("lifecycle events in order (number over a step: backward passes it consumed)", fontsize=8)
    title = f"gradwatch timeline: {len(findings)} finding(s)" if findings else "gradwatch timeline: no findings"
    ax.set_title(title, color="tab:red" if findings else "black")
    ax.grid(axis="x", alpha=0.2)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return pixels
