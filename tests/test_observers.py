"""course_lib.observers: range setting (min-max, percentile, MSE, KL), error split, observers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver as TorchMinMax
from torch.ao.quantization.observer import MovingAverageMinMaxObserver as TorchMovingAverage

from course_lib import observers as ob
from course_lib import quant


def gaussian(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def torch_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, int]:
    """Independent oracle: torch's observer qparams for a signed ``bits``-bit code."""
    obs = TorchMinMax(
        dtype=torch.qint32,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        quant_min=-(2 ** (bits - 1)),
        quant_max=2 ** (bits - 1) - 1,
    )
    obs(torch.tensor([lo, hi]))
    s, z = obs.calculate_qparams()
    return float(s), int(z)


def torch_mse(x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool = False) -> float:
    """Quantization MSE of ``x`` with torch's own fake-quant op (an independent oracle)."""
    s, z = torch_qparams(lo, hi, bits, symmetric)
    xq = torch.fake_quantize_per_tensor_affine(x, s, z, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return float(((xq.double() - x.double()) ** 2).mean())


# ---------------------------------------------------------------------------- min-max


def test_minmax_range_matches_torch_observer():
    x = gaussian() * 3 + 1
    obs = TorchMinMax()
    obs(x)
    assert ob.minmax_range(x) == (float(obs.min_val), float(obs.max_val))


@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_observer_streams_to_the_one_shot_result_and_torch_qparams(symmetric):
    x = gaussian(10_000, seed=1) * torch.linspace(0.1, 5, 10_000)  # the range grows batch by batch
    obs = ob.MinMaxObserver(8, symmetric=symmetric)
    for batch in x.split(999):
        obs.update(batch)
    assert obs.range() == ob.minmax_range(x)
    assert obs.count == x.numel()
    ref = TorchMinMax(
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
    )
    for batch in x.split(999):
        ref(batch)
    s_ref, z_ref = ref.calculate_qparams()
    s, z = obs.qparams()
    assert torch.equal(s.reshape(()), s_ref.reshape(())) and int(z) == int(z_ref)


def test_moving_average_observer_matches_torch():
    batches = [gaussian(500, seed=i) * (1 + i) for i in range(6)]
    ours = ob.MovingAverageMinMaxObserver(averaging_constant=0.25)
    ref = TorchMovingAverage(averaging_constant=0.25)
    for b in batches:
        ours.update(b)
        ref(b)
    lo, hi = ours.range()
    assert lo == pytest.approx(float(ref.min_val), rel=1e-6)
    assert hi == pytest.approx(float(ref.max_val), rel=1e-6)


def test_observer_passes_its_input_through_and_reports_no_data():
    obs = ob.MinMaxObserver()
    with pytest.raises(ValueError, match="no data"):
        obs.range()
    x = gaussian(10)
    assert obs(x) is x
    assert "range=" in repr(obs)


# ---------------------------------------------------------------------------- percentile


@pytest.mark.parametrize("p", [50.0, 90.0, 99.0, 99.99, 100.0])
def test_percentile_range_matches_numpy(p):
    x = gaussian(5_001, seed=2) ** 3
    xn = x.double().numpy()
    lo, hi = ob.percentile_range(x, p)
    assert lo == pytest.approx(np.percentile(xn, 100 - p), rel=1e-12, abs=1e-12)
    assert hi == pytest.approx(np.percentile(xn, p), rel=1e-12, abs=1e-12)
    t = np.percentile(np.abs(xn), p)
    lo_s, hi_s = ob.percentile_range(x, p, symmetric=True)
    assert (lo_s, hi_s) == pytest.approx((max(xn.min(), -t), min(xn.max(), t)), rel=1e-12)


def test_symmetric_percentile_keeps_relu_lower_end_at_zero():
    x = torch.relu(gaussian())
    lo, hi = ob.percentile_range(x, 99.0, symmetric=True)
    assert lo == 0.0 and 0 < hi < float(x.max())


def test_percentile_from_histogram_is_within_a_bin_of_the_order_statistics():
    x = gaussian(50_000, seed=3)
    xs = np.sort(x.double().numpy())
    counts, edges = ob.histogram(x, 2048)
    width = edges[1] - edges[0]

    def bracket(q: float) -> tuple[float, float]:
        # numpy interpolates between two neighbouring order statistics; in a sparse tail they
        # can be bins apart, so the histogram answer must lie between them (± one bin).
        j = int(q * (xs.size - 1))
        return xs[max(j - 1, 0)] - width, xs[min(j + 2, xs.size - 1)] + width

    for p in (99.0, 99.9):
        lo, hi = ob.percentile_range_from_histogram(counts, edges, p)
        a, b = bracket(1 - p / 100)
        assert a <= lo <= b
        a, b = bracket(p / 100)
        assert a <= hi <= b
        lo_s, hi_s = ob.percentile_range_from_histogram(counts, edges, p, symmetric=True)
        t = np.percentile(np.abs(xs), p)
        assert abs(hi_s - t) <= 2 * width and lo_s == pytest.approx(-hi_s)


# ---------------------------------------------------------------------------- error decomposition


@pytest.mark.parametrize(("lo", "hi", "bits"), [(-1.0, 1.0, 4), (-3.0, 2.5, 8), (-5.0, 5.0, 3), (0.0, 2.0, 2)])
def test_error_parts_sum_to_the_total_and_match_torch(lo, hi, bits):
    x = gaussian(30_001, seed=4) * 1.5
    err = ob.quantization_error(x, lo, hi, bits)
    assert err.total == err.rounding + err.clipping
    assert err.total == pytest.approx(torch_mse(x, lo, hi, bits), rel=1e-5)
    # The clipping part, independently: values beyond the outermost grid points.
    s, z = torch_qparams(lo, hi, bits, False)
    top, bottom = (2 ** (bits - 1) - 1 - z) * s, (-(2 ** (bits - 1)) - z) * s
    xn = x.double().numpy()
    over, under = xn > top, xn < bottom
    clip_ref = (((xn - top) ** 2)[over].sum() + ((xn - bottom) ** 2)[under].sum()) / xn.size
    assert err.clipping == pytest.approx(clip_ref, rel=1e-5)
    assert err.clipped_fraction == pytest.approx((over | under).mean())
    assert err.scale == pytest.approx(s) and err.zero_point == z


def test_minmax_range_clips_at_most_a_sliver_and_rounding_is_about_step_squared_over_12():
    g = torch.Generator().manual_seed(5)
    # Non-negative data: zero point = qmin exactly, the grid covers [0, max]: nothing clipped.
    relu = torch.rand(200_000, generator=g) * 4
    err = ob.quantization_error(relu, *ob.minmax_range(relu), 6)
    assert err.clipping == 0.0 and err.clipped_fraction == 0.0
    assert err.rounding == pytest.approx(err.scale**2 / 12, rel=0.02)
    # Signed data: the zero point is rounded to an integer, which shifts the grid by up to half
    # a step, so even min-max may clip values by less than half a step at one end.
    x = relu - 2
    err = ob.quantization_error(x, *ob.minmax_range(x), 6)
    assert 0 < err.clipped_fraction <= 0.5 / 63 + 0.002
    assert err.clipping <= err.clipped_fraction * (err.scale / 2) ** 2
    assert err.total == pytest.approx(err.scale**2 / 12, rel=0.02)


def test_inlined_fake_quantize_is_bit_exact_with_the_library():
    x = gaussian(4_000, seed=6) * 7
    lo = torch.tensor([-1.0, -6.0, -0.3, 0.0])
    hi = torch.tensor([1.0, 4.5, 9.0, 2.2])
    for bits, signed in [(8, True), (4, False), (3, True)]:
        scale, zp = quant.qparams_from_range(lo, hi, bits, signed=signed)
        qmin, qmax = quant.qrange(bits, signed)
        rows = ob._fake_quantize_rows(x, scale, zp, qmin, qmax)
        for k in range(lo.numel()):
            ref = quant.fake_quantize(x, scale[k], zp[k], bits, signed=signed)
            assert torch.equal(rows[k], ref)


# ---------------------------------------------------------------------------- MSE


@pytest.mark.parametrize(("bits", "symmetric", "seed"), [(8, False, 0), (4, False, 1), (3, True, 2), (2, False, 3)])
def test_mse_range_is_the_brute_force_minimum(bits, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(3_000, generator=g), 6 * torch.rand(20, generator=g) + 4])
    n_grid = 40
    lo, hi = ob.mse_range(x, bits, symmetric=symmetric, n_grid=n_grid)
    # Same candidate set, evaluated with torch's quantizer one by one.
    m, big = float(x.min()), float(x.max())
    tmax = max(-m, big)
    cands = [(max(m, -t), min(big, t)) for t in tmax * np.arange(1, n_grid + 1) / n_grid]
    errors = [torch_mse(x, a, b, bits, symmetric) for a, b in cands]
    assert (lo, hi) == pytest.approx(cands[int(np.argmin(errors))], rel=1e-6)
    # A 10x denser search cannot do much better: the grid resolution is fine enough.
    dense = [torch_mse(x, max(m, -t), min(big, t), bits, symmetric) for t in np.linspace(tmax / 100, tmax, 400)]
    assert min(errors) <= min(dense) * 1.05
    # Never worse than min-max (the last candidate).
    assert min(errors) <= torch_mse(x, m, big, bits, symmetric)


def test_mse_range_clips_outliers_only_when_the_grid_is_coarse():
    x = torch.cat([gaussian(30_000, seed=7), torch.full((3,), 40.0)])
    _, hi8 = ob.mse_range(x, 8)
    _, hi4 = ob.mse_range(x, 4)
    # 8 bits: a step of 0.17 rounds cheaply, clipping 3 values at 40 would cost more.
    assert hi8 > 35
    # 4 bits: the step would be 2.9 (MSE ≈ 0.7), so clipping the outliers wins.
    assert hi4 < 6


def test_mse_curve_from_histogram_matches_the_exact_curve():
    g = torch.Generator().manual_seed(8)
    relu_like = torch.relu(torch.randn(50_000, generator=g)) * torch.rand(50_000, generator=g) ** 2
    for x in (gaussian(50_000, seed=9), relu_like):
        counts, edges = ob.histogram(x, 2048)
        zeros = float((x == 0).sum())
        for bits in (8, 4, 2):
            exact = ob.mse_curve(x, None, bits, n_grid=30)
            approx = ob.mse_curve_from_histogram(counts, edges, exact.thresholds, bits, exact_zeros=zeros)
            np.testing.assert_allclose(approx.total, exact.total, rtol=0.02)
            np.testing.assert_allclose(approx.clipping, exact.clipping, rtol=0.02, atol=1e-3 * exact.total.min())
            assert np.argmin(approx.total) == np.argmin(exact.total)


def test_mse_curve_total_is_rounding_plus_clipping_and_monotone_parts():
    x = gaussian(20_000, seed=10)
    c = ob.mse_curve(x, np.linspace(0.5, 4.0, 15), 4)
    np.testing.assert_array_equal(c.total, c.rounding + c.clipping)
    assert (np.diff(c.clipping) <= 0).all()  # a wider range clips less
    assert c.rounding[-1] > c.rounding[0]  # and rounds coarser


# ---------------------------------------------------------------------------- KL


def nvidia_kl_curve(counts: np.ndarray, levels: int, start_bin: int = 128) -> list[float]:
    """KL(P||Q) per candidate bin, written the way NVIDIA's ``_compute_amax_entropy``
    (pytorch-quantization, calib/histogram.py) computes it: chunk boundaries from
    ``np.linspace(0, i, levels + 1)`` and ``np.digitize``, empty bins left out of Q,
    and the relative entropy of ``scipy.stats.entropy`` (both normalised; inf where Q = 0 < P).
    An independent re-implementation with Python loops, for comparison."""

    def entropy(p: list[float], q: list[float]) -> float:
        ps, qs = sum(p), sum(q)
        terms = [(pb / ps, qb / qs) for pb, qb in zip(p, q, strict=True) if pb > 0]
        if any(qb == 0 for _, qb in terms):
            return math.inf
        return sum(pb * math.log(pb / qb) for pb, qb in terms)

    out = []
    for i in range(start_bin, len(counts) + 1):
        chunk_of = np.digitize(range(i), np.linspace(0, i, num=levels + 1)) - 1
        totals, members = [0.0] * levels, [0] * levels
        for b in range(i):
            if counts[b] != 0:
                totals[chunk_of[b]] += counts[b]
                members[chunk_of[b]] += 1
        q = [totals[chunk_of[b]] / members[chunk_of[b]] if counts[b] != 0 else 0.0 for b in range(i)]
        p = list(counts[:i])
        p[-1] += sum(counts[i:])
        out.append(float(entropy(p, q)))
    return out


def test_kl_divergence_curve_matches_nvidias_algorithm():
    rng = np.random.default_rng(0)
    counts = np.round(np.abs(rng.normal(0, 1, 5_000)) * 7).clip(0, 40)
    counts = np.bincount(counts.astype(int), minlength=41)[:41].astype(float)
    counts[38] = 0  # an empty bin next to the end: the candidate i = 39 has P > 0 = Q there
    counts[40] += 3
    for levels, start in [(8, 1), (8, 8), (16, 20), (64, 5)]:
        got = ob.kl_divergence_curve(counts, levels, start)
        want = nvidia_kl_curve(counts, levels, start)
        np.testing.assert_allclose(got, want, rtol=1e-10)
    assert ob.kl_divergence(counts, 39, 8) == math.inf


def test_kl_threshold_matches_nvidias_search():
    # start at bin 128, bin 0 replaced by bin 1, the last of equal minima, the edge after bin i - 1
    rng = np.random.default_rng(3)
    x = np.abs(np.concatenate([rng.standard_t(3, 30_000), np.zeros(20_000)]))
    counts, edges = np.histogram(x, bins=600, range=(0.0, x.max()))
    counts = counts.astype(float)
    for levels in (128, 256, 8):
        bins = counts.copy()
        bins[0] = bins[1]
        curve = np.array(nvidia_kl_curve(bins, levels, 128))
        last_argmin = len(curve) - 1 - int(np.argmin(curve[::-1]))
        assert ob.kl_threshold(counts, edges, levels) == edges[128 + last_argmin]


def test_kl_search_starts_at_bin_128_whatever_the_bits():
    x = torch.cat([gaussian(100_000, seed=18), torch.tensor([60.0])])  # max|x| = 60, the bulk below 5
    for bits in (8, 4, 3):
        lo, hi = ob.kl_range(x, bits)
        assert hi >= 60.0 * 128 / 2048 - 1e-9
    # started at bin `levels` (a different method) it may go lower
    assert ob.kl_range(x, 3, start_bin=4)[1] < ob.kl_range(x, 3)[1]


def test_kl_range_clips_far_outliers_of_a_gaussian():
    x = torch.cat([gaussian(200_000, seed=11), torch.tensor([40.0, -38.0, 39.5, 35.0])])
    lo, hi = ob.kl_range(x)
    assert 2.5 < hi < 8 and lo == -hi  # the bulk (|x| < 5) kept, the outliers at ~40 clipped


def test_kl_range_keeps_nearly_all_of_a_uniform_distribution():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(12))
    lo, hi = ob.kl_range(x)
    assert hi >= 0.97 and lo == pytest.approx(float(x.min()))


def test_kl_range_from_histogram_agrees_with_raw_samples():
    x = torch.cat([gaussian(200_000, seed=13), torch.tensor([30.0, -25.0])])
    _, hi_raw = ob.kl_range(x)
    # A histogram of x over [-30, 30] with 4096 bins folds exactly onto 2048 bins of |x|.
    counts, edges = np.histogram(x.numpy(), 4096, range=(-30.0, 30.0))
    lo, hi = ob.kl_range_from_histogram(counts, edges)
    assert hi == pytest.approx(hi_raw, rel=1e-9) and lo == -hi
    # Bins that do not align smear the histogram a little. Near its minimum the KL curve is
    # flat (3.9 to 4.7 are within 10 % of each other here), so the choice moves within that band.
    counts, edges = ob.histogram(x, 4096)
    _, hi = ob.kl_range_from_histogram(counts, edges)
    assert hi == pytest.approx(hi_raw, rel=0.2)


# ---------------------------------------------------------------------------- histogram observer


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "kl"])
def test_histogram_observer_streaming_matches_the_one_shot_range(method):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(120_000, generator=g) * torch.linspace(0.2, 1.5, 120_000)  # range grows
    obs = ob.HistogramObserver(method, 8, percentile=99.9)
    for batch in x.split(10_000):
        obs.update(batch)
    lo, hi = obs.range()
    counts, edges = ob.histogram(x, 2048)
    if method == "minmax":
        ref = ob.minmax_range(x)
    elif method == "percentile":
        ref = ob.percentile_range(x, 99.9)
    elif method == "mse":
        ref = ob.mse_range_from_histogram(counts, edges, 8)
    else:
        ref = ob.kl_range(x)
    assert (lo, hi) == pytest.approx(ref, rel=0.03)
    assert obs.count == x.numel()
    assert obs.counts.sum() == pytest.approx(x.numel())


def test_histogram_observer_counts_exact_zeros_for_the_mse_method():
    x = torch.relu(gaussian(20_000, seed=15))
    obs = ob.HistogramObserver("mse", 4).update(x)
    assert obs.zeros == float((x == 0).sum())
    lo, hi = obs.range()
    lo_exact, hi_exact = ob.mse_range(x, 4)
    assert lo == 0.0 and hi == pytest.approx(hi_exact, rel=0.03)


def test_histogram_observer_on_a_constant():
    obs = ob.HistogramObserver("kl").update(torch.full((10,), 2.0))
    assert obs.range() == (2.0, 2.0)
    s, z = obs.qparams()
    assert float(s) > 0


# ---------------------------------------------------------------------------- calibrate / fake-quant


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def test_calibrate_observes_the_named_points_and_removes_its_hooks():
    net = tiny_net()
    images = torch.randn(20, 1, 8, 8)
    obs = ob.calibrate(net, {"input": ob.MinMaxObserver(), "1": ob.MinMaxObserver()}, images.split(7))
    assert obs["input"].range() == ob.minmax_range(images)
    with torch.no_grad():
        assert obs["1"].range() == ob.minmax_range(net[1](net[0](images)))
    assert not net._forward_pre_hooks and not net[1]._forward_hooks
    with pytest.raises(ValueError, match="submodule"):
        ob.calibrate(net, {"nope": ob.MinMaxObserver()}, [images])


def test_fake_quantize_activations_quantizes_inside_the_block_only():
    net = tiny_net()
    images = torch.randn(5, 1, 8, 8)
    sz_in = quant.qparams_from_range(-2.0, 2.0, 4)
    sz_relu = quant.qparams_from_range(0.0, 0.5, 4)
    with torch.no_grad():
        plain = net(images)
        with ob.fake_quantize_activations(net, {"input": sz_in, "1": sz_relu}, 4) as qnet:
            got = qnet(images)
        h = quant.fake_quantize(images, *sz_in, 4)
        h = quant.fake_quantize(net[1](net[0](h)), *sz_relu, 4)
        expected = net[3](net[2](h))
        assert torch.equal(got, expected)
        assert torch.equal(net(images), plain)  # hooks gone


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "fn",
    [
        ob.minmax_range,
        ob.percentile_range,
        ob.mse_range,
        ob.kl_range,
        lambda x: ob.quantization_error(x, -1, 1, 8),
        lambda x: ob.MinMaxObserver().update(x),
        lambda x: ob.HistogramObserver().update(x),
    ],
)
@pytest.mark.parametrize("bad", [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 0.0]), torch.tensor([])])
def test_bad_values_raise(fn, bad):
    with pytest.raises(ValueError, match="NaN|empty"):
        fn(bad)


@pytest.mark.parametrize("p", [0.0, -1.0, 100.5, float("nan")])
def test_percentile_out_of_range_raises(p):
    with pytest.raises(ValueError, match="percentile"):
        ob.percentile_range(gaussian(10), p)


def test_two_sided_percentile_below_50_raises_but_symmetric_accepts_it():
    with pytest.raises(ValueError, match="≥ 50"):
        ob.percentile_range(gaussian(10), 30.0)
    assert ob.percentile_range(gaussian(10), 30.0, symmetric=True)[1] > 0


@pytest.mark.parametrize("bits", [1, 17, 8.0, True])
def test_bad_bits_raise(bits):
    x = gaussian(100)
    for fn in (ob.mse_range, ob.kl_range, lambda x, bits: ob.quantization_error(x, -1, 1, bits)):
        with pytest.raises(ValueError, match="bits"):
            fn(x, bits)
    with pytest.raises(ValueError, match="bits"):
        ob.MinMaxObserver(bits)


def test_other_bad_arguments_raise():
    x = gaussian(100)
    with pytest.raises(ValueError, match="lo must be ≤ hi"):
        ob.quantization_error(x, 1.0, -1.0)
    with pytest.raises(ValueError, match="n_grid"):
        ob.mse_range(x, n_grid=1)
    with pytest.raises(ValueError, match="bins"):
        ob.kl_range(x, bins=64)  # fewer bins than the start bin 128
    with pytest.raises(ValueError, match="edges"):
        ob.mse_range_from_histogram(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="increasing"):
        ob.percentile_range_from_histogram(np.ones(3), np.array([0.0, 2.0, 1.0, 3.0]))
    with pytest.raises(ValueError, match="no data"):
        ob.kl_range_from_histogram(np.zeros(3), np.arange(4.0))
    with pytest.raises(ValueError, match="method"):
        ob.HistogramObserver("median")
    with pytest.raises(ValueError, match="threshold"):
        ob.clip_to_threshold(-1.0, 1.0, -0.5)


def test_with_method_reuses_the_histogram_without_sharing_it():
    x = gaussian(30_000, seed=16)
    obs = ob.HistogramObserver("minmax").update(x)
    kl4 = obs.with_method("kl", 4)
    counts, edges = obs.counts.copy(), obs.edges
    assert kl4.range() == ob.kl_range_from_histogram(counts, edges, 4)
    assert obs.with_method("percentile", percentile=99.0).range() == ob.percentile_range_from_histogram(counts, edges, 99.0)
    assert obs.range() == ob.minmax_range(x)  # the original keeps its method
    obs.update(x)
    assert kl4.counts.sum() == x.numel()  # the copy did not see the second batch
    with pytest.raises(ValueError, match="option"):
        obs.with_method("kl", colour="red")


def test_kl_threshold_is_the_last_argmin_of_the_divergence_curve():
    counts, edges = ob.histogram(gaussian(50_000, seed=17), 512, absolute=True)
    bins = counts.copy()
    bins[0] = bins[1]
    curve = ob.kl_divergence_curve(bins, 32, 100)
    last = len(curve) - 1 - int(np.argmin(curve[::-1]))
    assert ob.kl_threshold(counts, edges, 32, 100) == edges[100 + last]
