"""Integer-only inference: int8 kernels with TFLite-style fixed-point requantization.

The arithmetic of one quantized layer (TFLite's int8 scheme, per-channel weights)::

    real value      r = S · (q - Z)                    (the affine map of lesson 01)
    accumulator     acc[o] = Σ_k (x_q[k] - Z_in) · w_q[o, k]  +  bias_q[o]       (int32)
    real multiplier M[o] = S_in · S_w[o] / S_out       (one per output channel)
    fixed point     M[o] = M0[o] · 2^(shift[o] - 31),  M0[o] ∈ [2^30, 2^31)   (int32)
    output          y_q[o] = clamp(Z_out + round(acc[o] · M[o]), act_min, act_max)  (int8)

Weights are int8 symmetric in [-127, 127] (zero point 0); activations are int8
asymmetric; the bias is int32 with scale S_in · S_w[o] and zero point 0, so it adds
straight into the accumulator. ``round(acc · M)`` is done without any floating point:
:func:`saturating_rounding_doubling_high_mul` multiplies by M0 and keeps the high
32 bits, :func:`rounding_divide_by_pot` divides by a power of two. That is how a
microcontroller without a floating-point unit runs a network, and how TFLite's
reference kernels (``reference_ops``, gemmlowp ``fixedpoint.h``) compute, bit for bit.

Functions are named after that arithmetic, work element-wise on numpy integer arrays
(or Python ints), and check their inputs: a wrong dtype, shape or range raises
ValueError. Convolution is im2col + one matrix product; no Python loop visits a pixel.

Layouts follow PyTorch (NCHW activations, OIHW weights), not TFLite's NHWC.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from course_lib.quant import qparams_from_range

__all__ = [
    "FLOAT32_EXACT_LIMIT",
    "FLOAT64_EXACT_LIMIT",
    "INT32_MAX",
    "INT32_MIN",
    "IntegerLayer",
    "IntegerTinyCNN",
    "conv2d_accumulator",
    "exact_int_matmul",
    "fake_quantize_tflite",
    "fbgemm_emulation",
    "fbgemm_tinycnn_emulation",
    "fold_batchnorm",
    "fused_activation_range",
    "im2col",
    "int8_conv2d",
    "int8_linear",
    "int8_max_pool2d",
    "int8_to_quint8",
    "integer_layer_from_codes",
    "linear_accumulator",
    "multiply_by_quantized_multiplier",
    "multiply_by_quantized_multiplier_single_rounding",
    "quantize_bias",
    "quantize_layer",
    "quantize_multiplier",
    "quantize_multipliers",
    "quantize_tflite",
    "quint8_to_int8",
    "requantize",
    "round_half_away_from_zero",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
    "to_torch_quantized",
    "torch_quantized_logits_in_subprocess",
    "torch_quantized_tinycnn",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
INT8_MIN, INT8_MAX = -128, 127
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # symmetric narrow range: -128 is never used by weights
FLOAT64_EXACT_LIMIT = 2**53  # every integer of magnitude ≤ 2^53 is a float64 (53-bit significand)
FLOAT32_EXACT_LIMIT = 2**24  # ... and ≤ 2^24 a float32 (24-bit significand)


# ----------------------------------------------------------------------------- checks


def _int_array(name: str, value: Any, lo: int = INT32_MIN, hi: int = INT32_MAX) -> np.ndarray:
    """``value`` as an int64 array after checking it holds integers in [lo, hi]."""
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    info = np.iinfo(arr.dtype)
    if arr.size and not (lo <= info.min and info.max <= hi):  # int8/int32 inputs need no scan
        if arr.min() < lo or arr.max() > hi:
            raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def _int_scalar(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {int(value)}")
    return int(value)


def _require_dtype(name: str, arr: Any, dtype: type, ndim: int | None = None) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of dtype {np.dtype(dtype)}, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


def _scalar_result(arr: np.ndarray) -> np.ndarray:
    """0-d results come back as numpy scalars, arrays as arrays."""
    return arr[()] if arr.ndim == 0 else arr


def _pair(name: str, value: int | Sequence[int], lo: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) and v >= lo for v in pair):
        raise ValueError(f"{name} must be an int ≥ {lo} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


# ----------------------------------------------------------------------------- quantize


def round_half_away_from_zero(v: np.ndarray) -> np.ndarray:
    """C's ``std::round`` (TFLite's ``TfLiteRound``): ties go away from zero, 2.5 → 3, -2.5 → -3.

    Written as ``trunc(v) + sign(v)·[|v - trunc(v)| ≥ 0.5]``: ``v - trunc(v)`` is exact in
    floating point, whereas ``floor(|v| + 0.5)`` is not (0.49999997 + 0.5 rounds up to 1
    in float32). ``np.round`` would round ties to even (2.5 → 2), like PyTorch does.
    """
    v = np.asarray(v)
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0).astype(v.dtype)


def quantize_tflite(
    x: np.ndarray | torch.Tensor,
    scale: float | np.ndarray,
    zero_point: int | np.ndarray,
    *,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
    axis: int | None = None,
) -> np.ndarray:
    """TFLite's quantize: ``q = clamp(round_half_away(x / scale) + zero_point, qmin, qmax)``.

    The division is done in float32 (as ``reference_ops::AffineQuantize`` does) and ties
    round away from zero. PyTorch's rule differs in two ways: it multiplies by the
    float32 reciprocal ``1/scale`` and rounds ties to even (``course_lib.quant.quantize``).
    The two agree except on values that land on, or within a float32 ulp of, a tie.

    ``axis`` picks per-channel parameters: ``scale``/``zero_point`` are 1-D, one per
    index along that axis. Returns int8 when ``[qmin, qmax]`` fits int8, else int32.
    Raises ValueError on NaN, non-positive scales or a range that does not hold the zero point.
    """
    xa = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if not np.issubdtype(xa.dtype, np.floating):
        raise ValueError(f"x must be a float array, got dtype {xa.dtype}")
    if np.isnan(xa).any():
        raise ValueError("x contains NaN: there is no integer to round it to")
    if not (INT32_MIN <= qmin < qmax <= INT32_MAX):
        raise ValueError(f"need INT32_MIN ≤ qmin < qmax ≤ INT32_MAX, got qmin={qmin}, qmax={qmax}")
    s = np.asarray(scale, dtype=np.float32)
    z = _int_array("zero_point", zero_point, qmin, qmax)
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    if axis is not None:
        if s.ndim != 1 or z.ndim > 1 or xa.ndim == 0:
            raise ValueError("per-channel quantize needs 1-D scale and zero_point")
        axis = axis % xa.ndim
        if s.shape[0] != xa.shape[axis] or (z.ndim == 1 and z.shape[0] != s.shape[0]):
            raise ValueError(
                f"axis {axis} has {xa.shape[axis]} channels but got {s.shape[0]} scales "
                f"and {z.size} zero points"
            )
        shape = [1] * xa.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape) if z.ndim == 1 else z
    elif s.ndim or z.ndim:
        raise ValueError("scale and zero_point must be scalars when axis is None")
    q = round_half_away_from_zero(xa.astype(np.float32) / s).astype(np.float64) + z
    q = np.clip(q, qmin, qmax)
    dtype = np.int8 if (qmin >= INT8_MIN and qmax <= INT8_MAX) else np.int32
    return q.astype(dtype)


def fake_quantize_tflite(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int = INT8_MIN, qmax: int = INT8_MAX
) -> torch.Tensor:
    """Float simulation of :func:`quantize_tflite` then dequantize, in torch (per-tensor).

    ``(clamp(round_half_away(x / scale) + zero_point, qmin, qmax) - zero_point) · scale``,
    computed in ``x``'s dtype. Used to simulate the integer network in float.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    v = x / scale
    t = torch.trunc(v)
    r = t + torch.where((v - t).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))
    q = torch.clamp(r + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_bias(
    bias: np.ndarray | torch.Tensor, input_scale: float, weight_scale: float | np.ndarray
) -> np.ndarray:
    """int32 bias: ``round_half_away(bias / (S_in · S_w))``, zero point 0, clamped to ±(2^31 - 1).

    Its scale S_in·S_w is the accumulator's, so the integer bias is added to the int32
    accumulator as it is. The product S_in·S_w and the division are float32, as in the
    TFLite converter. ``weight_scale`` is a float or one scale per output channel.
    """
    b = bias.detach().cpu().numpy() if isinstance(bias, torch.Tensor) else np.asarray(bias)
    b = b.astype(np.float32)
    ws = np.asarray(weight_scale, dtype=np.float32)
    if b.ndim != 1 or (ws.ndim == 1 and ws.shape != b.shape) or ws.ndim > 1:
        raise ValueError(f"bias must be 1-D with one weight scale per entry, got {b.shape} and {ws.shape}")
    accumulator_scale = np.float32(input_scale) * ws
    if not (np.isfinite(accumulator_scale).all() and (accumulator_scale > 0).all()):
        raise ValueError("input_scale and weight_scale must be finite and > 0")
    q = round_half_away_from_zero(b / accumulator_scale).astype(np.float64)
    return np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int32)


# ----------------------------------------------------------------------------- fixed point


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """Split ``M`` into ``(M0, shift)`` with ``M = M0 · 2^(shift - 31)``, ``M0 ∈ [2^30, 2^31)``.

    As TFLite's ``QuantizeMultiplier``: ``frexp`` gives ``M = q · 2^shift`` with
    ``q ∈ [0.5, 1)``; ``M0 = round_half_away(q · 2^31)``. When that rounding reaches
    2^31 (q within 2^-32 of 1), M0 is halved and the shift grows by one. A shift below
    -31 would shift every bit out: TFLite then returns ``(0, 0)``, a multiplier of zero,
    and so does this function (M < 2^-32 turns any int32 accumulator into 0 anyway).

    ``shift`` ≤ 0 means a right shift (M < 1, the usual case), ``shift`` > 0 a left shift.
    Raises ValueError unless ``0 < M < 2^31`` and finite.
    """
    if isinstance(real_multiplier, bool) or not isinstance(real_multiplier, int | float | np.integer | np.floating):
        raise ValueError(f"real_multiplier must be a float, got {type(real_multiplier).__name__}")
    m = float(real_multiplier)
    if not math.isfinite(m) or m <= 0:
        raise ValueError(f"real_multiplier must be finite and > 0, got {real_multiplier!r}")
    if m >= 2.0**31:
        raise ValueError(f"real_multiplier must be < 2^31, got {m!r}")
    q, shift = math.frexp(m)  # m = q · 2^shift, 0.5 ≤ q < 1
    scaled = q * 2.0**31  # exact: a power-of-two scaling
    whole = math.floor(scaled)
    q_fixed = whole + (1 if scaled - whole >= 0.5 else 0)  # half away from zero (scaled > 0)
    if q_fixed == 2**31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(q_fixed), int(shift)


def quantize_multipliers(real_multipliers: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_multiplier` for each channel: ``(M0 int32 array, shift int32 array)``."""
    m = np.asarray(real_multipliers, dtype=np.float64)
    if m.ndim != 1 or m.size == 0:
        raise ValueError(f"real_multipliers must be a non-empty 1-D array, got shape {m.shape}")
    pairs = [quantize_multiplier(float(v)) for v in m]  # one per channel, not per pixel
    return (
        np.array([p[0] for p in pairs], dtype=np.int32),
        np.array([p[1] for p in pairs], dtype=np.int32),
    )


def saturating_rounding_doubling_high_mul(a: Any, b: Any) -> np.ndarray:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: ``round(a · b / 2^31)`` in int32.

    The high 32 bits of the doubled 64-bit product ``2·a·b``, rounded: the nudge
    ``+2^30`` (or ``1 - 2^30`` when ``a·b < 0``) is added before C's truncating division
    by 2^31. In effect ties round **towards +∞**: 0.5 → 1 but -0.5 → 0, -1.5 → -1
    (as ARM's ``vqrdmulh`` does). The one overflow, ``INT32_MIN · INT32_MIN`` (= +2^31
    after the division), saturates to ``INT32_MAX``.

    ``a`` and ``b`` are int32 values (Python ints or integer numpy arrays that broadcast);
    the result is int32. Raises ValueError for non-integers or values outside int32.
    """
    ab = _int_array("a", a) * _int_array("b", b)  # |a·b| ≤ 2^62: exact in int64
    # gemmlowp adds the nudge 2^30 (or 1 - 2^30 when a·b < 0) and divides by 2^31
    # truncating toward zero. Both cases equal floor((a·b + 2^30) / 2^31), because
    # -⌊(n + 2^30 - 1)/2^31⌋ = ⌊(2^30 - n)/2^31⌋ for an integer n = -a·b > 0; numpy's
    # arithmetic shift is that floor, so one expression covers both signs.
    high = (ab + (1 << 30)) >> 31
    # Only INT32_MIN · INT32_MIN gives more than INT32_MAX (2^31 exactly): saturate it.
    return _scalar_result(np.minimum(high, INT32_MAX).astype(np.int32))


def rounding_divide_by_pot(x: Any, exponent: Any) -> np.ndarray:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded, ties away from zero.

    Integer-only: ``(x >> e) + [remainder > threshold]`` with ``remainder = x & (2^e - 1)``
    and ``threshold = (2^e - 1) >> 1`` plus 1 when ``x < 0``; so 5/2 → 3, -5/2 → -3,
    -6/4 → -2. ``x`` int32, ``exponent`` an int (or int array) in [0, 31]; int32 result.
    """
    x64 = _int_array("x", x)
    e = _int_array("exponent", exponent, 0, 31)
    mask = (np.int64(1) << e) - 1
    remainder = x64 & mask
    threshold = (mask >> 1) + (x64 < 0)
    return _scalar_result(((x64 >> e) + (remainder > threshold)).astype(np.int32))


def multiply_by_quantized_multiplier(x: Any, quantized_multiplier: Any, shift: Any) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier``: ``x · M0 · 2^(shift - 31)``, rounded, int32.

    ``rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x · 2^left, M0), right)``
    with ``left = max(shift, 0)`` and ``right = max(-shift, 0)``. Two roundings happen:
    the high-mul rounds ``x·M`` to a multiple of ``2^shift``; when that lands exactly on a
    tie the divide rounds it away from zero. So an ``x·M`` within ``2^(shift-1)`` of a tie,
    on the side toward zero, comes out one step too far from zero (see
    :func:`multiply_by_quantized_multiplier_single_rounding`). The left shift saturates to
    int32 (TFLite's C code would overflow there; saturation gives the same clamped int8 output).

    ``x`` int32, ``quantized_multiplier`` in [0, INT32_MAX], ``shift`` in [-31, 31];
    all broadcast (per-channel arrays are fine).
    """
    x64 = _int_array("x", x)
    m0 = _int_array("quantized_multiplier", quantized_multiplier, 0, INT32_MAX)
    s = _int_array("shift", shift, -31, 31)
    left = np.maximum(s, 0)
    right = np.maximum(-s, 0)
    if left.any():  # only multipliers ≥ 1 shift left; skip the work for the usual M < 1
        x64 = np.clip(x64 << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x64, m0), right)


def multiply_by_quantized_multiplier_single_rounding(x: Any, quantized_multiplier: Any, shift: Any) -> np.ndarray:
    """TFLite's single-rounding variant (``TFLITE_SINGLE_ROUNDING``): one rounding, not two.

    ``floor((x · M0 + 2^(30 - shift)) / 2^(31 - shift))``: the exact 64-bit product rounded
    once to the nearest integer, ties toward +∞. It differs from
    :func:`multiply_by_quantized_multiplier` exactly where the double rounding bites (a
    value within ``2^(shift - 1)`` of a tie, on the side toward zero). ``x`` int32,
    ``quantized_multiplier`` in [0, INT32_MAX], ``shift`` in [-31, 30]; int32 result
    (saturated, which only matters for multipliers ≥ 1).
    """
    x64 = _int_array("x", x)
    m0 = _int_array("quantized_multiplier", quantized_multiplier, 0, INT32_MAX)
    total = 31 - _int_array("shift", shift, -31, 30)  # in [1, 62]
    product = x64 * m0  # |x · M0| < 2^62, plus the rounding term < 2^61: fits int64
    result = (product + (np.int64(1) << (total - 1))) >> total
    return _scalar_result(np.clip(result, INT32_MIN, INT32_MAX).astype(np.int32))


def requantize(
    acc: np.ndarray,
    quantized_multiplier: Any,
    shift: Any,
    output_zero_point: int,
    activation_min: int = INT8_MIN,
    activation_max: int = INT8_MAX,
    *,
    single_rounding: bool = False,
) -> np.ndarray:
    """int32 accumulator → int8 output: ``clamp(Z_out + MBQM(acc, M0, shift), act_min, act_max)``.

    ``M0``/``shift`` broadcast against ``acc`` (shape them (C, 1, 1) for NCHW per-channel).
    A fused ReLU or ReLU6 is nothing but ``activation_min``/``activation_max``
    (see :func:`fused_activation_range`). MBQM is TFLite's default double-rounding
    :func:`multiply_by_quantized_multiplier`, or with ``single_rounding=True``
    :func:`multiply_by_quantized_multiplier_single_rounding`.
    """
    _require_dtype("acc", acc, np.int32)
    zp = _int_scalar("output_zero_point", output_zero_point, INT8_MIN, INT8_MAX)
    lo = _int_scalar("activation_min", activation_min, INT8_MIN, INT8_MAX)
    hi = _int_scalar("activation_max", activation_max, INT8_MIN, INT8_MAX)
    if lo > hi:
        raise ValueError(f"activation_min {lo} > activation_max {hi}")
    multiply = multiply_by_quantized_multiplier_single_rounding if single_rounding else multiply_by_quantized_multiplier
    scaled = multiply(acc, quantized_multiplier, shift).astype(np.int64)
    return np.clip(scaled + zp, lo, hi).astype(np.int8)


def fused_activation_range(
    activation: str | None, output_scale: float, output_zero_point: int,
    qmin: int = INT8_MIN, qmax: int = INT8_MAX,
) -> tuple[int, int]:
    """The clamp ``[act_min, act_max]`` that fuses an activation into requantization.

    TFLite's ``CalculateActivationRangeQuantized``: ``None`` → ``[qmin, qmax]``;
    ``"relu"`` → ``[max(qmin, Z), qmax]`` (real 0 is the zero point);
    ``"relu6"`` → ``[max(qmin, Z), min(qmax, Z + round_half_away(6 / S))]``.
    """
    if activation not in (None, "relu", "relu6"):
        raise ValueError(f"activation must be None, 'relu' or 'relu6', got {activation!r}")
    zp = _int_scalar("output_zero_point", output_zero_point, qmin, qmax)
    if not (math.isfinite(output_scale) and output_scale > 0):
        raise ValueError(f"output_scale must be finite and > 0, got {output_scale!r}")
    if activation is None:
        return qmin, qmax
    if activation == "relu":
        return max(qmin, zp), qmax
    six = int(round_half_away_from_zero(np.float32(6.0) / np.float32(output_scale)))
    return max(qmin, zp), min(qmax, zp + six)


# ----------------------------------------------------------------------------- accumulate


def exact_int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for integer arrays, exact, as int64; fast through a float64 matmul.

    A float64 holds every integer up to 2^53 exactly. The products ``a[i,k]·b[k,j]`` are
    integers and so is every partial sum, whose magnitude is at most
    ``bound = K · max|a| · max|b|``. If ``bound ≤ 2^53`` no addition ever rounds, in any
    order BLAS adds, so the float64 result *is* the integer result. For int8 operands
    (|x - Z| ≤ 255, |w| ≤ 127) that holds up to K ≈ 2.8·10^11 — the int32 accumulator
    overflows long before (K ≈ 66,000 in the worst case). float32 would stop being exact
    at 2^24, i.e. K ≈ 518 in the worst case. Beyond the bound this falls back to an exact
    (slower) int64 matmul.
    """
    if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
        raise ValueError(f"exact_int_matmul needs integer arrays, got {a.dtype} and {b.dtype}")
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"inner dimensions differ: {a.shape} @ {b.shape}")
    k = a.shape[-1]
    amax = max(abs(int(a.min(initial=0))), abs(int(a.max(initial=0))))
    bmax = max(abs(int(b.min(initial=0))), abs(int(b.max(initial=0))))
    bound = k * amax * bmax  # Python ints: the bound itself cannot overflow
    if bound <= FLOAT64_EXACT_LIMIT:
        out = np.matmul(a.astype(np.float64), b.astype(np.float64))
        return out.astype(np.int64)
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def _to_int32_accumulator(acc: np.ndarray) -> np.ndarray:
    if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise ValueError(
            f"int32 accumulator overflow: values reach [{acc.min()}, {acc.max()}]; "
            "TFLite would silently wrap around here"
        )
    return acc.astype(np.int32)


def _check_weight_bias(weight_q: np.ndarray, bias_q: np.ndarray | None, ndim: int) -> None:
    _require_dtype("weight_q", weight_q, np.int8, ndim)
    if weight_q.size and weight_q.min() < WEIGHT_QMIN:
        raise ValueError("weight_q holds -128: int8 weights are symmetric in [-127, 127]")
    if bias_q is not None:
        _require_dtype("bias_q", bias_q, np.int32, 1)
        if bias_q.shape[0] != weight_q.shape[0]:
            raise ValueError(f"bias_q has {bias_q.shape[0]} entries for {weight_q.shape[0]} output channels")


def linear_accumulator(
    x_q: np.ndarray, weight_q: np.ndarray, bias_q: np.ndarray | None, input_zero_point: int
) -> np.ndarray:
    """int32 ``acc[n, o] = Σ_k (x_q[n, k] - Z_in) · w_q[o, k] + bias_q[o]``.

    ``x_q`` int8 (N, K), ``weight_q`` int8 (O, K) in [-127, 127], ``bias_q`` int32 (O,) or None.
    """
    _require_dtype("x_q", x_q, np.int8, 2)
    _check_weight_bias(weight_q, bias_q, 2)
    if x_q.shape[1] != weight_q.shape[1]:
        raise ValueError(f"x_q has {x_q.shape[1]} features, weight_q expects {weight_q.shape[1]}")
    zp = _int_scalar("input_zero_point", input_zero_point, INT8_MIN, INT8_MAX)
    centred = x_q.astype(np.int16) - np.int16(zp)  # in [-255, 255]: int16 holds it
    acc = exact_int_matmul(centred, weight_q.T)
    if bias_q is not None:
        acc = acc + bias_q.astype(np.int64)
    return _to_int32_accumulator(acc)


def int8_linear(
    x_q: np.ndarray,
    weight_q: np.ndarray,
    bias_q: np.ndarray | None,
    *,
    input_zero_point: int,
    output_multiplier: Any,
    output_shift: Any,
    output_zero_point: int,
    activation_min: int = INT8_MIN,
    activation_max: int = INT8_MAX,
) -> np.ndarray:
    """int8 fully connected layer: :func:`linear_accumulator` then :func:`requantize`.

    ``y_q[n, o] = clamp(Z_out + MBQM(acc[n, o], M0[o], shift[o]), act_min, act_max)``, int8 (N, O).
    ``output_multiplier``/``output_shift`` are one int (per-tensor) or one per output.
    """
    acc = linear_accumulator(x_q, weight_q, bias_q, input_zero_point)
    return requantize(acc, output_multiplier, output_shift, output_zero_point, activation_min, activation_max)


def im2col(
    x: np.ndarray, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> np.ndarray:
    """Patches of an (N, C, H, W) array: (N, H_out·W_out, C, k_h·k_w), zero-padded.

    ``H_out = (H + 2·p_h - k_h) // s_h + 1`` (same for W). A strided view of the padded
    array is reshaped into rows, so a convolution becomes one matrix product.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    n, c, h, w = x.shape
    if h + 2 * ph < kh or w + 2 * pw < kw:
        raise ValueError(f"kernel {kh}×{kw} is larger than the padded input {h + 2 * ph}×{w + 2 * pw}")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # N, C, Ho, Wo, kh, kw
    ho, wo = windows.shape[2], windows.shape[3]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n, ho * wo, c, kh * kw)


def conv2d_accumulator(
    x_q: np.ndarray,
    weight_q: np.ndarray,
    bias_q: np.ndarray | None,
    input_zero_point: int,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
) -> np.ndarray:
    """int32 ``acc[n, o, i, j] = Σ_{c, u, v} (x_q[n, g·C_g + c, s·i + u - p, s·j + v - p] - Z_in) · w_q[o, c, u, v] + bias_q[o]``.

    ``x_q`` int8 (N, C, H, W), ``weight_q`` int8 (O, C/groups, k_h, k_w), ``bias_q`` int32 (O,)
    or None; output channel o belongs to group ``g = o // (O/groups)`` (PyTorch's
    convention; ``groups = C = O`` is a depthwise convolution). Padding contributes
    real 0, i.e. ``x_q = Z_in``, which is 0 after subtracting the zero point.
    """
    _require_dtype("x_q", x_q, np.int8, 4)
    _check_weight_bias(weight_q, bias_q, 4)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    zp = _int_scalar("input_zero_point", input_zero_point, INT8_MIN, INT8_MAX)
    n, c, _, _ = x_q.shape
    o, c_per_group, kh, kw = weight_q.shape
    if not isinstance(groups, int | np.integer) or groups < 1 or c % groups or o % groups:
        raise ValueError(f"groups={groups!r} must be a positive int dividing in ({c}) and out ({o}) channels")
    if c // groups != c_per_group:
        raise ValueError(f"weight_q expects {c_per_group} input channels per group, x_q gives {c}/{groups}")
    centred = x_q.astype(np.int16) - np.int16(zp)
    patches = im2col(centred, (kh, kw), (sh, sw), (ph, pw))  # N, L, C, kh·kw
    length = patches.shape[1]
    k = c_per_group * kh * kw
    # One matrix product per group: (G, N·L, K) @ (G, K, O_g) → (G, N·L, O_g)
    patches = patches.reshape(n * length, groups, k).transpose(1, 0, 2)
    w = weight_q.reshape(groups, o // groups, k).transpose(0, 2, 1)
    acc = exact_int_matmul(patches, w)
    ho = (x_q.shape[2] + 2 * ph - kh) // sh + 1
    wo = (x_q.shape[3] + 2 * pw - kw) // sw + 1
    # (G, N, Ho, Wo, O_g) → (N, G, O_g, Ho, Wo) = (N, O, Ho, Wo): channel o = g·O_g + j
    acc = acc.reshape(groups, n, ho, wo, o // groups).transpose(1, 0, 4, 2, 3).reshape(n, o, ho, wo)
    if bias_q is not None:
        acc = acc + bias_q.astype(np.int64).reshape(o, 1, 1)
    return _to_int32_accumulator(acc)


def int8_conv2d(
    x_q: np.ndarray,
    weight_q: np.ndarray,
    bias_q: np.ndarray | None,
    *,
    input_zero_point: int,
    output_multiplier: Any,
    output_shift: Any,
    output_zero_point: int,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    activation_min: int = INT8_MIN,
    activation_max: int = INT8_MAX,
) -> np.ndarray:
    """int8 2-D convolution: :func:`conv2d_accumulator` then per-channel :func:`requantize`.

    ``output_multiplier``/``output_shift``: one int, or one per output channel (O,).
    Returns int8 (N, O, H_out, W_out).
    """
    acc = conv2d_accumulator(
        x_q, weight_q, bias_q, input_zero_point, stride=stride, padding=padding, groups=groups
    )
    m0 = np.asarray(output_multiplier)
    sh = np.asarray(output_shift)
    m0 = m0.reshape(-1, 1, 1) if m0.ndim == 1 else m0  # per channel: broadcast over H, W
    sh = sh.reshape(-1, 1, 1) if sh.ndim == 1 else sh
    return requantize(acc, m0, sh, output_zero_point, activation_min, activation_max)


def int8_max_pool2d(x_q: np.ndarray, kernel_size: int = 2, stride: int | None = None) -> np.ndarray:
    """Max-pooling on int8 (N, C, H, W), no padding; the output keeps the input's (S, Z).

    ``r = S·(q - Z)`` is increasing in q (S > 0), so the largest q is the largest r:
    pooling commutes with the affine map and needs no requantization.
    """
    _require_dtype("x_q", x_q, np.int8, 4)
    k = _int_scalar("kernel_size", kernel_size, 1, max(x_q.shape[2:]))
    s = k if stride is None else _int_scalar("stride", stride, 1, 2**31)
    windows = sliding_window_view(x_q, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    return windows.max(axis=(4, 5))


# ----------------------------------------------------------------------------- layers


def fold_batchnorm(conv: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the layer before it: ``(weight, bias)``, float32.

    ``BN(conv(x)) = γ·(W·x + b - μ)/√(σ² + ε) + β``, so with ``a = γ/√(σ² + ε)`` per
    output channel: ``W' = a·W`` (each output channel scaled) and ``b' = a·(b - μ) + β``.
    Computed in float64 and rounded once to float32. The layer's own bias may be absent.
    """
    if not isinstance(conv, nn.Conv2d | nn.Linear) or not isinstance(bn, nn.BatchNorm2d | nn.BatchNorm1d):
        raise ValueError(f"need (Conv2d or Linear, BatchNorm), got ({type(conv).__name__}, {type(bn).__name__})")
    out_channels = conv.weight.shape[0]
    if bn.num_features != out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} features, the layer {out_channels} outputs")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm has no running statistics (track_running_stats=False): nothing to fold")
    with torch.no_grad():
        w = conv.weight.double()
        b = conv.bias.double() if conv.bias is not None else torch.zeros(out_channels, dtype=torch.float64)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones(out_channels, dtype=torch.float64)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros(out_channels, dtype=torch.float64)
        a = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
        weight = w * a.reshape(-1, *([1] * (w.dim() - 1)))
        bias = a * (b - bn.running_mean.double()) + beta
    return weight.float(), bias.float()


@dataclass(frozen=True)
class IntegerLayer:
    """One int8 conv or linear layer with everything its integer kernel needs.

    ``kind`` is "conv" or "linear". Real-valued parameters (scales) are kept for
    dequantizing and for building the equivalent float or PyTorch-quantized layer.
    """

    kind: str
    weight_q: np.ndarray  # int8 (O, ...), symmetric in [-127, 127]
    weight_scale: np.ndarray  # float32 (O,)
    bias_q: np.ndarray  # int32 (O,), scale input_scale · weight_scale, zero point 0
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    output_multiplier: np.ndarray  # int32 (O,): M0
    output_shift: np.ndarray  # int32 (O,)
    activation_min: int
    activation_max: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    def accumulator(self, x_q: np.ndarray) -> np.ndarray:
        """The int32 accumulator (bias included) before requantization."""
        if self.kind == "conv":
            return conv2d_accumulator(
                x_q, self.weight_q, self.bias_q, self.input_zero_point,
                stride=self.stride, padding=self.padding, groups=self.groups,
            )
        return linear_accumulator(x_q, self.weight_q, self.bias_q, self.input_zero_point)

    def requantize(self, acc: np.ndarray, *, single_rounding: bool = False) -> np.ndarray:
        """This layer's :func:`requantize` of an accumulator from :meth:`accumulator`."""
        m0, shift = self.output_multiplier, self.output_shift
        if self.kind == "conv":  # per output channel, broadcast over H and W
            m0, shift = m0.reshape(-1, 1, 1), shift.reshape(-1, 1, 1)
        return requantize(acc, m0, shift, self.output_zero_point, self.activation_min,
                          self.activation_max, single_rounding=single_rounding)

    def __call__(self, x_q: np.ndarray, *, single_rounding: bool = False) -> np.ndarray:
        """int8 in, int8 out: the same arithmetic as :func:`int8_conv2d` / :func:`int8_linear`."""
        return self.requantize(self.accumulator(x_q), single_rounding=single_rounding)

    @property
    def real_multiplier(self) -> np.ndarray:
        """``M = S_in · S_w / S_out`` per output channel, float64 (as TFLite computes it)."""
        return np.float64(self.input_scale) * self.weight_scale.astype(np.float64) / np.float64(self.output_scale)

    def dequantized_weight(self) -> torch.Tensor:
        """``w_q · S_w`` as a float32 tensor (what a fake-quant simulation multiplies by)."""
        shape = (-1,) + (1,) * (self.weight_q.ndim - 1)
        return torch.from_numpy(self.weight_q.astype(np.float32) * self.weight_scale.reshape(shape))

    def dequantized_bias(self) -> torch.Tensor:
        """``bias_q · S_in · S_w`` as a float32 tensor."""
        acc_scale = np.float32(self.input_scale) * self.weight_scale
        return torch.from_numpy(self.bias_q.astype(np.float32) * acc_scale)


def quantize_layer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    input_scale: float,
    input_zero_point: int,
    output_scale: float,
    output_zero_point: int,
    activation: str | None = None,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
) -> IntegerLayer:
    """Quantize a float layer for :class:`IntegerLayer`: per-channel int8 weights and the rest.

    Weights: ``S_w[o] = max|W[o]| / 127`` (symmetric, narrow range [-127, 127], float32,
    by ``course_lib.quant.qparams_from_range``), ``w_q = quantize_tflite(W, S_w, 0)``. Bias: :func:`quantize_bias`.
    Multipliers: :func:`quantize_multipliers` of ``S_in · S_w / S_out``. The activation
    becomes the clamp of :func:`fused_activation_range` within the output codes
    ``[qmin, qmax]`` (narrower than int8 for 7-bit activations). 4-D weights make a conv layer.
    """
    w = weight.detach().cpu().double().numpy()
    if w.ndim not in (2, 4):
        raise ValueError(f"weight must be 2-D (linear) or 4-D (conv), got shape {w.shape}")
    out_channels = w.shape[0]
    absmax = torch.from_numpy(np.abs(w.reshape(out_channels, -1)).max(axis=1)).float()
    scale, _ = qparams_from_range(-absmax, absmax, bits=8, symmetric=True, narrow_range=True)
    weight_scale = scale.numpy().astype(np.float32)
    weight_q = quantize_tflite(w.astype(np.float32), weight_scale, np.zeros(out_channels, np.int64),
                               qmin=WEIGHT_QMIN, qmax=WEIGHT_QMAX, axis=0)
    return integer_layer_from_codes(
        weight_q, weight_scale, bias, input_scale=input_scale, input_zero_point=input_zero_point,
        output_scale=output_scale, output_zero_point=output_zero_point, activation=activation,
        stride=stride, padding=padding, groups=groups, qmin=qmin, qmax=qmax,
    )


def integer_layer_from_codes(
    weight_q: np.ndarray,
    weight_scale: np.ndarray,
    bias: torch.Tensor | None,
    *,
    input_scale: float,
    input_zero_point: int,
    output_scale: float,
    output_zero_point: int,
    activation: str | None = None,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
) -> IntegerLayer:
    """An :class:`IntegerLayer` around weight codes already chosen (any bit-width, any scales).

    ``weight_scale`` holds one float32 scale per output channel. Bias: :func:`quantize_bias`
    (int32, scale ``S_in · S_w[o]``, zero point 0). Multipliers: :func:`quantize_multipliers`
    of ``S_in · S_w / S_out``, computed in float64 from the float32 scales. The activation
    becomes the clamp of :func:`fused_activation_range` within ``[qmin, qmax]``.
    """
    out_channels = weight_q.shape[0]
    b = bias if bias is not None else torch.zeros(out_channels)
    bias_q = quantize_bias(b, input_scale, weight_scale)
    real = np.float64(np.float32(input_scale)) * weight_scale.astype(np.float64) / np.float64(np.float32(output_scale))
    m0, shift = quantize_multipliers(real)
    lo, hi = fused_activation_range(activation, float(output_scale), int(output_zero_point), qmin, qmax)
    return IntegerLayer(
        kind="conv" if weight_q.ndim == 4 else "linear",
        weight_q=weight_q, weight_scale=weight_scale, bias_q=bias_q,
        input_scale=float(np.float32(input_scale)), input_zero_point=int(input_zero_point),
        output_scale=float(np.float32(output_scale)), output_zero_point=int(output_zero_point),
        output_multiplier=m0, output_shift=shift, activation_min=lo, activation_max=hi,
        stride=stride, padding=padding, groups=groups,
    )


def _qparams(min_val: float, max_val: float, bits: int) -> tuple[float, int]:
    """Asymmetric (scale, int8 zero point) of a calibrated range on ``bits``-bit codes.

    The unsigned ``[0, 2^bits - 1]`` range of torch's MinMaxObserver, shifted by -128 into
    int8: for 8 bits that is exactly int8's qparams, for 7 bits codes ``[-128, -1]``.
    """
    scale, zero_point = qparams_from_range(min_val, max_val, bits=bits, signed=False)
    return float(scale), int(zero_point) - 128


@dataclass
class IntegerTinyCNN:
    """TinyCNN in integers only: int8 image in, int8 logits out.

    ``quantize_input`` (the one float step, at the sensor) → conv1 (int8, ReLU as a
    clamp) → int8 max-pool → conv2 → int8 max-pool → flatten → fc (int8 logits).
    BatchNorm is folded into the convolutions, weights are int8 per-channel symmetric,
    activation ranges come from min-max calibration on float activations.
    """

    input_scale: float
    input_zero_point: int
    conv1: IntegerLayer
    conv2: IntegerLayer
    fc: IntegerLayer
    pool: int = 2

    @classmethod
    def from_float(
        cls, model: nn.Module, calib_images: torch.Tensor, *, activation_bits: int = 8
    ) -> IntegerTinyCNN:
        """Fold BN, calibrate min-max ranges on ``calib_images`` (N×1×28×28 float), quantize.

        ``activation_bits=7`` sets every activation scale from the 7-bit range ``[0, 127]``
        (codes ``[-128, -1]`` in int8), as fbgemm's ``reduce_range`` does so that its
        u8×s8 pair sums stay inside int16. As in PyTorch only the scale changes: the clamps
        stay int8, so a value above the calibrated maximum may still use codes up to 127.
        """
        if calib_images.ndim != 4 or calib_images.shape[0] == 0:
            raise ValueError(f"calib_images must be a non-empty N×C×H×W batch, got {tuple(calib_images.shape)}")
        if activation_bits not in (7, 8):
            raise ValueError(f"activation_bits must be 8 or 7 (reduce_range), got {activation_bits!r}")
        bits = activation_bits
        w1, b1 = fold_batchnorm(model.conv1, model.bn1)
        w2, b2 = fold_batchnorm(model.conv2, model.bn2)
        pool = int(model.pool1.kernel_size) if isinstance(model.pool1.kernel_size, int) else model.pool1.kernel_size[0]
        with torch.no_grad():  # the float model with BN folded: the ranges to calibrate
            x = calib_images.float()
            a1 = F.relu(F.conv2d(x, w1, b1, padding=model.conv1.padding))
            a2 = F.relu(F.conv2d(F.max_pool2d(a1, pool), w2, b2, padding=model.conv2.padding))
            logits = F.linear(F.max_pool2d(a2, pool).flatten(1), model.fc.weight, model.fc.bias)
        s_x, z_x = _qparams(x.min().item(), x.max().item(), bits)
        s_1, z_1 = _qparams(a1.min().item(), a1.max().item(), bits)
        s_2, z_2 = _qparams(a2.min().item(), a2.max().item(), bits)
        s_o, z_o = _qparams(logits.min().item(), logits.max().item(), bits)
        conv1 = quantize_layer(w1, b1, input_scale=s_x, input_zero_point=z_x, output_scale=s_1,
                               output_zero_point=z_1, activation="relu", padding=model.conv1.padding[0])
        conv2 = quantize_layer(w2, b2, input_scale=s_1, input_zero_point=z_1, output_scale=s_2,
                               output_zero_point=z_2, activation="relu", padding=model.conv2.padding[0])
        fc = quantize_layer(model.fc.weight, model.fc.bias, input_scale=s_2, input_zero_point=z_2,
                            output_scale=s_o, output_zero_point=z_o)
        return cls(s_x, z_x, conv1, conv2, fc, pool)

    def quantize_input(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Float images → int8 with the input's (S, Z), TFLite rule (divide, ties away from zero)."""
        return quantize_tflite(images, self.input_scale, self.input_zero_point)

    def forward_int8(
        self, x_q: np.ndarray, batch_size: int = 250, *, single_rounding: bool = False
    ) -> np.ndarray:
        """int8 images (N, 1, 28, 28) → int8 logits (N, classes); integers all the way.

        ``single_rounding=True`` requantizes with TFLite's single-rounding variant.
        """
        _require_dtype("x_q", x_q, np.int8, 4)
        outs = []
        for start in range(0, x_q.shape[0], batch_size):  # batches bound the im2col memory
            h = self.conv1(x_q[start:start + batch_size], single_rounding=single_rounding)
            h = self.conv2(int8_max_pool2d(h, self.pool), single_rounding=single_rounding)
            h = int8_max_pool2d(h, self.pool)
            outs.append(self.fc(h.reshape(h.shape[0], -1), single_rounding=single_rounding))  # flatten: same (S, Z)
        return np.concatenate(outs)

    def __call__(self, images: torch.Tensor | np.ndarray, *, single_rounding: bool = False) -> np.ndarray:
        """Float images → int8 logits."""
        return self.forward_int8(self.quantize_input(images), single_rounding=single_rounding)

    def dequantize_logits(self, logits_q: np.ndarray) -> np.ndarray:
        """int8 logits → float32 ``S_out · (q - Z_out)``."""
        return (logits_q.astype(np.float32) - self.fc.output_zero_point) * np.float32(self.fc.output_scale)

    def predict(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Predicted classes (argmax of the int8 logits; ties go to the lower class index)."""
        return self(images).argmax(axis=1)

    def fake_quant_forward(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float simulation: same quantized weights, biases and ranges, float arithmetic.

        Each activation goes through :func:`fake_quantize_tflite`; convolutions and the
        linear layer run in ``dtype`` on dequantized weights. Returns float logits that
        are exact multiples of the output scale (shifted by the zero point).
        """
        def fq(t: torch.Tensor, layer_scale: float, zp: int) -> torch.Tensor:
            return fake_quantize_tflite(t, layer_scale, zp)

        c1, c2, fc = self.conv1, self.conv2, self.fc
        with torch.no_grad():
            x = fq(torch.as_tensor(images).to(dtype), self.input_scale, self.input_zero_point)
            h = F.conv2d(x, c1.dequantized_weight().to(dtype), c1.dequantized_bias().to(dtype),
                         stride=c1.stride, padding=c1.padding)
            h = F.max_pool2d(fq(F.relu(h), c1.output_scale, c1.output_zero_point), self.pool)
            h = F.conv2d(h, c2.dequantized_weight().to(dtype), c2.dequantized_bias().to(dtype),
                         stride=c2.stride, padding=c2.padding)
            h = F.max_pool2d(fq(F.relu(h), c2.output_scale, c2.output_zero_point), self.pool)
            out = F.linear(h.flatten(1), fc.dequantized_weight().to(dtype), fc.dequantized_bias().to(dtype))
            return fq(out, fc.output_scale, fc.output_zero_point)


# ----------------------------------------------------------------------------- PyTorch's kernels


def int8_to_quint8(x_q: np.ndarray, scale: float, zero_point: int) -> torch.Tensor:
    """Our int8 codes as a torch ``quint8`` tensor with the same real values.

    PyTorch's x86 (fbgemm) kernels take unsigned activations: ``q + 128`` with zero point
    ``Z + 128`` represents exactly the same ``S·(q - Z)``.
    """
    _require_dtype("x_q", x_q, np.int8)
    codes = torch.from_numpy(x_q.astype(np.int16) + 128).to(torch.uint8)
    return torch._make_per_tensor_quantized_tensor(codes, float(scale), int(zero_point) + 128)


def quint8_to_int8(t: torch.Tensor) -> np.ndarray:
    """A torch ``quint8`` tensor's codes shifted back to int8 (``q - 128``)."""
    if t.dtype != torch.quint8:
        raise ValueError(f"expected a quint8 tensor, got {t.dtype}")
    return (t.int_repr().numpy().astype(np.int16) - 128).astype(np.int8)


def to_torch_quantized(layer: IntegerLayer, relu: bool = False) -> nn.Module:
    """PyTorch's quantized module with exactly this layer's integers and scales.

    ``torch.ao.nn.quantized`` Conv2d/Linear (``intrinsic`` ConvReLU2d/LinearReLU when
    ``relu``) with the same int8 per-channel weights and scales, the bias as float
    ``bias_q · S_in · S_w`` (PyTorch quantizes it internally), and the output (S, Z + 128).
    PyTorch's clamp is ``[Z, 127]`` with ReLU, else ``[-128, 127]`` (in int8 terms); a
    layer with another clamp (ReLU6) raises ValueError.
    """
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    clamp = (max(layer.output_zero_point, INT8_MIN) if relu else INT8_MIN, INT8_MAX)
    if (layer.activation_min, layer.activation_max) != clamp:
        raise ValueError(
            f"the layer clamps to [{layer.activation_min}, {layer.activation_max}], "
            f"PyTorch's module (relu={relu}) to {list(clamp)}"
        )
    out_channels = layer.weight_q.shape[0]
    qweight = torch._make_per_channel_quantized_tensor(
        torch.from_numpy(layer.weight_q.copy()),
        torch.from_numpy(layer.weight_scale.astype(np.float64)),
        torch.zeros(out_channels, dtype=torch.int64),
        0,
    )
    if layer.kind == "conv":
        kh, kw = layer.weight_q.shape[2:]
        in_channels = layer.weight_q.shape[1] * layer.groups
        cls = nniq.ConvReLU2d if relu else nnq.Conv2d
        module = cls(in_channels, out_channels, (kh, kw), stride=layer.stride,
                     padding=layer.padding, groups=layer.groups)
    else:
        cls = nniq.LinearReLU if relu else nnq.Linear
        module = cls(layer.weight_q.shape[1], out_channels)
    module.set_weight_bias(qweight, layer.dequantized_bias())
    module.scale = float(layer.output_scale)
    module.zero_point = int(layer.output_zero_point) + 128
    return module


def fbgemm_emulation(layer: IntegerLayer, x_q: np.ndarray, *, saturate: bool = True) -> tuple[np.ndarray, int]:
    """What PyTorch's x86 (fbgemm, AVX2) kernel computes for this layer, in numpy.

    1. Activations as uint8 (``q + 128``), weights int8. ``vpmaddubsw`` multiplies
       adjacent pairs along the reduction axis (for a conv: kernel row, kernel column,
       channel; channels-last) and adds each pair **into int16 with saturation**:
       ``255·127 + 255·127 = 64,770`` does not fit in 32,767. ``saturate=False`` skips it.
    2. The pair sums add up in int32; ``(Z_in + 128) · Σ w`` is subtracted.
    3. Requantization in float32: ``(float(acc) + bias / (S_in·S_w)) · (S_in·S_w / S_out)``,
       rounded half to even (``cvtps2dq``), plus the zero point, clamped.

    Returns (int8 output, number of pair sums outside int16). Only ungrouped layers
    (fbgemm's depthwise kernels are different code).
    """
    _require_dtype("x_q", x_q, np.int8)
    if layer.groups != 1:
        raise ValueError("fbgemm_emulation covers ungrouped layers only")
    xu = x_q.astype(np.int32) + 128
    zp_u = layer.input_zero_point + 128
    w = layer.weight_q.astype(np.int32)
    if layer.kind == "conv":
        p = layer.padding
        xp = np.pad(xu, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=zp_u)  # pad = real 0
        kh, kw = w.shape[2:]
        patches = im2col(xp, (kh, kw), (layer.stride, layer.stride), (0, 0))  # N, L, C, kh·kw
        n, length = patches.shape[:2]
        a = patches.transpose(0, 1, 3, 2).reshape(n * length, -1)  # reduction order (u, v, c)
        b = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
    else:
        a, b = xu, w
    if a.shape[1] % 2:  # an odd length gets a zero partner
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 0), (0, 1)))
    acc = np.empty((a.shape[0], b.shape[0]), dtype=np.int64)
    saturated = 0
    rows = max(1, 2**22 // (b.shape[0] * b.shape[1]))  # chunks keep the pair array small
    for start in range(0, a.shape[0], rows):
        chunk = a[start:start + rows, None, :]
        pairs = chunk[..., 0::2] * b[None, :, 0::2] + chunk[..., 1::2] * b[None, :, 1::2]
        saturated += int((np.abs(pairs) > 32767).sum() if saturate else 0)
        if saturate:
            pairs = np.clip(pairs, -32768, 32767)
        acc[start:start + rows] = pairs.sum(axis=-1, dtype=np.int64)
    acc -= zp_u * b.sum(axis=1, dtype=np.int64)[None, :]
    act_times_w = (np.float32(layer.input_scale) * layer.weight_scale).astype(np.float32)
    multiplier = (act_times_w / np.float32(layer.output_scale)).astype(np.float32)
    bias = layer.dequantized_bias().numpy()
    scaled = (acc.astype(np.float32) + bias / act_times_w) * multiplier  # float32 throughout
    y = np.rint(scaled).astype(np.int64) + layer.output_zero_point  # rint: ties to even
    y = np.clip(y, layer.activation_min, layer.activation_max).astype(np.int8)
    if layer.kind == "conv":
        ho = (x_q.shape[2] + 2 * layer.padding - kh) // layer.stride + 1
        wo = (x_q.shape[3] + 2 * layer.padding - kw) // layer.stride + 1
        y = y.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)
    return y, saturated


def fbgemm_tinycnn_emulation(
    net: IntegerTinyCNN, images: torch.Tensor | np.ndarray, *, saturate: bool = True, batch_size: int = 250
) -> np.ndarray:
    """int8 logits of ``net`` with every layer computed as fbgemm's x86 kernel does.

    Each conv and the classifier go through :func:`fbgemm_emulation`: ``saturate=True``
    is the AVX2 path (``vpmaddubsw``: u8×s8 pair sums clipped to int16), ``saturate=False``
    the AVX-512 VNNI path (``vpdpbusd``: int32 throughout). The input is quantized with
    ``net.quantize_input`` and max-pooling is :func:`int8_max_pool2d`, as in
    :meth:`IntegerTinyCNN.forward_int8`. This shows what an AVX2 CPU computes on any CPU.
    """
    x_q = net.quantize_input(images)
    outs = []
    for start in range(0, x_q.shape[0], batch_size):
        h, _ = fbgemm_emulation(net.conv1, x_q[start:start + batch_size], saturate=saturate)
        h, _ = fbgemm_emulation(net.conv2, int8_max_pool2d(h, net.pool), saturate=saturate)
        h = int8_max_pool2d(h, net.pool)
        outs.append(fbgemm_emulation(net.fc, h.reshape(h.shape[0], -1), saturate=saturate)[0])
    return np.concatenate(outs)


def torch_quantized_tinycnn(net: IntegerTinyCNN) -> nn.Sequential:
    """The same integer TinyCNN as PyTorch quantized modules: quint8 in, quint8 logits out.

    conv1 and conv2 are fused ConvReLU2d; max-pooling and flattening run on quantized
    tensors directly. Feed it ``int8_to_quint8(net.quantize_input(x), ...)`` or
    ``torch.quantize_per_tensor(x, S, Z + 128, torch.quint8)``.
    """
    return nn.Sequential(
        to_torch_quantized(net.conv1, relu=True),
        nn.MaxPool2d(net.pool),
        to_torch_quantized(net.conv2, relu=True),
        nn.MaxPool2d(net.pool),
        nn.Flatten(),
        to_torch_quantized(net.fc, relu=False),
    ).eval()


# The child process of torch_quantized_logits_in_subprocess: fbgemm reads
# FBGEMM_ENABLE_INSTRUCTIONS once, when torch loads, so the engine runs in a fresh process.
_SUBPROCESS_CODE = """
import pickle, sys
import numpy as np, torch
import course_lib
from course_lib import kernels as K
course_lib.filter_quantization_warnings()
folder, engine = sys.argv[1], sys.argv[2]
torch.backends.quantized.engine = engine
with open(folder + "/in.pkl", "rb") as f:
    net, x_q = pickle.load(f)
with torch.no_grad():
    out = K.torch_quantized_tinycnn(net)(K.int8_to_quint8(x_q, net.input_scale, net.input_zero_point))
np.save(folder + "/out.npy", K.quint8_to_int8(out))
"""


def torch_quantized_logits_in_subprocess(
    net: IntegerTinyCNN, x_q: np.ndarray, *, engine: str = "fbgemm", instructions: str | None = "AVX2",
    timeout: float = 300.0,
) -> np.ndarray:
    """int8 logits of :func:`torch_quantized_tinycnn` on int8 images, run by PyTorch in a new process.

    The child sets ``torch.backends.quantized.engine = engine`` and, with ``instructions``,
    the environment variable ``FBGEMM_ENABLE_INSTRUCTIONS`` (``"AVX2"``: fbgemm ignores
    newer instruction sets such as AVX-512 VNNI). fbgemm reads it once, when torch loads;
    hence the separate process. ``x_q`` is int8 (N, 1, 28, 28); the result is int8 (N, classes).
    Raises ValueError for an engine this torch does not have, RuntimeError if the child fails.
    """
    _require_dtype("x_q", x_q, np.int8, 4)
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"engine {engine!r} is not one of {torch.backends.quantized.supported_engines}")
    env = dict(os.environ)
    env.pop("FBGEMM_ENABLE_INSTRUCTIONS", None)
    if instructions is not None:
        env["FBGEMM_ENABLE_INSTRUCTIONS"] = instructions
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "in.pkl"), "wb") as f:
            pickle.dump((net, x_q), f)
        done = subprocess.run([sys.executable, "-c", _SUBPROCESS_CODE, folder, engine], env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"PyTorch ({engine}) failed in the child process:\n{done.stderr[-2000:]}")
        return np.load(os.path.join(folder, "out.npy"))
