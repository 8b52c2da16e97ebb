"""course_lib.widgets: the clipping explorer of lesson 02 (Agg backend, no front end needed)."""

from __future__ import annotations

import base64

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from course_lib import observers as ob  # noqa: E402
from course_lib import widgets as w  # noqa: E402


def activation(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """A skewed, heavy-tailed signed tensor, like a conv output before its ReLU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 0.7 + 0.3 + torch.randn(n, generator=g) ** 3 * 0.2


def torch_mse(x: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    """Independent oracle: torch's observer qparams and fake-quant op."""
    from torch.ao.quantization.observer import MinMaxObserver

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    obs = MinMaxObserver(dtype=torch.qint32, quant_min=qmin, quant_max=qmax)
    obs(torch.tensor([lo, hi]))
    s, z = obs.calculate_qparams()
    xq = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), qmin, qmax)
    return float(((xq.double() - x.double()) ** 2).mean())


def tails(fig) -> list:
    ax = fig.axes[0]
    return [p for p in ax.patches if p.get_gid() == "clipped-tail"]


def grid_lines(fig):
    (grid,) = [c for c in fig.axes[0].collections if c.get_gid() == "quantization-grid"]
    return grid.get_segments()


# ---------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(("lo", "hi", "bits"), [(-1.0, 1.5, 3), (-2.5, 2.5, 8), (-0.5, 4.0, 5)])
def test_explorer_state_numbers(lo, hi, bits):
    x = activation()
    st = w.explorer_state(x, lo, hi, bits)
    assert st.mse_total == st.mse_rounding + st.mse_clipping
    assert st.mse_total == pytest.approx(torch_mse(x, lo, hi, bits), rel=1e-5)
    assert st.levels == 2**bits and st.bits == bits
    assert st.grid_hi - st.grid_lo == pytest.approx(st.scale * (2**bits - 1), rel=1e-6)
    xn = x.double().numpy()
    assert st.clipped_fraction == pytest.approx(((xn < st.grid_lo) | (xn > st.grid_hi)).mean(), abs=1e-4)
    assert st.sqnr_db == pytest.approx(10 * np.log10((xn**2).mean() / st.mse_total), rel=1e-9)
    text = st.readout()
    assert text.startswith(f"MSE total {st.mse_total:.3e} = rounding ") and "+ clipping" in text


def test_static_figure_shades_the_clipped_tails_and_draws_a_sparse_grid():
    x = activation()
    fig = w.explorer_figure(x, -1.0, 1.2, 4)
    assert len(fig.axes) == 3
    lo_tail, hi_tail = tails(fig)
    st = w.explorer_state(x, -1.0, 1.2, 4)
    # Shaded: from the data's ends to the outermost grid values.
    assert lo_tail.get_x() == pytest.approx(float(x.min()))
    assert lo_tail.get_x() + lo_tail.get_width() == pytest.approx(st.grid_lo)
    assert hi_tail.get_x() == pytest.approx(st.grid_hi)
    assert hi_tail.get_x() + hi_tail.get_width() == pytest.approx(float(x.max()))
    assert lo_tail.get_width() > 0.5 and hi_tail.get_width() > 0.5
    segments = grid_lines(fig)
    assert len(segments) == 16
    np.testing.assert_allclose(sorted(s[0][0] for s in segments), st.grid_lo + st.scale * np.arange(16), rtol=1e-6)
    fig.canvas.draw()  # renders without error on the Agg canvas


def test_min_max_range_has_no_visible_tails_and_dense_grids_are_not_drawn():
    x = torch.relu(activation())  # non-negative: the grid covers [0, max] exactly
    fig = w.explorer_figure(x, *ob.minmax_range(x), 8)
    span = float(x.max())
    assert all(p.get_width() <= 1e-6 * span for p in tails(fig))
    assert len(grid_lines(fig)) == 0  # 256 levels: too dense to draw


def test_explorer_state_rejects_bad_input():
    x = activation(100)
    with pytest.raises(ValueError, match="lo ≤ hi"):
        w.explorer_state(x, 1.0, -1.0, 8)
    with pytest.raises(ValueError, match="bits"):
        w.explorer_state(x, -1.0, 1.0, 1)
    with pytest.raises(ValueError, match="NaN"):
        w.explorer_state(torch.tensor([0.0, float("nan")]), -1.0, 1.0, 8)


# ---------------------------------------------------------------------------- the widget


def test_widget_sliders_have_sensible_bounds():
    x = activation()
    ex = w.clipping_explorer(x, bits=6)
    tmax = float(x.abs().max())
    s = ex.clip_slider
    assert s.description == "clip range"
    assert 0 < s.min < 0.01 * tmax and s.max == pytest.approx(tmax) and s.value == pytest.approx(tmax)
    assert (ex.bits_slider.min, ex.bits_slider.max, ex.bits_slider.value) == (2, 8, 6)
    assert "cl-mse-readout" in ex.readout._dom_classes
    assert ex.state.lo == pytest.approx(float(x.min())) and ex.state.hi == pytest.approx(float(x.max()))
    assert ex.image.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_moving_the_sliders_updates_readout_state_and_picture():
    x = activation()
    ex = w.clipping_explorer(x, bits=4)
    before_text, before_png, before = ex.readout.value, ex.image.value, ex.state
    ex.clip_slider.value = ex.clip_slider.max / 4
    assert ex.readout.value != before_text and ex.image.value != before_png
    assert ex.state.hi == pytest.approx(ex.clip_slider.value)
    assert ex.state.mse_clipping > before.mse_clipping and ex.state.scale < before.scale
    assert f"MSE total {ex.state.mse_total:.3e}" in ex.readout.value
    assert ex.state.mse_total == pytest.approx(torch_mse(x, ex.state.lo, ex.state.hi, 4), rel=1e-5)
    # The figure follows: the upper tail starts at the new grid edge.
    assert tails(ex.figure)[1].get_x() == pytest.approx(ex.state.grid_hi)
    ex.bits_slider.value = 2
    assert ex.state.bits == 2 and ex.state.levels == 4 and len(grid_lines(ex.figure)) == 4


def test_optimum_button_moves_the_slider_to_the_exact_mse_minimum_within_a_step():
    x = activation()
    ex = w.clipping_explorer(x, bits=3)
    ex.optimum_button.click()
    t_best = ex.clip_slider.value
    exact = ob.mse_curve(x, np.arange(1, 401) * ex.clip_slider.step, 3)
    assert ex.state.mse_total <= exact.total.min() * 1.01
    assert t_best < ex.clip_slider.max / 2  # at 3 bits the minimum clips hard


def test_mimebundle_carries_a_static_picture():
    ex = w.clipping_explorer(activation(), bits=5)
    bundle = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == ex.image.value
    assert bundle["text/plain"].startswith("ClippingExplorer: MSE total")


def test_widget_rejects_bad_input():
    with pytest.raises(ValueError, match="zeros"):
        w.clipping_explorer(torch.zeros(10))
    with pytest.raises(ValueError, match="2..8"):
        w.clipping_explorer(activation(100), bits=12)
    with pytest.raises(ValueError, match="clip"):
        w.clipping_explorer(activation(100), clip=1e6)


# ---------------------------------------------------------------------------- static figures


def test_ranges_figure_draws_each_range_at_its_ends():
    x = activation()
    ranges = {"min-max": ob.minmax_range(x), "MSE": (-1.5, 1.7)}
    fig = w.ranges_figure(x, ranges, title="t")
    ax = fig.axes[0]
    xs = sorted(float(line.get_xdata()[0]) for line in ax.lines)
    assert xs == pytest.approx(sorted([*ranges["min-max"], -1.5, 1.7]))
    assert any("MSE: [-1.50, 1.70]" == t.get_text() for t in ax.get_legend().get_texts())


def test_bits_sweep_figure_marks_one_minimum_per_bit_width_and_mse_beats_minmax():
    fig = w.bits_sweep_figure(activation(), (8, 4, 2))
    ax_curves, ax_sqnr = fig.axes
    stars = [line for line in ax_curves.lines if line.get_marker() == "*"]
    assert len(stars) == 3 and all(line.get_ydata()[0] == 1.0 for line in stars)
    minmax, best = (np.asarray(line.get_ydata()) for line in ax_sqnr.lines)
    assert (best >= minmax).all() and best[0] > best[-1]  # 8 bits above 2 bits


def test_calibration_size_figure_error_bars_span_min_to_max():
    results = {"A4": {1: [0.90, 0.96], 10: [0.95, 0.97], 100: [0.97]}}
    fig = w.calibration_size_figure(results, float_accuracy=0.98)
    ax = fig.axes[0]
    (container,) = ax.containers
    data_line, _caplines, (bars,) = container
    np.testing.assert_allclose(data_line.get_ydata(), [93.0, 96.0, 97.0])
    spans = [seg[:, 1] for seg in bars.get_segments()]
    np.testing.assert_allclose([sorted(s) for s in spans], [[90, 96], [95, 97], [97, 97]])
