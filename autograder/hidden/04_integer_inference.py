"""Hidden tests of lesson 04 (integer-only inference), run in the grader's process.

The student's functions run in the sandbox; every expected value is computed here, with
the grader's own ``course_lib.kernels`` or with plain Python integers. Scalar exercises
are called on hundreds of inputs in one ``student.run`` loop.
"""

from __future__ import annotations

import math

import numpy as np

from autograder.hidden import HiddenTests
from course_lib import grading
from course_lib import kernels as K

tests = HiddenTests("04_integer_inference")

I32_MIN, I32_MAX = -(2**31), 2**31 - 1

# Calls the student's scalar function on every input pair inside the sandbox: one round trip.
_LOOP = "result = [{fn}(p, q) for p, q in zip(first, second)]"


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _exact_ints(name: str, got: object, expected: list, inputs: str) -> None:
    """``got`` must be a list of ints (or of int pairs) equal to ``expected``, value for value."""
    pairs = bool(expected) and isinstance(expected[0], tuple)
    what = "(int, int) pairs" if pairs else "ints"
    if not isinstance(got, list) or len(got) != len(expected):
        raise grading.ExerciseError(f"{name} for {inputs}: expected a list of {len(expected)} {what}, "
                                    f"got {type(got).__name__} of length {len(got) if hasattr(got, '__len__') else '-'}")
    for i, v in enumerate(got):
        ok = (isinstance(v, tuple | list) and len(v) == 2 and all(_is_int(u) for u in v)) if pairs else _is_int(v)
        if not ok:
            raise grading.ExerciseError(f"{name} for {inputs}: result {i} is {v!r}, expected {what[:-1]} "
                                        f"like {expected[i]!r} (Python ints, not floats)")
    grading.check(name, np.array(got, dtype=np.int64), np.array(expected, dtype=np.int64), inputs=inputs)


# --------------------------------------------------------------------------- exercise 1


@tests.case("test-quantize-multiplier", disabled=[
    "course_lib.kernels.quantize_multiplier", "course_lib.kernels.quantize_multipliers",
])
def quantize_multiplier(student) -> None:
    rng = np.random.default_rng(4101)
    ms = [float(m) for m in 10.0 ** rng.uniform(-11, 3, size=300)]
    # Exact ties m·2^31 = M0 + 1/2 (M0 even half the time): ties go away from zero, which
    # Python's round (ties to even) gets wrong on every even M0.
    floors = rng.integers(2**30, 2**31 - 1, size=60)
    exps = rng.integers(-25, 12, size=60)
    ms += [math.ldexp(int(f) + 0.5, int(e) - 31) for f, e in zip(floors, exps, strict=True)]
    ms += [0.75 + 2**-32, 2.0**-31, 1 - 2**-33, 0.75, 2**-32 * (1 - 2**-20), 1.5 * 2**-32, 1e9]
    expected = [K.quantize_multiplier(m) for m in ms]
    got = student.run("result = [quantize_multiplier(m) for m in ms]", ms=ms)
    _exact_ints("quantize_multiplier (hidden)", got, expected,
                "300 log-uniform multipliers in [1e-11, 1e3], 60 exact ties and edge cases")
    raised = student.run(
        "result = []\n"
        "for m in bad:\n"
        "    try:\n"
        "        quantize_multiplier(m)\n"
        "        result.append(False)\n"
        "    except ValueError:\n"
        "        result.append(True)\n",
        bad=[0.0, -3.0, float("nan")],
    )
    if raised != [True, True, True]:
        raise grading.ExerciseError(
            f"quantize_multiplier must raise ValueError for 0.0, -3.0 and NaN; raised for: {raised}"
        )


# --------------------------------------------------------------------------- exercise 2


def _ref_high_mul(a: int, b: int) -> int:
    """gemmlowp's SaturatingRoundingDoublingHighMul with Python ints (no overflow)."""
    if a == b == I32_MIN:
        return I32_MAX
    num = a * b + (2**30 if a * b >= 0 else 1 - 2**30)
    return abs(num) // 2**31 * (1 if num >= 0 else -1)


@tests.case("test-high-mul", disabled=[
    "course_lib.kernels.saturating_rounding_doubling_high_mul",
    "course_lib.kernels.multiply_by_quantized_multiplier",
    "course_lib.kernels.multiply_by_quantized_multiplier_single_rounding",
])
def high_mul(student) -> None:
    rng = np.random.default_rng(4102)
    a = rng.integers(I32_MIN, I32_MAX, size=400, endpoint=True).tolist()
    b = rng.integers(I32_MIN, I32_MAX, size=400, endpoint=True).tolist()
    # exact ties a·b = (k + 1/2)·2^31 of both signs (positive ties go up, negative toward zero)
    for k in rng.integers(1, 2**15, size=40).tolist():
        a += [2 * k + 1, -(2 * k + 1)]
        b += [2**30, 2**30]
    a += [I32_MIN, I32_MIN, I32_MAX, 0, 7, -7]
    b += [I32_MIN, 1, I32_MIN, I32_MIN, 3 * 2**28, 3 * 2**28]
    expected = [_ref_high_mul(p, q) for p, q in zip(a, b, strict=True)]
    if expected != [int(v) for v in K.saturating_rounding_doubling_high_mul(np.array(a), np.array(b))]:
        raise RuntimeError("grader error: the two references of high_mul disagree")
    got = student.run(_LOOP.format(fn="saturating_rounding_doubling_high_mul"), first=a, second=b)
    _exact_ints("high_mul (hidden)", got, expected, "400 random int32 pairs, 80 exact ties, edge cases")


# --------------------------------------------------------------------------- exercise 3


def _ref_divide_by_pot(x: int, e: int) -> int:
    """round(x / 2^e), ties away from zero, with exact Python integers."""
    q, r = divmod(abs(x), 2**e)
    return (q + (1 if 2 * r >= 2**e else 0)) * (1 if x >= 0 else -1)


@tests.case("test-divide-by-pot", disabled=[
    "course_lib.kernels.rounding_divide_by_pot", "course_lib.kernels.multiply_by_quantized_multiplier",
])
def divide_by_pot(student) -> None:
    rng = np.random.default_rng(4103)
    x = rng.integers(I32_MIN, I32_MAX, size=400, endpoint=True).tolist()
    e = rng.integers(0, 31, size=400, endpoint=True).tolist()
    for k in range(1, 32):  # exact ties ±(2j + 1)·2^(k-1) / 2^k = ±(j + 1/2), both signs
        tie = (2 * int(rng.integers(0, 2 ** (31 - k))) + 1) * 2 ** (k - 1)  # ≤ 2^31 - 2^(k-1)
        x += [tie, -tie]
        e += [k, k]
    x += [I32_MIN, I32_MAX, -1, 1, 0]
    e += [30, 30, 1, 1, 17]
    expected = [_ref_divide_by_pot(p, q) for p, q in zip(x, e, strict=True)]
    if expected != [int(v) for v in K.rounding_divide_by_pot(np.array(x), np.array(e))]:
        raise RuntimeError("grader error: the two references of divide_by_pot disagree")
    got = student.run(_LOOP.format(fn="rounding_divide_by_pot"), first=x, second=e)
    _exact_ints("divide_by_pot (hidden)", got, expected, "400 random (x, exponent) pairs, 62 exact ties, edge cases")


# --------------------------------------------------------------------------- exercise 4


def _linear_case(seed: int, n: int, k: int, o: int, relu: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    m0s, shifts = K.quantize_multipliers(10 ** rng.uniform(-4.5, -1.5, size=o))
    z_in, z_out = (int(v) for v in rng.integers(-128, 128, size=2))
    return dict(x_q=rng.integers(-128, 128, size=(n, k)).astype(np.int8),
                w_q=rng.integers(-127, 128, size=(o, k)).astype(np.int8),
                bias_q=rng.integers(-30000, 30000, size=o).astype(np.int32),
                input_zero_point=z_in, output_multiplier=m0s, output_shift=shifts,
                output_zero_point=z_out, activation_min=max(z_out, -128) if relu else -128, activation_max=127)


@tests.case("test-linear-int8", disabled=[
    "course_lib.kernels.int8_linear", "course_lib.kernels.linear_accumulator", "course_lib.kernels.requantize",
])
def linear_int8(student) -> None:
    cases = [_linear_case(4104, 8, 1568, 10), _linear_case(4105, 5, 33, 3, relu=True),
             _linear_case(4106, 1, 1, 1), _linear_case(4107, 64, 200, 17)]
    # int8 arithmetic wraps: x - Z must be widened first (here Z = -128 and x = 127 give 255)
    m0, shift = K.quantize_multipliers([1e-3])
    cases[2].update(x_q=np.array([[127]], np.int8), w_q=np.array([[-127]], np.int8), input_zero_point=-128,
                    bias_q=np.zeros(1, np.int32), output_multiplier=m0, output_shift=shift, output_zero_point=0)
    for c in cases:
        expected = K.int8_linear(c["x_q"], c["w_q"], c["bias_q"], input_zero_point=c["input_zero_point"],
                                 output_multiplier=c["output_multiplier"], output_shift=c["output_shift"],
                                 output_zero_point=c["output_zero_point"], activation_min=c["activation_min"],
                                 activation_max=c["activation_max"])
        got = student.call("linear_int8", **c)
        grading.check("linear_int8 (hidden)", got, expected,
                      inputs=f"x_q {c['x_q'].shape}, w_q {c['w_q'].shape}, Z_in={c['input_zero_point']}, "
                             f"clamp [{c['activation_min']}, {c['activation_max']}]")


# --------------------------------------------------------------------------- exercise 5


def _conv_case(seed: int, n: int, c: int, hw: tuple[int, int], o: int, k: tuple[int, int],
               stride: int, padding: int, relu: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    m0s, shifts = K.quantize_multipliers(10 ** rng.uniform(-4, -2, size=o))
    z_in, z_out = (int(v) for v in rng.integers(-120, 120, size=2))
    return dict(x_q=rng.integers(-128, 128, size=(n, c, *hw)).astype(np.int8),
                w_q=rng.integers(-127, 128, size=(o, c, *k)).astype(np.int8),
                bias_q=rng.integers(-20000, 20000, size=o).astype(np.int32),
                input_zero_point=z_in, output_multiplier=m0s, output_shift=shifts, output_zero_point=z_out,
                stride=stride, padding=padding,
                activation_min=max(z_out, -128) if relu else -128, activation_max=127)


@tests.case("test-conv2d-int8", disabled=[
    "course_lib.kernels.int8_conv2d", "course_lib.kernels.conv2d_accumulator", "course_lib.kernels.im2col",
    "course_lib.kernels.requantize", "course_lib.kernels.fbgemm_emulation",
    "torch.nn.functional.conv2d", "torch.conv2d",
])
def conv2d_int8(student) -> None:
    cases = [
        _conv_case(4110, 2, 3, (9, 8), 4, (3, 3), stride=1, padding=1),             # padding = code Z_in
        _conv_case(4111, 1, 2, (11, 11), 5, (3, 2), stride=2, padding=2, relu=True),  # stride, wide padding
        _conv_case(4112, 3, 1, (6, 7), 6, (1, 1), stride=1, padding=0),              # a 1×1 convolution
        _conv_case(4113, 2, 4, (7, 7), 3, (5, 5), stride=3, padding=1),
    ]
    cases[0]["input_zero_point"] = 97  # far from 0: zero-padding with code 0 instead of Z_in shows up
    for c in cases:
        expected = K.int8_conv2d(
            c["x_q"], c["w_q"], c["bias_q"], input_zero_point=c["input_zero_point"],
            output_multiplier=c["output_multiplier"], output_shift=c["output_shift"],
            output_zero_point=c["output_zero_point"], stride=c["stride"], padding=c["padding"],
            activation_min=c["activation_min"], activation_max=c["activation_max"])
        got = student.call("conv2d_int8", **c)
        grading.check("conv2d_int8 (hidden)", got, expected,
                      inputs=f"x_q {c['x_q'].shape}, w_q {c['w_q'].shape}, stride={c['stride']}, "
                             f"padding={c['padding']}, Z_in={c['input_zero_point']}")
