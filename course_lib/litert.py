"""LiteRT (TensorFlow Lite): run a shipped ``.tflite`` and read its integers back.

The ``.tflite`` files in ``data/`` were made by ``scripts/export_tflite.py`` with
``litert-torch`` (PT2E int8, per-channel symmetric weights, int8 input and output); the
converter lives outside the course's pinned environment, the runtime (``ai-edge-litert``)
inside it. This module:

- :func:`load_interpreter`: an ``Interpreter`` with one of three kernel sets:
  ``"xnnpack"`` (the default XNNPACK delegate takes the graph), ``"builtin"`` (TFLite's
  optimized builtin kernels, no delegate) or ``"reference"`` (``BUILTIN_REF``: the plain
  reference kernels, the ones TFLite Micro also implements);
- :class:`LiteRTRunner`: float32 N×C×H×W images in, float32 logits out, one image per
  ``invoke`` (batch 1), quantizing the input and dequantizing the output with the
  model's own (scale, zero point) when the model is int8;
- :func:`integer_layers`: each int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED of the
  file as lesson 04's :class:`course_lib.kernels.IntegerLayer` (weights, int32 bias,
  scales, fixed-point multipliers from :func:`course_lib.kernels.quantize_multipliers`),
  so that lesson 04's kernels can recompute what the runtime computed, layer by layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from course_lib import kernels

__all__ = ["KERNELS", "LayerMatch", "LiteRTRunner", "compare_layers", "integer_layers", "load_interpreter"]

KERNELS = ("xnnpack", "builtin", "reference")
_LAYER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def load_interpreter(path: str | Path, *, kernels_: str = "xnnpack", threads: int = 1,
                     preserve_all_tensors: bool = False):
    """A ready ``ai_edge_litert.interpreter.Interpreter`` (tensors allocated).

    ``kernels_``: "xnnpack" (``OpResolverType.AUTO``, which applies the XNNPACK delegate),
    "builtin" (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``) or "reference" (``BUILTIN_REF``).
    ``preserve_all_tensors`` keeps every intermediate tensor readable after ``invoke``
    (needed by :func:`compare_layers`; it only works without a delegate).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolvers = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                 "reference": OpResolverType.BUILTIN_REF}
    if kernels_ not in resolvers:
        raise ValueError(f"kernels_ must be one of {KERNELS}, got {kernels_!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if preserve_all_tensors and kernels_ == "xnnpack":
        raise ValueError("preserve_all_tensors needs kernels_='builtin' or 'reference': a delegate hides intermediates")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .tflite file at {path} (scripts/export_tflite.py makes them)")
    interpreter = Interpreter(model_path=str(path), num_threads=threads,
                              experimental_op_resolver_type=resolvers[kernels_],
                              experimental_preserve_all_tensors=preserve_all_tensors)
    interpreter.allocate_tensors()
    return interpreter


class LiteRTRunner:
    """Callable float32 N×C×H×W numpy batch → float32 logits (N, classes), batch 1 per invoke.

    An int8 model's input is quantized TFLite's way, ``clamp(round(x / S) + Z)`` with ties
    away from zero (:func:`course_lib.kernels.quantize_tflite`), and its int8 output is
    dequantized ``S · (q - Z)``. :meth:`invoke_codes` runs one already-quantized input and
    returns the raw int8 output codes.
    """

    def __init__(self, path: str | Path, *, kernels_: str = "xnnpack", threads: int = 1) -> None:
        self.path = Path(path)
        self.interpreter = load_interpreter(path, kernels_=kernels_, threads=threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.int8 = self.input["dtype"] == np.int8
        self.input_qparams = tuple(self.input["quantization"])  # (scale, zero point); (0.0, 0) if float
        self.output_qparams = tuple(self.output["quantization"])
        self.max_batch = 1

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """TFLite's quantize, as :func:`course_lib.kernels.quantize_tflite` (float32 division,
        ties away from zero), written out without its checks: it runs on every call."""
        scale, zero_point = self.input_qparams
        v = np.asarray(x, np.float32) / np.float32(scale)
        return np.clip(np.trunc(v + np.copysign(np.float32(0.5), v)) + zero_point, -128, 127).astype(np.int8)

    def invoke_codes(self, x_q: np.ndarray) -> np.ndarray:
        """One input as the model's own dtype (1×C×H×W) → the output tensor, copied."""
        self.interpreter.set_tensor(self.input["index"], x_q)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"expected an N×C×H×W batch, got shape {x.shape}")
        out = []
        for i in range(len(x)):
            one = x[i : i + 1]
            y = self.invoke_codes(self.quantize_input(one) if self.int8 else one)
            if self.int8:
                scale, zero_point = self.output_qparams
                y = (y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
            out.append(y)
        return np.concatenate(out)


# ------------------------------------------------------------------ the file's integers
@dataclass
class _TFLiteLayer:
    op_index: int
    op_name: str
    input_index: int
    output_index: int
    layer: kernels.IntegerLayer


def _qparams(detail: dict) -> tuple[np.ndarray, np.ndarray]:
    q = detail["quantization_parameters"]
    return np.asarray(q["scales"], np.float32), np.asarray(q["zero_points"], np.int64)


def integer_layers(interpreter, activations: Sequence[str | None] | None = None) -> list[_TFLiteLayer]:
    """Every int8 conv / depthwise conv / fully-connected op of the model as an IntegerLayer.

    TFLite stores conv weights OHWI and depthwise weights 1×H×W×O; they are turned into
    PyTorch's OIHW (a depthwise layer with one input channel is an ordinary convolution
    with ``groups=1``). The int32 bias is taken as stored; the fixed-point multipliers are
    computed from the stored scales as lesson 04 does. ``activations``: the fused
    activation of each layer in order ("relu" or None); by default, ReLU where the
    output's clamp starts at the zero point is not detectable from the tensors, so TinyCNN's
    (relu, relu, None) must be passed for it. Padding is TFLite's SAME for 3×3 stride 1 (= 1).
    """
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] in _LAYER_OPS]
    if activations is None:
        activations = [None] * len(ops)
    if len(activations) != len(ops):
        raise ValueError(f"{len(ops)} conv/FC ops in the model but {len(activations)} activations given")
    layers = []
    for op, act in zip(ops, activations, strict=True):
        x_idx, w_idx, b_idx = (int(i) for i in op["inputs"][:3])
        y_idx = int(op["outputs"][0])
        w = interpreter.get_tensor(w_idx)
        if w.dtype != np.int8:
            raise ValueError(f"op {op['index']} {op['op_name']} has {w.dtype} weights, not int8: is the model quantized?")
        if op["op_name"] == "CONV_2D":
            w = w.transpose(0, 3, 1, 2)  # OHWI → OIHW
        elif op["op_name"] == "DEPTHWISE_CONV_2D":
            if details[x_idx]["shape"][-1] != 1:
                raise ValueError("only depthwise layers with one input channel are supported")
            w = w.transpose(3, 0, 1, 2)  # 1HWO → O1HW
        w_scale, _ = _qparams(details[w_idx])
        (s_in,), (z_in,) = _qparams(details[x_idx])
        (s_out,), (z_out,) = _qparams(details[y_idx])
        bias_q = interpreter.get_tensor(b_idx).astype(np.int32)
        real = np.float64(s_in) * w_scale.astype(np.float64) / np.float64(s_out)
        m0, shift = kernels.quantize_multipliers(real)
        lo, hi = kernels.fused_activation_range(act, float(s_out), int(z_out))
        layer = kernels.IntegerLayer(
            kind="conv" if w.ndim == 4 else "linear", weight_q=np.ascontiguousarray(w), weight_scale=w_scale,
            bias_q=bias_q, input_scale=float(s_in), input_zero_point=int(z_in), output_scale=float(s_out),
            output_zero_point=int(z_out), output_multiplier=m0, output_shift=shift, activation_min=lo,
            activation_max=hi, stride=1, padding=(w.shape[-1] // 2) if w.ndim == 4 else 0, groups=1,
        )
        layers.append(_TFLiteLayer(int(op["index"]), op["op_name"], x_idx, y_idx, layer))
    return layers


@dataclass(frozen=True)
class LayerMatch:
    """How lesson 04's kernel compares with the runtime on one layer."""

    op_name: str
    outputs: int
    differ: int
    max_abs_diff: int
    differ_single_rounding: int


def _nchw(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def compare_layers(path: str | Path, images: torch.Tensor | np.ndarray, *, kernels_: str = "reference",
                   activations: Sequence[str | None] = ("relu", "relu", None)) -> list[LayerMatch]:
    """Run the int8 model on ``images`` and recompute each conv/FC layer with lesson 04's kernels.

    Each layer gets **the runtime's own input** to that layer (read back from the
    interpreter), so a difference in one layer does not spill into the next. Counts the
    outputs where the kernel's int8 result differs from the runtime's, with TFLite's
    double rounding (``multiply_by_quantized_multiplier``) and with single rounding.
    """
    runner = LiteRTRunner(path, kernels_=kernels_)
    interp = load_interpreter(path, kernels_=kernels_, preserve_all_tensors=True)
    layers = integer_layers(interp, activations)
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    ins: list[list[np.ndarray]] = [[] for _ in layers]
    outs: list[list[np.ndarray]] = [[] for _ in layers]
    for i in range(len(x)):
        interp.set_tensor(runner.input["index"], runner.quantize_input(x[i : i + 1]))
        interp.invoke()
        for k, lay in enumerate(layers):
            ins[k].append(_nchw(interp.get_tensor(lay.input_index)).copy())
            outs[k].append(_nchw(interp.get_tensor(lay.output_index)).copy())
    result = []
    for k, lay in enumerate(layers):
        x_q, want = np.concatenate(ins[k]), np.concatenate(outs[k])
        if lay.layer.kind == "linear":
            x_q = x_q.reshape(len(x_q), -1)
        acc = lay.layer.accumulator(x_q)
        got = lay.layer.requantize(acc)
        got_single = lay.layer.requantize(acc, single_rounding=True)
        diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
        result.append(LayerMatch(lay.op_name, int(diff.size), int((diff > 0).sum()), int(diff.max()),
                                 int((got_single != want).sum())))
    return result
