"""Edge deployment: export a model to two edge runtimes, then size, time and check it.

The two runtimes, each with a float32 and an INT8 version of the model:

- **ExecuTorch** (``.pte``): ``torch.export`` → PT2E quantization with the
  ``XNNPACKQuantizer`` (symmetric INT8, per-channel weights, calibrated on the calib
  split) → ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` → a
  flatbuffer program run by ExecuTorch's Python runtime on this CPU. The float version
  is lowered to XNNPACK without quantization. Programs have a static batch of 1.
- **ONNX Runtime** (``.onnx``): ``torch.onnx.export`` (the dynamo exporter, dynamic
  batch) → ``quant_pre_process`` → ``quantize_static`` to QDQ (INT8 activations and
  per-channel INT8 weights, min-max calibration through a :class:`CalibrationReader`)
  → an ``InferenceSession`` on the CPU execution provider.

And the tools to compare them:

- :func:`measure_latency` / :func:`percentile`: warm-up, then ``repeats`` timed calls;
  median and p90 in milliseconds (linear interpolation between order statistics).
- :func:`encode_png` / :func:`preprocess_png`: the end-to-end pipeline (decode, resize,
  normalise) that a device runs on a raw image before the model.
- :func:`layer_param_bytes` / :func:`model_param_bytes`: bytes of the parameters at a
  given bit width, scales, zero points and biases included, to set beside file sizes.
- :func:`estimate_latency_ms`: a budget from MAC counts and stated device assumptions.
- :func:`benchmark_model` and :func:`format_table`: the whole measured table, shared by
  lesson 08 and ``scripts/benchmark_deploy.py`` (``make bench``).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from course_lib import data, models

__all__ = [
    "INT8_CPU_FLAGS",
    "MODEL_INPUTS",
    "PI4_SCENARIOS",
    "PRECISIONS",
    "RUNTIMES",
    "SCHEMES",
    "Artifact",
    "CalibrationReader",
    "DeployRow",
    "DeviceAssumptions",
    "LatencyStats",
    "ParamBytes",
    "benchmark_model",
    "build_artifacts",
    "cpu_flags",
    "cpu_model_name",
    "encode_png",
    "estimate_latency_ms",
    "export_executorch",
    "export_onnx",
    "format_table",
    "layer_param_bytes",
    "load_runner",
    "measure_artifacts",
    "measure_latency",
    "model_param_bytes",
    "onnx_initializer_bytes",
    "percentile",
    "preprocess_png",
    "quantize_onnx",
    "quantize_pt2e_xnnpack",
    "runner_logits",
    "strip_onnx_metadata",
]

RUNTIMES = ("executorch", "onnxruntime")
PRECISIONS = ("fp32", "int8")
THREADS = 2  # the course machine has 2 cores
INPUT_NAME, OUTPUT_NAME = "x", "logits"
# name -> (C, H, W) of one input image and whether it is the 3×32×32 "rgb32" input
MODEL_INPUTS: dict[str, tuple[tuple[int, int, int], bool]] = {
    "tinycnn": ((1, 28, 28), False),
    "mobilenetv2": ((3, 32, 32), True),
}
DISPLAY_NAMES = {"tinycnn": "TinyCNN", "mobilenetv2": "MobileNetV2"}


# --------------------------------------------------------------------------- logging
class _KernelPreferenceFilter(logging.Filter):
    """Drops the one warning torchao's import triggers in torch's pytree logger.

    torchao 0.18 calls ``register_constant`` on its ``KernelPreference`` enum, which
    torch 2.14 reports as deprecated; nothing in this course can act on it. Only that
    record is dropped: every other message of the logger still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            "register_constant" in str(record.msg)
            and any("KernelPreference" in str(a) for a in (record.args or ()))
        )


_PYTREE_LOGGER = logging.getLogger("torch.utils._pytree")
if not any(isinstance(f, _KernelPreferenceFilter) for f in _PYTREE_LOGGER.filters):
    _PYTREE_LOGGER.addFilter(_KernelPreferenceFilter())


# --------------------------------------------------------------------------- the CPU
INT8_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(names: Sequence[str] = INT8_CPU_FLAGS, cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, bool]:
    """Which of the x86 instruction-set ``names`` this CPU reports in ``/proc/cpuinfo``.

    INT8 speed on x86 hinges on these: AVX2 multiplies int8 pairs with ``vpmaddubsw``
    (u8×s8 → saturating s16) then ``vpmaddwd``; AVX512-VNNI / AVX-VNNI fuse that into one
    ``vpdpbusd`` (u8×s8 → s32 accumulate). Returns all False where the file is absent
    (not Linux, or not x86).
    """
    path = Path(cpuinfo)
    if not path.exists():
        return dict.fromkeys(names, False)
    flags: set[str] = set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {n: n in flags for n in names}


def cpu_model_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    path = Path(cpuinfo)
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown CPU"


# --------------------------------------------------------------------------- latency
def percentile(samples: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) by linear interpolation between order statistics.

    With the samples sorted ascending as x[0] ≤ … ≤ x[n-1], h = (n - 1)·q/100 and
    k = floor(h):  P_q = x[k] + (h - k)·(x[k+1] - x[k])   (x[k] when k = n - 1).
    This is numpy's default ("linear") method; q = 50 is the median. Float64 result.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64).reshape(-1))
    if x.size == 0:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if np.isnan(x).any():
        raise ValueError("the samples contain NaN")
    h = (x.size - 1) * q / 100.0
    k = math.floor(h)
    if k >= x.size - 1:
        return float(x[-1])
    return float(x[k] + (h - k) * (x[k + 1] - x[k]))


@dataclass(frozen=True)
class LatencyStats:
    """Timed calls in milliseconds (warm-up calls excluded) and their summary."""

    samples_ms: tuple[float, ...]
    warmup: int

    @property
    def median_ms(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p90_ms(self) -> float:
        return percentile(self.samples_ms, 90)

    @property
    def repeats(self) -> int:
        return len(self.samples_ms)


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 10,
    repeats: int = 50,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed one by one.

    Sample i = (clock() after call i - clock() before call i) · 1000, in ms. Warm-up
    calls are excluded because first calls pay one-off costs (memory allocation, weight
    packing, thread-pool start-up, cache misses). ``clock`` returns seconds; pass a fake
    clock to test the harness without wall time.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append((clock() - start) * 1000.0)
    return LatencyStats(tuple(samples), warmup)


# --------------------------------------------------------------------------- end to end
def encode_png(images: np.ndarray) -> list[bytes]:
    """Each uint8 H×W image of ``images`` (N×H×W) as PNG bytes, in memory (Pillow)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape N×H×W, got {images.dtype} {images.shape}")
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def preprocess_png(png: bytes, *, rgb32: bool = False) -> np.ndarray:
    """Decode → [0, 1] → (resize 28→32, 3 channels if ``rgb32``) → normalise: float32 1×C×H×W.

    x = (p/255 - MNIST_MEAN) / MNIST_STD. The resize is Pillow's bilinear on a float32
    ("F") image: for upsampling it interpolates at pixel centres and clamps at the border,
    as ``torch.nn.functional.interpolate(bilinear, align_corners=False)`` does, so the
    result equals :func:`course_lib.data.get_split` to float32 rounding (~1e-6).
    """
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    if image.mode != "L":
        raise ValueError(f"expected a grayscale PNG, got mode {image.mode!r}")
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if rgb32:
        x = np.asarray(Image.fromarray(x, mode="F").resize((32, 32), Image.Resampling.BILINEAR))
    x = (x - np.float32(data.MNIST_MEAN)) / np.float32(data.MNIST_STD)
    x = x[None, None]
    if rgb32:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- size accounting
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


# --------------------------------------------------------------------------- calibration
try:  # onnxruntime is part of the pinned set; keep course_lib importable without it
    from onnxruntime.quantization import CalibrationDataReader as _CalibrationDataReader
except ImportError:  # pragma: no cover
    _CalibrationDataReader = object  # type: ignore[misc, assignment]


class CalibrationReader(_CalibrationDataReader):
    """An ONNX Runtime ``CalibrationDataReader`` over a set of images.

    ``get_next()`` returns ``{input_name: batch}`` with batch = images[i : i+batch_size]
    as a C-contiguous float32 numpy array (the last batch may be shorter), in order, then
    ``None`` once every image has been given. ``rewind()`` starts again from the first.
    ``quantize_static`` calls ``get_next`` until it returns None and runs the model on
    each batch to record activation ranges.
    """

    def __init__(self, images: torch.Tensor | np.ndarray, *, input_name: str = INPUT_NAME, batch_size: int = 100) -> None:
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.ndim != 4 or len(array) == 0:
            raise ValueError(f"expected a non-empty N×C×H×W batch of images, got shape {array.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = np.ascontiguousarray(array, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = int(batch_size)
        self._next = 0

    @classmethod
    def from_split(cls, split: str = "calib", *, rgb32: bool = False, **kwargs: Any) -> CalibrationReader:
        """A reader over one normalised split of the shipped subset (the calib split by default)."""
        images, _ = data.get_split(split, rgb32=rgb32)
        return cls(images, **kwargs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next : self._next + self.batch_size]
        self._next += self.batch_size
        return {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)


# --------------------------------------------------------------------------- exports
@dataclass
class Artifact:
    """One exported model file and how it was made."""

    runtime: str  # "executorch" | "onnxruntime"
    precision: str  # "fp32" | "int8"
    path: Path
    export_seconds: float
    reference: nn.Module | None = field(default=None, repr=False)  # its PyTorch twin, if any
    metadata_bytes_removed: int = 0  # debug metadata stripped from the file (ONNX)

    @property
    def file_bytes(self) -> int:
        return os.path.getsize(self.path)


def _example(input_chw: Sequence[int], batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, *input_chw)


def quantize_pt2e_xnnpack(model: nn.Module, calib_images: torch.Tensor, *, batch_size: int = 100) -> nn.Module:
    """PT2E static INT8 quantization for XNNPACK, calibrated on ``calib_images``.

    ``torch.export`` with a dynamic batch (so calibration runs in batches) →
    ``prepare_pt2e`` with ``XNNPACKQuantizer`` (symmetric per-channel int8 weights,
    asymmetric int8 activations) → one forward per batch records ranges →
    ``convert_pt2e``, whose graph holds explicit quantize/dequantize ops: it runs in
    PyTorch and computes what the lowered INT8 program should.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torch.export import Dim, export
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calib_images.ndim != 4 or len(calib_images) == 0:
        raise ValueError(f"calib_images must be a non-empty N×C×H×W tensor, got {tuple(calib_images.shape)}")
    # An example batch of 2: with 1, export would specialise the batch dimension to 1.
    example = (calib_images[:2].clone(),) if len(calib_images) >= 2 else (calib_images.repeat(2, 1, 1, 1),)
    graph = export(model.eval(), example, dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}}).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in calib_images.split(batch_size):
            prepared(batch)
    return convert_pt2e(prepared)


def export_executorch(
    model: nn.Module,
    path: str | Path,
    input_chw: Sequence[int],
    *,
    calib_images: torch.Tensor | None = None,
) -> Artifact:
    """Lower ``model`` to an XNNPACK-delegated ExecuTorch program at ``path`` (batch 1).

    Without ``calib_images``: the float32 model. With them: :func:`quantize_pt2e_xnnpack`
    first, and the artifact's ``reference`` is the converted (quantize/dequantize)
    PyTorch module. Then ``torch.export`` → ``to_edge_transform_and_lower`` with the
    ``XnnpackPartitioner`` → ``to_executorch()`` → the flatbuffer bytes.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import export

    start = time.perf_counter()
    module = model.eval()
    precision = "fp32"
    if calib_images is not None:
        module, precision = quantize_pt2e_xnnpack(model, calib_images), "int8"
    program = to_edge_transform_and_lower(
        export(module, (_example(input_chw),)), partitioner=[XnnpackPartitioner()]
    ).to_executorch()
    path = Path(path)
    path.write_bytes(program.buffer)
    reference = module if precision == "int8" else model
    return Artifact("executorch", precision, path, time.perf_counter() - start, reference)


def strip_onnx_metadata(path: str | Path) -> int:
    """Remove the per-node debug metadata of an ONNX file in place; returns the bytes saved.

    The dynamo exporter annotates every node with ``metadata_props``: the Python stack
    trace that created it (absolute source paths included), the FX node, module names.
    Useful for debugging, not needed to run, and it makes the file depend on where the
    code lives. Weights, graph and operator attributes are untouched.
    """
    import onnx

    path = Path(path)
    before = os.path.getsize(path)
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))
    return before - os.path.getsize(path)


def export_onnx(model: nn.Module, path: str | Path, input_chw: Sequence[int]) -> Artifact:
    """The float32 model as one self-contained ONNX file with a dynamic batch dimension.

    torch 2.14's default exporter (``dynamo=True``: ``torch.export`` then onnxscript);
    it runs offline. ``external_data=False`` keeps the weights inside the file;
    ``optimize=True`` (the default) folds BatchNorm into the convolutions. The nodes'
    debug metadata is then stripped (:func:`strip_onnx_metadata`).
    """
    from torch.export import Dim

    start = time.perf_counter()
    path = Path(path)
    torch.onnx.export(
        model.eval(),
        (_example(input_chw, batch=2),),  # batch 2: batch 1 would be specialised
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamo=True,
        external_data=False,
        verbose=False,
        dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}},
    )
    removed = strip_onnx_metadata(path)
    return Artifact("onnxruntime", "fp32", path, time.perf_counter() - start, model, removed)


def quantize_onnx(
    float_path: str | Path, path: str | Path, reader: CalibrationReader, *, preprocess: bool = True
) -> Artifact:
    """Static INT8 quantization of an ONNX model to QDQ form at ``path``.

    ``quant_pre_process`` (shape inference and graph clean-up) first, then
    ``quantize_static`` with QuantFormat.QDQ, per-channel symmetric int8 weights,
    int8 activations (asymmetric) and min-max ranges from ``reader``. QDQ keeps float
    operators surrounded by QuantizeLinear/DequantizeLinear pairs; ONNX Runtime fuses
    each pattern into an integer kernel (e.g. QLinearConv) when it loads the model.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    float_path, path = Path(float_path), Path(path)
    source = float_path
    if preprocess:
        source = path.with_name(path.stem + "_pre.onnx")
        quant_pre_process(str(float_path), str(source))
    reader.rewind()
    quantize_static(
        str(source),
        str(path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return Artifact("onnxruntime", "int8", path, time.perf_counter() - start, None)


def build_artifacts(
    name: str,
    out_dir: str | Path,
    *,
    model: nn.Module | None = None,
    runtimes: Iterable[str] = RUNTIMES,
    progress: bool = True,
) -> list[Artifact]:
    """Export model ``name`` to every runtime in ``runtimes``, fp32 and int8, into ``out_dir``."""
    from tqdm.auto import tqdm

    if name not in MODEL_INPUTS:
        raise ValueError(f"name must be one of {tuple(MODEL_INPUTS)}, got {name!r}")
    runtimes = list(runtimes)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown runtimes {unknown}; choose from {RUNTIMES}")
    chw, rgb32 = MODEL_INPUTS[name]
    model = model if model is not None else models.load_pretrained(name)
    calib, _ = data.get_split("calib", rgb32=rgb32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [(r, p) for r in runtimes for p in PRECISIONS]
    artifacts: list[Artifact] = []
    for runtime, precision in tqdm(steps, desc=f"export {name}", disable=not progress, leave=False):
        if runtime == "executorch":
            artifacts.append(
                export_executorch(model, out / f"{name}_{precision}.pte", chw,
                                  calib_images=calib if precision == "int8" else None)
            )
        elif precision == "fp32":
            artifacts.append(export_onnx(model, out / f"{name}_fp32.onnx", chw))
        else:
            artifacts.append(quantize_onnx(out / f"{name}_fp32.onnx", out / f"{name}_int8.onnx",
                                           CalibrationReader(calib)))
    return artifacts


# --------------------------------------------------------------------------- runners
class _OrtRunner:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # threads inside one operator
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.max_batch: int | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: x})[0]


class _ExecuTorchRunner:
    def __init__(self, path: Path, threads: int) -> None:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        # XNNPACK's thread pool is process-wide; the runtime sizes it to the core count.
        # (Experimental API of executorch 1.5: the only way to choose the count from Python.)
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.method = Runtime.get().load_program(Path(path)).load_method("forward")
        self.max_batch = 1  # programs are exported with a static batch of 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.method.execute([torch.from_numpy(x)])[0].numpy()


class _TorchRunner:
    def __init__(self, model: nn.Module, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = model.eval()
        self.max_batch: int | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()


def load_runner(target: Artifact | nn.Module, *, threads: int = THREADS) -> Callable[[np.ndarray], np.ndarray]:
    """A callable float32 N×C×H×W numpy batch → logits for an artifact or a PyTorch model.

    ONNX Runtime: ``InferenceSession`` on ``CPUExecutionProvider`` with
    ``intra_op_num_threads=threads``. ExecuTorch: the Python runtime's ``forward`` method
    (batch 1 only). PyTorch: the module under ``torch.no_grad()`` with
    ``torch.set_num_threads(threads)``. ``runner.max_batch`` is the largest batch it takes
    (None: any).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if isinstance(target, nn.Module):
        return _TorchRunner(target, threads)
    if target.runtime == "onnxruntime":
        return _OrtRunner(target.path, threads)
    if target.runtime == "executorch":
        return _ExecuTorchRunner(target.path, threads)
    raise ValueError(f"unknown runtime {target.runtime!r}")


def runner_logits(runner: Callable[[np.ndarray], np.ndarray], images: torch.Tensor | np.ndarray,
                  *, batch_size: int = 500) -> np.ndarray:
    """Logits of every image, in batches of ``min(batch_size, runner.max_batch)``."""
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = np.ascontiguousarray(x, dtype=np.float32)
    step = min(batch_size, getattr(runner, "max_batch", None) or batch_size)
    return np.concatenate([runner(np.ascontiguousarray(x[i : i + step])) for i in range(0, len(x), step)])


# --------------------------------------------------------------------------- the table
@dataclass
class DeployRow:
    """One line of the deployment table."""

    model: str
    runtime: str  # "pytorch", "executorch", "onnxruntime"
    precision: str
    file_bytes: int
    accuracy: float  # in the runtime, on the evaluated test images
    reference_accuracy: float | None  # its PyTorch twin (None: no PyTorch twin)
    agreement: float  # top-1 agreement with the float PyTorch model
    model_latency: LatencyStats
    e2e_latency: LatencyStats
    export_seconds: float | None = None
    eval_images: int = 0


def measure_artifacts(
    name: str,
    artifacts: Sequence[Artifact],
    *,
    model: nn.Module | None = None,
    repeats: int = 50,
    warmup: int = 10,
    threads: int = THREADS,
    eval_limit: int | None = None,
    e2e_images: int = 100,
    progress: bool = True,
) -> list[DeployRow]:
    """Measure the float PyTorch model and every artifact: one :class:`DeployRow` each.

    - accuracy: top-1 on the first ``eval_limit`` test images (all 1,000 by default),
      batched where the runtime allows; agreement: share of those images whose top-1
      equals the float PyTorch model's.
    - model latency: one normalised test image at batch 1, ``threads`` threads.
    - end to end: per call, one PNG (cycling through ``e2e_images`` test digits encoded
      once) is decoded, resized (MobileNetV2), normalised, run, and its argmax taken.
    """
    from tqdm.auto import tqdm

    chw, rgb32 = MODEL_INPUTS[name]
    model = model if model is not None else models.load_pretrained(name)
    x_test, y_test = data.get_split("test", rgb32=rgb32)
    if eval_limit is not None:
        if eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1, got {eval_limit}")
        x_test, y_test = x_test[:eval_limit], y_test[:eval_limit]
    labels = y_test.numpy()
    pngs = encode_png(data.raw_images("test")[0][:e2e_images])
    one_image = np.ascontiguousarray(x_test[:1].numpy())

    def row_for(runtime: str, precision: str, runner, file_bytes: int, reference: float | None,
                export_seconds: float | None, float_pred: np.ndarray | None) -> tuple[DeployRow, np.ndarray]:
        pred = runner_logits(runner, x_test).argmax(axis=1)
        float_pred = pred if float_pred is None else float_pred
        png_cycle = itertools.cycle(pngs)

        def end_to_end() -> int:
            return int(runner(preprocess_png(next(png_cycle), rgb32=rgb32)).argmax())

        return DeployRow(
            model=DISPLAY_NAMES[name], runtime=runtime, precision=precision, file_bytes=file_bytes,
            accuracy=float((pred == labels).mean()), reference_accuracy=reference,
            agreement=float((pred == float_pred).mean()),
            model_latency=measure_latency(lambda: runner(one_image), warmup=warmup, repeats=repeats),
            e2e_latency=measure_latency(end_to_end, warmup=warmup, repeats=repeats),
            export_seconds=export_seconds, eval_images=len(labels),
        ), pred

    def twin_accuracy(module: nn.Module | None) -> float | None:
        if module is None:
            return None
        with torch.no_grad():
            logits = torch.cat([module(b) for b in x_test.split(500)])
        return float((logits.argmax(1).numpy() == labels).mean())

    bar = tqdm(total=1 + len(artifacts), desc=f"measure {name}", disable=not progress, leave=False)
    checkpoint_bytes = os.path.getsize(models.checkpoint_path(name))
    torch_row, float_pred = row_for("pytorch", "fp32", load_runner(model, threads=threads),
                                    checkpoint_bytes, None, None, None)
    torch_row.reference_accuracy = torch_row.accuracy
    rows = [torch_row]
    bar.update()
    for art in artifacts:
        reference = twin_accuracy(art.reference)
        row, _ = row_for(art.runtime, art.precision, load_runner(art, threads=threads), art.file_bytes,
                         reference, art.export_seconds, float_pred)
        rows.append(row)
        bar.update()
    bar.close()
    return rows


def benchmark_model(
    name: str,
    out_dir: str | Path,
    *,
    runtimes: Iterable[str] = RUNTIMES,
    repeats: int = 50,
    warmup: int = 10,
    threads: int = THREADS,
    eval_limit: int | None = None,
    progress: bool = True,
) -> list[DeployRow]:
    """:func:`build_artifacts` then :func:`measure_artifacts` for model ``name``."""
    torch.set_num_threads(threads)
    model = models.load_pretrained(name)
    artifacts = build_artifacts(name, out_dir, model=model, runtimes=runtimes, progress=progress)
    return measure_artifacts(name, artifacts, model=model, repeats=repeats, warmup=warmup,
                             threads=threads, eval_limit=eval_limit, progress=progress)


def format_table(rows: Sequence[DeployRow], *, timings: bool = True) -> str:
    """The table as aligned text. ``timings=False`` keeps only the deterministic columns
    (file size, size ratio, accuracies, agreement), for outputs that must not change."""
    if not rows:
        raise ValueError("no rows to format")
    fp32_bytes = {r.runtime: r.file_bytes for r in rows if r.precision == "fp32"}
    header = f"{'runtime':12s} {'prec':5s} {'file bytes':>11s} {'fp32/this':>9s} "
    header += f"{'acc':>6s} {'PyTorch':>7s} {'agree':>6s}"
    if timings:
        header += f" {'model ms p50/p90':>17s} {'e2e ms p50/p90':>15s} {'export s':>8s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = fp32_bytes.get(r.runtime, r.file_bytes) / r.file_bytes
        ref = f"{r.reference_accuracy:7.3f}" if r.reference_accuracy is not None else f"{'-':>7s}"
        line = (f"{r.runtime:12s} {r.precision:5s} {r.file_bytes:11,d} {ratio:8.2f}× "
                f"{r.accuracy:6.3f} {ref} {r.agreement:6.3f}")
        if timings:
            m, e = r.model_latency, r.e2e_latency
            export = f"{r.export_seconds:8.1f}" if r.export_seconds is not None else f"{'-':>8s}"
            line += f" {m.median_ms:8.3f}/{m.p90_ms:<8.3f} {e.median_ms:7.3f}/{e.p90_ms:<7.3f} {export}"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- the budget
@dataclass(frozen=True)
class DeviceAssumptions:
    """A device described by the numbers a latency budget needs. All are assumptions.

    sustained MACs/s = cores · clock_ghz·1e9 · macs_per_cycle · efficiency, where
    ``macs_per_cycle`` is the peak per core for the data type and ``efficiency`` the
    share of that peak a real network sustains (memory traffic, small and depthwise
    layers, quantize/requantize work, threads waiting).
    """

    label: str
    cores: int
    clock_ghz: float
    macs_per_cycle: float
    efficiency: float

    @property
    def macs_per_second(self) -> float:
        return self.cores * self.clock_ghz * 1e9 * self.macs_per_cycle * self.efficiency


def estimate_latency_ms(macs: int | float, device: DeviceAssumptions) -> float:
    """Compute-bound latency estimate: 1000 · macs / device.macs_per_second (ms)."""
    if macs < 0:
        raise ValueError(f"macs must be >= 0, got {macs}")
    if device.macs_per_second <= 0:
        raise ValueError("the device must sustain a positive MAC rate")
    return 1000.0 * macs / device.macs_per_second


# Raspberry Pi 4: 4× Cortex-A72 at 1.5 GHz, 128-bit NEON, ARMv8.0-A (no SDOT dot-product
# instruction: that arrived with ARMv8.2). Peak rates per core: fp32 two 4-lane FMA pipes
# = 8 MACs/cycle; int8 16 lanes per 128-bit register = 16 MACs/cycle. The efficiencies are
# assumptions, chosen as plausible for a tuned runtime (XNNPACK, TFLite/ruy) and for a
# naive loop; they are not measurements of a Pi.
PI4_SCENARIOS = (
    DeviceAssumptions("tuned int8, 4 threads", 4, 1.5, 16.0, 0.25),
    DeviceAssumptions("tuned int8, 1 thread", 1, 1.5, 16.0, 0.25),
    DeviceAssumptions("tuned fp32, 4 threads", 4, 1.5, 8.0, 0.25),
    DeviceAssumptions("naive scalar fp32, 1 thread", 1, 1.5, 1.0, 0.4),
)
