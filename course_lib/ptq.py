"""Static post-training quantization (PTQ) of TinyCNN, the course's own pipeline.

Five steps turn the trained float model into lesson 04's integer-only network::

    folded   = fold_bn(model)                          # BatchNorm merged into the convs
    observed = attach_observers(folded, method="mse")  # one observer per activation
    calibrate(observed, "calib")                       # 500 calibration images, no labels
    qmodel   = convert(observed, w_bits=8, granularity="per-channel")   # IntegerTinyCNN
    evaluate(qmodel, "test")                           # top-1 accuracy on 1,000 test images

What gets quantized, and how
    activations   int8 asymmetric: ``S = (hi - lo) / 255``, ``Z = -128 - round(lo / S)``,
                  with ``[lo, hi]`` from the observer's range (widened to include 0).
                  Four points are observed: the model's input, the outputs of ``relu1``
                  and ``relu2`` (max-pooling keeps their (S, Z)) and the logits (``fc``).
    weights       symmetric, narrow range, ``w_bits`` bits stored in an int8 container:
                  codes in ``[-q, q]`` with ``q = 2^(w_bits-1) - 1`` (127, 7 or 1),
                  ``S_w = max|W| / q`` per output channel or for the whole tensor,
                  ``w_q = clamp(round_half_away(W / S_w), -q, q)`` (TFLite's rule, as in
                  lesson 04's kernels).
    bias          int32, scale ``S_in · S_w``, zero point 0 (``kernels.quantize_bias``).
    requantize    per output channel, ``M = S_in · S_w / S_out`` as (M0, shift) fixed point.

Per-tensor weights are per-channel weights whose scales happen to be equal, and 4- or
2-bit codes are int8 codes that happen to lie in [-7, 7] or [-1, 1]; so every
configuration runs through the same integer kernels of :mod:`course_lib.kernels`.

Calibration only ever sees the calibration split: :func:`calibrate` refuses the names
"train" and "test", and counts the images it has seen (:attr:`ObservedModel.images_seen`).
Observers keep histograms (:class:`course_lib.observers.HistogramObserver`), so one
calibration pass serves all four range-setting methods (:meth:`ObservedModel.with_method`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from course_lib import observers as obs
from course_lib import quant, training
from course_lib.data import get_split
from course_lib.granularity import fold_batchnorms
from course_lib.kernels import (
    INT32_MAX,
    INT32_MIN,
    IntegerLayer,
    IntegerTinyCNN,
    integer_layer_from_codes,
    quantize_tflite,
)

__all__ = [
    "GRANULARITIES",
    "METHODS",
    "OBSERVED_POINTS",
    "ObservedModel",
    "accuracy_sweep",
    "attach_observers",
    "calibrate",
    "compare_logits",
    "convert",
    "evaluate",
    "forward_int8",
    "fold_bn",
    "logits",
    "quantize_integer_layer",
    "quantize_weight_codes",
]

METHODS = ("minmax", "percentile", "mse", "kl")
GRANULARITIES = ("per-tensor", "per-channel")
# Where TinyCNN's integer model changes (S, Z): its input and the outputs it requantizes to.
# Max-pooling and flattening keep (S, Z), so relu1/relu2 also describe pool1/pool2.
OBSERVED_POINTS = ("input", "relu1", "relu2", "fc")
_TINYCNN_PARTS = ("conv1", "bn1", "relu1", "pool1", "conv2", "bn2", "relu2", "pool2", "flatten", "fc")
ACTIVATION_BITS = 8  # lesson 04's integer kernels take int8 activations


# ----------------------------------------------------------------------------- checks


def _check_tinycnn(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a TinyCNN nn.Module, got {type(model).__name__}")
    missing = [p for p in _TINYCNN_PARTS if not hasattr(model, p)]
    if missing:
        raise ValueError(
            f"the pipeline quantizes TinyCNN (course_lib.models.TinyCNN); "
            f"{type(model).__name__} has no {missing}"
        )


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _check_granularity(granularity: Any) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def _check_weight_bits(bits: Any) -> int:
    # 8 is the int8 container; below 2 bits a symmetric narrow grid has no non-zero code.
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 2 <= bits <= 8:
        raise ValueError(f"w_bits must be an int from 2 to 8 (stored in int8), got {bits!r}")
    return int(bits)


# ----------------------------------------------------------------------------- 1. fold


def fold_bn(model: nn.Module) -> nn.Module:
    """A folded copy of TinyCNN in eval mode: each BatchNorm merged into the conv before it.

    ``W' = W · γ/σ``, ``b' = (b - μ) · γ/σ + β`` with ``σ = sqrt(running_var + eps)``
    (``course_lib.kernels.fold_batchnorm``, float64 then rounded once to float32); the
    BatchNorms become ``nn.Identity``. The input model is not modified. In eval mode the
    folded model computes the same function up to float32 rounding.
    """
    _check_tinycnn(model)
    return fold_batchnorms(model)


# ----------------------------------------------------------------------------- 2. observe


class ObservedModel(nn.Module):
    """A folded TinyCNN whose forward pass also feeds one observer per activation.

    ``observers`` maps each name of :data:`OBSERVED_POINTS` to a
    :class:`course_lib.observers.HistogramObserver` for int8 asymmetric codes;
    ``images_seen`` counts the images that went through :meth:`forward`.
    The forward pass returns the float logits unchanged.
    """

    def __init__(self, model: nn.Module, observers: dict[str, obs.HistogramObserver]) -> None:
        super().__init__()
        self.model = model
        self.observers = observers
        self.images_seen = 0
        self._ranges: dict[str, tuple[float, float]] | None = None  # cache, reset by forward

    @property
    def method(self) -> str:
        """The range-setting method of the hidden activations."""
        return self.observers["relu1"].method

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """TinyCNN's forward pass (BatchNorm folded away) with an observer at each point.

        An observer called on a tensor records it and returns it unchanged.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty N×C×H×W image batch, got {getattr(x, 'shape', x)!r}")
        m, o = self.model, self.observers
        h = m.pool1(o["relu1"](m.relu1(m.conv1(o["input"](x)))))
        h = m.pool2(o["relu2"](m.relu2(m.conv2(h))))
        out = o["fc"](m.fc(m.flatten(h)))
        self.images_seen += x.shape[0]
        self._ranges = None
        return out

    def with_method(self, method: str, *, input_method: str | None = None, **options: Any) -> ObservedModel:
        """The same calibration read with another range-setting method (no new data needed).

        ``method`` applies to the hidden activations; the input keeps its method unless
        ``input_method`` is given. ``options`` go to :meth:`HistogramObserver.with_method`
        (``percentile=99.9``, …). The float model is shared; the histograms are copied.
        """
        _check_method(method)
        methods = {k: method for k in self.observers}
        methods["input"] = self.observers["input"].method if input_method is None else _check_method(input_method)
        other = ObservedModel(
            self.model, {k: o.with_method(methods[k], **options) for k, o in self.observers.items()}
        )
        other.images_seen = self.images_seen
        return other

    def ranges(self) -> dict[str, tuple[float, float]]:
        """``{point: (lo, hi)}`` chosen by the observers' method (computed once per calibration)."""
        if self.images_seen == 0:
            raise ValueError("the observers have seen no data: run calibrate(observed, 'calib') first")
        if self._ranges is None:
            self._ranges = {k: o.range() for k, o in self.observers.items()}
        return dict(self._ranges)

    def activation_qparams(
        self, ranges: dict[str, tuple[float, float]] | None = None
    ) -> dict[str, tuple[float, int]]:
        """``{point: (scale, zero_point)}`` for int8 asymmetric codes [-128, 127].

        ``S = (hi - lo) / 255`` (float32), ``Z = clamp(-128 - round(lo / S), -128, 127)``
        after widening ``[lo, hi]`` to include 0 (``quant.qparams_from_range``).
        ``ranges`` (one ``(lo, hi)`` per observed point) replaces :meth:`ranges`.
        """
        if ranges is None:
            ranges = self.ranges()
        elif set(ranges) != set(OBSERVED_POINTS):
            raise ValueError(f"ranges must give (lo, hi) for exactly {OBSERVED_POINTS}, got {sorted(ranges)}")
        out = {}
        for k, (lo, hi) in ranges.items():
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ValueError(f"range {k!r} must be finite with lo <= hi, got ({lo}, {hi})")
            s, z = quant.qparams_from_range(lo, hi, ACTIVATION_BITS, signed=True)
            out[k] = (float(s), int(z))
        return out

    def extra_repr(self) -> str:
        return f"method={self.method!r}, images_seen={self.images_seen}"


def attach_observers(
    model: nn.Module,
    method: str = "minmax",
    *,
    input_method: str = "minmax",
    bins: int = 2048,
    percentile: float = 99.99,
    n_grid: int = 100,
) -> ObservedModel:
    """Wrap a **folded** TinyCNN so that its forward pass feeds activation observers.

    One :class:`course_lib.observers.HistogramObserver` (``bins`` bins over the data's
    [min, max], 8-bit asymmetric) watches each point of :data:`OBSERVED_POINTS`; the
    hidden activations use ``method`` (one of :data:`METHODS`), the input ``input_method``.
    The input defaults to min-max because its values are discrete and its range known:
    the 256 normalised grey levels are ``(max - min) / 255`` apart, so min-max gives each
    grey level its own int8 code, whereas a clipping method merges the bright strokes of
    the digits. Raises ValueError if the model still has BatchNorm layers
    (fold first: the integer model has no BatchNorm, so ranges must be those of the
    folded network) or is not a TinyCNN.
    """
    _check_tinycnn(model)
    _check_method(method)
    _check_method(input_method)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("the model still has BatchNorm layers: call fold_bn(model) first")
    observers = {
        name: obs.HistogramObserver(
            input_method if name == "input" else method, ACTIVATION_BITS, bins=bins,
            percentile=percentile, n_grid=n_grid, signed=True, symmetric=False,
        )
        for name in OBSERVED_POINTS
    }
    return ObservedModel(model.eval(), observers)


# ----------------------------------------------------------------------------- 3. calibrate


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, tuple | list):  # (images, labels): labels are never needed
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"a calibration batch must be a tensor or an (images, labels) pair, got {type(batch).__name__}")
    return batch


def calibrate(
    observed: ObservedModel,
    data: str | DataLoader | Iterable[Any] = "calib",
    *,
    batch_size: int = 250,
    progress: bool = False,
) -> ObservedModel:
    """Run the calibration images through ``observed`` so its observers see every activation.

    ``data`` is the split name ``"calib"`` (the 500 images set aside for it), a DataLoader
    or any iterable of image batches or (images, labels) pairs; labels are ignored.
    The names ``"train"`` and ``"test"`` raise ValueError: ranges fitted to the test
    images would make the test accuracy optimistic, and the training images are the
    ones the model fits best. Returns ``observed``, updated in place.
    """
    if not isinstance(observed, ObservedModel):
        raise ValueError(f"calibrate needs the result of attach_observers, got {type(observed).__name__}")
    if isinstance(data, str):
        if data != "calib":
            raise ValueError(
                f"calibrate on the 'calib' split only, got {data!r}: the test split is for "
                "measuring, the train split for fitting"
            )
        x, _ = get_split("calib")
        data = x.split(batch_size)
    seen_before = observed.images_seen
    for batch in tqdm(data, desc="calibrate", disable=not progress, leave=False):
        observed(_images(batch))
    if observed.images_seen == seen_before:
        raise ValueError("the calibration data yielded no batches")
    return observed


# ----------------------------------------------------------------------------- 4. convert


def quantize_weight_codes(
    weight: torch.Tensor, bits: int = 8, granularity: str = "per-channel"
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric narrow-range weight codes in an int8 container: ``(w_q int8, S_w float32 (O,))``.

    ``q = 2^(bits-1) - 1``; ``S_w = max|W| / q`` over one output channel (per-channel) or
    the whole tensor (per-tensor, the one scale repeated O times), never below float32 eps
    (``quant.qparams_from_range``); ``w_q = clamp(round_half_away(W / S_w), -q, q)``
    with a float32 division (``kernels.quantize_tflite``, as lesson 04's ``quantize_layer``).
    """
    bits = _check_weight_bits(bits)
    _check_granularity(granularity)
    w = weight.detach().cpu().float()
    if w.ndim not in (2, 4):
        raise ValueError(f"weight must be 2-D (linear) or 4-D (conv), got shape {tuple(w.shape)}")
    out_channels = w.shape[0]
    absmax = w.reshape(out_channels, -1).abs().amax(dim=1)
    if granularity == "per-tensor":
        absmax = absmax.max().expand(out_channels)
    scale, _ = quant.qparams_from_range(-absmax, absmax, bits, symmetric=True, narrow_range=True)
    qmin, qmax = quant.qrange(bits, signed=True, narrow_range=True)
    scale = scale.numpy().astype(np.float32)
    codes = quantize_tflite(w.numpy(), scale, np.zeros(out_channels, np.int64), qmin=qmin, qmax=qmax, axis=0)
    return codes, scale


def quantize_integer_layer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    w_bits: int,
    granularity: str,
    input_qparams: tuple[float, int],
    output_qparams: tuple[float, int],
    activation: str | None = None,
    padding: int = 0,
) -> IntegerLayer:
    """Lesson 04's ``kernels.quantize_layer`` with a weight bit-width and granularity.

    Weights: :func:`quantize_weight_codes`. Bias: ``kernels.quantize_bias`` (int32, scale
    ``S_in · S_w``). Requantization: ``kernels.quantize_multipliers(S_in · S_w / S_out)``
    in float64 from float32 scales. ReLU: the clamp ``[max(-128, Z_out), 127]``.
    At ``w_bits=8, granularity="per-channel"`` the result equals ``kernels.quantize_layer``.
    """
    (s_in, z_in), (s_out, z_out) = input_qparams, output_qparams
    weight_q, weight_scale = quantize_weight_codes(weight, w_bits, granularity)
    return integer_layer_from_codes(
        weight_q, weight_scale, bias, input_scale=s_in, input_zero_point=z_in,
        output_scale=s_out, output_zero_point=z_out, activation=activation, padding=padding,
    )


def _padding(conv: nn.Conv2d) -> int:
    if conv.stride != (1, 1) or conv.groups != 1 or len(set(conv.padding)) != 1:
        raise ValueError("TinyCNN's convolutions have stride 1, one group and square padding")
    return int(conv.padding[0])


def convert(
    observed: ObservedModel,
    w_bits: int = 8,
    granularity: str = "per-channel",
    *,
    method: str | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> IntegerTinyCNN:
    """The calibrated, folded TinyCNN as lesson 04's integer-only ``IntegerTinyCNN``.

    Activations: ``observed.activation_qparams()`` (int8 asymmetric, from the observers'
    ranges; ``method`` reads the same histograms with another method; ``ranges``, a
    ``{point: (lo, hi)}`` for every point of :data:`OBSERVED_POINTS`, replaces them, e.g.
    to try ranges set another way). Layers:
    :func:`quantize_integer_layer` with ``w_bits``-bit symmetric weights per tensor or per
    channel; conv1 and conv2 get ReLU as a clamp. Deterministic: the same inputs give
    the same integers. Raises ValueError before calibration or on a bad argument.
    """
    if not isinstance(observed, ObservedModel):
        raise ValueError(f"convert needs a calibrated ObservedModel, got {type(observed).__name__}")
    w_bits = _check_weight_bits(w_bits)
    _check_granularity(granularity)
    if method is not None and method != observed.method:
        observed = observed.with_method(method)
    qp = observed.activation_qparams(ranges)
    m = observed.model
    pool = m.pool1.kernel_size if isinstance(m.pool1.kernel_size, int) else m.pool1.kernel_size[0]
    common = dict(w_bits=w_bits, granularity=granularity)
    conv1 = quantize_integer_layer(m.conv1.weight, m.conv1.bias, input_qparams=qp["input"],
                                   output_qparams=qp["relu1"], activation="relu",
                                   padding=_padding(m.conv1), **common)
    conv2 = quantize_integer_layer(m.conv2.weight, m.conv2.bias, input_qparams=qp["relu1"],
                                   output_qparams=qp["relu2"], activation="relu",
                                   padding=_padding(m.conv2), **common)
    fc = quantize_integer_layer(m.fc.weight, m.fc.bias, input_qparams=qp["relu2"],
                                output_qparams=qp["fc"], **common)
    s_x, z_x = qp["input"]
    return IntegerTinyCNN(float(np.float32(s_x)), z_x, conv1, conv2, fc, int(pool))


# ----------------------------------------------------------------------------- 5. evaluate


def _pooled_conv_accumulator(x_q: np.ndarray, layer: IntegerLayer, pool: int) -> np.ndarray:
    """``maxpool(Σ (x_q - Z_in) · w_q) + bias_q`` of a stride-1 conv layer, int32 (N, O, H/p, W/p).

    The sums are integers computed exactly in floating point: each partial sum is at
    most ``bound = K · 255 · 127`` in magnitude (``|x_q - Z_in| ≤ 255``, ``|w_q| ≤ 127``),
    and float32 holds every integer up to 2^24 (float64 up to 2^53), so no addition
    rounds, in any order. PyTorch's CPU convolution is a direct or im2col + GEMM one
    (oneDNN's ``convolution_direct``), never Winograd or FFT, which would round.
    """
    bound = layer.weight_q[0].size * 255 * 127
    dtype = torch.float32 if bound <= 2**24 else torch.float64
    centred = torch.from_numpy(x_q).to(dtype) - layer.input_zero_point  # exact: small integers
    acc = F.conv2d(centred, torch.from_numpy(layer.weight_q).to(dtype), padding=layer.padding)
    bias = torch.from_numpy(layer.bias_q)
    if bound + int(bias.abs().max()) > INT32_MAX:  # only then can the int32 accumulator overflow
        lo = acc.amin(dim=(0, 2, 3)).to(torch.int64) + bias
        hi = acc.amax(dim=(0, 2, 3)).to(torch.int64) + bias
        if lo.min() < INT32_MIN or hi.max() > INT32_MAX:
            raise ValueError("int32 accumulator overflow: TFLite would silently wrap around here")
    pooled = _max_pool(acc, pool).to(torch.int32) + bias.reshape(-1, 1, 1)  # bias: constant per channel
    return pooled.numpy()


def _max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(x, k)`` (stride k, no padding) as the maximum of k² strided views:
    the same values, several times faster than the pooling kernel on this CPU."""
    h, w = x.shape[2] // k * k, x.shape[3] // k * k
    return functools.reduce(torch.maximum, [x[:, :, i:h:k, j:w:k] for i in range(k) for j in range(k)])


def forward_int8(qmodel: IntegerTinyCNN, x_q: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """``qmodel.forward_int8(x_q)``, bit for bit, several times faster: int8 logits (N, classes).

    Two exact rearrangements of lesson 04's reference:

    * max-pooling runs on the int32 accumulators, **before** requantization, so only a
      quarter of them are requantized. Requantization ``clamp(Z + MBQM(acc, M0, shift))``
      is non-decreasing in ``acc`` within a channel (M0 ≥ 0; both roundings are
      monotone), and ``max(f(a), f(b)) = f(max(a, b))`` for any non-decreasing f;
    * the integer convolutions run as float32 (or float64) convolutions that are exact
      (:func:`_pooled_conv_accumulator`).

    The requantization itself (``IntegerLayer.requantize``) and the fc layer are lesson
    04's code, unchanged.
    """
    if not isinstance(x_q, np.ndarray) or x_q.dtype != np.int8 or x_q.ndim != 4:
        raise ValueError(f"x_q must be an int8 N×C×H×W numpy array, got {getattr(x_q, 'dtype', type(x_q))}")
    outs = [np.zeros((0, qmodel.fc.weight_q.shape[0]), np.int8)]  # an empty batch gives no rows
    for start in range(0, x_q.shape[0], batch_size):
        h = x_q[start:start + batch_size]
        for layer in (qmodel.conv1, qmodel.conv2):
            h = layer.requantize(_pooled_conv_accumulator(h, layer, qmodel.pool))
        outs.append(qmodel.fc(h.reshape(h.shape[0], -1)))  # flatten keeps (S, Z)
    return np.concatenate(outs)


def logits(model: nn.Module | IntegerTinyCNN, images: torch.Tensor) -> torch.Tensor:
    """Float32 logits for a batch of normalised images, without gradients.

    A float or torch-quantized model is called as it is (put an ``nn.Module`` in eval
    mode first); an ``IntegerTinyCNN`` gives its dequantized int8 logits
    ``S_out · (q - Z_out)`` (:func:`forward_int8`).
    """
    if isinstance(model, IntegerTinyCNN):
        return torch.from_numpy(model.dequantize_logits(forward_int8(model, model.quantize_input(images))))
    if not callable(model):
        raise ValueError(f"expected a model, got {type(model).__name__}")
    with torch.no_grad():
        return model(images).float()


def _labelled_batches(data: Any, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, str):
        data = get_split(data)  # raises ValueError for an unknown split
    if isinstance(data, tuple | list):
        if len(data) != 2 or len(data[0]) != len(data[1]):
            raise ValueError("expected an (images, labels) pair of equal lengths")
        return zip(data[0].split(batch_size), data[1].split(batch_size), strict=True)
    if isinstance(data, DataLoader):
        return data
    raise ValueError(f"expected a split name, a DataLoader or an (images, labels) pair, got {type(data).__name__}")


def evaluate(
    model: nn.Module | IntegerTinyCNN,
    data: str | DataLoader | tuple[torch.Tensor, torch.Tensor] = "test",
    *,
    batch_size: int = training.EVAL_BATCH_SIZE,
) -> float:
    """Top-1 accuracy in [0, 1]: the fraction of images whose largest logit is the label.

    ``model``: a float or eager-quantized ``nn.Module`` (run in eval mode by
    ``training.evaluate``); a ``torch.export`` / PT2E graph module (called as it is: it
    was captured in eval mode and has no train/eval switch); or an ``IntegerTinyCNN``
    (argmax of its int8 logits from :func:`forward_int8`, as ``IntegerTinyCNN.predict``).
    Ties go to the lower class index. ``data``: a split name, a DataLoader of
    (images, labels) or an (images, labels) pair.
    """
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
        return training.evaluate(model, data, batch_size=batch_size)
    correct = total = 0
    for x, y in _labelled_batches(data, batch_size):
        correct += int((logits(model, x).argmax(dim=1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return correct / total


def compare_logits(reference: torch.Tensor, other: torch.Tensor, step: float) -> dict[str, float]:
    """How far two models' logits for the same images are apart.

    ``top1_agreement``: fraction of images with the same argmax;
    ``max_diff_steps``: ``max |reference - other| / step``, the largest difference in
    units of an output quantization step (``step`` = the reference's output scale);
    ``mean_diff_steps``: the mean of the same.
    """
    a, b = torch.as_tensor(reference).float(), torch.as_tensor(other).float()
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two N×classes logit tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    diff = (a - b).abs() / step
    return {
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
        "max_diff_steps": float(diff.max()),
        "mean_diff_steps": float(diff.mean()),
    }


def accuracy_sweep(
    observed: ObservedModel,
    w_bits: Sequence[int] = (8, 4, 2),
    granularities: Sequence[str] = GRANULARITIES,
    methods: Sequence[str] = METHODS,
    data: str | tuple[torch.Tensor, torch.Tensor] = "test",
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Test accuracy of every (w_bits, granularity, method), from one calibration.

    Each method reads the same histograms (:meth:`ObservedModel.with_method`), so the
    calibration images run through the model once; each configuration is converted
    and evaluated in integers. Returns one dict per configuration:
    ``{"w_bits", "granularity", "method", "accuracy"}``.
    """
    for b in w_bits:
        _check_weight_bits(b)
    for g in granularities:
        _check_granularity(g)
    for m in methods:
        _check_method(m)
    if isinstance(data, str):
        data = get_split(data)
    rows = []
    configs = list(itertools.product(methods, w_bits, granularities))
    by_method: dict[str, ObservedModel] = {}
    for method, bits, gran in tqdm(configs, desc="PTQ sweep", disable=not progress, leave=False):
        if method not in by_method:
            by_method[method] = observed.with_method(method)
        qmodel = convert(by_method[method], bits, gran)
        rows.append({"w_bits": bits, "granularity": gran, "method": method,
                     "accuracy": evaluate(qmodel, data)})
    return rows

