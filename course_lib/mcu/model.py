"""A network as a microcontroller runs it: a chain of int8 layers on NHWC tensors.

Microcontroller runtimes (TFLite Micro, CMSIS-NN) keep activations NHWC (channels
last) and weights OHWI, so that the innermost loop of a convolution walks contiguous
input channels. :class:`McuModel` is that view of a network: each layer carries its
int8 weights, int32 bias and one (multiplier ``M0``, ``shift``) pair per output channel,
exactly what the generated C stores in flash. It is built from course_lib's
:class:`~course_lib.kernels.IntegerTinyCNN` (lessons 04–05) or from an int8 ``.tflite``
file, and :meth:`McuModel.reference` runs it with course_lib's integer kernels.

Flatten order: PyTorch flattens C×H×W, a channels-last tensor flattens H×W×C. The
converter folds that permutation into the classifier's weight columns (no transpose runs
on the device); litert-torch instead emits a TRANSPOSE op, which :func:`from_tflite`
folds the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from course_lib import kernels as K

__all__ = [
    "Conv2D",
    "FullyConnected",
    "Layer",
    "MaxPool2D",
    "McuModel",
    "UnsupportedLayerError",
    "from_integer_tinycnn",
    "from_tflite",
    "tflite_ops",
]


class UnsupportedLayerError(ValueError):
    """A layer (or .tflite operator) the C generator has no kernel for."""


@dataclass(frozen=True)
class Conv2D:
    """int8 convolution, NHWC. ``weight`` is OHWI (depthwise: 1×H×W×(C·multiplier))."""

    name: str
    weight: np.ndarray  # int8
    bias: np.ndarray  # int32 (O,)
    multiplier: np.ndarray  # int32 (O,): M0
    shift: np.ndarray  # int32 (O,)
    input_zero_point: int
    output_zero_point: int
    act_min: int
    act_max: int
    stride: int = 1
    padding: tuple[int, int] = (0, 0)  # (top, left) rows/columns of zero point
    depthwise: bool = False
    padding_extra: tuple[int, int] = (0, 0)  # TFLite's SAME may pad one more at the bottom/right

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[3] if self.depthwise else self.weight.shape[0])

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[1]), int(self.weight.shape[2])


@dataclass(frozen=True)
class MaxPool2D:
    name: str
    kernel: int = 2
    stride: int = 2


@dataclass(frozen=True)
class FullyConnected:
    """int8 fully connected layer on the flattened (H·W·C order) input; ``weight`` is (O, K)."""

    name: str
    weight: np.ndarray  # int8 (O, K)
    bias: np.ndarray  # int32 (O,)
    multiplier: np.ndarray  # int32 (O,) (a per-tensor layer repeats its one value)
    shift: np.ndarray
    input_zero_point: int
    output_zero_point: int
    act_min: int
    act_max: int

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])


Layer = Conv2D | MaxPool2D | FullyConnected
SUPPORTED = (Conv2D, MaxPool2D, FullyConnected)


def _out_hw(layer: Layer, h: int, w: int) -> tuple[int, int]:
    if isinstance(layer, Conv2D):
        (kh, kw), s, (ph, pw), (eh, ew) = layer.kernel, layer.stride, layer.padding, layer.padding_extra
        return (h + 2 * ph + eh - kh) // s + 1, (w + 2 * pw + ew - kw) // s + 1
    if isinstance(layer, MaxPool2D):
        return (h - layer.kernel) // layer.stride + 1, (w - layer.kernel) // layer.stride + 1
    return 1, 1


@dataclass
class McuModel:
    """An int8 network for a microcontroller: input (H, W, C) int8 → a chain of layers → int8 logits."""

    name: str
    input_shape: tuple[int, int, int]  # H, W, C
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    layers: list[Layer] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, SUPPORTED):
                name = getattr(layer, "name", None)
                label = f"layer {i} {name!r} ({type(layer).__name__})" if isinstance(name, str) else \
                    f"layer {i} ({type(layer).__name__})"
                raise UnsupportedLayerError(
                    f"{self.name}: {label} has no C kernel; the generator supports "
                    f"{', '.join(t.__name__ for t in SUPPORTED)}")

    def shapes(self) -> list[tuple[int, ...]]:
        """The shape of every tensor: the input, then each layer's output (H, W, C) or (O,)."""
        h, w, c = self.input_shape
        shapes: list[tuple[int, ...]] = [(h, w, c)]
        for layer in self.layers:
            if isinstance(layer, FullyConnected):
                k = int(np.prod(shapes[-1]))
                if layer.weight.shape[1] != k:
                    raise ValueError(f"layer {layer.name!r}: weight has {layer.weight.shape[1]} inputs, "
                                     f"the previous tensor {shapes[-1]} has {k} values")
                shapes.append((layer.out_channels,))
                continue
            if len(shapes[-1]) != 3:
                raise ValueError(f"layer {layer.name!r} needs an H×W×C input, got {shapes[-1]}")
            h, w = _out_hw(layer, h, w)
            if isinstance(layer, Conv2D):
                in_c = c
                c = layer.out_channels
                want = in_c if not layer.depthwise else None
                if want is not None and layer.weight.shape[3] != want:
                    raise ValueError(f"layer {layer.name!r}: weight has {layer.weight.shape[3]} input "
                                     f"channels, its input has {in_c}")
            shapes.append((h, w, c))
        return shapes

    def tensor_bytes(self) -> list[int]:
        """int8 bytes of every tensor (input first)."""
        return [int(np.prod(s)) for s in self.shapes()]

    def macs(self) -> int:
        """Multiply-accumulates of one inference (convolutions and fully connected layers)."""
        total, shapes = 0, self.shapes()
        for layer, out in zip(self.layers, shapes[1:], strict=True):
            if isinstance(layer, Conv2D):
                kh, kw = layer.kernel
                per_out = kh * kw * (1 if layer.depthwise else int(layer.weight.shape[3]))
                total += int(np.prod(out)) * per_out
            elif isinstance(layer, FullyConnected):
                total += int(layer.weight.size)
        return total

    def quantize_input(self, images_nchw: np.ndarray) -> np.ndarray:
        """Float images (N, C, H, W) → int8 NHWC with the input's (S, Z), TFLite's rounding."""
        q = K.quantize_tflite(np.asarray(images_nchw, dtype=np.float32), self.input_scale, self.input_zero_point)
        return np.ascontiguousarray(q.transpose(0, 2, 3, 1))

    def reference(self, x_q: np.ndarray) -> np.ndarray:
        """int8 NHWC images (N, H, W, C) → int8 outputs, with course_lib.kernels' arithmetic."""
        if x_q.dtype != np.int8 or x_q.ndim != 4 or tuple(x_q.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"x_q must be int8 (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {x_q.dtype} {x_q.shape}")
        h = x_q.transpose(0, 3, 1, 2)  # NCHW for course_lib's kernels
        shapes = self.shapes()
        for layer, out in zip(self.layers, shapes[1:], strict=True):
            if isinstance(layer, Conv2D):
                groups = h.shape[1] if layer.depthwise else 1
                w = layer.weight.transpose(3, 0, 1, 2) if layer.depthwise else layer.weight.transpose(0, 3, 1, 2)
                ph, pw = layer.padding
                kh, kw = layer.kernel
                oh, ow = out[0], out[1]
                # TFLite's SAME padding may pad one more row/column at the bottom/right
                extra_h = max((oh - 1) * layer.stride + kh - h.shape[2] - 2 * ph, 0)
                extra_w = max((ow - 1) * layer.stride + kw - h.shape[3] - 2 * pw, 0)
                x = h
                if extra_h or extra_w:
                    x = np.pad(h, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)),
                               constant_values=layer.input_zero_point)
                acc = K.conv2d_accumulator(np.ascontiguousarray(x), np.ascontiguousarray(w), layer.bias,
                                           layer.input_zero_point, stride=layer.stride, padding=(ph, pw),
                                           groups=groups)
                h = K.requantize(acc, layer.multiplier.reshape(-1, 1, 1), layer.shift.reshape(-1, 1, 1),
                                 layer.output_zero_point, layer.act_min, layer.act_max)
            elif isinstance(layer, MaxPool2D):
                h = K.int8_max_pool2d(h, layer.kernel, layer.stride)
            else:
                flat = np.ascontiguousarray(h.transpose(0, 2, 3, 1)).reshape(h.shape[0], -1) if h.ndim == 4 else h
                acc = K.linear_accumulator(flat, layer.weight, layer.bias, layer.input_zero_point)
                h = K.requantize(acc, layer.multiplier, layer.shift, layer.output_zero_point,
                                 layer.act_min, layer.act_max)
        return h if h.ndim == 2 else np.ascontiguousarray(h.transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- from course_lib


def _conv_from_layer(name: str, layer: K.IntegerLayer) -> Conv2D:
    if layer.groups != 1:
        raise UnsupportedLayerError(f"layer {name!r}: grouped convolution (groups={layer.groups}) is not supported")
    return Conv2D(name, np.ascontiguousarray(layer.weight_q.transpose(0, 2, 3, 1)), layer.bias_q,
                  layer.output_multiplier, layer.output_shift, layer.input_zero_point, layer.output_zero_point,
                  layer.activation_min, layer.activation_max, stride=layer.stride,
                  padding=(layer.padding, layer.padding))


def from_integer_tinycnn(net: K.IntegerTinyCNN, image_size: int = 28) -> McuModel:
    """course_lib's integer TinyCNN (lessons 04–05) as an NHWC :class:`McuModel`.

    Weights OIHW → OHWI; the classifier's columns are permuted from PyTorch's C·H·W flatten
    order to H·W·C, so the same integers come out without a transpose on the device.
    """
    in_c = int(net.conv1.weight_q.shape[1])
    conv1, conv2 = _conv_from_layer("conv1", net.conv1), _conv_from_layer("conv2", net.conv2)
    side = image_size // (net.pool * net.pool)
    c2 = conv2.out_channels
    fc_w = net.fc.weight_q.reshape(-1, c2, side, side).transpose(0, 2, 3, 1).reshape(net.fc.weight_q.shape[0], -1)
    fc = FullyConnected("fc", np.ascontiguousarray(fc_w), net.fc.bias_q, net.fc.output_multiplier,
                        net.fc.output_shift, net.fc.input_zero_point, net.fc.output_zero_point,
                        net.fc.activation_min, net.fc.activation_max)
    layers: list[Layer] = [conv1, MaxPool2D("pool1", net.pool, net.pool), conv2,
                           MaxPool2D("pool2", net.pool, net.pool), fc]
    return McuModel("tinycnn", (image_size, image_size, in_c), net.input_scale, net.input_zero_point,
                    net.fc.output_scale, net.fc.output_zero_point, layers, source="course_lib.kernels.IntegerTinyCNN")


# ----------------------------------------------------------------------------- from .tflite


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _same_padding(in_size: int, k: int, stride: int) -> tuple[int, int]:
    """TFLite's SAME: output ceil(in/stride); (padding before, extra padding after)."""
    out = (in_size + stride - 1) // stride
    total = max((out - 1) * stride + k - in_size, 0)
    return total // 2, total - 2 * (total // 2)


def from_tflite(path: str | Path) -> McuModel:
    """An int8 ``.tflite`` (one subgraph, int8 input and output) as an :class:`McuModel`.

    Supported operators: CONV_2D, DEPTHWISE_CONV_2D, MAX_POOL_2D, FULLY_CONNECTED,
    RESHAPE (a no-op in memory) and a TRANSPOSE NHWC→NCHW right before the flatten,
    which is folded into the fully connected weights. Multipliers are computed as TFLite
    does: ``M = S_in · S_w[c] / S_out`` in double from the float32 scales, then
    :func:`course_lib.kernels.quantize_multipliers`. Anything else raises
    :class:`UnsupportedLayerError` naming the operator.
    """
    schema = _schema()
    path = Path(path)
    buf = path.read_bytes()
    model = schema.ModelT.InitFromPackedBuf(bytearray(buf), 0)
    if len(model.subgraphs) != 1:
        raise UnsupportedLayerError(f"{path.name}: {len(model.subgraphs)} subgraphs, the generator needs one")
    graph = model.subgraphs[0]
    ops_by_code = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    tensors = graph.tensors

    def qp(index: int) -> tuple[np.ndarray, np.ndarray]:
        q = tensors[index].quantization
        return np.asarray(q.scale, dtype=np.float32), np.asarray(q.zeroPoint, dtype=np.int64)

    def const(index: int) -> np.ndarray:
        t = tensors[index]
        data = bytes(model.buffers[t.buffer].data) if model.buffers[t.buffer].data is not None else b""
        dtype = {schema.TensorType.INT8: np.int8, schema.TensorType.INT32: np.int32}[t.type]
        return np.frombuffer(data, dtype=dtype).reshape(t.shape).copy()

    def act_range(fused: int, out_index: int) -> tuple[int, int]:
        s, z = qp(out_index)
        kind = {schema.ActivationFunctionType.NONE: None, schema.ActivationFunctionType.RELU: "relu",
                schema.ActivationFunctionType.RELU6: "relu6"}.get(fused, "unsupported")
        if kind == "unsupported":
            raise UnsupportedLayerError(f"{path.name}: fused activation {fused} is not supported")
        return K.fused_activation_range(kind, float(s[0]), int(z[0]))

    in_t, out_t = tensors[graph.inputs[0]], tensors[graph.outputs[0]]
    if in_t.type != schema.TensorType.INT8 or out_t.type != schema.TensorType.INT8:
        raise UnsupportedLayerError(f"{path.name}: input and output must be int8 (got types {in_t.type}, {out_t.type})")
    # A RESHAPE moves no byte: the model's input shape is the one its first real layer reads
    # (litert-torch keeps PyTorch's 1×1×28×28 input and reshapes it to NHWC 1×28×28×1).
    first = next(op for op in graph.operators
                 if ops_by_code.get(max(model.operatorCodes[op.opcodeIndex].builtinCode,
                                        model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)) != "RESHAPE")
    n, h, w, c = (int(v) for v in tensors[first.inputs[0]].shape)
    s_in, z_in = qp(graph.inputs[0])
    s_out, z_out = qp(graph.outputs[0])
    shape = (h, w, c)
    layers: list[Layer] = []
    pending_transpose = False
    for i, op in enumerate(graph.operators):
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        kind = ops_by_code.get(builtin, f"#{builtin}")
        opts = op.builtinOptions
        x, y = op.inputs[0], op.outputs[0]
        lname = f"op{i:02d}_{kind.lower()}"
        if len(tensors[x].shape) == 4 and kind != "RESHAPE":
            shape = tuple(int(v) for v in tensors[x].shape[1:])  # NHWC of this op's input
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            weight, bias = const(op.inputs[1]), const(op.inputs[2]).astype(np.int32)
            sx, zx = qp(x)
            sw, _ = qp(op.inputs[1])
            sy, zy = qp(y)
            depthwise = kind == "DEPTHWISE_CONV_2D"
            out_c = weight.shape[3] if depthwise else weight.shape[0]
            if sw.size == 1:
                sw = np.repeat(sw, out_c)
            real = np.float64(sx[0]) * sw.astype(np.float64) / np.float64(sy[0])
            m0, shift = K.quantize_multipliers(real)
            kh, kw = weight.shape[1], weight.shape[2]
            if opts.strideH != opts.strideW or opts.dilationHFactor != 1 or opts.dilationWFactor != 1:
                raise UnsupportedLayerError(f"{path.name}: operator {i} {kind}: only equal strides, no dilation")
            ph = pw = eh = ew = 0
            if opts.padding == schema.Padding.SAME:
                ph, eh = _same_padding(shape[0], kh, opts.strideH)
                pw, ew = _same_padding(shape[1], kw, opts.strideW)
            lo, hi = act_range(opts.fusedActivationFunction, y)
            layers.append(Conv2D(lname, weight, bias, m0, shift, int(zx[0]), int(zy[0]), lo, hi,
                                 stride=int(opts.strideH), padding=(ph, pw), depthwise=depthwise,
                                 padding_extra=(eh, ew)))
        elif kind == "MAX_POOL_2D":
            if opts.filterHeight != opts.filterWidth or opts.strideH != opts.strideW or \
                    opts.padding != schema.Padding.VALID:
                raise UnsupportedLayerError(f"{path.name}: operator {i} MAX_POOL_2D: only square VALID pools")
            layers.append(MaxPool2D(lname, int(opts.filterHeight), int(opts.strideH)))
        elif kind == "TRANSPOSE":
            perm = const(op.inputs[1]).tolist()
            if perm != [0, 3, 1, 2]:
                raise UnsupportedLayerError(f"{path.name}: operator {i} TRANSPOSE with perm {perm}: "
                                            "only NHWC→NCHW before a flatten is supported")
            pending_transpose = True
            continue
        elif kind == "RESHAPE":
            continue  # a flatten: the same bytes in memory
        elif kind == "FULLY_CONNECTED":
            weight, bias = const(op.inputs[1]), const(op.inputs[2]).astype(np.int32)
            sx, zx = qp(x)
            sw, _ = qp(op.inputs[1])
            sy, zy = qp(y)
            out_c = weight.shape[0]
            if sw.size == 1:
                sw = np.repeat(sw, out_c)
            real = np.float64(sx[0]) * sw.astype(np.float64) / np.float64(sy[0])
            m0, shift = K.quantize_multipliers(real)
            if pending_transpose:  # the columns follow PyTorch's C·H·W order: make them H·W·C
                hh, ww, cc = shape
                weight = weight.reshape(out_c, cc, hh, ww).transpose(0, 2, 3, 1).reshape(out_c, -1)
                pending_transpose = False
            lo, hi = act_range(opts.fusedActivationFunction, y)
            layers.append(FullyConnected(lname, np.ascontiguousarray(weight), bias, m0, shift, int(zx[0]),
                                         int(zy[0]), lo, hi))
        else:
            raise UnsupportedLayerError(
                f"{path.name}: operator {i} is {kind}: the C generator supports CONV_2D, DEPTHWISE_CONV_2D, "
                "MAX_POOL_2D, FULLY_CONNECTED, RESHAPE and a TRANSPOSE before the flatten")
    return McuModel(path.stem, (h, w, c), float(s_in[0]), int(z_in[0]), float(s_out[0]), int(z_out[0]),
                    layers, source=path.name)


def tflite_ops(path: str | Path) -> list[str]:
    """The operator names of a .tflite file's first subgraph, in execution order."""
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(Path(path).read_bytes()), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for op in model.subgraphs[0].operators:
        code = model.operatorCodes[op.opcodeIndex]
        out.append(names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?"))
    return out
