"""The affine map between real numbers and integers.

Uniform (affine) quantization stores a real tensor ``x`` as integers ``q`` and two
quantization parameters, a positive ``scale`` s and an integer ``zero_point`` z::

    x  ≈  s · (q − z)                          dequantize
    q  =  clamp(z + round(x / s), qmin, qmax)  quantize

``[qmin, qmax]`` is the integer range of the storage type (``qrange``): [-128, 127] for
int8, [0, 255] for uint8, one code fewer with ``narrow_range``. The zero point is added
*after* rounding, in the integer domain: the often-quoted ``round((x - z) / s)`` mixes
an integer into the real domain and is wrong.

Why zero must be exactly representable
    Zeros are everywhere in a network (ReLU outputs, zero padding, pruned weights).
    With an integer zero point, the real 0.0 is stored as exactly ``z`` and read back
    as exactly 0.0, so padding adds no error and a zero weight contributes nothing to
    an integer dot product. This is why ``qparams_from_range`` first widens the range
    to include 0 and then rounds the zero point to an integer.

The rounding rule (PyTorch's, matched bit for bit on CPU)
    ``round`` is round-half-to-even (``std::nearbyint``), applied to the product of x
    with the float32 reciprocal of the scale: ``q = z + nearbyint(x * (1.0f / s))``.
    Multiplying by ``1/s`` is *not* the same as dividing by ``s``: in float32,
    ``3.1 / 0.2`` is 15.499999 (rounds to 15) while ``3.1 * (1 / 0.2)`` is exactly 15.5
    (rounds to 16, the even neighbour); PyTorch gives 16. The zero point is added after
    rounding, which matters at ties when z is odd: ``nearbyint(0.5) + 1 = 1`` whereas
    ``nearbyint(0.5 + 1) = 2``. TFLite's reference quantizer divides and rounds ties
    away from zero instead, so "bit-exact" always needs to say bit-exact with *what*.
    Scales are float32: a Python float scale is rounded to float32 first, as PyTorch does.

Granularity: one (s, z) for the whole tensor (per-tensor, ``axis=None``), one per
index along ``axis`` (per-channel), or one per group of ``group_size`` consecutive
values along the last dimension (per-group).

``pack_bits`` / ``unpack_bits`` store 1-, 2-, 4- or 8-bit codes densely in bytes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dequantize",
    "fake_quantize",
    "pack_bits",
    "qparams_from_range",
    "qparams_from_tensor",
    "qrange",
    "quantize",
    "unpack_bits",
]

MIN_BITS, MAX_BITS = 2, 16
PACK_WIDTHS = (1, 2, 4, 8)
# PyTorch observers never return a scale below float32 eps: it keeps a constant
# tensor (min == max) from getting scale 0 and an infinite 1/scale.
EPS = torch.finfo(torch.float32).eps
# The smallest normal float32. A smaller (subnormal) scale has a float32 reciprocal
# that overflows to inf, and PyTorch then returns garbage (0 * inf = NaN).
TINY = torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------- ranges


def qrange(bits: int = 8, signed: bool = True, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit code (2 ≤ bits ≤ 16).

    signed: [-2^(b-1), 2^(b-1) - 1]; unsigned: [0, 2^b - 1]. ``narrow_range`` drops the
    lowest code ([-127, 127] for int8, [1, 255] for uint8) so that the range is
    symmetric around its midpoint, as TFLite requires for int8 weights.
    """
    _check_bits(bits)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return (qmin + 1, qmax) if narrow_range else (qmin, qmax)


def qparams_from_range(
    min_val: float | Tensor,
    max_val: float | Tensor,
    bits: int = 8,
    *,
    signed: bool = True,
    symmetric: bool = False,
    narrow_range: bool = False,
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int64) that map ``[min_val, max_val]`` onto ``qrange``.

    ``min_val``/``max_val`` are floats (per-tensor, 0-dim results) or tensors of one
    shape (one pair per channel or group). The range is first widened to include 0:
    ``lo = min(min_val, 0)``, ``hi = max(max_val, 0)``.

    asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = clamp(qmin - round(lo / s), qmin, qmax)``
    symmetric:  ``s = max(-lo, hi) / ((qmax - qmin) / 2)``, ``z = (qmin + qmax + 1) // 2``,
    i.e. 0 for signed codes and 2^(b-1) for unsigned ones (128 for uint8).
    In both, ``s = max(s, eps)`` with eps = float32 eps, so a constant tensor still gets
    a valid scale. ``round`` is half-to-even (``torch.round``).

    Bit-exact with ``calculate_qparams`` of ``torch.ao.quantization.MinMaxObserver`` /
    ``PerChannelMinMaxObserver`` (per-tensor/per-channel, affine/symmetric, with
    ``quant_min, quant_max = qrange(...)``). Note the symmetric divisor is
    ``(qmax - qmin) / 2`` = 127.5 for int8, not 127; with ``narrow_range`` it is 127.
    One documented difference: for *unsigned symmetric* codes torch uses 128 (quint8
    default) and 2^15 (uint16), as here, but with a custom ``quant_min``/``quant_max``
    it takes ``(qmin + qmax) // 2``, one less (e.g. 7 instead of 8 for 4 bits).
    """
    qmin, qmax = qrange(bits, signed, narrow_range)
    lo, hi = _as_range(min_val, max_val)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = torch.maximum(-lo, hi) / (float(qmax - qmin) / 2)
    else:
        scale = (hi - lo) / float(qmax - qmin)
    if not torch.isfinite(scale).all():
        raise ValueError(
            f"the range [{float(lo.min())}, {float(hi.max())}] is too wide for a float32 scale"
        )
    scale = torch.clamp_min(scale, EPS)
    if symmetric:
        # The midpoint of [qmin, qmax], rounded up: 0 when signed, 2^(b-1) when unsigned,
        # so an unsigned code is the signed code plus 2^(b-1).
        zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int64)
    else:
        # lo / scale is a float32 division here (not the reciprocal), as in the observer.
        zero_point = qmin - torch.round(lo / scale).to(torch.int64)
        zero_point = zero_point.clamp(qmin, qmax)
    return scale, zero_point


def qparams_from_tensor(
    x: Tensor,
    bits: int = 8,
    *,
    signed: bool = True,
    symmetric: bool = False,
    narrow_range: bool = False,
    axis: int | None = None,
    group_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Min-max qparams of ``x``: ``qparams_from_range`` applied to its min and max.

    per-tensor (default): 0-dim scale and zero point.
    per-channel (``axis=k``): shape ``(x.shape[k],)``, min/max over all other dims.
    per-group (``group_size=g``): groups of g consecutive values along the last dim,
    shape ``x.shape[:-1] + (x.shape[-1] // g,)``.
    Bit-exact with ``MinMaxObserver`` / ``PerChannelMinMaxObserver(ch_axis=k)``.
    """
    x = _as_values(x)
    lo, hi = _min_max(x, axis, group_size)
    return qparams_from_range(
        lo, hi, bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range
    )


# ----------------------------------------------------------------------- the map


def quantize(
    x: Tensor,
    scale: float | Tensor,
    zero_point: int | Tensor,
    bits: int = 8,
    *,
    signed: bool = True,
    narrow_range: bool = False,
    axis: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Integer codes ``q = clamp(z + round(x * (1/s)), qmin, qmax)`` as int32.

    ``1/s`` is the float32 reciprocal, the product is float32 and ``round`` is half to
    even; z is added after rounding. Bit-exact with
    ``torch.quantize_per_tensor(x, s, z, dtype).int_repr()`` and
    ``torch.quantize_per_channel(x, s, z, axis, dtype).int_repr()`` (qint8, quint8 and,
    after clamping to ``qrange``, qint32 for other bit widths).
    ``x`` is converted to float32 and must be finite. Values beyond the range clamp to
    qmin/qmax however large they are; -0.0 quantizes like +0.0.
    """
    qmin, qmax = qrange(bits, signed, narrow_range)
    x = _as_values(x)
    xs, s, z = _broadcastable(x, scale, zero_point, axis, group_size, (qmin, qmax))
    q = torch.round(xs * torch.reciprocal(s))
    # Clamp in float, before the int cast: x/s can exceed every integer type (1e30 / 1e-10).
    q = torch.clamp(q + z.to(torch.float32), qmin, qmax)
    return q.to(torch.int32).reshape(x.shape)


def dequantize(
    q: Tensor,
    scale: float | Tensor,
    zero_point: int | Tensor,
    *,
    axis: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Real values ``(q - z) * s`` as float32: the integer difference times the float32 scale.

    Bit-exact with ``Tensor.dequantize()`` of a per-tensor or per-channel quantized tensor.
    Zero comes back as +0.0, never -0.0.
    """
    q = _as_integers(q, "q")
    qs, s, z = _broadcastable(q, scale, zero_point, axis, group_size, None)
    return ((qs.to(torch.int64) - z).to(torch.float32) * s).reshape(q.shape)


def fake_quantize(
    x: Tensor,
    scale: float | Tensor,
    zero_point: int | Tensor,
    bits: int = 8,
    *,
    signed: bool = True,
    narrow_range: bool = False,
    axis: int | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Quantize then dequantize: ``(clamp(z + round(x * (1/s)), qmin, qmax) - z) * s``, float32.

    The float values a quantized tensor can hold, computed in float. Bit-exact with
    ``torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)`` and
    ``torch.fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax)`` (same rule:
    float32 reciprocal, half to even, z added after rounding), except that the
    per-channel torch op sends values with ``|x / s| >= 2**63`` to qmin (an int64
    overflow); here they clamp to the nearer end. Forward only: the straight-through
    gradient lives in ``course_lib.qat``.
    """
    q = quantize(
        x,
        scale,
        zero_point,
        bits,
        signed=signed,
        narrow_range=narrow_range,
        axis=axis,
        group_size=group_size,
    )
    return dequantize(q, scale, zero_point, axis=axis, group_size=group_size)


# ---------------------------------------------------------------------- packing


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Pack integer codes into bytes, ``8 // bits`` codes per byte (bits in 1, 2, 4, 8).

    ``q`` is flattened (row-major); the first code goes in the lowest bits of a byte.
    Negative codes are stored in ``bits``-bit two's complement (-1 → 0b1111 for 4 bits),
    so any value in [-2^(b-1), 2^b - 1] is accepted. The last byte is padded with zeros.
    Returns a 1-D uint8 tensor of ``ceil(q.numel() * bits / 8)`` bytes.
    """
    per_byte = _per_byte(bits)
    q = _as_integers(q, "q").reshape(-1).to(torch.int64)
    lo, hi = -(2 ** (bits - 1)), 2**bits - 1
    if q.numel() and (q.min() < lo or q.max() > hi):
        raise ValueError(
            f"values to pack in {bits} bits must lie in [{lo}, {hi}], "
            f"got min {int(q.min())} and max {int(q.max())}"
        )
    codes = q & (2**bits - 1)  # two's complement of `bits` bits
    codes = F.pad(codes, (0, -codes.numel() % per_byte)).reshape(-1, per_byte)
    shifts = torch.arange(per_byte) * bits
    return (codes << shifts).sum(dim=1).to(torch.uint8)  # disjoint bits: sum == or


def unpack_bits(packed: Tensor, bits: int, numel: int, *, signed: bool = True) -> Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` codes as a 1-D int32 tensor.

    ``signed=True`` reads each code as ``bits``-bit two's complement
    ([-2^(b-1), 2^(b-1) - 1]); ``signed=False`` as unsigned ([0, 2^b - 1]).
    """
    per_byte = _per_byte(bits)
    packed = torch.as_tensor(packed)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    need = -(-numel // per_byte)
    if packed.numel() != need:
        raise ValueError(
            f"{numel} codes of {bits} bits take {need} bytes, but packed has {packed.numel()}"
        )
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    codes = (packed.reshape(-1, 1).to(torch.int32) >> shifts) & (2**bits - 1)
    codes = codes.reshape(-1)[:numel]
    if signed:  # the top bit of a code weighs -2^(b-1) instead of +2^(b-1)
        codes = torch.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes)
    return codes


# ------------------------------------------------------------ checks and layout


def _check_bits(bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def _per_byte(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACK_WIDTHS:
        raise ValueError(f"pack_bits/unpack_bits support bits in {PACK_WIDTHS}, got {bits!r}")
    return 8 // bits


def _check_finite(t: Tensor, name: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN or Inf value(s), the first at index "
            f"{first}: {float(t[first])}; quantization needs finite values"
        )


def _as_values(x: Any, name: str = "x") -> Tensor:
    """``x`` as a finite, non-empty float32 tensor (the dtype PyTorch quantizes from)."""
    x = torch.as_tensor(x)
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    x = x.to(torch.float32)
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): nothing to quantize")
    _check_finite(x, name)
    return x


def _as_integers(t: Any, name: str) -> Tensor:
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    return t


def _as_range(min_val: Any, max_val: Any) -> tuple[Tensor, Tensor]:
    lo, hi = _as_values(min_val, "min_val"), _as_values(max_val, "max_val")
    if lo.shape != hi.shape:
        raise ValueError(
            f"min_val and max_val must have the same shape, got {tuple(lo.shape)} "
            f"and {tuple(hi.shape)}"
        )
    if (lo > hi).any():
        raise ValueError(f"min_val must not exceed max_val, got {lo} > {hi}")
    return lo, hi


def _as_scale(scale: Any) -> Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32)  # a Python float is rounded to float32
    if s.numel() == 0:
        raise ValueError("scale is empty")
    if not torch.isfinite(s).all():
        raise ValueError(f"scale must be finite, got {float(s[~torch.isfinite(s)][0])}")
    if (s <= 0).any():
        raise ValueError(f"scale must be positive, got {float(s[s <= 0][0])}")
    if (s < TINY).any():
        raise ValueError(
            f"scale {float(s[s < TINY][0]):.4g} is below the smallest normal float32 "
            f"({TINY:.4g}): its float32 reciprocal overflows to inf"
        )
    return s


def _as_zero_point(zero_point: Any, qlimits: tuple[int, int] | None) -> Tensor:
    z = _as_integers(zero_point, "zero_point").to(torch.int64)
    if qlimits is not None and z.numel():
        qmin, qmax = qlimits
        if z.min() < qmin or z.max() > qmax:
            raise ValueError(
                f"zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], "
                f"got values from {int(z.min())} to {int(z.max())}"
            )
    return z


def _min_max(x: Tensor, axis: int | None, group_size: int | None) -> tuple[Tensor, Tensor]:
    """Min and max of x per tensor, per channel along ``axis`` or per group of the last dim."""
    if axis is not None and group_size is not None:
        raise ValueError("give either axis (per-channel) or group_size (per-group), not both")
    if group_size is not None:
        return torch.aminmax(_groups(x, group_size), dim=-1)
    if axis is not None:
        rows = x.movedim(_normalize_axis(axis, x.dim()), 0).reshape(x.shape[axis], -1)
        return torch.aminmax(rows, dim=1)
    return torch.aminmax(x)


def _normalize_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis!r} is out of range for a tensor with {ndim} dimension(s)")
    return axis % ndim


def _groups(x: Tensor, group_size: Any) -> Tensor:
    """View the last dim of x as (n_groups, group_size)."""
    if x.dim() == 0:
        raise ValueError("per-group quantization needs a tensor with at least one dimension")
    n = x.shape[-1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"group_size {group_size} does not divide the last dimension ({n})")
    return x.reshape(*x.shape[:-1], n // group_size, group_size)


def _broadcastable(
    x: Tensor,
    scale: Any,
    zero_point: Any,
    axis: int | None,
    group_size: int | None,
    qlimits: tuple[int, int] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (scale, zero_point) and reshape (x, scale, zero_point) to broadcast elementwise.

    per-tensor: 0-dim s and z. per-channel: s and z of shape (C,) viewed as (C, 1, ..., 1)
    against dim ``axis``. per-group: x viewed as (..., n_groups, group_size) and s, z as
    (..., n_groups, 1). ``qlimits`` (quantize only) bounds the zero point.
    """
    s, z = _as_scale(scale), _as_zero_point(zero_point, qlimits)
    if axis is not None and group_size is not None:
        raise ValueError("give either axis (per-channel) or group_size (per-group), not both")
    if group_size is not None:
        x = _groups(x, group_size)
        want = tuple(x.shape[:-1])
        _expect_shape(s, "scale", want, "per-group")
        _expect_shape(z, "zero_point", want, "per-group")
        return x, s.unsqueeze(-1), z.unsqueeze(-1)
    if axis is not None:
        k = _normalize_axis(axis, x.dim())
        want = (x.shape[k],)
        _expect_shape(s, "scale", want, "per-channel")
        _expect_shape(z, "zero_point", want, "per-channel")
        view = [-1] + [1] * (x.dim() - k - 1)  # channel index first, broadcast over the rest
        return x, s.reshape(view), z.reshape(view)
    if s.numel() != 1 or z.numel() != 1:
        raise ValueError(
            f"per-tensor quantization takes one scale and one zero_point, got shapes "
            f"{tuple(s.shape)} and {tuple(z.shape)}; pass axis= or group_size= for more"
        )
    return x, s.reshape(()), z.reshape(())


def _expect_shape(t: Tensor, name: str, want: tuple[int, ...], kind: str) -> None:
    if tuple(t.shape) != want:
        raise ValueError(
            f"{kind}: {name} must have shape {want} (one value per channel or group), "
            f"got {tuple(t.shape)}"
        )
