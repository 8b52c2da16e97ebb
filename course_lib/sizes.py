"""Size accounting: how many bytes a model's parameters take, stored one way or another.

The one home of byte counting for lessons 03, 07 and 08:

- lesson 03: :func:`model_size_bytes` (every tensor of a state dict), :func:`payload_bytes`
  (the tensors of a packed dict, no file format) and :func:`saved_size` (``torch.save``,
  then the file's real size);
- lesson 07: :func:`weight_bytes` / :func:`model_bytes` (packed ``b``-bit codes plus a
  float32 scale per output channel, the rest float32) and :func:`written_size`;
- lesson 08: :func:`layer_param_bytes` / :func:`model_param_bytes` with one
  :data:`SCHEMES` entry per deployed format (XNNPACK INT8, ONNX QDQ INT8, float32),
  split into weights, scales, zero points and biases to set beside a file's size, and
  :func:`onnx_initializer_bytes` (the tensors an ONNX file really stores, by dtype).

The formulas differ because the formats differ; the parts are always the same: codes,
one scale (and perhaps a zero point) per channel or tensor, biases, and a file format
around them. The old names (``compress.model_bytes``, ``granularity.saved_size``,
``models.model_size_bytes``, ``deploy.model_param_bytes``, ...) still work: they are
these functions.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FLOAT_BITS",
    "SCHEMES",
    "ParamBytes",
    "bits_plan",
    "layer_param_bytes",
    "model_bytes",
    "model_param_bytes",
    "model_size_bytes",
    "onnx_initializer_bytes",
    "other_float_bytes",
    "payload_bytes",
    "saved_size",
    "weight_bytes",
    "written_size",
]

FLOAT_BITS = 32  # "bits" of a layer left in float32
SCALE_BYTES = 4  # one float32 scale per output channel


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every Conv2d and Linear, in registration (forward) order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


# --------------------------------------------------------------------------- tensors and files (lesson 03)
def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):  # packed params of quantized modules
        return sum(_tensor_bytes(v) for v in value)
    return 0


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all tensors in ``model.state_dict()``: Σ numel · element_size.

    Parameters and buffers alike (BN running statistics count), so float32 → 4 bytes
    per value and int8 → 1; Python metadata and file-format overhead are not included.
    """
    return sum(_tensor_bytes(v) for v in model.state_dict().values())


def payload_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of the tensors alone (``numel · element_size``), without any file format."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))


def saved_size(obj: Any, path: str | os.PathLike[str]) -> int:
    """``torch.save(obj, path)``, then the file's real size in bytes (``os.path.getsize``)."""
    torch.save(obj, path)
    return os.path.getsize(path)


def written_size(blob: bytes, directory: str | os.PathLike[str] | None = None) -> int:
    """Write ``blob`` to a temporary file and return ``os.path.getsize`` of it (bytes)."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "weights.bin")
        with open(path, "wb") as f:
            f.write(blob)
        return os.path.getsize(path)


# --------------------------------------------------------------------------- packed b-bit weights (lesson 07)
def bits_plan(model: nn.Module, bits: int | Mapping[str, int]) -> dict[str, int]:
    """One bit width per weight layer; layers missing from a mapping stay float (32)."""
    layers = _weight_layers(model)
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(layers))
        if unknown:
            raise ValueError(f"no Conv2d/Linear layer named {unknown}; known: {list(layers)}")
        plan = {name: int(bits.get(name, FLOAT_BITS)) for name in layers}
    else:
        plan = dict.fromkeys(layers, int(bits))
    for name, b in plan.items():
        if b != FLOAT_BITS and not 2 <= b <= 16:
            raise ValueError(f"bits for {name!r} must be in 2..16 or {FLOAT_BITS} (float), got {b}")
    return plan


def weight_bytes(layer: nn.Module, bits: int) -> int:
    """Bytes of one Conv2d/Linear weight at ``bits``: ``ceil(numel·bits/8) + 4·C_out``.

    The second term is the float32 per-channel scale; symmetric zero points (all 0)
    are not stored. ``bits = 32`` means float32: ``4·numel``, no scale.
    """
    if not isinstance(layer, nn.Conv2d | nn.Linear):
        raise ValueError(f"expected a Conv2d or Linear layer, got {type(layer).__name__}")
    numel, channels = layer.weight.numel(), layer.weight.shape[0]
    if bits == FLOAT_BITS:
        return 4 * numel
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16 or {FLOAT_BITS} (float), got {bits}")
    return math.ceil(numel * bits / 8) + SCALE_BYTES * channels


def other_float_bytes(model: nn.Module) -> int:
    """Bytes of the floating-point state-dict tensors that are not Conv/Linear weights."""
    weight_keys = {f"{n}.weight" for n in _weight_layers(model)}
    return sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
               if k not in weight_keys and v.is_floating_point())


def model_bytes(model: nn.Module, bits: int | Mapping[str, int]) -> int:
    """Deployed size in bytes: Σ :func:`weight_bytes` + every other float tensor.

    ``bits``: one width for all weight layers or ``{layer: bits}`` (missing layers
    float32). Biases and BatchNorm tensors count at their own size (float32: 4 bytes);
    integer buffers (BatchNorm's ``num_batches_tracked``) are bookkeeping and not counted.
    """
    layers = _weight_layers(model)
    plan = bits_plan(model, bits)
    return sum(weight_bytes(layers[n], b) for n, b in plan.items()) + other_float_bytes(model)


# --------------------------------------------------------------------------- deployed formats (lesson 08)
@dataclass(frozen=True)
class ParamBytes:
    """Bytes of a model's parameters by role (one layer or a sum of layers)."""

    weights: int = 0
    scales: int = 0
    zero_points: int = 0
    biases: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.scales + self.zero_points + self.biases

    def __add__(self, other: ParamBytes) -> ParamBytes:
        return ParamBytes(
            self.weights + other.weights,
            self.scales + other.scales,
            self.zero_points + other.zero_points,
            self.biases + other.biases,
        )


def layer_param_bytes(
    weight_shape: Sequence[int],
    weight_bits: int = 8,
    *,
    per_channel: bool = True,
    scale_bytes: int = 4,
    zero_point_bytes: int = 0,
    has_bias: bool = True,
    bias_bytes: int = 4,
) -> ParamBytes:
    """Bytes one Conv2d/Linear layer takes when stored with ``weight_bits``-bit weights.

    With C = weight_shape[0] (output channels) and n = prod(weight_shape):

    - weights     = ceil(n · weight_bits / 8)   (codes packed densely; 32 = float32)
    - scales      = (C if per_channel else 1) · scale_bytes          (0 for float weights)
    - zero_points = (C if per_channel else 1) · zero_point_bytes     (0 when symmetric
      and the format does not store them)
    - biases      = C · bias_bytes if has_bias, else 0 (an int32 or float32 bias is 4
      bytes; a format that stores a scale and zero point per bias value pays those too)

    ``scale_bytes`` and ``zero_point_bytes`` are ignored (0) when weight_bits == 32.
    """
    shape = tuple(int(s) for s in weight_shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"weight_shape must have >= 2 positive dimensions, got {tuple(weight_shape)}")
    if not 1 <= weight_bits <= 32:
        raise ValueError(f"weight_bits must be in 1..32, got {weight_bits}")
    if min(scale_bytes, zero_point_bytes, bias_bytes) < 0:
        raise ValueError("byte counts must be >= 0")
    channels, n = shape[0], math.prod(shape)
    n_qparams = (channels if per_channel else 1) if weight_bits < 32 else 0
    return ParamBytes(
        weights=math.ceil(n * weight_bits / 8),
        scales=n_qparams * scale_bytes,
        zero_points=n_qparams * zero_point_bytes,
        biases=channels * bias_bytes if has_bias else 0,
    )


# How each deployed format stores a Conv2d/Linear layer, for model_param_bytes.
SCHEMES: dict[str, dict[str, Any]] = {
    # float32 weights and biases
    "fp32": dict(weight_bits=32, bias_bytes=4),
    # XNNPACK (ExecuTorch): int8 symmetric per-channel weights, one float32 scale per
    # channel, zero point 0 implied (not stored), bias kept 4 bytes per channel
    "xnnpack-int8": dict(weight_bits=8, per_channel=True, scale_bytes=4, zero_point_bytes=0, bias_bytes=4),
    # ONNX QDQ (onnxruntime.quantization): int8 weights with a float32 scale and an int8
    # zero point per channel; the bias is int32 with its own float32 scale and int32
    # zero point per channel: 12 bytes per output channel
    "onnx-qdq-int8": dict(weight_bits=8, per_channel=True, scale_bytes=4, zero_point_bytes=1, bias_bytes=12),
}


def model_param_bytes(model: nn.Module, scheme: str | dict[str, Any] = "fp32", *, fold_bn: bool = True) -> ParamBytes:
    """Sum of :func:`layer_param_bytes` over the Conv2d and Linear layers of ``model``.

    ``scheme`` names an entry of :data:`SCHEMES` or gives the keyword arguments of
    :func:`layer_param_bytes`. With ``fold_bn`` the BatchNorms are first folded into the
    convolutions before them (as both runtimes do), so each such conv gains a bias and
    the BatchNorm parameters disappear; other parameters are not counted.
    """
    if isinstance(scheme, str) and scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    kwargs = SCHEMES[scheme] if isinstance(scheme, str) else dict(scheme)
    if fold_bn:
        from course_lib.granularity import fold_batchnorms

        model = fold_batchnorms(model)
    total = ParamBytes()
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            total = total + layer_param_bytes(
                module.weight.shape, has_bias=module.bias is not None, **kwargs
            )
    return total


def onnx_initializer_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of the stored tensors (initializers) of an ONNX file, by numpy dtype name."""
    import onnx
    from onnx import numpy_helper

    out: dict[str, int] = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(tensor)
        out[array.dtype.name] = out.get(array.dtype.name, 0) + int(array.nbytes)
    return out


