"""Range setting (calibration): choose the range ``[lo, hi]`` a quantizer maps onto its grid.

A ``b``-bit affine quantizer with range ``[lo, hi]`` has step ``Δ = (hi - lo) / (2^b - 1)``.
Its error on a value ``x`` has two sources:

* **rounding** — ``x`` inside the representable range lands on the nearest grid point,
  ``|error| ≤ Δ/2`` (about ``Δ²/12`` mean square for smooth data);
* **clipping** — ``x`` outside the range is clamped to the end point, ``|error| = distance``.

A wide range clips nothing but rounds coarsely; a narrow one rounds finely but clips the
tails. Each method below picks a different point on that trade-off:

=============== ========================================================================
``minmax``      ``[min x, max x]``: no clipping at all (torch ``MinMaxObserver``)
``percentile``  drop a fraction of the tails, e.g. keep the central 99.99 %
``mse``         the clipping threshold that minimises the quantization MSE
``kl``          TensorRT's entropy calibration: the threshold whose quantized histogram
                is closest to the original in Kullback–Leibler divergence
                (S. Migacz, "8-bit Inference with TensorRT", GTC 2017)
=============== ========================================================================

The ``mse``, ``kl`` and symmetric ``percentile`` methods choose a **clipping threshold**
``t > 0`` and clip the data at ``±t``: the range is ``[max(min x, -t), min(max x, t)]``
(so ReLU outputs keep ``lo = 0``, and the longer tail of a skewed tensor is cut first).

Every range function works on a tensor of samples; the ``*_from_histogram`` variants work
on a histogram ``(counts, edges)``, which is what a streaming observer keeps. Observers
(:class:`MinMaxObserver`, :class:`MovingAverageMinMaxObserver`, :class:`HistogramObserver`)
share one interface: ``update(x)``, ``range() -> (lo, hi)``, ``qparams() -> (scale,
zero_point)``. :func:`calibrate` runs a model over batches with observers attached to its
layers, and :func:`fake_quantize_activations` then quantizes those layers' outputs.

The quantizer itself (qparams, round half to even, clamp) is :mod:`course_lib.quant`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from course_lib import quant

__all__ = [
    "HistogramObserver",
    "MSECurve",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "QuantizationError",
    "calibrate",
    "clip_to_threshold",
    "fake_quantize_activations",
    "histogram",
    "kl_divergence",
    "kl_divergence_curve",
    "kl_range",
    "kl_range_from_histogram",
    "kl_levels",
    "kl_threshold",
    "minmax_range",
    "mse_curve",
    "mse_curve_from_histogram",
    "mse_range",
    "mse_range_from_histogram",
    "percentile_range",
    "percentile_range_from_histogram",
    "quantization_error",
]

_CHUNK_ELEMENTS = 2_000_000  # bound on candidates × samples evaluated at once (≈ 16 MB per float64 array)


# --------------------------------------------------------------------------- validation


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")
    return int(bits)


def _values(x: torch.Tensor | np.ndarray, name: str = "x") -> torch.Tensor:
    """``x`` flattened to a float32 tensor, after checking it is non-empty and finite."""
    t = torch.as_tensor(x).detach().cpu()
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: a range needs at least one value")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
    t = t.reshape(-1).to(torch.float32)
    lo, hi = torch.aminmax(t)  # NaN propagates into min and max: one pass checks everything
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s): remove them before calibrating")
    return t


def _check_percentile(percentile: float, *, symmetric: bool) -> float:
    p = float(percentile)
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    if not symmetric and p < 50.0:
        # Two-sided: lo is the (100 - p)-th and hi the p-th percentile, so p < 50 gives lo > hi.
        raise ValueError(f"a two-sided percentile range needs percentile ≥ 50, got {percentile!r}")
    return p


def _check_histogram(counts: np.ndarray | torch.Tensor, edges: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    e = np.asarray(edges, dtype=np.float64).reshape(-1)
    if c.size == 0:
        raise ValueError("the histogram is empty (no bins)")
    if e.size != c.size + 1:
        raise ValueError(f"a histogram with {c.size} bins needs {c.size + 1} edges, got {e.size}")
    if not (np.isfinite(c).all() and np.isfinite(e).all()):
        raise ValueError("the histogram contains NaN or Inf")
    if (c < 0).any():
        raise ValueError("histogram counts must be ≥ 0")
    if c.sum() <= 0:
        raise ValueError("the histogram holds no data (all counts are 0)")
    if not (np.diff(e) > 0).all():
        raise ValueError("histogram edges must be strictly increasing")
    return c, e


def clip_to_threshold(lo: float, hi: float, threshold: float) -> tuple[float, float]:
    """The range ``[max(lo, -t), min(hi, t)]``: the data range ``[lo, hi]`` clipped at ``±t``.

    Both ends stay inside ``[-t, t]``, so a threshold below all the data gives ``(t, t)``
    (or ``(-t, -t)``), never an inverted range.
    """
    t = float(threshold)
    if not t >= 0:
        raise ValueError(f"a clipping threshold must be ≥ 0, got {threshold!r}")
    return min(max(float(lo), -t), t), max(min(float(hi), t), -t)


# --------------------------------------------------------------------------- histograms


def histogram(x: torch.Tensor | np.ndarray, bins: int = 2048, *, absolute: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Histogram ``(counts float64 [bins], edges float64 [bins + 1])`` of ``x`` over ``[min, max]``.

    With ``absolute=True`` it is the histogram of ``|x|`` over ``[0, max |x|]`` (what the KL
    method uses). A constant tensor gets a single-value range widened by one float32 ulp.
    """
    if bins < 1:
        raise ValueError(f"bins must be ≥ 1, got {bins!r}")
    v = _values(x).double().numpy()
    if absolute:
        v = np.abs(v)
        lo, hi = 0.0, float(v.max())
    else:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * float(np.finfo(np.float32).eps)
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return counts.astype(np.float64), edges


def _cdf_at(counts: np.ndarray, edges: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Cumulative count at ``points``, assuming values spread uniformly inside each bin."""
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    return np.interp(points, edges, cum, left=0.0, right=cum[-1])


def _rebin(counts: np.ndarray, edges: np.ndarray, new_edges: np.ndarray) -> np.ndarray:
    """Counts of ``(counts, edges)`` redistributed over ``new_edges`` (uniform within each old bin)."""
    return np.diff(_cdf_at(counts, edges, new_edges))


def _fold_absolute(counts: np.ndarray, edges: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of ``|x|`` over ``[0, max |edge|]`` with ``bins`` bins, from a histogram of ``x``.

    The mass of ``|x|`` in ``[a, b]`` is ``F(b) - F(a) + F(-a) - F(-b)`` with ``F`` the
    (piecewise-linear) cumulative count of ``x``.
    """
    amax = max(abs(edges[0]), abs(edges[-1]))
    new_edges = np.linspace(0.0, amax, bins + 1)
    positive = np.diff(_cdf_at(counts, edges, new_edges))
    negative = -np.diff(_cdf_at(counts, edges, -new_edges))
    return positive + negative, new_edges


# --------------------------------------------------------------------------- min-max, percentile


def minmax_range(x: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """``(min x, max x)`` as Python floats: the range that clips nothing.

    It is not widened to include 0; :func:`course_lib.quant.qparams_from_range` does that.
    """
    v = _values(x)
    return float(v.min()), float(v.max())


def percentile_range(
    x: torch.Tensor | np.ndarray, percentile: float = 99.99, *, symmetric: bool = False
) -> tuple[float, float]:
    """Range that keeps the central ``percentile`` % of the values (numpy's linear interpolation).

    Two-sided (default): ``(P_{100-p}(x), P_p(x))``, each tail loses ``100 - p`` %.
    ``symmetric=True``: ``t = P_p(|x|)``, then the range is ``x``'s range clipped at ``±t``.
    Computed in float64; ``percentile`` in (0, 100] (≥ 50 when two-sided).
    """
    p = _check_percentile(percentile, symmetric=symmetric)
    v = _values(x).double().numpy()
    if symmetric:
        t = float(np.percentile(np.abs(v), p))
        return clip_to_threshold(v.min(), v.max(), t)
    lo, hi = np.percentile(v, [100.0 - p, p])
    return float(lo), float(hi)


def percentile_range_from_histogram(
    counts: np.ndarray, edges: np.ndarray, percentile: float = 99.99, *, symmetric: bool = False
) -> tuple[float, float]:
    """:func:`percentile_range` on a histogram: the inverse of its piecewise-linear CDF."""
    p = _check_percentile(percentile, symmetric=symmetric)
    c, e = _check_histogram(counts, edges)
    if symmetric:
        ca, ea = _fold_absolute(c, e, c.size)
        t = _inverse_cdf(ca, ea, p / 100.0)
        return clip_to_threshold(e[0], e[-1], t)
    return _inverse_cdf(c, e, 1.0 - p / 100.0), _inverse_cdf(c, e, p / 100.0)


def _inverse_cdf(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    cum = np.concatenate([[0.0], np.cumsum(counts)]) / counts.sum()
    # The first edge where the CDF reaches q, interpolated inside that bin.
    k = int(np.searchsorted(cum, q, side="left"))
    if k == 0:
        return float(edges[0])
    if k >= cum.size:
        return float(edges[-1])
    frac = (q - cum[k - 1]) / max(cum[k] - cum[k - 1], 1e-300)
    return float(edges[k - 1] + frac * (edges[k] - edges[k - 1]))


# --------------------------------------------------------------------------- quantization error


class QuantizationError(NamedTuple):
    """Mean squared error of quantizing ``x``, split by where each value lies.

    ``total = rounding + clipping`` exactly: ``rounding`` sums the squared errors of values
    inside the representable range ``[(qmin - zp)·s, (qmax - zp)·s]``, ``clipping`` those
    outside; both are divided by the number of values.
    """

    total: float
    rounding: float
    clipping: float
    clipped_fraction: float  # share of values outside the representable range
    scale: float
    zero_point: int


def _fake_quantize_rows(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``quant.fake_quantize`` of ``x`` [N] for K qparams at once: a K×N float32 matrix.

    Row k is ``(clamp(z_k + round(x * (1/s_k)), qmin, qmax) - z_k) * s_k`` with the float32
    reciprocal and round half to even: the library's rule, inlined because the MSE search
    calls it for hundreds of candidate ranges (the tests check it is bit-exact).
    """
    s = scale.float()[:, None]
    z = zero_point.float()[:, None]  # integers below 2^16: exact in float32
    q = torch.round(x * (1.0 / s))
    return q.add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def _error_parts(
    values: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    signed: bool,
    symmetric: bool,
    narrow_range: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """Rounding and clipping MSE, clipped fraction, scale and zero point for K candidate ranges.

    ``values`` [N] float32, ``lo``/``hi`` [K] float32.
    A value counts as clipped when it lies beyond the smallest or largest representable
    value ``(qmin - z)·s`` / ``(qmax - z)·s``; errors are squared and summed in float64.
    """
    scale, zp = quant.qparams_from_range(
        lo, hi, bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range
    )
    qmin, qmax = quant.qrange(bits, signed, narrow_range)
    # The representable range of each candidate, computed as dequantize computes it.
    edge_lo = (qmin - zp).float() * scale
    edge_hi = (qmax - zp).float() * scale
    k_total = lo.numel()
    rounding, clipping, clipped = (np.empty(k_total) for _ in range(3))
    n = values.numel()
    v64 = values.double()  # errors in float64: x̂ - x and its square are then exact enough to rank ranges
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, k_total, step):
        sl = slice(start, min(start + step, k_total))
        err2 = _fake_quantize_rows(values, scale[sl], zp[sl], qmin, qmax).double().sub_(v64).square_()
        outside = (values < edge_lo[sl, None]) | (values > edge_hi[sl, None])
        clip_err2 = torch.where(outside, err2, 0.0)
        # err2 - clip_err2 is exact (x - 0 or x - x), so each value lands in exactly one part.
        clipping[sl] = (clip_err2.sum(1, dtype=torch.float64) / n).numpy()
        rounding[sl] = (err2.sub_(clip_err2).sum(1, dtype=torch.float64) / n).numpy()
        clipped[sl] = (outside.sum(1, dtype=torch.float64) / n).numpy()
    return rounding, clipping, clipped, scale, zp


def quantization_error(
    x: torch.Tensor | np.ndarray,
    lo: float,
    hi: float,
    bits: int = 8,
    *,
    signed: bool = True,
    symmetric: bool = False,
    narrow_range: bool = False,
) -> QuantizationError:
    """MSE of fake-quantizing ``x`` with qparams from ``[lo, hi]``, split into rounding + clipping.

    ``scale, zp = qparams_from_range(lo, hi, bits, ...)``; ``x̂ = fake_quantize(x, scale, zp)``
    (float32 reciprocal, round half to even, clamp to [qmin, qmax]); errors are summed in
    float64. A value is *clipped* when it lies outside ``[(qmin - zp)·scale, (qmax - zp)·scale]``.
    """
    bits = _check_bits(bits)
    v = _values(x)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"lo and hi must be finite, got lo={lo!r}, hi={hi!r}")
    if lo > hi:
        raise ValueError(f"lo must be ≤ hi, got lo={lo!r} > hi={hi!r}")
    lo_t, hi_t = torch.tensor([lo]), torch.tensor([hi])
    r, c, f, scale, zp = _error_parts(v, lo_t, hi_t, bits, signed, symmetric, narrow_range)
    rounding, clipping = float(r[0]), float(c[0])
    return QuantizationError(
        rounding + clipping, rounding, clipping, float(f[0]), float(scale[0]), int(zp[0])
    )


# --------------------------------------------------------------------------- MSE-optimal range


class MSECurve(NamedTuple):
    """Quantization MSE as a function of the clipping threshold (numpy float64 arrays)."""

    thresholds: np.ndarray
    total: np.ndarray
    rounding: np.ndarray
    clipping: np.ndarray


def _threshold_ranges(lo0: float, hi0: float, thresholds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate ranges :func:`clip_to_threshold` ``(lo0, hi0, t)`` as float32 tensors [K]."""
    t = torch.as_tensor(thresholds, dtype=torch.float64)
    lo = torch.minimum(t.neg().clamp(min=lo0), t)
    hi = torch.maximum(t.clamp(max=hi0), t.neg())
    return lo.float(), hi.float()


def _thresholds(thresholds: np.ndarray | None, lo0: float, hi0: float, n_grid: int) -> np.ndarray:
    if thresholds is None:
        if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 2:
            raise ValueError(f"n_grid must be an integer ≥ 2, got {n_grid!r}")
        # The search grid: max|x|·k/n_grid for k = 1..n_grid; the last one is the min-max range.
        return max(abs(lo0), abs(hi0)) * np.arange(1, n_grid + 1) / n_grid
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all() or (t < 0).any():
        raise ValueError("thresholds must be a non-empty array of finite values ≥ 0")
    return t


def mse_curve(
    x: torch.Tensor | np.ndarray,
    thresholds: np.ndarray | None = None,
    bits: int = 8,
    *,
    signed: bool = True,
    symmetric: bool = False,
    narrow_range: bool = False,
    n_grid: int = 100,
) -> MSECurve:
    """Quantization MSE (total, rounding, clipping) of ``x`` clipped at each threshold ``t``.

    The range for ``t`` is ``[max(min x, -t), min(max x, t)]``; the default thresholds are
    ``max|x| · k / n_grid`` for ``k = 1..n_grid``. Exact: every value of ``x`` is quantized
    for every threshold, as in :func:`quantization_error` (cost ∝ thresholds × values).
    """
    bits = _check_bits(bits)
    v = _values(x)
    lo0, hi0 = float(v.min()), float(v.max())
    t = _thresholds(thresholds, lo0, hi0, n_grid)
    lo, hi = _threshold_ranges(lo0, hi0, t)
    r, c, _, _, _ = _error_parts(v, lo, hi, bits, signed, symmetric, narrow_range)
    return MSECurve(t, r + c, r, c)


def _cell_integral(u: np.ndarray) -> np.ndarray:
    """``H(u) = ∫ (t - round(t))² dt`` from -1/2 to ``u``: each whole cell adds 1/12."""
    k = np.floor(u + 0.5)
    return k / 12.0 + ((u - k) ** 3 + 0.125) / 3.0


def mse_curve_from_histogram(
    counts: np.ndarray,
    edges: np.ndarray,
    thresholds: np.ndarray | None = None,
    bits: int = 8,
    *,
    signed: bool = True,
    symmetric: bool = False,
    narrow_range: bool = False,
    n_grid: int = 100,
    exact_zeros: float = 0.0,
) -> MSECurve:
    """:func:`mse_curve` for a histogram, assuming the values spread uniformly inside each bin.

    For a bin ``[a, b]`` the expected squared error is ``∫_a^b (x - Q(x))² dx / (b - a)``, in
    closed form: inside the representable range ``[E_lo, E_hi]`` it is ``s³ (H(u_b) - H(u_a))``
    with ``u = x/s + z`` (see :func:`_cell_integral`), beyond ``E_hi`` it is ``∫ (x - E_hi)² dx``
    (and likewise below ``E_lo``). Bins much wider or narrower than the step both work; there is
    no aliasing between bin centres and grid points. ``exact_zeros`` of the counts are values
    exactly 0 (ReLU outputs): 0 is always on the grid, so they add no error.
    """
    bits = _check_bits(bits)
    c, e = _check_histogram(counts, edges)
    if not 0.0 <= exact_zeros <= c.sum():
        raise ValueError(f"exact_zeros must be between 0 and the total count, got {exact_zeros!r}")
    total = c.sum()
    if exact_zeros:
        # Take the zeros out of the bin that holds 0: spread uniformly, they would look like error.
        k = int(np.clip(np.searchsorted(e, 0.0, side="right") - 1, 0, c.size - 1))
        c = c.copy()
        c[k] = max(c[k] - exact_zeros, 0.0)
    lo0, hi0 = float(e[0]), float(e[-1])
    t = _thresholds(thresholds, lo0, hi0, n_grid)
    lo, hi = _threshold_ranges(lo0, hi0, t)
    scale, zp = quant.qparams_from_range(
        lo, hi, bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range
    )
    qmin, qmax = quant.qrange(bits, signed, narrow_range)
    s = scale.double().numpy()[:, None]  # [K, 1] against bins [1, B]
    z = zp.double().numpy()[:, None]
    e_lo, e_hi = (qmin - z) * s, (qmax - z) * s
    keep = c > 0  # empty bins add nothing
    c, a, b = c[keep], e[None, :-1][:, keep], e[None, 1:][:, keep]
    ia, ib = np.clip(a, e_lo, e_hi), np.clip(b, e_lo, e_hi)
    inside = s**3 * (_cell_integral(ib / s + z) - _cell_integral(ia / s + z))
    above = ((np.maximum(b, e_hi) - e_hi) ** 3 - (np.maximum(a, e_hi) - e_hi) ** 3) / 3.0
    below = ((e_lo - np.minimum(a, e_lo)) ** 3 - (e_lo - np.minimum(b, e_lo)) ** 3) / 3.0
    weight = c / (b - a) / total  # count per unit length, as a share of all values
    rounding = (inside * weight).sum(1)
    clipping = ((above + below) * weight).sum(1)
    return MSECurve(t, rounding + clipping, rounding, clipping)


def _argmin_range(curve: MSECurve, lo0: float, hi0: float) -> tuple[float, float]:
    # np.argmin returns the first minimum: among equal errors, the narrowest range.
    k = int(np.argmin(curve.total))
    return clip_to_threshold(lo0, hi0, float(curve.thresholds[k]))


def mse_range(
    x: torch.Tensor | np.ndarray,
    bits: int = 8,
    *,
    signed: bool = True,
    symmetric: bool = False,
    narrow_range: bool = False,
    n_grid: int = 100,
) -> tuple[float, float]:
    """The clipping range that minimises the quantization MSE of ``x`` (a grid search).

    Search: ``n_grid`` thresholds ``t_k = max|x| · k / n_grid`` (k = 1..n_grid, so the
    resolution is ``max|x| / n_grid``); for each, the range ``[max(min x, -t), min(max x, t)]``
    is quantized exactly as :func:`quantization_error` does and the range with the smallest
    mean squared error wins. ``t_{n_grid}`` gives the min-max range, so the result is never
    worse than min-max. Cost ∝ ``n_grid × x.numel()``: for millions of values use a
    :class:`HistogramObserver` (:func:`mse_range_from_histogram`).
    """
    curve = mse_curve(
        x, None, bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range, n_grid=n_grid
    )
    v = _values(x)
    return _argmin_range(curve, float(v.min()), float(v.max()))


def mse_range_from_histogram(
    counts: np.ndarray,
    edges: np.ndarray,
    bits: int = 8,
    *,
    signed: bool = True,
    symmetric: bool = False,
    narrow_range: bool = False,
    n_grid: int = 100,
    exact_zeros: float = 0.0,
) -> tuple[float, float]:
    """:func:`mse_range` on a histogram, with the error of :func:`mse_curve_from_histogram`."""
    curve = mse_curve_from_histogram(
        counts, edges, None, bits, signed=signed, symmetric=symmetric,
        narrow_range=narrow_range, n_grid=n_grid, exact_zeros=exact_zeros,
    )
    return _argmin_range(curve, float(edges[0]), float(edges[-1]))


# --------------------------------------------------------------------------- KL (entropy) calibration


KL_START_BIN = 128  # TensorRT / pytorch-quantization's first candidate threshold bin (of 2048)


def kl_divergence(abs_counts: np.ndarray, i: int, levels: int) -> float:
    """KL(P‖Q) (natural log) of one candidate threshold: the upper edge of bin ``i - 1``.

    On a histogram of ``|x|`` (float64 ``[bins]``), as NVIDIA's ``_compute_amax_entropy``
    (pytorch-quantization) computes it:

    * ``P``: the data clipped at the threshold, ``counts[:i]`` with every count beyond
      (``counts[i:]``) added to bin ``i - 1``;
    * ``Q``: what a ``levels``-level quantizer of ``[0, threshold]`` keeps of ``counts[:i]``:
      bin ``b`` falls in chunk ``b·levels // i`` (integer division), and each chunk's total
      is spread evenly over its non-empty bins (empty bins stay 0);
    * both normalised to sum 1; ``KL = Σ_{P>0} P log(P / Q)``, ``+inf`` where ``P > 0`` and
      ``Q = 0`` (the last bin is empty but values lie beyond it), as ``scipy.stats.entropy``.
    """
    counts = np.asarray(abs_counts, dtype=np.float64).reshape(-1)
    if not 1 <= i <= counts.size:
        raise ValueError(f"i must be in 1..{counts.size} (the number of bins), got {i!r}")
    if levels < 1:
        raise ValueError(f"levels must be ≥ 1, got {levels!r}")
    kept = counts[:i]
    p = kept.copy()
    p[-1] += counts[i:].sum()
    filled = kept > 0
    chunk = np.arange(i) * levels // i  # chunk of each bin; chunk sizes differ by at most 1
    chunk_sum = np.bincount(chunk, weights=kept, minlength=levels)
    chunk_filled = np.bincount(chunk, weights=filled, minlength=levels)
    q = np.where(filled, chunk_sum[chunk] / np.maximum(chunk_filled[chunk], 1), 0.0)
    if q.sum() <= 0 or p.sum() <= 0:  # no data below the threshold: nothing to compare
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    support = p > 0
    if (q[support] == 0).any():
        return math.inf
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def kl_divergence_curve(abs_counts: np.ndarray, levels: int = 128, start_bin: int = KL_START_BIN) -> np.ndarray:
    """:func:`kl_divergence` for every candidate ``i = start_bin .. len(abs_counts)``.

    Returns float64 ``[len(abs_counts) - start_bin + 1]``; entry ``j`` is the candidate
    ``i = start_bin + j``.
    """
    counts = np.asarray(abs_counts, dtype=np.float64).reshape(-1)
    n = counts.size
    if isinstance(start_bin, bool) or not 1 <= int(start_bin) <= n:
        raise ValueError(f"start_bin must be in 1..{n} (the number of bins), got {start_bin!r}")
    if levels < 1:
        raise ValueError(f"levels must be ≥ 1, got {levels!r}")
    return np.array([kl_divergence(counts, i, levels) for i in range(int(start_bin), n + 1)])


def kl_threshold(
    abs_counts: np.ndarray, abs_edges: np.ndarray, levels: int = 128, start_bin: int = KL_START_BIN
) -> float:
    """The threshold ``abs_edges[i]`` that minimises :func:`kl_divergence_curve` over
    ``i = start_bin .. bins``, for a histogram of ``|x|``; among equal divergences the largest
    threshold wins (NVIDIA's ``last_argmin``)."""
    c, e = _check_histogram(abs_counts, abs_edges)
    if c.size > 1:
        # Bin 0 holds every exact zero (half of a ReLU output, often): such a spike would
        # dominate P and favour tiny thresholds. Like NVIDIA's pytorch-quantization, give
        # it its neighbour's count instead; the zeros are exact on any grid anyway.
        c = c.copy()
        c[0] = c[1]
    divergence = kl_divergence_curve(c, levels, start_bin)
    if not np.isfinite(divergence).any():  # every candidate clips values into an empty bin
        return float(e[-1])
    last_argmin = divergence.size - 1 - int(np.argmin(divergence[::-1]))
    return float(e[int(start_bin) + last_argmin])


def kl_levels(bits: int, non_negative: bool) -> int:
    """Quantization levels that cover ``[0, t]``: ``2^(bits-1)`` for signed data (128 at 8 bits),
    ``2^bits`` for data that is never negative (NVIDIA's ``1 << (num_bits - 1 + unsigned)``)."""
    bits = _check_bits(bits)
    return 2**bits if non_negative else 2 ** (bits - 1)


def _kl_args(bits: int, levels: int | None, start_bin: int | None, non_negative: bool, bins: int) -> tuple[int, int]:
    levels = kl_levels(bits, non_negative) if levels is None else int(levels)
    start = KL_START_BIN if start_bin is None else int(start_bin)
    if not 1 <= start <= bins:
        raise ValueError(f"start_bin ({start}) must be in 1..bins ({bins})")
    return levels, start


def kl_range(
    x: torch.Tensor | np.ndarray,
    bits: int = 8,
    *,
    bins: int = 2048,
    levels: int | None = None,
    start_bin: int | None = None,
) -> tuple[float, float]:
    """TensorRT's entropy (KL) calibration: the threshold minimising KL(P‖Q) on ``|x|``.

    A ``bins``-bin histogram of ``|x|`` over ``[0, max|x|]``; candidates are the upper edges of
    bins ``start_bin .. bins``: by default bin 128 onwards, as NVIDIA's ``_compute_amax_entropy``
    (so with 2048 bins the threshold is at least 1/16 of ``max|x|``, whatever the bit-width).
    ``levels`` defaults to :func:`kl_levels` (``2^(bits-1)``, or ``2^bits`` for data that is
    never negative). See :func:`kl_divergence` for P and Q. Returns ``x``'s range clipped at
    ``±t``. Reference: S. Migacz, "8-bit Inference with TensorRT", NVIDIA GTC 2017.
    """
    v = _values(x)
    levels, start = _kl_args(bits, levels, start_bin, bool(v.min() >= 0), bins)
    counts, edges = histogram(v, bins, absolute=True)
    return clip_to_threshold(float(v.min()), float(v.max()), kl_threshold(counts, edges, levels, start))


def kl_range_from_histogram(
    counts: np.ndarray,
    edges: np.ndarray,
    bits: int = 8,
    *,
    bins: int = 2048,
    levels: int | None = None,
    start_bin: int | None = None,
) -> tuple[float, float]:
    """:func:`kl_range` on a histogram of ``x``: folded into a ``bins``-bin histogram of ``|x|`` first."""
    c, e = _check_histogram(counts, edges)
    levels, start = _kl_args(bits, levels, start_bin, bool(e[0] >= 0), bins)
    abs_counts, abs_edges = _fold_absolute(c, e, bins)
    return clip_to_threshold(e[0], e[-1], kl_threshold(abs_counts, abs_edges, levels, start))


# --------------------------------------------------------------------------- streaming observers


class Observer:
    """Watches tensors (``update``) and proposes a range and qparams for them.

    ``bits``, ``signed``, ``symmetric`` and ``narrow_range`` describe the quantizer the range is
    for (the MSE method needs them); :meth:`qparams` uses them unless told otherwise.
    Calling an observer updates it and returns its input unchanged, so it can sit in a model.
    """

    def __init__(
        self, bits: int = 8, *, signed: bool = True, symmetric: bool = False, narrow_range: bool = False
    ) -> None:
        self.bits = _check_bits(bits)
        self.signed, self.symmetric, self.narrow_range = signed, symmetric, narrow_range
        self.count = 0  # values seen

    def update(self, x: torch.Tensor) -> Observer:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        raise NotImplementedError

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__} has seen no data: call update(x) first")

    def qparams(
        self,
        bits: int | None = None,
        *,
        signed: bool | None = None,
        symmetric: bool | None = None,
        narrow_range: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero_point int64)`` for :meth:`range` via ``quant.qparams_from_range``."""
        lo, hi = self.range()
        return quant.qparams_from_range(
            lo,
            hi,
            self.bits if bits is None else _check_bits(bits),
            signed=self.signed if signed is None else signed,
            symmetric=self.symmetric if symmetric is None else symmetric,
            narrow_range=self.narrow_range if narrow_range is None else narrow_range,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.update(x)
        return x

    def __repr__(self) -> str:
        seen = f"range={tuple(round(v, 6) for v in self.range())}" if self.count else "no data"
        return f"{type(self).__name__}({seen}, bits={self.bits})"


class MinMaxObserver(Observer):
    """Running ``min`` and ``max`` over every value seen (torch's ``MinMaxObserver``)."""

    def __init__(self, bits: int = 8, **kwargs: bool) -> None:
        super().__init__(bits, **kwargs)
        self.min_val, self.max_val = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> MinMaxObserver:
        v = _values(x)
        self.min_val = min(self.min_val, float(v.min()))
        self.max_val = max(self.max_val, float(v.max()))
        self.count += v.numel()
        return self

    def range(self) -> tuple[float, float]:
        self._require_data()
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (torch's observer of that name).

    ``min ← min + c · (batch_min - min)`` (same for max); the first batch sets them directly.
    Outliers in one batch move the range only by the fraction ``c``.
    """

    def __init__(self, bits: int = 8, *, averaging_constant: float = 0.01, **kwargs: bool) -> None:
        super().__init__(bits, **kwargs)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.averaging_constant = averaging_constant

    def update(self, x: torch.Tensor) -> MovingAverageMinMaxObserver:
        v = _values(x)
        b_min, b_max = float(v.min()), float(v.max())
        if self.count == 0:
            self.min_val, self.max_val = b_min, b_max
        else:
            c = self.averaging_constant
            self.min_val += c * (b_min - self.min_val)
            self.max_val += c * (b_max - self.max_val)
        self.count += v.numel()
        return self


Method = Literal["minmax", "percentile", "mse", "kl"]


class HistogramObserver(Observer):
    """A fixed-size histogram of every value seen; the range comes from a method applied to it.

    The histogram always spans exactly ``[min, max]`` of the data seen, with ``bins`` equal
    bins. When a batch extends that span, the old counts are re-binned onto the new, wider
    bins (each old bin's count spread uniformly over the new bins it overlaps) and the batch
    is added; this simpler cousin of torch's ``HistogramObserver`` smears the old counts a
    little at each growth, at most by one new bin width.

    ``method``: ``"minmax"``, ``"percentile"`` (``percentile``, ``symmetric_percentile``),
    ``"mse"`` (``n_grid``; for the observer's ``bits``/``signed``/``symmetric``) or ``"kl"``
    (``levels``, default: the grid levels covering ``[0, t]``; ``start_bin``, default 128:
    see :func:`kl_range`).
    """

    def __init__(
        self,
        method: Method = "mse",
        bits: int = 8,
        *,
        bins: int = 2048,
        percentile: float = 99.99,
        symmetric_percentile: bool = False,
        n_grid: int = 100,
        levels: int | None = None,
        start_bin: int | None = None,
        **kwargs: bool,
    ) -> None:
        super().__init__(bits, **kwargs)
        if method not in ("minmax", "percentile", "mse", "kl"):
            raise ValueError(f"method must be 'minmax', 'percentile', 'mse' or 'kl', got {method!r}")
        if bins < 2:
            raise ValueError(f"bins must be ≥ 2, got {bins!r}")
        if method == "percentile":
            _check_percentile(percentile, symmetric=symmetric_percentile)
        self.method, self.bins = method, int(bins)
        self.percentile, self.symmetric_percentile = percentile, symmetric_percentile
        self.n_grid, self.levels, self.start_bin = n_grid, levels, start_bin
        self.min_val, self.max_val = math.inf, -math.inf
        self.counts = np.zeros(self.bins)
        self.edges: np.ndarray | None = None
        self.zeros = 0.0  # values exactly 0 (ReLU outputs): the MSE method knows they cost nothing

    def with_method(self, method: Method, bits: int | None = None, **options: Any) -> HistogramObserver:
        """A copy of this observer (its histogram copied, so no new data is needed) that uses
        another method, bit-width or option (``percentile=``, ``n_grid=``, ``levels=``, ``start_bin=`` …)."""
        other = copy.copy(self)
        other.counts = self.counts.copy()
        other.method = method
        other.bits = self.bits if bits is None else _check_bits(bits)
        for key, value in options.items():
            if not hasattr(other, key):
                raise ValueError(f"unknown option {key!r} for HistogramObserver")
            setattr(other, key, value)
        if method not in ("minmax", "percentile", "mse", "kl"):
            raise ValueError(f"method must be 'minmax', 'percentile', 'mse' or 'kl', got {method!r}")
        return other

    def update(self, x: torch.Tensor) -> HistogramObserver:
        v = _values(x).numpy()
        lo, hi = min(self.min_val, float(v.min())), max(self.max_val, float(v.max()))
        if hi <= lo:  # a constant so far: a tiny span so the bins are well defined
            hi = lo + max(abs(lo), 1.0) * float(np.finfo(np.float32).eps)
        new_edges = np.linspace(lo, hi, self.bins + 1)
        if self.edges is not None and (lo < self.edges[0] or hi > self.edges[-1]):
            self.counts = _rebin(self.counts, self.edges, new_edges)
            self.edges = new_edges
        elif self.edges is None:
            self.edges = new_edges
        # bins + range (not the edge array) takes numpy's fast equal-width path
        self.counts += np.histogram(v, bins=self.bins, range=(self.edges[0], self.edges[-1]))[0]
        self.zeros += float(np.count_nonzero(v == 0))
        self.min_val, self.max_val = min(self.min_val, float(v.min())), max(self.max_val, float(v.max()))
        self.count += v.size
        return self

    def range(self) -> tuple[float, float]:
        self._require_data()
        if self.max_val == self.min_val or self.method == "minmax":
            return self.min_val, self.max_val
        c, e = self.counts, self.edges
        if self.method == "percentile":
            return percentile_range_from_histogram(
                c, e, self.percentile, symmetric=self.symmetric_percentile
            )
        if self.method == "mse":
            return mse_range_from_histogram(
                c, e, self.bits, signed=self.signed, symmetric=self.symmetric,
                narrow_range=self.narrow_range, n_grid=self.n_grid, exact_zeros=self.zeros,
            )
        return kl_range_from_histogram(
            c, e, self.bits, bins=self.bins, levels=self.levels, start_bin=self.start_bin
        )


# --------------------------------------------------------------------------- whole-model calibration


def _hook_points(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module | None]:
    """Module for each name (``None`` for ``"input"``, the model's input)."""
    modules = dict(model.named_modules())
    points: dict[str, nn.Module | None] = {}
    for name in names:
        if name in modules:
            points[name] = modules[name]
        elif name == "input":
            points[name] = None
        else:
            raise ValueError(
                f"{name!r} is neither 'input' nor a submodule of the model; "
                f"submodules: {[n for n in modules if n][:20]}"
            )
    return points


@torch.no_grad()
def calibrate(
    model: nn.Module, observers: Mapping[str, Observer], batches: Iterable[torch.Tensor]
) -> Mapping[str, Observer]:
    """Run ``model`` on every batch with each observer watching one point of the network.

    Keys of ``observers`` are submodule names (``model.named_modules()``; the observer sees
    the module's *output*) or ``"input"`` (the model's input). The model runs in eval mode;
    its previous mode is restored. Returns ``observers``, updated.
    """
    points = _hook_points(model, observers)
    def watch_input(obs: Observer):  # hooks must return None, or they replace the tensor
        return lambda _module, args: None if obs.update(args[0]) else None

    def watch_output(obs: Observer):
        return lambda _module, _args, out: None if obs.update(out) else None

    handles = []
    for name, module in points.items():
        if module is None:
            handles.append(model.register_forward_pre_hook(watch_input(observers[name])))
        else:
            handles.append(module.register_forward_hook(watch_output(observers[name])))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return observers


@contextlib.contextmanager
def fake_quantize_activations(
    model: nn.Module,
    qparams: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    bits: int = 8,
    *,
    signed: bool = True,
    narrow_range: bool = False,
) -> Iterator[nn.Module]:
    """Inside the ``with`` block, the named points of ``model`` output fake-quantized values.

    ``qparams`` maps the names :func:`calibrate` uses (submodule or ``"input"``) to per-tensor
    ``(scale, zero_point)``; each output becomes ``quant.fake_quantize(out, scale, zp, bits)``,
    computed by torch's fused ``fake_quantize_per_tensor_affine`` (the same rule, bit for bit,
    and several times faster on the millions of values of a feature map). The hooks are
    removed on exit, even after an error.
    """
    bits = _check_bits(bits)
    points = _hook_points(model, qparams)
    qmin, qmax = quant.qrange(bits, signed, narrow_range)
    for name, (scale, zp) in qparams.items():
        if torch.as_tensor(scale).numel() != 1 or torch.as_tensor(zp).numel() != 1:
            raise ValueError(f"qparams[{name!r}] must be one per-tensor (scale, zero_point) pair")
        if not qmin <= int(zp) <= qmax:
            raise ValueError(f"qparams[{name!r}]: zero point {int(zp)} is outside [{qmin}, {qmax}]")

    def fq(t: torch.Tensor, sz: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(t, float(sz[0]), int(sz[1]), qmin, qmax)

    handles = []
    for name, module in points.items():
        sz = qparams[name]
        if module is None:
            handles.append(
                model.register_forward_pre_hook(lambda _m, args, sz=sz: (fq(args[0], sz), *args[1:]))
            )
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, sz=sz: fq(out, sz)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
