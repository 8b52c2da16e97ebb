"""Interactive explorers for the lessons (ipywidgets 8, no ipympl needed).

:func:`clipping_explorer` (lesson 02) shows what a clipping range and a bit-width do to a
real activation tensor: its histogram with the clipped tails shaded and the quantization
grid drawn, the mean squared error split into rounding and clipping, and the MSE as a
function of the clipping threshold with its minimum marked.

The figure is a plain matplotlib :class:`~matplotlib.figure.Figure` drawn with the Agg
canvas and sent to an :class:`ipywidgets.Image` as PNG bytes, so moving a slider swaps
one picture for another (no flicker, no ``%matplotlib widget``). Without a widget front
end (nbval, exported HTML, a notebook viewer) the explorer shows that PNG as a static
picture. :func:`explorer_state` and :func:`explorer_figure` are the pure functions behind
it, usable (and tested) without any widget.

Quantizer: signed asymmetric ``bits``-bit codes, qparams from ``[lo, hi]`` by
:func:`course_lib.quant.qparams_from_range` (range widened to include 0, zero point
rounded half to even), values rounded half to even, out-of-range values clamped.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, NamedTuple

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from course_lib import observers

__all__ = [
    "ClippingExplorer",
    "ExplorerState",
    "bits_sweep_figure",
    "calibration_size_figure",
    "clipping_explorer",
    "explorer_figure",
    "explorer_state",
    "ranges_figure",
]

MAX_GRID_LINES = 64  # draw the grid only when its lines are sparse enough to see
CURVE_POINTS = 400  # thresholds on the MSE-vs-clip curve, also the clip slider's steps
CURVE_BINS = 2048  # histogram bins behind the curve (closed-form error per bin)
HIST_BINS = 160  # bars of the displayed histogram

# Colours: data, clipped tails, rounding, clipping, total (colour-blind safe pairs).
C_DATA, C_CLIP, C_ROUND, C_TOTAL, C_GRID = "#4C72B0", "#D1495B", "#2A9D8F", "#222222", "#7F7F7F"


class ExplorerState(NamedTuple):
    """The numbers the explorer shows for one setting (all floats are Python floats)."""

    lo: float  # requested range
    hi: float
    bits: int
    scale: float  # qparams of that range
    zero_point: int
    grid_lo: float  # smallest and largest representable value: (qmin - zp)·s, (qmax - zp)·s
    grid_hi: float
    levels: int  # 2^bits
    mse_total: float  # = mse_rounding + mse_clipping
    mse_rounding: float
    mse_clipping: float
    clipped_fraction: float  # share of values beyond the grid
    sqnr_db: float  # 10·log10(mean x² / mse_total)

    def readout(self) -> str:
        """One line: ``MSE total … = rounding … + clipping …`` and what produced it."""
        return (
            f"MSE total {self.mse_total:.3e} = rounding {self.mse_rounding:.3e} "
            f"+ clipping {self.mse_clipping:.3e} · clipped {100 * self.clipped_fraction:.3f} % "
            f"of values · range [{self.lo:.3f}, {self.hi:.3f}] · {self.bits} bits, "
            f"step {self.scale:.4f} · SQNR {self.sqnr_db:.1f} dB"
        )


def _tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return observers._values(x)  # flattened float32, non-empty, finite (ValueError otherwise)


def _check_range(x: torch.Tensor, lo: float, hi: float, bits: int) -> tuple[float, float, int]:
    bits = observers._check_bits(bits)
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ValueError(f"the clipping range needs finite lo ≤ hi, got [{lo!r}, {hi!r}]")
    return lo, hi, bits


def explorer_state(x: torch.Tensor | np.ndarray, lo: float, hi: float, bits: int = 8) -> ExplorerState:
    """Quantization error of ``x`` for the range ``[lo, hi]`` at ``bits`` bits (exact, all values)."""
    v = _tensor(x)
    lo, hi, bits = _check_range(v, lo, hi, bits)
    err = observers.quantization_error(v, lo, hi, bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    power = float((v.double() ** 2).mean())
    sqnr = 10 * np.log10(power / err.total) if err.total > 0 else float("inf")
    return ExplorerState(
        lo, hi, bits, err.scale, err.zero_point,
        (qmin - err.zero_point) * err.scale, (qmax - err.zero_point) * err.scale,
        2**bits, err.total, err.rounding, err.clipping, err.clipped_fraction, float(sqnr),
    )


class _Data:
    """What the figure needs from ``x``, computed once: its histogram and MSE curves per bit-width."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.min, self.max = float(x.min()), float(x.max())
        self.tmax = max(abs(self.min), abs(self.max))
        self.counts, self.edges = observers.histogram(x, HIST_BINS)
        self.fine_counts, self.fine_edges = observers.histogram(x, CURVE_BINS)
        self.zeros = float((x == 0).sum())
        self.thresholds = self.tmax * np.arange(1, CURVE_POINTS + 1) / CURVE_POINTS
        self._curves: dict[int, observers.MSECurve] = {}

    def curve(self, bits: int) -> observers.MSECurve:
        """MSE vs threshold from a fine histogram (closed-form error per bin, within ~1 % of exact)."""
        if bits not in self._curves:
            self._curves[bits] = observers.mse_curve_from_histogram(
                self.fine_counts, self.fine_edges, self.thresholds, bits, exact_zeros=self.zeros
            )
        return self._curves[bits]


class _ExplorerPlot:
    """A figure whose artists are updated in place for each (lo, hi, bits)."""

    def __init__(self, data: _Data, name: str) -> None:
        self.data = data
        self.fig = Figure(figsize=(12.5, 3.9), layout="constrained")
        FigureCanvasAgg(self.fig)
        gs = self.fig.add_gridspec(1, 3, width_ratios=[2.3, 1.8, 0.75])
        self.ax_hist = self.fig.add_subplot(gs[0])
        self.ax_curve = self.fig.add_subplot(gs[1])
        self.ax_bar = self.fig.add_subplot(gs[2])

        ax = self.ax_hist
        ax.stairs(data.counts, data.edges, fill=True, color=C_DATA, alpha=0.85, label=f"{name} values")
        ax.set_yscale("log")
        ax.set_ylim(0.5, data.counts.max() * 3)
        pad = 0.02 * (data.max - data.min)
        ax.set_xlim(data.min - pad, data.max + pad)
        ax.set_xlabel("value")
        ax.set_ylabel("count (log scale)")
        # The clipped tails: everything beyond the outermost grid points.
        self.tail_lo = ax.axvspan(data.min - pad, data.min, color=C_CLIP, alpha=0.25, lw=0,
                                  label="clipped", gid="clipped-tail")
        self.tail_hi = ax.axvspan(data.max, data.max + pad, color=C_CLIP, alpha=0.25, lw=0,
                                  gid="clipped-tail")
        self.grid = LineCollection([], colors=C_GRID, linewidths=0.6, alpha=0.7,
                                   transform=ax.get_xaxis_transform(), label="grid values",
                                   gid="quantization-grid")
        ax.add_collection(self.grid)
        self.edge_lines = [ax.axvline(0, color=C_CLIP, lw=1.5) for _ in range(2)]
        handles, labels = ax.get_legend_handles_labels()
        # An empty LineCollection has no colour of its own in a legend: draw its entry by hand.
        handles = [Line2D([], [], color=C_GRID, lw=0.8) if lab == "grid values" else h
                   for h, lab in zip(handles, labels, strict=True)]
        ax.legend(handles, labels, loc="upper right", fontsize=8, framealpha=0.9)
        self.hist_title = ax.set_title("", fontsize=10)

        ax = self.ax_curve
        self.l_total, = ax.plot([], [], color=C_TOTAL, lw=2, label="total")
        self.l_round, = ax.plot([], [], color=C_ROUND, lw=1.2, ls="--", label="rounding")
        self.l_clip, = ax.plot([], [], color=C_CLIP, lw=1.2, ls=":", label="clipping")
        self.opt_marker, = ax.plot([], [], marker="*", ms=14, color="#F4A261", mec="k", ls="none",
                                   label="minimum")
        self.now_line = ax.axvline(0, color=C_DATA, lw=1)
        self.now_marker, = ax.plot([], [], "o", color=C_DATA, mec="k", label="current")
        ax.set_yscale("log")
        ax.set_xlabel("clip threshold t  (range = data range ∩ [−t, t])")
        ax.set_ylabel("mean squared error")
        ax.legend(loc="upper center", fontsize=8, ncol=3, framealpha=0.9)
        self.curve_title = ax.set_title("", fontsize=10)
        self.curve_bits: int | None = None

        ax = self.ax_bar
        self.bars = ax.bar([0, 1], [0, 0], color=[C_ROUND, C_CLIP], width=0.7)
        ax.set_xticks([0, 1], ["rounding", "clipping"])
        ax.set_yticks([])  # the bars carry their values
        ax.spines[["left", "top", "right"]].set_visible(False)
        self.bar_labels = [ax.text(i, 0, "", ha="center", va="bottom", fontsize=8) for i in range(2)]
        self.bar_title = ax.set_title("", fontsize=10)

    def update(self, state: ExplorerState) -> None:
        d = self.data
        # Histogram panel: shaded tails, the grid, the range edges.
        # Shaded: the data beyond the outermost grid values (zero width when nothing is clipped).
        self.tail_lo.set_x(d.min)
        self.tail_lo.set_width(max(state.grid_lo - d.min, 0.0))
        self.tail_hi.set_x(state.grid_hi)
        self.tail_hi.set_width(max(d.max - state.grid_hi, 0.0))
        for line, v in zip(self.edge_lines, (state.grid_lo, state.grid_hi), strict=True):
            line.set_xdata([v, v])
        if state.levels <= MAX_GRID_LINES:
            values = state.grid_lo + state.scale * np.arange(state.levels)
            self.grid.set_segments([[(v, 0), (v, 1)] for v in values])
            grid_note = f"{state.levels} grid values drawn"
        else:
            self.grid.set_segments([])
            grid_note = f"{state.levels} grid values (too dense to draw)"
        self.hist_title.set_text(
            f"{state.bits} bits, range [{state.lo:.2f}, {state.hi:.2f}]: "
            f"{100 * state.clipped_fraction:.2f} % clipped · {grid_note}"
        )
        # Curve panel: recomputed only when the bit-width changes.
        curve = d.curve(state.bits)
        if self.curve_bits != state.bits:
            self.l_total.set_data(curve.thresholds, curve.total)
            self.l_round.set_data(curve.thresholds, curve.rounding)
            self.l_clip.set_data(curve.thresholds, np.where(curve.clipping > 0, curve.clipping, np.nan))
            k = int(np.argmin(curve.total))
            self.opt_marker.set_data([curve.thresholds[k]], [curve.total[k]])
            self.ax_curve.set_xlim(0, d.tmax * 1.02)
            positive = curve.total[curve.total > 0]
            lo_y = max(positive.min() / 3, curve.total.max() * 1e-6)
            self.ax_curve.set_ylim(lo_y, curve.total.max() * 3)
            self.curve_title.set_text(
                f"MSE vs clipping at {state.bits} bits: minimum at t = {curve.thresholds[k]:.2f}"
            )
            self.curve_bits = state.bits
        t_now = max(-state.lo, state.hi)
        self.now_line.set_xdata([t_now, t_now])
        self.now_marker.set_data([t_now], [max(state.mse_total, self.ax_curve.get_ylim()[0])])
        # Bar panel: the split of the current error.
        parts = (state.mse_rounding, state.mse_clipping)
        for bar, label, v in zip(self.bars, self.bar_labels, parts, strict=True):
            bar.set_height(v)
            label.set_position((bar.get_x() + bar.get_width() / 2, v))
            label.set_text(f"{v:.2e}")
        self.ax_bar.set_ylim(0, max(parts) * 1.25 or 1.0)
        self.bar_title.set_text(f"this setting:\nMSE {state.mse_total:.2e}")

    def png(self, dpi: int = 80) -> bytes:
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()


def explorer_figure(
    x: torch.Tensor | np.ndarray, lo: float, hi: float, bits: int = 8, *, name: str = "activation"
) -> Figure:
    """The explorer's picture for one setting, as a matplotlib Figure (Agg canvas, no pyplot).

    Left: histogram of ``x`` (log counts) with the values beyond the grid shaded and, for at
    most 64 levels, a line at every representable value. Middle: MSE (total, rounding,
    clipping) against the clipping threshold ``t`` with the minimum starred and the current
    setting marked at ``t = max(-lo, hi)``. Right: the current MSE split into its two parts.
    """
    v = _tensor(x)
    state = explorer_state(v, lo, hi, bits)
    plot = _ExplorerPlot(_Data(v), name)
    plot.update(state)
    return plot.fig


class ClippingExplorer(widgets.VBox):
    """Sliders for the clipping threshold and the bit-width over one tensor, and their effect.

    Attributes a notebook (or a browser test) can drive: ``clip_slider`` (FloatSlider,
    description ``"clip range"``: clip at ±t), ``bits_slider`` (IntSlider 2..8),
    ``optimum_button`` (moves the clip slider to the MSE minimum), ``readout`` (HTML with
    CSS class ``cl-mse-readout``, text ``"MSE total … = rounding … + clipping …"``),
    ``image`` (the figure as PNG) and ``state`` (the current :class:`ExplorerState`).
    """

    def __init__(
        self,
        x: torch.Tensor | np.ndarray,
        *,
        bits: int = 8,
        clip: float | None = None,
        name: str = "activation",
        dpi: int = 80,
    ) -> None:
        v = _tensor(x)
        self._data = _Data(v)
        d = self._data
        if d.tmax == 0:
            raise ValueError("x is all zeros: there is no range to clip")
        bits = observers._check_bits(bits)
        if not 2 <= bits <= 8:
            raise ValueError(f"the explorer's bit-width slider covers 2..8 bits, got {bits}")
        # Slider steps are the curve's thresholds, so the current point lies on the curve
        # (the MSE is jagged at low bit-widths: the rounded zero point shifts the grid).
        step = d.tmax / CURVE_POINTS
        clip = d.tmax if clip is None else float(clip)
        if not step <= clip <= d.tmax:
            raise ValueError(f"clip must be in [{step:.4g}, {d.tmax:.4g}] (up to max |x|), got {clip!r}")
        self._plot = _ExplorerPlot(d, name)
        self._dpi = dpi
        self.clip_slider = widgets.FloatSlider(
            value=clip, min=step, max=d.tmax, step=step, description="clip range",
            readout_format=".3f", continuous_update=False,
            tooltip="clip at ±t: the range is the data range ∩ [−t, t]",
            style={"description_width": "initial"}, layout=widgets.Layout(width="420px"),
        )
        self.bits_slider = widgets.IntSlider(
            value=bits, min=2, max=8, step=1, description="bits", continuous_update=False,
            layout=widgets.Layout(width="260px"),
        )
        self.optimum_button = widgets.Button(description="go to MSE minimum", icon="star")
        self.readout = widgets.HTML()
        self.readout.add_class("cl-mse-readout")
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.clip_slider.observe(self._on_change, names="value")
        self.bits_slider.observe(self._on_change, names="value")
        self.optimum_button.on_click(self._go_to_optimum)
        self.state: ExplorerState
        self._refresh()
        controls = widgets.HBox([self.clip_slider, self.bits_slider, self.optimum_button])
        super().__init__([controls, self.readout, self.image])

    @property
    def figure(self) -> Figure:
        """The persistent matplotlib Figure behind the image."""
        return self._plot.fig

    def _range(self) -> tuple[float, float]:
        return observers.clip_to_threshold(self._data.min, self._data.max, self.clip_slider.value)

    def _refresh(self) -> None:
        lo, hi = self._range()
        self.state = explorer_state(self._data.x, lo, hi, self.bits_slider.value)
        self._plot.update(self.state)
        self.readout.value = (
            f"<span class='cl-mse-readout' style='font-family: monospace'>"
            f"{html.escape(self.state.readout())}</span>"
        )
        self.image.value = self._plot.png(self._dpi)

    def _on_change(self, _change: dict[str, Any]) -> None:
        self._refresh()

    def _go_to_optimum(self, _button: widgets.Button | None = None) -> None:
        curve = self._data.curve(self.bits_slider.value)
        self.clip_slider.value = float(curve.thresholds[int(np.argmin(curve.total))])

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        # The widget view for a live front end, plus the current picture as a PNG, which
        # nbconvert, nbval and notebook viewers show when the widget cannot be rendered.
        data = super()._repr_mimebundle_(**kwargs)
        data["image/png"] = base64.b64encode(self.image.value).decode("ascii")
        data["text/plain"] = f"ClippingExplorer: {self.state.readout()}"
        return data


def clipping_explorer(
    x: torch.Tensor | np.ndarray,
    *,
    bits: int = 8,
    clip: float | None = None,
    name: str = "activation",
) -> ClippingExplorer:
    """An explorer over ``x``: a clip-threshold slider (initially ``clip``, default max |x|,
    i.e. min-max) and a bit-width slider (2..8, initially ``bits``). Display it as a cell's
    last expression; see :class:`ClippingExplorer` for its parts."""
    return ClippingExplorer(x, bits=bits, clip=clip, name=name)


# ---------------------------------------------------------------------------- static figures of lesson 02

METHOD_COLOURS = {"min-max": "#222222", "percentile": "#2A9D8F", "MSE": "#E76F51", "KL": "#6A4C93"}


def ranges_figure(
    x: torch.Tensor | np.ndarray,
    ranges: dict[str, tuple[float, float]],
    *,
    title: str = "",
    name: str = "activation",
    ax: Any = None,
) -> Figure:
    """Histogram of ``x`` (log counts) with each method's range drawn as a pair of vertical lines.

    ``ranges`` maps a label (e.g. ``"MSE"``) to ``(lo, hi)``; the legend gives each range.
    Pass ``ax`` to draw into an existing Axes (the figure returned is then ``ax.figure``).
    """
    v = _tensor(x)
    counts, edges = observers.histogram(v, HIST_BINS)
    if ax is None:
        fig = Figure(figsize=(7.5, 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, color=C_DATA, alpha=0.35, label=f"{name} values")
    ax.set_yscale("log")
    ax.set_ylim(0.5, counts.max() * 8)
    styles = ["-", "--", "-.", ":"]
    for k, (label, (lo, hi)) in enumerate(ranges.items()):
        colour = METHOD_COLOURS.get(label, f"C{k}")
        ls = styles[k % len(styles)]
        ax.axvline(lo, color=colour, ls=ls, lw=1.6, label=f"{label}: [{lo:.2f}, {hi:.2f}]")
        ax.axvline(hi, color=colour, ls=ls, lw=1.6)
    ax.set_xlabel("value")
    ax.set_ylabel("count (log scale)")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax.set_title(title, fontsize=10)
    return ax.figure


def bits_sweep_figure(
    x: torch.Tensor | np.ndarray, bits_list: tuple[int, ...] = (8, 6, 4, 3, 2), *, name: str = "activation"
) -> Figure:
    """How the best clipping threshold moves with the bit-width.

    Left: MSE against the threshold ``t / max|x|`` for each bit-width, each curve divided by
    its own minimum (starred). Right: signal-to-quantization-noise ratio
    ``10·log10(mean x² / MSE)`` of the min-max range and of the MSE-optimal one.
    """
    data = _Data(_tensor(x))
    power = float((data.x.double() ** 2).mean())
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_c, ax_s = fig.subplots(1, 2, width_ratios=[1.6, 1])
    sqnr_minmax, sqnr_best = [], []
    for k, bits in enumerate(bits_list):
        curve = data.curve(bits)
        ratio = curve.thresholds / data.tmax
        best = int(np.argmin(curve.total))
        colour = f"C{k}"
        ax_c.plot(ratio, curve.total / curve.total[best], color=colour, lw=1.5, label=f"{bits} bits")
        ax_c.plot(ratio[best], 1.0, marker="*", ms=13, color=colour, mec="k")
        sqnr_minmax.append(10 * np.log10(power / curve.total[-1]))
        sqnr_best.append(10 * np.log10(power / curve.total[best]))
    ax_c.set_yscale("log")
    ax_c.set_ylim(0.8, 1e3)
    ax_c.set_xlim(0, 1.02)
    ax_c.set_xlabel("clip threshold t / max|x|   (1 = min-max)")
    ax_c.set_ylabel("MSE / its minimum")
    ax_c.set_title(f"{name}: the fewer the bits, the harder the best range clips", fontsize=10)
    ax_c.legend(fontsize=8, loc="upper right")
    ax_s.plot(bits_list, sqnr_minmax, "o-", color=METHOD_COLOURS["min-max"], label="min-max range")
    ax_s.plot(bits_list, sqnr_best, "s-", color=METHOD_COLOURS["MSE"], label="MSE-optimal range")
    ax_s.set_xlabel("bits")
    ax_s.set_ylabel("SQNR (dB)")
    ax_s.set_xticks(sorted(bits_list))
    ax_s.grid(alpha=0.3)
    ax_s.legend(fontsize=8)
    ax_s.set_title("signal-to-quantization-noise ratio", fontsize=10)
    return fig


def calibration_size_figure(
    results: dict[str, dict[int, list[float]]],
    *,
    float_accuracy: float | None = None,
    title: str = "",
    styles: dict[str, dict[str, Any]] | None = None,
) -> Figure:
    """Accuracy against the number of calibration images, one line per label.

    ``results[label][n]`` holds the accuracies of the subsets of ``n`` images; the line goes
    through their mean and the error bar spans their minimum to maximum. Lines are nudged
    sideways a little so that equal values stay visible; ``styles[label]`` (matplotlib
    keyword arguments such as ``color``, ``ls``, ``marker``) overrides a line's look.
    """
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n_lines = len(results)
    for k, (label, by_size) in enumerate(results.items()):
        sizes = np.array(sorted(by_size), dtype=float)
        accs = [np.asarray(by_size[int(n)], dtype=float) for n in sizes]
        mean = np.array([a.mean() for a in accs])
        err = np.array([mean - [a.min() for a in accs], [a.max() for a in accs] - mean])
        nudge = 1 + 0.05 * (k - (n_lines - 1) / 2)  # multiplicative: the x axis is logarithmic
        style = {"marker": "o", "color": f"C{k}", "lw": 1.6} | (styles or {}).get(label, {})
        ax.errorbar(sizes * nudge, 100 * mean, yerr=100 * err, capsize=4, label=label, **style)
    if float_accuracy is not None:
        ax.axhline(100 * float_accuracy, color="k", ls=":", lw=1, label="float32")
    ax.set_xscale("log")
    ax.set_xlabel("calibration images (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title, fontsize=10)
    return fig
