"""Small matplotlib helpers shared by the lessons.

Each function draws on the axes it is given (or on new ones) and returns them, so a
lesson can combine several panels in one figure. The functions only draw: every
number they show is computed in the lesson.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes

__all__ = ["plot_step_sizes", "plot_value_grids"]

# One colour per number format, the same in every lesson.
FORMAT_COLORS = {
    "FP32": "tab:gray",
    "FP16": "tab:blue",
    "BF16": "tab:orange",
    "INT8": "tab:green",
    "INT4": "tab:red",
}


def _color(name: str) -> str | None:
    return next((c for key, c in FORMAT_COLORS.items() if name.upper().startswith(key)), None)


def _numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64).cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def plot_step_sizes(
    magnitudes: torch.Tensor | np.ndarray,
    steps: Mapping[str, torch.Tensor | np.ndarray],
    *,
    clip_at: Mapping[str, float] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Log-log plot of the gap to the next representable value against the magnitude |x|.

    ``steps[name][i]`` is the gap at ``magnitudes[i]``. A format named in ``clip_at``
    (an integer grid with a fixed scale) is drawn only up to its largest representable
    value, where a cross marks that larger inputs are clipped.
    """
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    m = _numpy(magnitudes)
    clip_at = clip_at or {}
    for name, step in steps.items():
        s = _numpy(step)
        keep = m <= clip_at.get(name, np.inf)
        (line,) = ax.loglog(m[keep], s[keep], label=name, color=_color(name), lw=2)
        if name in clip_at:
            ax.plot(m[keep][-1], s[keep][-1], "x", color=line.get_color(), ms=9, mew=2)
    ax.set_xlabel("magnitude |x|")
    ax.set_ylabel("gap to the next representable value")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return ax


def plot_value_grids(
    grids: Mapping[str, torch.Tensor | np.ndarray],
    *,
    xlim: tuple[float, float],
    ax: Axes | None = None,
) -> Axes:
    """One row of tick marks per format: where its representable values lie in ``xlim``."""
    ax = ax or plt.subplots(figsize=(6, 2.5))[1]
    names = list(grids)
    labels = []
    for row, name in enumerate(names):
        values = _numpy(grids[name])
        values = values[(values >= xlim[0]) & (values <= xlim[1])]
        ax.eventplot(values, lineoffsets=row, linelengths=0.7, linewidths=0.8, colors=_color(name))
        labels.append(f"{name}\n{values.size} values")
    ax.set_yticks(range(len(names)), labels)
    ax.set_ylim(-0.6, len(names) - 0.1)
    pad = 0.02 * (xlim[1] - xlim[0])  # so that ticks at the ends stay visible
    ax.set_xlim(xlim[0] - pad, xlim[1] + pad)
    ax.invert_yaxis()
    ax.set_xlabel("x")
    return ax
