"""Export a PyTorch model to an edge runtime, one step after the other (lesson 08).

- **ExecuTorch** (``.pte``): ``torch.export`` → PT2E quantization with the
  ``XNNPACKQuantizer`` (:func:`quantize_pt2e_xnnpack`: symmetric INT8, per-channel
  weights, calibrated on the calib split) → ``to_edge_transform_and_lower`` with the
  ``XnnpackPartitioner`` → a flatbuffer program (:func:`export_executorch`). The float
  version is lowered to XNNPACK without quantization. Programs have a static batch of 1.
- **ONNX Runtime** (``.onnx``): ``torch.onnx.export`` (the dynamo exporter, dynamic
  batch; :func:`export_onnx`, debug metadata stripped by :func:`strip_onnx_metadata`)
  → ``quant_pre_process`` → ``quantize_static`` to QDQ (:func:`quantize_onnx`: INT8
  activations and per-channel INT8 weights, min-max calibration through a
  :class:`CalibrationReader`).
- **LiteRT** (``.tflite``): converted offline by ``scripts/export_tflite.py`` (its converter
  cannot share the course's environment); :func:`shipped_tflite` finds the shipped files.

Every exported file is an :class:`Artifact`; :func:`build_artifacts` makes all of them for
one model. Lesson 08 writes these steps out in its cells first; this module is what the
rest of the lesson and ``make bench`` call. Running them: :mod:`course_lib.deploy`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from course_lib import data, drop_torchao_import_notice, models

__all__ = [
    "EXPORT_LOCK",
    "MODEL_INPUTS",
    "PRECISIONS",
    "RUNTIMES",
    "Artifact",
    "CalibrationReader",
    "build_artifacts",
    "export_executorch",
    "export_onnx",
    "quantize_onnx",
    "quantize_pt2e_xnnpack",
    "shipped_tflite",
    "strip_onnx_metadata",
]

RUNTIMES = ("executorch", "onnxruntime", "litert")  # LiteRT: the shipped .tflite files
PRECISIONS = ("fp32", "int8")
INPUT_NAME, OUTPUT_NAME = "x", "logits"
# torch.export is not thread-safe (dynamo and the proxy-tensor modes keep global state): the
# exports of this module hold this lock, and so must any other thread of the process that
# exports while they may run (the grader computes expected values in threads).
EXPORT_LOCK = threading.RLock()
# name -> (C, H, W) of one input image and whether it is the 3×32×32 "rgb32" input
MODEL_INPUTS: dict[str, tuple[tuple[int, int, int], bool]] = {
    "tinycnn": ((1, 28, 28), False),
    "mobilenetv2": ((3, 32, 32), True),
}


# --------------------------------------------------------------------------- logging
# torchao's import-time KernelPreference notice: one filter, course_lib's (idempotent).
drop_torchao_import_notice()


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

    runtime: str  # "executorch" | "onnxruntime" | "litert"
    precision: str  # "fp32" | "int8"
    path: Path
    export_seconds: float
    reference: nn.Module | None = field(default=None, repr=False)  # its PyTorch twin, if any
    metadata_bytes_removed: int = 0  # debug metadata stripped from the file (ONNX)
    planned_bytes: int | None = None  # activation memory planned by the runtime (ExecuTorch), if known

    @property
    def file_bytes(self) -> int:
        return os.path.getsize(self.path)


def shipped_tflite(name: str, precision: str) -> Artifact:
    """The shipped LiteRT file ``data/<name>_{float,int8}.tflite`` as an :class:`Artifact`.

    Made by ``scripts/export_tflite.py`` (litert-torch, outside the pinned environment); its
    export time is not measured here (``export_seconds`` is NaN) and it has no PyTorch twin.
    """
    from course_lib import DATA_DIR

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    path = DATA_DIR / f"{name}_{'float' if precision == 'fp32' else 'int8'}.tflite"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: `make tflite` converts the checkpoint (see data/README.md)")
    return Artifact("litert", precision, path, float("nan"), None)


def _example(input_chw: Sequence[int], batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, *input_chw)


def quantize_pt2e_xnnpack(model: nn.Module, calib_images: torch.Tensor, *, batch_size: int = 100) -> nn.Module:
    """PT2E static INT8 quantization for XNNPACK, calibrated on ``calib_images``.

    ``torch.export`` with a dynamic batch (so calibration runs in batches) →
    ``prepare_pt2e`` with ``XNNPACKQuantizer`` (as :class:`course_lib.pt2e.FoldedXNNPACKQuantizer`,
    the same graph faster; symmetric per-channel int8 weights,
    asymmetric int8 activations) → one forward per batch records ranges →
    ``convert_pt2e``, whose graph holds explicit quantize/dequantize ops: it runs in
    PyTorch and computes what the lowered INT8 program should.
    """
    from torch.export import Dim, export
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from course_lib.pt2e import FoldedXNNPACKQuantizer, get_symmetric_quantization_config

    if calib_images.ndim != 4 or len(calib_images) == 0:
        raise ValueError(f"calib_images must be a non-empty N×C×H×W tensor, got {tuple(calib_images.shape)}")
    # An example batch of 2: with 1, export would specialise the batch dimension to 1.
    example = (calib_images[:2].clone(),) if len(calib_images) >= 2 else (calib_images.repeat(2, 1, 1, 1),)
    with EXPORT_LOCK:
        graph = export(model.eval(), example, dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}}).module()
        quantizer = FoldedXNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
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
    with EXPORT_LOCK:
        program = to_edge_transform_and_lower(
            export(module, (_example(input_chw),)), partitioner=[XnnpackPartitioner()]
        ).to_executorch()
    path = Path(path)
    path.write_bytes(program.buffer)
    reference = module if precision == "int8" else model
    planned = sum(program.executorch_program.execution_plan[0].non_const_buffer_sizes)
    return Artifact("executorch", precision, path, time.perf_counter() - start, reference, planned_bytes=planned)


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
        if runtime == "litert":
            artifacts.append(shipped_tflite(name, precision))
        elif runtime == "executorch":
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
