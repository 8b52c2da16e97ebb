"""course_lib.kernels against plainly written integer references.

The references here are deliberately different code: Python ints (arbitrary
precision, no overflow), exact fractions, and explicit loops over every output
value on small shapes. The library's vectorised numpy kernels must agree bit for bit.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from course_lib import kernels as K

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
int32s = st.integers(INT32_MIN, INT32_MAX)


# --------------------------------------------------------------------------- references


def ref_round_half_away(v: Fraction) -> int:
    """Round an exact rational, ties away from zero."""
    sign = -1 if v < 0 else 1
    return sign * math.floor(abs(v) + Fraction(1, 2))


def ref_high_mul(a: int, b: int) -> int:
    """gemmlowp's SaturatingRoundingDoublingHighMul, line by line, with Python ints."""
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    num = ab + nudge
    quotient = abs(num) // 2**31  # C's integer division truncates toward zero
    return quotient if num >= 0 else -quotient


def ref_divide_by_pot(x: int, e: int) -> int:
    return ref_round_half_away(Fraction(x, 2**e))


def ref_quantize_multiplier(m: float) -> tuple[int, int]:
    """Search the shift with exact rationals: M0 = round_half_away(M·2^(31-shift)) ∈ [2^30, 2^31)."""
    exact = Fraction(m)
    shift = 0
    while exact * Fraction(2) ** (31 - shift) >= 2**31:
        shift += 1
    while exact * Fraction(2) ** (31 - shift) < 2**30:
        shift -= 1
    m0 = ref_round_half_away(exact * Fraction(2) ** (31 - shift))
    if m0 == 2**31:
        m0, shift = 2**30, shift + 1
    if shift < -31:
        return 0, 0
    return m0, shift


def ref_multiply(x: int, m0: int, shift: int) -> int:
    left, right = max(shift, 0), max(-shift, 0)
    x = min(max(x * 2**left, INT32_MIN), INT32_MAX)
    return ref_divide_by_pot(ref_high_mul(x, m0), right)


def ref_requant(acc: int, m0: int, shift: int, zp: int, lo: int, hi: int) -> int:
    return min(max(ref_multiply(acc, m0, shift) + zp, lo), hi)


def ref_conv2d(x, w, b, zp_in, m0, shift, zp_out, stride, padding, groups, lo, hi):
    """Seven nested loops over Python ints: the textbook definition of a grouped convolution."""
    n_, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n_, o, ho, wo), dtype=np.int64)
    og = o // groups
    for n in range(n_):
        for oc in range(o):
            g = oc // og
            for i in range(ho):
                for j in range(wo):
                    acc = int(b[oc]) if b is not None else 0
                    for ci in range(cg):
                        for u in range(kh):
                            for v in range(kw):
                                r, s = i * stride + u - padding, j * stride + v - padding
                                if 0 <= r < h and 0 <= s < wd:
                                    xv = int(x[n, g * cg + ci, r, s]) - zp_in
                                else:
                                    xv = 0  # padding is real zero
                                acc += xv * int(w[oc, ci, u, v])
                    out[n, oc, i, j] = ref_requant(acc, int(m0[oc]), int(shift[oc]), zp_out, lo, hi)
    return out.astype(np.int8)


def ref_linear(x, w, b, zp_in, m0, shift, zp_out, lo, hi):
    out = np.zeros((x.shape[0], w.shape[0]), dtype=np.int64)
    for n in range(x.shape[0]):
        for o in range(w.shape[0]):
            acc = int(b[o]) if b is not None else 0
            for k in range(x.shape[1]):
                acc += (int(x[n, k]) - zp_in) * int(w[o, k])
            out[n, o] = ref_requant(acc, int(m0[o]), int(shift[o]), zp_out, lo, hi)
    return out.astype(np.int8)


# --------------------------------------------------------------------------- fixed point: hand-worked


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (2**30, 2**30, 2**29),  # 2^60 / 2^31
        (1, 2**30, 1),  # 0.5 → 1 (tie up)
        (-1, 2**30, 0),  # -0.5 → 0 (tie toward +inf, not away from zero)
        (3, 2**30, 2),  # 1.5 → 2
        (-3, 2**30, -1),  # -1.5 → -1
        (5, 2**29, 1),  # 1.25 → 1
        (-5, 2**29, -1),  # -1.25 → -1
        (-7, 2**29, -2),  # -1.75 → -2
        (INT32_MIN, INT32_MIN, INT32_MAX),  # 2^62 / 2^31 = 2^31 does not fit: saturate
        (INT32_MIN, INT32_MAX, -INT32_MAX),  # -2^31 · (2^31 - 1) / 2^31, exact
        (INT32_MAX, INT32_MAX, INT32_MAX - 1),  # (2^31-1)^2 / 2^31 = 2^31 - 2 + 2^-31
        (0, INT32_MIN, 0),
    ],
)
def test_high_mul_hand_worked(a: int, b: int, expected: int) -> None:
    got = K.saturating_rounding_doubling_high_mul(a, b)
    assert got == expected
    assert got.dtype == np.int32


@pytest.mark.parametrize(
    ("x", "e", "expected"),
    [
        (5, 1, 3), (-5, 1, -3),  # ±2.5 → ±3: ties away from zero
        (3, 1, 2), (-3, 1, -2),  # ±1.5
        (7, 2, 2), (-7, 2, -2),  # ±1.75
        (6, 2, 2), (-6, 2, -2),  # ±1.5
        (5, 2, 1), (-5, 2, -1),  # ±1.25
        (9, 0, 9), (-9, 0, -9),  # exponent 0: unchanged
        (INT32_MIN, 31, -1), (INT32_MAX, 31, 1), (-(2**30), 31, -1), (2**30 - 1, 31, 0),
    ],
)
def test_divide_by_pot_hand_worked(x: int, e: int, expected: int) -> None:
    got = K.rounding_divide_by_pot(x, e)
    assert got == expected
    assert got.dtype == np.int32


def test_double_rounding_is_visible() -> None:
    # M = 0.25 = 2^30 · 2^(-1-31): the high-mul rounds 1·2^30/2^31 = 0.5 up to 1, then
    # the divide by 2 rounds 0.5 away from zero to 1 again, whereas round(0.25) = 0.
    m0, shift = K.quantize_multiplier(0.25)
    assert (m0, shift) == (2**30, -1)
    assert K.multiply_by_quantized_multiplier(1, m0, shift) == 1
    assert K.multiply_by_quantized_multiplier(-1, m0, shift) == 0  # -0.25: high-mul gives 0
    assert K.multiply_by_quantized_multiplier(-2, m0, shift) == -1  # -0.5: exact high-mul, divide ties away


def test_single_rounding_removes_the_double_rounding() -> None:
    # acc·M0·2^(shift-31) = 23.49901...: the high-mul gives round(23.499·2^8) = 6016 = 23.5·2^8,
    # which the divide rounds away from zero to 24; one rounding gives 23.
    x, m0, shift = 11675, 1106528477, -8
    assert abs(float(Fraction(x * m0, 2**39)) - 23.49901) < 1e-5
    assert K.multiply_by_quantized_multiplier(x, m0, shift) == 24
    assert K.multiply_by_quantized_multiplier_single_rounding(x, m0, shift) == 23
    m0_q, shift_q = K.quantize_multiplier(0.25)
    assert K.multiply_by_quantized_multiplier_single_rounding(1, m0_q, shift_q) == 0  # 0.25 → 0
    assert K.multiply_by_quantized_multiplier_single_rounding(2, m0_q, shift_q) == 1  # 0.5 → 1 (tie up)
    assert K.multiply_by_quantized_multiplier_single_rounding(-2, m0_q, shift_q) == 0  # -0.5 → 0 (tie up)


@settings(max_examples=300)
@given(int32s, st.integers(0, INT32_MAX), st.integers(-31, 0))
def test_single_rounding_is_round_half_up_of_the_exact_product(x: int, m0: int, shift: int) -> None:
    exact = Fraction(x * m0, 2 ** (31 - shift))
    assert K.multiply_by_quantized_multiplier_single_rounding(x, m0, shift) == math.floor(exact + Fraction(1, 2))


def test_fixed_point_broadcasts_per_channel() -> None:
    x = np.array([[100, -100], [7, -7]], dtype=np.int32)
    m0 = np.array([2**30, 3 * 2**28], dtype=np.int32)  # 0.5 and 0.375 (with shift 0)
    shift = np.array([0, -2], dtype=np.int32)  # → 0.5 and 0.09375
    got = K.multiply_by_quantized_multiplier(x, m0, shift)
    expected = [[ref_multiply(int(x[i, j]), int(m0[j]), int(shift[j])) for j in range(2)] for i in range(2)]
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [[50, -9], [4, -1]])  # 0.5·7 = 3.5 → 4; -9.375 → -9


# --------------------------------------------------------------------------- fixed point: properties


@settings(max_examples=400)
@given(int32s, int32s)
def test_high_mul_matches_exact_rounding(a: int, b: int) -> None:
    assert K.saturating_rounding_doubling_high_mul(a, b) == ref_high_mul(a, b)


@settings(max_examples=400)
@given(int32s, st.integers(0, 31))
def test_divide_by_pot_matches_exact_rounding(x: int, e: int) -> None:
    assert K.rounding_divide_by_pot(x, e) == ref_divide_by_pot(x, e)


@settings(max_examples=300)
@given(int32s, st.floats(min_value=1e-9, max_value=0.999, allow_nan=False))
def test_multiply_is_within_one_of_exact(x: int, m: float) -> None:
    m0, shift = K.quantize_multiplier(m)
    got = int(K.multiply_by_quantized_multiplier(x, m0, shift))
    assert got == ref_multiply(x, m0, shift)
    # Two roundings (high-mul, then divide) and a 31-bit M0: at most one step from round(x·M).
    assert abs(got - ref_round_half_away(Fraction(x) * Fraction(m))) <= 1


def test_multiply_vectorised_matches_scalar_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(INT32_MIN, INT32_MAX, size=2000, endpoint=True, dtype=np.int64).astype(np.int32)
    x[:4] = [INT32_MIN, INT32_MAX, 0, -1]
    m0 = rng.integers(2**30, 2**31 - 1, size=2000).astype(np.int32)
    shift = rng.integers(-31, 4, size=2000).astype(np.int32)
    got = K.multiply_by_quantized_multiplier(x, m0, shift)
    expected = [ref_multiply(int(a), int(b), int(c)) for a, b, c in zip(x, m0, shift, strict=True)]
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- quantize_multiplier


@pytest.mark.parametrize(
    ("m", "expected"),
    [
        (0.5, (2**30, 0)),  # exactly a power of two: M0 = 2^30
        (0.25, (2**30, -1)),
        (1.0, (2**30, 1)),
        (2.0, (2**30, 2)),
        (0.75, (3 * 2**29, 0)),
        (1 - 2**-31, (2**31 - 1, 0)),  # the largest M0
        (1 - 2**-32, (2**30, 1)),  # q·2^31 = 2^31 - 0.5 rounds up to 2^31: halve, shift + 1
        (1 - 2**-40, (2**30, 1)),
        (2**-31, (2**30, -30)),
        (2**-32, (2**30, -31)),  # the smallest non-zero multiplier
        (2**-33, (0, 0)),  # below 2^-32: shift < -31, TFLite returns a zero multiplier
        (1e-20, (0, 0)),
    ],
)
def test_quantize_multiplier_edges(m: float, expected: tuple[int, int]) -> None:
    assert K.quantize_multiplier(m) == expected
    assert ref_quantize_multiplier(m) == expected


@settings(max_examples=300)
@given(st.floats(min_value=2.0**-40, max_value=2.0**20, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_property(m: float) -> None:
    m0, shift = K.quantize_multiplier(m)
    assert (m0, shift) == ref_quantize_multiplier(m)
    if m0:
        assert 2**30 <= m0 < 2**31
        # M0·2^(shift-31) is M rounded to 31 bits: error at most half a unit of M0
        err = abs(Fraction(m0) * Fraction(2) ** (shift - 31) - Fraction(m))
        assert err <= Fraction(2) ** (shift - 32)


def test_quantize_multipliers_per_channel() -> None:
    ms = np.array([0.5, 0.3, 1e-3, 1.7])
    m0, shift = K.quantize_multipliers(ms)
    assert m0.dtype == np.int32 and shift.dtype == np.int32
    assert list(zip(m0.tolist(), shift.tolist(), strict=True)) == [ref_quantize_multiplier(m) for m in ms]


@pytest.mark.parametrize("bad", [0.0, -0.5, -1, float("nan"), float("inf"), 2.0**31, "0.5", True, None])
def test_quantize_multiplier_rejects_bad_input(bad) -> None:
    with pytest.raises(ValueError):
        K.quantize_multiplier(bad)


def test_quantize_multipliers_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        K.quantize_multipliers(np.array([0.5, 0.0]))
    with pytest.raises(ValueError):
        K.quantize_multipliers(np.ones((2, 2)))


def test_fixed_point_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        K.saturating_rounding_doubling_high_mul(1.5, 2)
    with pytest.raises(ValueError):
        K.saturating_rounding_doubling_high_mul(2**31, 1)  # outside int32
    with pytest.raises(ValueError):
        K.rounding_divide_by_pot(5, 32)
    with pytest.raises(ValueError):
        K.rounding_divide_by_pot(5, -1)
    with pytest.raises(ValueError):
        K.rounding_divide_by_pot(np.array([1.0]), 1)
    with pytest.raises(ValueError):
        K.multiply_by_quantized_multiplier(5, -(2**30), 0)
    with pytest.raises(ValueError):
        K.multiply_by_quantized_multiplier(5, 2**30, 32)
    with pytest.raises(ValueError):
        K.requantize(np.zeros(3, np.int64), 2**30, 0, 0)  # accumulator must be int32
    with pytest.raises(ValueError):
        K.requantize(np.zeros(3, np.int32), 2**30, 0, 0, activation_min=10, activation_max=5)
    with pytest.raises(ValueError):
        K.requantize(np.zeros(3, np.int32), 2**30, 0, 200)  # zero point outside int8


# --------------------------------------------------------------------------- quantize (TFLite rule)


def test_quantize_tflite_rounds_ties_away_from_zero_unlike_torch() -> None:
    x = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 0.49999997, 126.5, -300.0], dtype=np.float32)
    got = K.quantize_tflite(x, 1.0, 0)
    np.testing.assert_array_equal(got, [1, -1, 2, 3, -3, 0, 127, -128])
    assert got.dtype == np.int8
    torch_q = torch.quantize_per_tensor(torch.from_numpy(x), 1.0, 0, torch.qint8).int_repr().numpy()
    np.testing.assert_array_equal(torch_q, [0, 0, 2, 2, -2, 0, 126, -128])  # ties to even


@settings(max_examples=300)
@given(
    st.floats(-1e3, 1e3, allow_nan=False, width=32),
    st.floats(2.0**-10, 10.0, width=32),
    st.integers(-128, 127),
)
def test_quantize_tflite_matches_exact_rounding(x: float, scale: float, zp: int) -> None:
    quotient = np.float32(x) / np.float32(scale)  # the float32 division TFLite does
    expected = min(max(ref_round_half_away(Fraction(float(quotient))) + zp, -128), 127)
    assert int(K.quantize_tflite(np.array([x], np.float32), scale, zp)[0]) == expected


def test_quantize_tflite_per_channel_and_bias() -> None:
    w = np.array([[0.375, -31.625], [0.03, -0.5]], dtype=np.float32)
    q = K.quantize_tflite(w, np.array([0.25, 2**-10], np.float32), np.zeros(2, np.int64),
                          qmin=-127, qmax=127, axis=0)
    np.testing.assert_array_equal(q, [[2, -127], [31, -127]])  # 1.5 → 2, -126.5 → -127, 30.72 → 31, clamp
    b = K.quantize_bias(np.array([0.25, -0.25], np.float32), 0.5, np.array([0.25, 0.1], np.float32))
    np.testing.assert_array_equal(b, [2, -5])  # 0.25/0.125 = 2; -0.25/0.05 = -5
    assert b.dtype == np.int32


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        K.quantize_tflite(np.array([np.nan], np.float32), 1.0, 0)
    with pytest.raises(ValueError):
        K.quantize_tflite(np.array([1.0], np.float32), 0.0, 0)
    with pytest.raises(ValueError):
        K.quantize_tflite(np.array([1], np.int32), 1.0, 0)
    with pytest.raises(ValueError):
        K.quantize_tflite(np.ones((2, 3), np.float32), np.ones(3, np.float32), np.zeros(3, np.int64), axis=0)
    with pytest.raises(ValueError):
        K.quantize_bias(np.ones(3, np.float32), 0.1, np.ones(2, np.float32))


def test_fused_activation_range() -> None:
    assert K.fused_activation_range(None, 0.1, -10) == (-128, 127)
    assert K.fused_activation_range("relu", 0.1, -10) == (-10, 127)
    assert K.fused_activation_range("relu6", 0.1, -10) == (-10, 50)  # -10 + 6/0.1
    assert K.fused_activation_range("relu6", 0.01, -128) == (-128, 127)  # 6/0.01 saturates
    with pytest.raises(ValueError):
        K.fused_activation_range("gelu", 0.1, 0)


# --------------------------------------------------------------------------- accumulation


def test_float64_matmul_is_exact_where_float32_is_not() -> None:
    # 1,001 products of 255·127: the sum 32,417,385 is odd and above 2^24, so no float32 holds it
    a = np.full((1, 1001), 255, dtype=np.int16)
    b = np.full((1001, 1), 127, dtype=np.int8)
    exact = 1001 * 255 * 127
    assert exact > 2**24 and exact % 2 == 1
    assert K.exact_int_matmul(a, b)[0, 0] == exact
    assert int((a.astype(np.float32) @ b.astype(np.float32))[0, 0]) != exact


def test_exact_matmul_falls_back_beyond_2_to_53() -> None:
    a = np.full((2, 3), 2**40 + 1, dtype=np.int64)
    b = np.full((3, 2), 2**12 + 1, dtype=np.int64)  # bound 3·2^52·... > 2^53
    assert (3 * (2**40 + 1) * (2**12 + 1)) > 2**53
    got = K.exact_int_matmul(a, b)
    assert got[0, 0] == 3 * (2**40 + 1) * (2**12 + 1)  # float64 would lose the low bits
    with pytest.raises(ValueError):
        K.exact_int_matmul(np.ones((2, 2)), np.ones((2, 2), np.int64))


def test_int32_accumulator_overflow_is_an_error() -> None:
    k = 70_000  # 70,000 · 255 · 127 > 2^31
    x = np.full((1, k), 127, np.int8)
    w = np.full((1, k), 127, np.int8)
    with pytest.raises(ValueError, match="overflow"):
        K.linear_accumulator(x, w, None, input_zero_point=-128)


# --------------------------------------------------------------------------- kernels vs loops


def _random_layer(rng, out_channels: int):
    m = 10 ** rng.uniform(-5, -1, size=out_channels)  # outputs spread over int8, some saturate
    m0, shift = K.quantize_multipliers(m)
    zp_in, zp_out = (int(v) for v in rng.integers(-128, 128, size=2))
    return m0, shift, zp_in, zp_out


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 3))
    o = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    stride = draw(st.integers(1, 3))
    h = draw(st.integers(max(1, k - 2 * padding), 7))
    w = draw(st.integers(max(1, k - 2 * padding), 7))
    n = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, c, o, k, h, w, stride, padding, groups, seed


def _check_conv(n, c, o, k, h, w, stride, padding, groups, seed, activation_bounds=(-128, 127)):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(n, c, h, w)).astype(np.int8)
    wt = rng.integers(-127, 128, size=(o, c // groups, k, k)).astype(np.int8)
    b = rng.integers(-5000, 5000, size=o).astype(np.int32)
    m0, shift, zp_in, zp_out = _random_layer(rng, o)
    lo, hi = activation_bounds
    got = K.int8_conv2d(x, wt, b, input_zero_point=zp_in, output_multiplier=m0, output_shift=shift,
                        output_zero_point=zp_out, stride=stride, padding=padding, groups=groups,
                        activation_min=lo, activation_max=hi)
    expected = ref_conv2d(x, wt, b, zp_in, m0, shift, zp_out, stride, padding, groups, lo, hi)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, expected)
    # The accumulator on its own against torch's float64 convolution (exact for these sizes)
    acc = K.conv2d_accumulator(x, wt, b, zp_in, stride=stride, padding=padding, groups=groups)
    xt = torch.from_numpy(x.astype(np.float64) - zp_in)
    tacc = torch.nn.functional.conv2d(xt, torch.from_numpy(wt.astype(np.float64)), torch.from_numpy(b.astype(np.float64)),
                                      stride=stride, padding=padding, groups=groups)
    np.testing.assert_array_equal(acc, tacc.numpy().astype(np.int64))


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_conv2d_bit_exact_random_shapes(case) -> None:
    _check_conv(*case)


@pytest.mark.parametrize(
    "case",
    [
        (2, 4, 4, 3, 6, 6, 1, 1, 4, 1),  # depthwise 3×3, padding 1
        (1, 3, 6, 3, 7, 5, 2, 1, 3, 2),  # depthwise with channel multiplier 2, stride 2
        (2, 6, 4, 3, 7, 7, 2, 0, 2, 3),  # grouped, stride 2, no padding
        (1, 2, 5, 1, 4, 4, 1, 0, 1, 4),  # pointwise 1×1
        (1, 1, 3, 3, 5, 5, 3, 2, 1, 5),  # stride 3 with padding 2
    ],
)
def test_conv2d_bit_exact_named_cases(case) -> None:
    _check_conv(*case)


def test_conv2d_fused_relu_clamp() -> None:
    _check_conv(2, 3, 4, 3, 5, 5, 1, 1, 1, 7, activation_bounds=(-20, 127))  # ReLU with Z_out = -20
    _check_conv(2, 3, 4, 3, 5, 5, 1, 1, 1, 8, activation_bounds=(-20, 40))  # ReLU6-like


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 20), st.integers(1, 6), st.booleans(), st.integers(0, 2**32 - 1))
def test_linear_bit_exact(n: int, k: int, o: int, with_bias: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(n, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(o, k)).astype(np.int8)
    b = rng.integers(-(2**20), 2**20, size=o).astype(np.int32) if with_bias else None
    m0, shift, zp_in, zp_out = _random_layer(rng, o)
    got = K.int8_linear(x, w, b, input_zero_point=zp_in, output_multiplier=m0, output_shift=shift,
                        output_zero_point=zp_out)
    np.testing.assert_array_equal(got, ref_linear(x, w, b, zp_in, m0, shift, zp_out, -128, 127))
    assert got.dtype == np.int8


def test_linear_per_tensor_multiplier() -> None:
    rng = np.random.default_rng(11)
    x = rng.integers(-128, 128, size=(3, 9)).astype(np.int8)
    w = rng.integers(-127, 128, size=(4, 9)).astype(np.int8)
    m0, shift = K.quantize_multiplier(0.0123)
    got = K.int8_linear(x, w, None, input_zero_point=5, output_multiplier=m0, output_shift=shift,
                        output_zero_point=-3)
    expected = ref_linear(x, w, None, 5, [m0] * 4, [shift] * 4, -3, -128, 127)
    np.testing.assert_array_equal(got, expected)


def test_max_pool_commutes_with_dequantize() -> None:
    rng = np.random.default_rng(3)
    q = rng.integers(-128, 128, size=(2, 3, 6, 6)).astype(np.int8)
    scale, zp = 0.037, -11
    pooled = K.int8_max_pool2d(q, 2)
    real = torch.from_numpy((q.astype(np.float64) - zp) * scale)
    np.testing.assert_allclose((pooled.astype(np.float64) - zp) * scale,
                               torch.nn.functional.max_pool2d(real, 2).numpy(), rtol=0, atol=1e-12)
    assert pooled.dtype == np.int8


def test_kernels_reject_bad_input() -> None:
    x = np.zeros((1, 2, 4, 4), np.int8)
    w = np.zeros((2, 2, 3, 3), np.int8)
    common = dict(input_zero_point=0, output_multiplier=2**30, output_shift=0, output_zero_point=0)
    with pytest.raises(ValueError):
        K.int8_conv2d(x.astype(np.int32), w, None, **common)  # activations must be int8
    with pytest.raises(ValueError):
        K.int8_conv2d(x, w.astype(np.float32), None, **common)
    with pytest.raises(ValueError):
        K.int8_conv2d(x, np.full((2, 2, 3, 3), -128, np.int8), None, **common)  # -128 not a weight
    with pytest.raises(ValueError):
        K.int8_conv2d(x, w, np.zeros(3, np.int32), **common)  # bias length
    with pytest.raises(ValueError):
        K.int8_conv2d(x, w, np.zeros(2, np.int64), **common)  # bias dtype
    with pytest.raises(ValueError):
        K.int8_conv2d(x, w, None, groups=2, **common)  # weight has 2 in-channels per group, x gives 1
    with pytest.raises(ValueError):
        K.int8_conv2d(x, np.zeros((3, 1, 3, 3), np.int8), None, groups=2, **common)  # 3 outputs / 2 groups
    with pytest.raises(ValueError):
        K.int8_conv2d(x[0], w, None, **common)  # 3-D input
    with pytest.raises(ValueError):
        K.int8_conv2d(x, np.zeros((2, 2, 5, 5), np.int8), None, **common)  # kernel larger than input
    with pytest.raises(ValueError):
        K.int8_conv2d(x, w, None, stride=0, **common)
    with pytest.raises(ValueError):
        K.int8_linear(np.zeros((2, 3), np.int8), np.zeros((4, 5), np.int8), None,
                      input_zero_point=0, output_multiplier=2**30, output_shift=0, output_zero_point=0)
    with pytest.raises(ValueError):
        K.int8_linear(np.zeros((2, 3), np.int8), np.zeros((4, 3), np.int8), None,
                      input_zero_point=300, output_multiplier=2**30, output_shift=0, output_zero_point=0)


# --------------------------------------------------------------------------- BN folding, the integer TinyCNN


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batchnorm_matches_torch(with_bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=with_bias)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    weight, bias = K.fold_batchnorm(conv, bn)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = bn(conv(x))
        got = torch.nn.functional.conv2d(x, weight, bias, padding=1)
        ref = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight, ref.weight.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        K.fold_batchnorm(conv, nn.BatchNorm2d(4))


@pytest.fixture(scope="module")
def integer_tinycnn():
    from course_lib import data, models

    try:
        model = models.load_pretrained("tinycnn")
    except FileNotFoundError:
        pytest.skip("data/tinycnn.pt is not built yet")
    calib, _ = data.get_split("calib")
    test_x, test_y = data.get_split("test")
    return model, K.IntegerTinyCNN.from_float(model, calib), test_x, test_y


@pytest.mark.slow
def test_integer_tinycnn_agrees_with_fake_quant(integer_tinycnn) -> None:
    model, net, test_x, test_y = integer_tinycnn
    logits_q = net(test_x)
    assert logits_q.dtype == np.int8 and logits_q.shape == (len(test_y), 10)
    fq = net.fake_quant_forward(test_x).numpy()
    fq_q = np.rint(fq / net.fc.output_scale).astype(np.int64) + net.fc.output_zero_point
    # Within one output step on every logit of every test image, and the same accuracy
    assert np.abs(logits_q.astype(np.int64) - fq_q).max() <= 1
    int_acc = (logits_q.argmax(1) == test_y.numpy()).mean()
    fq_acc = (fq.argmax(1) == test_y.numpy()).mean()
    assert int_acc == fq_acc
    with torch.no_grad():
        float_acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    assert abs(int_acc - float_acc) <= 0.01  # 8-bit PTQ of a small CNN costs well under a point


def test_integer_layers_are_integer(integer_tinycnn) -> None:
    _, net, _, _ = integer_tinycnn
    for layer in (net.conv1, net.conv2, net.fc):
        assert layer.weight_q.dtype == np.int8 and layer.weight_q.min() >= -127
        assert layer.bias_q.dtype == np.int32
        assert layer.output_multiplier.dtype == np.int32
        assert ((layer.output_multiplier >= 2**30) | (layer.output_multiplier == 0)).all()
        # M0·2^(shift-31) reproduces S_in·S_w/S_out to 31 significant bits
        approx = layer.output_multiplier * 2.0 ** (layer.output_shift.astype(np.float64) - 31)
        np.testing.assert_allclose(approx, layer.real_multiplier, rtol=2**-30)
    assert net.conv1.activation_min == net.conv1.output_zero_point  # ReLU is a clamp at Z


# --------------------------------------------------------------------------- PyTorch's x86 kernels

needs_x86 = pytest.mark.skipif(
    "x86" not in torch.backends.quantized.supported_engines,
    reason="PyTorch's x86 (fbgemm) quantized engine is not available on this CPU",
)


def _random_float_layer(rng, kind: str, stride: int = 1):
    if kind == "conv":
        weight = torch.from_numpy(rng.normal(0, 0.2, size=(6, 4, 3, 3)).astype(np.float32))
    else:
        weight = torch.from_numpy(rng.normal(0, 0.2, size=(5, 24)).astype(np.float32))
    bias = torch.from_numpy(rng.normal(0, 0.5, size=weight.shape[0]).astype(np.float32))
    return K.quantize_layer(weight, bias, input_scale=0.02, input_zero_point=-100, output_scale=0.05,
                            output_zero_point=-7, activation="relu", stride=stride,
                            padding=1 if kind == "conv" else 0)


@needs_x86
@pytest.mark.parametrize(("kind", "stride"), [("conv", 1), ("conv", 2), ("linear", 1)])
def test_fbgemm_emulation_matches_pytorch(kind: str, stride: int) -> None:
    torch.backends.quantized.engine = "x86"
    rng = np.random.default_rng(21)
    layer = _random_float_layer(rng, kind, stride)
    module = K.to_torch_quantized(layer, relu=True)
    shape = (3, 4, 9, 9) if kind == "conv" else (40, 24)
    # 7-bit inputs (codes ≤ -1, i.e. quint8 ≤ 127): no int16 pair can saturate, on any x86 CPU
    x7 = rng.integers(-128, 0, size=shape).astype(np.int8)
    with torch.no_grad():
        got = K.quint8_to_int8(module(K.int8_to_quint8(x7, layer.input_scale, layer.input_zero_point)))
    emulated, saturated = K.fbgemm_emulation(layer, x7)
    assert saturated == 0
    np.testing.assert_array_equal(got, emulated)
    # ... and PyTorch rounds differently from TFLite only by one step
    assert np.abs(got.astype(np.int64) - layer(x7)).max() <= 1
    # Full 8-bit inputs: AVX2 saturates pair sums in int16 (VNNI CPUs accumulate in int32)
    x8 = rng.integers(-128, 128, size=shape).astype(np.int8)
    with torch.no_grad():
        got = K.quint8_to_int8(module(K.int8_to_quint8(x8, layer.input_scale, layer.input_zero_point)))
    saturating, saturated = K.fbgemm_emulation(layer, x8)
    exact, _ = K.fbgemm_emulation(layer, x8, saturate=False)
    assert saturated > 0
    assert np.array_equal(got, saturating) or np.array_equal(got, exact)


def test_to_torch_quantized_rejects_a_clamp_it_cannot_express() -> None:
    layer = _random_float_layer(np.random.default_rng(0), "linear")
    relu6 = K.quantize_layer(torch.ones(2, 3), None, input_scale=0.1, input_zero_point=0,
                             output_scale=0.1, output_zero_point=-100, activation="relu6")
    with pytest.raises(ValueError):
        K.to_torch_quantized(relu6, relu=True)
    with pytest.raises(ValueError):
        K.to_torch_quantized(layer, relu=False)  # the layer clamps at its zero point (ReLU)
    with pytest.raises(ValueError):
        K.quint8_to_int8(torch.zeros(3))


@needs_x86
@pytest.mark.slow
def test_torch_quantized_tinycnn_within_one_step_at_7_bits(integer_tinycnn) -> None:
    torch.backends.quantized.engine = "x86"
    model, _, test_x, _ = integer_tinycnn
    from course_lib import data

    calib, _ = data.get_split("calib")
    net7 = K.IntegerTinyCNN.from_float(model, calib, activation_bits=7)
    x = test_x[:200]
    ours = net7(x)
    with torch.no_grad():
        q = K.int8_to_quint8(net7.quantize_input(x), net7.input_scale, net7.input_zero_point)
        theirs = K.quint8_to_int8(K.torch_quantized_tinycnn(net7)(q))
    assert np.abs(ours.astype(np.int64) - theirs).max() <= 1
    assert net7.conv1.input_scale > 1.9 * K.IntegerTinyCNN.from_float(model, calib).conv1.input_scale


@needs_x86
@pytest.mark.slow
def test_fbgemm_tinycnn_emulation_is_pytorch_on_this_cpu(integer_tinycnn) -> None:
    # On every x86 CPU PyTorch's fbgemm equals one of the two emulated paths, and at 8 bits
    # the AVX2 path saturates conv1's pair sums: many logits move, by several steps.
    torch.backends.quantized.engine = "x86"
    _, net, test_x, _ = integer_tinycnn
    x = test_x[:200]
    with torch.no_grad():
        q = K.int8_to_quint8(net.quantize_input(x), net.input_scale, net.input_zero_point)
        theirs = K.quint8_to_int8(K.torch_quantized_tinycnn(net)(q))
    avx2 = K.fbgemm_tinycnn_emulation(net, x, batch_size=64)
    vnni = K.fbgemm_tinycnn_emulation(net, x, saturate=False)
    assert np.array_equal(theirs, avx2) or np.array_equal(theirs, vnni)
    assert np.abs(vnni.astype(np.int64) - net(x)).max() <= 1  # without saturation: rounding only
    moved = np.abs(avx2.astype(np.int64) - net(x))
    assert moved.max() >= 5 and (moved > 0).mean() > 0.5


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_integer_layer_is_the_kernel(kind: str) -> None:
    rng = np.random.default_rng(5)
    layer = _random_float_layer(rng, kind, stride=2)
    x = rng.integers(-128, 128, size=(2, 4, 7, 7) if kind == "conv" else (3, 24)).astype(np.int8)
    common = dict(input_zero_point=layer.input_zero_point, output_multiplier=layer.output_multiplier,
                  output_shift=layer.output_shift, output_zero_point=layer.output_zero_point,
                  activation_min=layer.activation_min, activation_max=layer.activation_max)
    if kind == "conv":
        expected = K.int8_conv2d(x, layer.weight_q, layer.bias_q, stride=2, padding=1, **common)
    else:
        expected = K.int8_linear(x, layer.weight_q, layer.bias_q, **common)
    np.testing.assert_array_equal(layer(x), expected)
    single = layer(x, single_rounding=True)
    assert np.abs(single.astype(np.int64) - expected).max() <= 1


@needs_x86
@pytest.mark.slow
def test_real_fbgemm_avx2_kernel_is_the_emulation(integer_tinycnn) -> None:
    # FBGEMM_ENABLE_INSTRUCTIONS=AVX2 makes fbgemm run its AVX2 kernels on any x86 CPU (VNNI or not):
    # in a fresh process, engine fbgemm then equals the saturating emulation bit for bit.
    _, net, test_x, _ = integer_tinycnn
    x = test_x[:200]
    real = K.torch_quantized_logits_in_subprocess(net, net.quantize_input(x), engine="fbgemm", instructions="AVX2")
    assert real.dtype == np.int8 and real.shape == (200, 10)
    np.testing.assert_array_equal(real, K.fbgemm_tinycnn_emulation(net, x))


def test_torch_quantized_logits_in_subprocess_rejects_bad_input(integer_tinycnn) -> None:
    _, net, test_x, _ = integer_tinycnn
    with pytest.raises(ValueError):
        K.torch_quantized_logits_in_subprocess(net, net.quantize_input(test_x[:2]), engine="no-such-engine")
    with pytest.raises(ValueError):
        K.torch_quantized_logits_in_subprocess(net, net.quantize_input(test_x[:2]).astype(np.int32))
