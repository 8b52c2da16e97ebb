"""course_lib.quant against PyTorch's own quantization ops, first principles and properties.

The oracles are independent of the code under test: torch.ao.quantization observers
for qparams, torch.quantize_per_tensor / quantize_per_channel / fake_quantize_* and
Tensor.dequantize for the map, literal tables worked out by hand for ranges, ties
and bit packing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from course_lib import quant as Q

PROPERTY = settings(max_examples=100, deadline=None)
EPS32 = float(np.finfo(np.float32).eps)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same float32 bit patterns (so -0.0 differs from +0.0)."""
    a, b = a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# ------------------------------------------------------------------------- qrange

QRANGE_TABLE = [  # (bits, signed, narrow) -> (qmin, qmax), written out by hand
    (8, True, False, -128, 127),
    (8, False, False, 0, 255),
    (8, True, True, -127, 127),
    (8, False, True, 1, 255),
    (4, True, False, -8, 7),
    (4, False, False, 0, 15),
    (4, True, True, -7, 7),
    (2, True, False, -2, 1),
    (2, False, True, 1, 3),
    (3, True, False, -4, 3),
    (16, True, False, -32768, 32767),
    (16, False, False, 0, 65535),
]


@pytest.mark.parametrize("bits, signed, narrow, qmin, qmax", QRANGE_TABLE)
def test_qrange_table(bits: int, signed: bool, narrow: bool, qmin: int, qmax: int) -> None:
    assert Q.qrange(bits, signed, narrow) == (qmin, qmax)


def test_qrange_defaults_are_int8() -> None:
    assert Q.qrange() == (-128, 127)


@pytest.mark.parametrize("bits", [0, 1, 17, 32, 8.0, True, "8"])
def test_bits_outside_2_to_16_are_rejected(bits: object) -> None:
    with pytest.raises(ValueError, match="bits must be an int from 2 to 16"):
        Q.qrange(bits)  # type: ignore[arg-type]


# ------------------------------------------------------- qparams vs torch observers

# Data that exercise every branch of the observer: mixed signs, one-signed ranges,
# a constant, all zeros, a range so small that the eps clamp kicks in, a huge range.
OBSERVED = {
    "randn": torch.randn(64, generator=seeded(0)) * 3,
    "small": torch.randn(64, generator=seeded(1)) * 1e-3,
    "positive": torch.rand(64, generator=seeded(2)) + 0.5,
    "negative": -(torch.rand(64, generator=seeded(3)) + 0.5),
    "constant": torch.full((8,), 3.0),
    "negative constant": torch.full((8,), -2.0),
    "zeros": torch.zeros(8),
    "eps clamp": torch.randn(64, generator=seeded(4)) * 1e-9,
    "huge": torch.randn(64, generator=seeded(5)) * 1e20,
    "skewed": torch.cat([torch.tensor([-0.1]), torch.rand(63, generator=seeded(6)) * 7]),
}

MODES = [
    (bits, signed, symmetric, narrow)
    for bits in range(2, 17)
    for signed in (True, False)
    for symmetric in (False, True)
    for narrow in (False, True)
]


def torch_observer(bits, signed, symmetric, narrow, axis=None):
    """The torch.ao observer that defines the same qparams, or None when torch can't.

    Unsigned narrow ranges start at 1 (torch requires quant_min <= 0) and unsigned
    symmetric codes with a custom range get torch's (qmin + qmax) // 2 zero point,
    which course_lib deliberately does not follow (see the test below).
    """
    qmin, qmax = Q.qrange(bits, signed, narrow)
    if not signed and narrow:
        return None
    if bits <= 8:
        dtype = torch.qint8 if signed else torch.quint8
    else:
        dtype = torch.int16 if signed else torch.uint16
    custom = {"quant_min": qmin, "quant_max": qmax}
    if not signed and symmetric:
        if bits == 8:
            custom = {}  # default quint8: zero point 128
        elif bits != 16:
            return None  # uint16 uses 2**15 whatever the range
    if axis is None:
        scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        return MinMaxObserver(dtype=dtype, qscheme=scheme, **custom)
    scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    return PerChannelMinMaxObserver(ch_axis=axis, dtype=dtype, qscheme=scheme, **custom)


# modes with no torch counterpart are tested from first principles below
OBSERVER_MODES = [m for m in MODES if torch_observer(*m) is not None]


@pytest.mark.parametrize("bits, signed, symmetric, narrow", OBSERVER_MODES)
def test_qparams_match_minmax_observer_bit_for_bit(bits, signed, symmetric, narrow) -> None:
    for name, x in OBSERVED.items():
        obs = torch_observer(bits, signed, symmetric, narrow)
        obs(x)
        want_s, want_z = obs.calculate_qparams()
        s, z = Q.qparams_from_tensor(
            x, bits, signed=signed, symmetric=symmetric, narrow_range=narrow
        )
        assert s.dtype == torch.float32 and z.dtype == torch.int64 and s.dim() == 0
        assert bits_equal(s, want_s.reshape(())), (name, float(s), float(want_s))
        assert int(z) == int(want_z), (name, int(z), int(want_z))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
@pytest.mark.parametrize(
    "bits, signed, symmetric, narrow",
    [(8, True, False, False), (8, True, True, True), (8, False, False, False),
     (8, False, True, False), (4, True, True, False), (4, False, False, False),
     (16, True, False, False), (2, True, False, True)],
)  # fmt: skip
def test_per_channel_qparams_match_per_channel_observer(
    axis, bits, signed, symmetric, narrow
) -> None:
    x = torch.randn(5, 6, 7, generator=seeded(7)) * torch.linspace(0.01, 10, 6).reshape(1, 6, 1)
    x[:, 2] = 0.0  # a channel of zeros (pruned filter)
    x[1] = x[1].abs()  # an all-positive channel along axis 0
    obs = torch_observer(bits, signed, symmetric, narrow, axis=axis % 3)
    obs(x)
    want_s, want_z = obs.calculate_qparams()
    s, z = Q.qparams_from_tensor(
        x, bits, signed=signed, symmetric=symmetric, narrow_range=narrow, axis=axis
    )
    assert s.shape == (x.shape[axis],)
    assert bits_equal(s, want_s)
    assert torch.equal(z, want_z.to(torch.int64))


def test_qparams_literal_examples() -> None:
    # int8 asymmetric over [-1, 2]: s = 3/255, z = -128 - round(-1 / s) = -128 + 85.
    s, z = Q.qparams_from_range(-1.0, 2.0)
    assert float(s) == pytest.approx(3 / 255, rel=1e-7) and int(z) == -43
    # int8 symmetric: 2 / 127.5, not 2 / 127; narrow range: 2 / 127.
    assert float(Q.qparams_from_range(-1.0, 2.0, symmetric=True)[0]) == pytest.approx(2 / 127.5)
    s, z = Q.qparams_from_range(-1.0, 2.0, symmetric=True, narrow_range=True)
    assert float(s) == pytest.approx(2 / 127) and int(z) == 0
    # uint8 symmetric: zero point 128 (not 0, and never 128 for a signed range).
    assert int(Q.qparams_from_range(-1.0, 2.0, signed=False, symmetric=True)[1]) == 128
    # a range that excludes 0 is widened to include it: [2, 5] -> [0, 5]
    s, z = Q.qparams_from_range(2.0, 5.0, signed=False)
    assert float(s) == pytest.approx(5 / 255) and int(z) == 0


@pytest.mark.parametrize("bits", range(2, 17))
def test_unsigned_narrow_symmetric_from_first_principles(bits: int) -> None:
    # range [1, 2^b - 1]: midpoint 2^(b-1), half-width 2^(b-1) - 1 steps
    s, z = Q.qparams_from_range(-3.0, 1.5, bits, signed=False, symmetric=True, narrow_range=True)
    assert int(z) == 2 ** (bits - 1)
    assert float(s) == pytest.approx(3.0 / (2 ** (bits - 1) - 1), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_unsigned_symmetric_zero_point_differs_from_torch_custom_range_by_one(bits) -> None:
    # Documented difference: torch's observer with quant_min/quant_max takes
    # (qmin + qmax) // 2 = 2^(b-1) - 1; course_lib uses 2^(b-1) at every width, as
    # torch itself does for quint8 (128) and uint16 (2^15) by default.
    x = torch.tensor([-1.0, 2.0])
    obs = MinMaxObserver(
        dtype=torch.quint8, qscheme=torch.per_tensor_symmetric, quant_min=0, quant_max=2**bits - 1
    )
    obs(x)
    want_s, want_z = obs.calculate_qparams()
    s, z = Q.qparams_from_tensor(x, bits, signed=False, symmetric=True)
    assert bits_equal(s, want_s.reshape(()))
    assert int(z) == 2 ** (bits - 1) == int(want_z) + 1


def test_constant_tensor_gets_a_valid_nonzero_scale() -> None:
    for value in (0.0, 3.0, -2.0, 1e-30):
        x = torch.full((10,), value)
        for symmetric in (False, True):
            s, z = Q.qparams_from_tensor(x, symmetric=symmetric)
            assert float(s) > 0 and math.isfinite(1 / float(s))
            assert -128 <= int(z) <= 127
            # the constant itself survives the round trip within half a step
            err = (Q.fake_quantize(x, s, z) - x).abs().max()
            assert float(err) <= float(s) / 2 + 4 * EPS32 * abs(value)


def test_qparams_accept_tensors_of_any_shape_for_groups() -> None:
    lo = torch.tensor([[-1.0, 0.5], [-2.0, -0.5]])
    hi = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    s, z = Q.qparams_from_range(lo, hi)
    assert s.shape == z.shape == (2, 2)
    for i in range(2):
        for j in range(2):
            s1, z1 = Q.qparams_from_range(float(lo[i, j]), float(hi[i, j]))
            assert bits_equal(s[i, j], s1) and int(z[i, j]) == int(z1)


# --------------------------------------------------- the rounding rule, bit for bit


def test_float32_reciprocal_is_correctly_rounded() -> None:
    # quantize relies on torch.reciprocal being IEEE 1.0f / s, like aten's 1.0f / scale.
    s = torch.rand(100_000, generator=seeded(8)) * 10 + 1e-6
    want = np.float32(1.0) / s.numpy()
    assert np.array_equal(torch.reciprocal(s).numpy().view(np.int32), want.view(np.int32))


def near_ties(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x close to (k + 1/2)·s, where x/s and x·(1/s) often round to different integers."""
    g = seeded(seed)
    s = torch.rand(n, generator=g) * 0.1 + 1e-3
    k = torch.randint(-100, 100, (n,), generator=g).to(torch.float32)
    return (k + 0.5) * s, s


def test_torch_multiplies_by_the_reciprocal_and_so_does_quantize() -> None:
    x, s = near_ties(50_000, seed=9)
    by_mul = torch.round(x * torch.reciprocal(s))
    by_div = torch.round(x / s)
    differ = (by_mul != by_div).nonzero().flatten()[:300]
    assert len(differ) == 300  # such inputs are common near ties (~10 %)
    for i in differ.tolist():
        xi, si = x[i : i + 1], float(s[i])
        qpt = torch.quantize_per_tensor(xi, si, 0, torch.qint8).int_repr()
        qpc = torch.quantize_per_channel(
            xi.reshape(1, 1), s[i : i + 1], torch.zeros(1, dtype=torch.long), 0, torch.qint8
        ).int_repr()
        fq = torch.fake_quantize_per_tensor_affine(xi, si, 0, -128, 127)
        ours = Q.quantize(xi, si, 0)
        assert int(qpt) == int(qpc) == int(ours) == int(by_mul[i]) != int(by_div[i])
        assert bits_equal(fq, Q.fake_quantize(xi, si, 0))
        assert int(torch.round(fq / si)) == int(by_mul[i])


@pytest.mark.parametrize(
    "x, scale, q_mul, q_div",
    [(3.1, 0.2, 16, 15), (4.5, 0.6, 8, 7), (0.09, 0.02, 4, 5), (4.7, 0.2, 24, 23)],
)
def test_reciprocal_examples_to_quote(x: float, scale: float, q_mul: int, q_div: int) -> None:
    # In float32, 3.1 / 0.2 = 15.499999 but 3.1 * (1 / 0.2) = 15.5 -> ties to even -> 16.
    t = torch.tensor([x])
    assert int(torch.round(t / torch.tensor(scale))) == q_div
    assert int(Q.quantize(t, scale, 0)) == q_mul
    assert int(torch.quantize_per_tensor(t, scale, 0, torch.qint8).int_repr()) == q_mul


def test_ties_round_half_to_even_then_add_zero_point() -> None:
    # s = 1/4 makes x / s exact: x / s = 0.5, 1.5, 2.5, -0.5, -1.5, -2.5
    x = torch.tensor([0.125, 0.375, 0.625, -0.125, -0.375, -0.625])
    assert Q.quantize(x, 0.25, 0).tolist() == [0, 2, 2, 0, -2, -2]
    # zero point added after rounding: nearbyint(0.5) + 1 = 1, not nearbyint(1.5) = 2
    assert Q.quantize(x, 0.25, 1).tolist() == [1, 3, 3, 1, -1, -1]
    want = torch.quantize_per_tensor(x, 0.25, 1, torch.qint8).int_repr()
    assert Q.quantize(x, 0.25, 1).tolist() == want.tolist()


@pytest.mark.parametrize("zero_point", [0, 1, 2, 3, -5, 100])
@pytest.mark.parametrize("log2_scale", [-12, -4, 0, 3])
def test_exact_ties_match_torch(zero_point: int, log2_scale: int) -> None:
    s = 2.0**log2_scale
    x = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * s  # every x / s is a tie
    for n in (1, 7, 8, 33, 600):  # scalar tail and vectorised body of the kernels
        xs = x[:n] if n < 600 else x
        want = torch.quantize_per_tensor(xs, s, zero_point, torch.qint8).int_repr()
        assert torch.equal(Q.quantize(xs, s, zero_point), want.to(torch.int32))
        u = torch.quantize_per_tensor(xs, s, zero_point + 128, torch.quint8).int_repr()
        assert torch.equal(Q.quantize(xs, s, zero_point + 128, signed=False), u.to(torch.int32))
        fq = torch.fake_quantize_per_tensor_affine(xs, s, zero_point, -128, 127)
        assert bits_equal(Q.fake_quantize(xs, s, zero_point), fq)


# ------------------------------------------------------ quantize vs torch, at large


def random_qparams(g: torch.Generator, n: int, qmin: int, qmax: int):
    scale = 10 ** (torch.rand(n, generator=g) * 6 - 4)  # 1e-4 .. 1e2
    zero_point = torch.randint(qmin, qmax + 1, (n,), generator=g)
    return scale, zero_point


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_quantize_per_tensor(signed: bool) -> None:
    g = seeded(10)
    dtype = torch.qint8 if signed else torch.quint8
    scales, zps = random_qparams(g, 200, *Q.qrange(8, signed))
    for i, (s, z) in enumerate(zip(scales.tolist(), zps.tolist(), strict=True)):
        n = 1 + i % 70
        x = torch.randn(n, generator=g) * s * 100  # well beyond both ends of the range
        want = torch.quantize_per_tensor(x, s, z, dtype)
        q = Q.quantize(x, s, z, signed=signed)
        assert q.dtype == torch.int32
        assert torch.equal(q, want.int_repr().to(torch.int32))
        assert bits_equal(Q.dequantize(q, s, z), want.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 10, 12, 16])
@pytest.mark.parametrize("signed", [True, False])
def test_other_bit_widths_match_qint32_then_clamp(bits: int, signed: bool) -> None:
    # qint32 applies the same rule with int32 limits; clamping further gives `bits` bits.
    g = seeded(11)
    qmin, qmax = Q.qrange(bits, signed)
    scales, zps = random_qparams(g, 40, qmin, qmax)
    for s, z in zip(scales.tolist(), zps.tolist(), strict=True):
        x = torch.randn(50, generator=g) * s * (qmax - qmin)
        wide = torch.quantize_per_tensor(x, s, z, torch.qint32).int_repr()
        assert torch.equal(Q.quantize(x, s, z, bits, signed=signed), wide.clamp(qmin, qmax))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
@pytest.mark.parametrize("signed", [True, False])
def test_per_channel_matches_quantize_per_channel(axis: int, signed: bool) -> None:
    g = seeded(12)
    x = torch.randn(4, 5, 6, generator=g) * 3
    dtype = torch.qint8 if signed else torch.quint8
    scale, zp = random_qparams(g, x.shape[axis], *Q.qrange(8, signed))
    scale = scale.clamp(1e-3, 1.0)
    want = torch.quantize_per_channel(x, scale, zp, axis % 3, dtype)
    q = Q.quantize(x, scale, zp, signed=signed, axis=axis)
    assert torch.equal(q, want.int_repr().to(torch.int32))
    assert bits_equal(Q.dequantize(q, scale, zp, axis=axis), want.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("narrow", [False, True])
def test_fake_quantize_matches_torch_per_tensor_and_per_channel(bits: int, narrow: bool) -> None:
    g = seeded(13)
    qmin, qmax = Q.qrange(bits, True, narrow)
    x = torch.randn(6, 40, generator=g) * 5
    for s, z in zip(*random_qparams(g, 30, qmin, qmax), strict=True):
        got = Q.fake_quantize(x, float(s), int(z), bits, narrow_range=narrow)
        want = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), qmin, qmax)
        assert bits_equal(got, want)
    scale, zp = random_qparams(g, 40, qmin, qmax)
    got = Q.fake_quantize(x, scale, zp, bits, narrow_range=narrow, axis=1)
    want = torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), 1, qmin, qmax)
    assert bits_equal(got, want)


def test_values_at_and_beyond_the_range_ends() -> None:
    s, z = 0.5, -3  # int8 covers [(-128 + 3) * 0.5, (127 + 3) * 0.5] = [-62.5, 65]
    x = torch.tensor([-62.5, -62.75, -63.0, -1e6, 65.0, 65.2, 65.3, 1e6])
    assert Q.quantize(x, s, z).tolist() == [-128, -128, -128, -128, 127, 127, 127, 127]
    assert Q.fake_quantize(x, s, z).tolist() == [-62.5] * 4 + [65.0] * 4
    want = torch.quantize_per_tensor(x, s, z, torch.qint8).int_repr()
    assert torch.equal(Q.quantize(x, s, z), want.to(torch.int32))


def test_huge_values_clamp_to_the_nearer_end() -> None:
    x = torch.tensor([1e30, -1e30, 3e38, -3e38, 2.0**63, 1e10])
    want = [127, -128, 127, -128, 127, 127]
    assert Q.quantize(x, 1.0, 0).tolist() == want
    assert torch.quantize_per_tensor(x, 1.0, 0, torch.qint8).int_repr().tolist() == want
    assert bits_equal(
        Q.fake_quantize(x, 1.0, 0), torch.fake_quantize_per_tensor_affine(x, 1.0, 0, -128, 127)
    )
    # with a tiny scale, x / s overflows float32 to inf: still clamped, not wrapped
    assert Q.quantize(torch.tensor([1e30, -1e30]), 1e-10, 0).tolist() == [127, -128]


def test_torch_per_channel_fake_quant_overflows_on_huge_values() -> None:
    # Recorded PyTorch 2.14 CPU behaviour (fake_quantize's docstring mentions it):
    # fake_quantize_per_channel_affine casts z + nearbyint(x / s) to int64 before
    # clamping, so |x / s| >= 2^63 wraps to quant_min. quantize_per_channel and the
    # per-tensor fake-quant op clamp correctly, and so does course_lib.
    x = torch.tensor([[1e30, 2.0**64, 1e10, -1e30]])
    fq = torch.fake_quantize_per_channel_affine(
        x, torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32), 0, -128, 127
    )
    assert fq.tolist() == [[-128.0, -128.0, 127.0, -128.0]]
    ours = Q.fake_quantize(x, torch.tensor([1.0]), torch.tensor([0]), axis=0)
    assert ours.tolist() == [[127.0, 127.0, 127.0, -128.0]]
    qpc = torch.quantize_per_channel(x, torch.tensor([1.0]), torch.tensor([0]), 0, torch.qint8)
    assert qpc.int_repr().tolist() == [[127, 127, 127, -128]]


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1e-3, 1e3, 1e10, 1e30])
def test_extreme_scales_match_torch(scale: float) -> None:
    g = seeded(14)
    x = torch.randn(100, generator=g) * scale * 60
    x[:4] = torch.tensor([0.0, -0.0, scale * 0.5, -scale * 2.5])
    want = torch.quantize_per_tensor(x, scale, 5, torch.qint8)
    assert torch.equal(Q.quantize(x, scale, 5), want.int_repr().to(torch.int32))
    fq = torch.fake_quantize_per_tensor_affine(x, scale, 5, -128, 127)
    assert bits_equal(Q.fake_quantize(x, scale, 5), fq)


def test_subnormal_scale_is_rejected_because_torch_returns_garbage() -> None:
    # 1/1e-39 overflows float32; torch then computes 0 * inf = NaN and stores 127 for 0.0.
    zero = torch.tensor([0.0])
    assert int(torch.quantize_per_tensor(zero, 1e-39, 0, torch.qint8).int_repr()) == 127
    with pytest.raises(ValueError, match="smallest normal float32"):
        Q.quantize(zero, 1e-39, 0)


def test_python_float_scale_is_rounded_to_float32_like_torch() -> None:
    # 0.1 is not a float32; torch rounds it to float32 before taking the reciprocal.
    x = torch.randn(10_000, generator=seeded(15)) * 5
    want = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)
    assert bits_equal(Q.fake_quantize(x, 0.1, 0), want)
    assert bits_equal(Q.fake_quantize(x, torch.tensor(0.1), 0), want)


def test_negative_zero() -> None:
    x = torch.tensor([-0.0, 0.0, -1e-9])
    assert Q.quantize(x, 0.1, 3).tolist() == [3, 3, 3]
    out = Q.fake_quantize(x, 0.1, 3)
    assert not torch.signbit(out).any()  # +0.0 back, as torch returns
    assert bits_equal(out, torch.fake_quantize_per_tensor_affine(x, 0.1, 3, -128, 127))
    assert not torch.signbit(Q.dequantize(torch.tensor([0]), 0.1, 0)).any()


def test_zero_is_exactly_representable() -> None:
    g = seeded(16)
    for bits in range(2, 17):
        for signed in (True, False):
            for symmetric in (False, True):
                x = torch.randn(100, generator=g) * 4 + 1
                s, z = Q.qparams_from_tensor(x, bits, signed=signed, symmetric=symmetric)
                assert Q.fake_quantize(torch.zeros(3), s, z, bits, signed=signed).eq(0).all()


# ------------------------------------------------------------ per-group


@pytest.mark.slow  # importing torchao takes a few seconds
def test_per_group_matches_torchao_quantize_affine() -> None:
    from torchao.quantization import quant_primitives  # pinned in requirements.txt

    g = seeded(17)
    x = torch.randn(6, 32, generator=g) * 2
    s, z = Q.qparams_from_tensor(x, 4, group_size=8)
    assert s.shape == (6, 4)
    want = quant_primitives.quantize_affine(x, [1, 8], s, z.to(torch.int32), torch.int8, -8, 7)
    assert torch.equal(Q.quantize(x, s, z, 4, group_size=8), want.to(torch.int32))


def test_per_group_qparams_are_per_channel_qparams_of_the_groups() -> None:
    x = torch.randn(2, 3, 12, generator=seeded(18))
    s, z = Q.qparams_from_tensor(x, symmetric=True, group_size=4)
    assert s.shape == z.shape == (2, 3, 3)
    obs = PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
    )
    obs(x.reshape(-1, 4))
    want_s, want_z = obs.calculate_qparams()
    assert bits_equal(s.reshape(-1), want_s) and torch.equal(z.reshape(-1), want_z)


# ------------------------------------------------------------ validation

X = torch.randn(4, 6, generator=seeded(19))
S4, Z4 = torch.full((4,), 0.1), torch.zeros(4, dtype=torch.long)

BAD_CALLS = {
    "nan in x": (lambda: Q.quantize(torch.tensor([1.0, float("nan")]), 0.1, 0), "NaN or Inf"),
    "inf in x": (lambda: Q.fake_quantize(torch.tensor([float("inf")]), 0.1, 0), "NaN or Inf"),
    "inf in tensor": (lambda: Q.qparams_from_tensor(torch.tensor([-float("inf")])), "NaN or Inf"),
    "nan min": (lambda: Q.qparams_from_range(float("nan"), 1.0), "min_val contains"),
    "inf max": (lambda: Q.qparams_from_range(0.0, float("inf")), "max_val contains"),
    "min > max": (lambda: Q.qparams_from_range(2.0, 1.0), "must not exceed"),
    "range overflows": (lambda: Q.qparams_from_range(-3e38, 3e38), "too wide"),
    "min/max shapes": (lambda: Q.qparams_from_range(torch.zeros(2), torch.ones(3)), "same shape"),
    "empty x": (lambda: Q.quantize(torch.tensor([]), 0.1, 0), "empty"),
    "empty tensor": (lambda: Q.qparams_from_tensor(torch.zeros(0, 3)), "empty"),
    "bits 1": (lambda: Q.quantize(X, 0.1, 0, 1), "bits must be"),
    "bits 17": (lambda: Q.qparams_from_tensor(X, 17), "bits must be"),
    "zero scale": (lambda: Q.quantize(X, 0.0, 0), "positive"),
    "negative scale": (lambda: Q.dequantize(torch.tensor([1]), -0.1, 0), "positive"),
    "inf scale": (lambda: Q.quantize(X, float("inf"), 0), "finite"),
    "nan scale": (lambda: Q.fake_quantize(X, float("nan"), 0), "finite"),
    "scale overflows float32": (lambda: Q.quantize(X, 1e39, 0), "finite"),
    "subnormal scale": (lambda: Q.quantize(X, 1e-40, 0), "smallest normal"),
    "zero point above": (lambda: Q.quantize(X, 0.1, 128), r"\[-128, 127\]"),
    "zero point below": (lambda: Q.quantize(X, 0.1, -1, signed=False), r"\[0, 255\]"),
    "narrow zero point": (lambda: Q.quantize(X, 0.1, -128, narrow_range=True), r"\[-127, 127\]"),
    "float zero point": (lambda: Q.quantize(X, 0.1, 0.5), "integers"),
    "per-tensor with vectors": (lambda: Q.quantize(X, S4, Z4), "one scale"),
    "axis too big": (lambda: Q.quantize(X, S4, Z4, axis=2), "axis 2 is out of range"),
    "axis too negative": (lambda: Q.quantize(X, S4, Z4, axis=-3), "axis -3 is out of range"),
    "axis of a scalar": (lambda: Q.quantize(torch.tensor(1.0), S4, Z4, axis=0), "out of range"),
    "scale shape": (lambda: Q.quantize(X, S4, Z4, axis=1), r"scale must have shape \(6,\)"),
    "zero point shape": (
        lambda: Q.quantize(X, S4, torch.zeros(3, dtype=torch.long), axis=0),
        r"zero_point must have shape \(4,\)",
    ),
    "dequantize channel count": (
        lambda: Q.dequantize(torch.zeros(4, 6, dtype=torch.int32), S4, Z4, axis=1),
        "must have shape",
    ),
    "group does not divide": (lambda: Q.qparams_from_tensor(X, group_size=4), "does not divide"),
    "quantize group does not divide": (
        lambda: Q.quantize(X, S4, Z4, group_size=5),
        "does not divide",
    ),
    "group scale shape": (lambda: Q.quantize(X, S4, Z4, group_size=3), r"shape \(4, 2\)"),
    "zero group size": (lambda: Q.quantize(X, S4, Z4, group_size=0), "positive int"),
    "axis and group": (lambda: Q.qparams_from_tensor(X, axis=0, group_size=2), "not both"),
    "float codes": (lambda: Q.dequantize(torch.tensor([1.5]), 0.1, 0), "q must hold integers"),
    "pack too big": (lambda: Q.pack_bits(torch.tensor([0, 16]), 4), r"\[-8, 15\]"),
    "pack too small": (lambda: Q.pack_bits(torch.tensor([-3]), 2), r"\[-2, 3\]"),
    "pack 1-bit": (lambda: Q.pack_bits(torch.tensor([2]), 1), r"\[-1, 1\]"),
    "pack 8-bit": (lambda: Q.pack_bits(torch.tensor([256]), 8), r"\[-128, 255\]"),
    "pack width": (lambda: Q.pack_bits(torch.tensor([1]), 3), "support bits in"),
    "pack floats": (lambda: Q.pack_bits(torch.tensor([1.0]), 4), "integers"),
    "pack float width": (lambda: Q.pack_bits(torch.tensor([1]), 4.0), "support bits in"),
    "unpack width": (lambda: Q.unpack_bits(torch.zeros(1, dtype=torch.uint8), 16, 1), "bits in"),
    "unpack dtype": (lambda: Q.unpack_bits(torch.zeros(1, dtype=torch.int8), 4, 2), "uint8"),
    "unpack count": (lambda: Q.unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, 5), "3 bytes"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_value_error_saying_what_is_wrong(name: str) -> None:
    call, message = BAD_CALLS[name]
    with pytest.raises(ValueError, match=message):
        call()


def test_nan_message_points_at_the_value() -> None:
    x = torch.zeros(2, 3)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN or Inf value\(s\), the first at index \(1, 2\)"):
        Q.quantize(x, 0.1, 0)


# ------------------------------------------------------------ bit packing


@pytest.mark.parametrize(
    "codes, bits, packed",
    [
        ([1, 2, 3, 4], 4, [0x21, 0x43]),  # first code in the low nibble
        ([1, 2, 3], 4, [0x21, 0x03]),  # odd count: last byte padded with zeros
        ([-1, -8, 7], 4, [0x8F, 0x07]),  # two's complement: -1 = 0xF, -8 = 0x8
        ([0, 1, 2, 3], 2, [0b11100100]),
        ([-2, -1, 0, 1, 1], 2, [0b01001110, 0b01]),
        ([1, 0, 1, 1, 0, 0, 0, 1, 1], 1, [0b10001101, 0b1]),
        ([-128, -1, 0, 127, 255], 8, [0x80, 0xFF, 0x00, 0x7F, 0xFF]),
        ([], 4, []),
    ],
)
def test_pack_bits_layout(codes: list[int], bits: int, packed: list[int]) -> None:
    got = Q.pack_bits(torch.tensor(codes, dtype=torch.int64), bits)
    assert got.dtype == torch.uint8 and got.tolist() == packed


def test_unpack_signed_and_unsigned() -> None:
    packed = torch.tensor([0x8F, 0x07], dtype=torch.uint8)
    assert Q.unpack_bits(packed, 4, 3).tolist() == [-1, -8, 7]
    assert Q.unpack_bits(packed, 4, 3, signed=False).tolist() == [15, 8, 7]
    assert Q.unpack_bits(packed, 4, 4, signed=False).tolist() == [15, 8, 7, 0]
    assert Q.unpack_bits(packed, 4, 3).dtype == torch.int32


def test_pack_8_bits_is_the_int8_memory_layout() -> None:
    q = torch.randint(-128, 128, (1000,), generator=seeded(20), dtype=torch.int8)
    assert torch.equal(Q.pack_bits(q, 8), q.view(torch.uint8))


# ------------------------------------------------------------ properties

bits_st = st.integers(2, 16)
small_bits_st = st.integers(2, 8)


def inward32(value: float, direction: int) -> float:
    """``value`` rounded to a float32 that lies on its ``direction`` side (+1 up, -1 down)."""
    v = np.float32(value)
    if (v - value) * direction < 0:
        v = np.nextafter(v, np.float32(direction * np.inf))
    return float(v)


@st.composite
def representable_case(draw):
    """(x, scale, zero_point, bits, signed, narrow) with every x inside the representable range."""
    bits, signed, narrow = draw(bits_st), draw(st.booleans()), draw(st.booleans())
    qmin, qmax = Q.qrange(bits, signed, narrow)
    scale = float(np.float32(draw(st.floats(1e-6, 1e6))))
    z = draw(st.integers(qmin, qmax))
    lo, hi = inward32((qmin - z) * scale, 1), inward32((qmax - z) * scale, -1)
    x = draw(arrays(np.float32, st.integers(1, 40), elements=st.floats(lo, hi, width=32)))
    return torch.from_numpy(x), scale, z, bits, signed, narrow


@PROPERTY
@given(representable_case())
def test_round_trip_error_is_at_most_half_a_step(case) -> None:
    x, s, z, bits, signed, narrow = case
    back = Q.fake_quantize(x, s, z, bits, signed=signed, narrow_range=narrow)
    # half a step, plus float32 rounding of x * (1/s) and of (q - z) * s
    tol = s / 2 + 4 * EPS32 * (x.abs() + s)
    assert ((back - x).abs() <= tol).all()


@PROPERTY
@given(
    arrays(
        np.float32,
        st.integers(1, 30),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    st.floats(1e-30, 1e30),
    bits_st,
    st.booleans(),
    st.booleans(),
    st.data(),
)
def test_codes_stay_inside_qrange(x, scale, bits, signed, narrow, data) -> None:
    qmin, qmax = Q.qrange(bits, signed, narrow)
    z = data.draw(st.integers(qmin, qmax))
    q = Q.quantize(torch.from_numpy(x), scale, z, bits, signed=signed, narrow_range=narrow)
    assert q.dtype == torch.int32 and (q >= qmin).all() and (q <= qmax).all()


@PROPERTY
@given(
    arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e6, 1e6, width=32)),
    bits_st,
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_min_max_qparams_lose_at_most_half_a_step(x, bits, signed, symmetric, narrow) -> None:
    x = torch.from_numpy(x)
    kw = {"signed": signed, "symmetric": symmetric, "narrow_range": narrow}
    s, z = Q.qparams_from_tensor(x, bits, **kw)
    back = Q.fake_quantize(x, s, z, bits, signed=signed, narrow_range=narrow)
    # rounding at most s/2; the range ends may sit half a step outside the grid
    tol = float(s) * (0.5 + 1e-4) + 4 * EPS32 * x.abs()
    assert ((back - x).abs() <= tol).all()
    assert Q.fake_quantize(torch.zeros(1), s, z, bits, signed=signed, narrow_range=narrow) == 0


@PROPERTY
@given(st.sampled_from([1, 2, 4, 8]), st.booleans(), st.integers(0, 70), st.data())
def test_packing_is_lossless(bits: int, signed: bool, n: int, data) -> None:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = torch.tensor(data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)))
    codes = codes.to(torch.int64)
    packed = Q.pack_bits(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(Q.unpack_bits(packed, bits, n, signed=signed), codes.to(torch.int32))


@st.composite
def channel_case(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    x = draw(arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
    return torch.from_numpy(x), axis, draw(small_bits_st), draw(st.booleans())


@PROPERTY
@given(channel_case(), st.booleans())
def test_per_channel_is_per_tensor_channel_by_channel(case, symmetric: bool) -> None:
    x, axis, bits, signed = case
    kw = {"signed": signed, "symmetric": symmetric}
    s, z = Q.qparams_from_tensor(x, bits, axis=axis, **kw)
    q = Q.quantize(x, s, z, bits, signed=signed, axis=axis)
    fq = Q.fake_quantize(x, s, z, bits, signed=signed, axis=axis)
    for c in range(x.shape[axis]):
        xc = x.select(axis, c)
        sc, zc = Q.qparams_from_tensor(xc, bits, **kw)
        assert bits_equal(sc, s[c]) and int(zc) == int(z[c])
        assert torch.equal(q.select(axis, c), Q.quantize(xc, sc, zc, bits, signed=signed))
        assert bits_equal(fq.select(axis, c), Q.fake_quantize(xc, sc, zc, bits, signed=signed))


@st.composite
def group_case(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    group_size, n_groups = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    shape = (*lead, group_size * n_groups)
    x = draw(arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
    return torch.from_numpy(x), group_size, draw(small_bits_st), draw(st.booleans())


@PROPERTY
@given(group_case(), st.booleans())
def test_per_group_is_per_channel_on_the_reshaped_tensor(case, symmetric: bool) -> None:
    x, g, bits, signed = case
    kw = {"signed": signed, "symmetric": symmetric}
    s, z = Q.qparams_from_tensor(x, bits, group_size=g, **kw)
    assert s.shape == (*x.shape[:-1], x.shape[-1] // g)
    rows = x.reshape(-1, g)  # one row per group
    sr, zr = Q.qparams_from_tensor(rows, bits, axis=0, **kw)
    assert bits_equal(s.reshape(-1), sr) and torch.equal(z.reshape(-1), zr)
    q = Q.quantize(x, s, z, bits, signed=signed, group_size=g)
    qr = Q.quantize(rows, sr, zr, bits, signed=signed, axis=0)
    assert torch.equal(q.reshape(-1, g), qr)
    back = Q.dequantize(q, s, z, group_size=g)
    assert bits_equal(back.reshape(-1, g), Q.dequantize(qr, sr, zr, axis=0))
