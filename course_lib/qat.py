"""Quantization-aware training: fake quantization that gradients can flow through.

Forward, a fake quantizer rounds like the integer model will (``quant.fake_quantize``)::

    q  = round(x · (1/s)) + z                 round half to even, float32 reciprocal
    x̂  = (clamp(q, qmin, qmax) − z) · s

Backward, ``round`` has zero gradient almost everywhere, so training could not move the
weights. The **straight-through estimator** (STE, Bengio et al. 2013) pretends that
rounding is the identity and keeps only the clamp::

    ∂x̂/∂x = 1  if qmin ≤ q ≤ qmax   else 0

exactly the mask of ``torch.fake_quantize_per_tensor_affine`` (:class:`FakeQuantSTE`).

**Learned step size** (LSQ, Esser et al. 2020) also trains the scale. With the same STE,

    ∂x̂/∂s = round(x/s) − x/s     inside the range
             qmin − z  or  qmax − z   below / above it

(:func:`lsq_scale_grad`), and the summed gradient is multiplied by
``g = 1/sqrt(N · qmax)`` (N values share the scale) so that the scale learns at the
pace of the weights it serves (:class:`LSQFakeQuant`).

The QAT model (:func:`prepare_qat`) quantizes each Conv2d/Linear weight per output
channel (symmetric, narrow range, LSQ scale) and each layer input per tensor (int8
affine, range from an EMA of batch min/max that :func:`freeze_observers` fixes).
BatchNorm stays a separate layer; :func:`freeze_bn` makes it normalise with its running
statistics from then on. Because weights are quantized per channel, folding a frozen BN
into the conv afterwards only rescales each channel's scale by γ/σ: the integer weights
the network trained with are exactly the ones it will deploy with.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course_lib import kernels, quant

__all__ = [
    "ActivationFakeQuant",
    "FakeQuantSTE",
    "FreezableBatchNorm2d",
    "LSQFakeQuant",
    "LSQWeightFakeQuant",
    "QuantConv2d",
    "QuantLinear",
    "calibrate_observers",
    "convert_to_integer",
    "fake_quantize_ste",
    "freeze_bn",
    "freeze_observers",
    "frozen_batch_norm",
    "lsq_grad_factor",
    "lsq_scale_grad",
    "mse_weight_scale",
    "prepare_qat",
    "qat_step",
    "train_qat",
    "weight_codes",
]

# A learned scale must stay positive; one optimizer step too many cannot be allowed
# to make 1/s infinite or flip the sign of every weight.
MIN_SCALE = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------ the two autograd functions


def _check_qlimits(qmin: int, qmax: int) -> None:
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (qmin, qmax))
    if not ok or qmin >= qmax:
        raise ValueError(f"qmin < qmax must be two ints, got qmin={qmin!r}, qmax={qmax!r}")


def _view(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) reshaped to broadcast against x: scalars, or (C, 1, …) along ``axis``.

    Also validates x: a NaN or Inf would otherwise come out as a silent NaN (or as a
    clipped value with no gradient) and derail training far from its cause.
    """
    bad = ~torch.isfinite(x.detach())
    if bad.any():
        raise ValueError(
            f"x contains {int(bad.sum())} NaN or Inf value(s) of {x.numel()}; fake quantization "
            "needs finite inputs (a diverging training run? lower the learning rate)"
        )
    scale = torch.as_tensor(scale, dtype=torch.float32)
    zero_point = torch.as_tensor(zero_point)
    if zero_point.is_floating_point() and not torch.equal(zero_point, zero_point.round()):
        raise ValueError("zero_point must hold integers (PyTorch adds it after rounding)")
    if not torch.isfinite(scale).all() or (scale < quant.TINY).any():
        raise ValueError(
            f"scale must be finite and at least {quant.TINY:.3g}, got {scale.detach().reshape(-1)[:4]}"
        )
    if axis is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(
                f"per-tensor fake quantization takes one scale and one zero point, got shapes "
                f"{tuple(scale.shape)} and {tuple(zero_point.shape)}; pass axis for per-channel"
            )
        return scale.reshape(()), zero_point.reshape(()).to(torch.float32)
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-D tensor")
    axis %= x.dim()
    channels = x.shape[axis]
    if scale.shape != (channels,) or zero_point.shape != (channels,):
        raise ValueError(
            f"per-channel fake quantization along axis {axis} needs scale and zero_point of "
            f"shape ({channels},), got {tuple(scale.shape)} and {tuple(zero_point.shape)}"
        )
    view = [-1] + [1] * (x.dim() - axis - 1)
    return scale.reshape(view), zero_point.reshape(view).to(torch.float32)


def _round_and_mask(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
) -> tuple[Tensor, Tensor]:
    """``q = round(x · (1/s)) + z`` (float32, half to even) and the mask ``qmin ≤ q ≤ qmax``."""
    q = torch.round(x * torch.reciprocal(scale)) + zero_point
    return q, (q >= qmin) & (q <= qmax)


class FakeQuantSTE(torch.autograd.Function):
    """``x̂ = (clamp(round(x·(1/s)) + z, qmin, qmax) − z) · s`` with a clipped straight-through gradient.

    ``FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, axis=None)``; x float32;
    per-tensor (one scale, one integer zero point) or per-channel along ``axis``.
    Forward is bit-exact with ``torch.fake_quantize_per_tensor_affine`` /
    ``torch.fake_quantize_per_channel_affine``; backward passes ``grad`` where
    ``qmin ≤ round(x·(1/s)) + z ≤ qmax`` and 0 elsewhere, torch's mask too. The scale
    and zero point get no gradient (see :class:`LSQFakeQuant` for a learned scale).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                axis: int | None = None) -> Tensor:
        _check_qlimits(qmin, qmax)
        s, z = _view(x, scale, zero_point, axis)
        q, inside = _round_and_mask(x, s, z, qmin, qmax)
        ctx.save_for_backward(inside)
        return (q.clamp(qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None, None, None


def fake_quantize_ste(
    x: Tensor,
    scale: float | Tensor,
    zero_point: int | Tensor,
    bits: int = 8,
    *,
    signed: bool = True,
    narrow_range: bool = False,
    axis: int | None = None,
) -> Tensor:
    """:class:`FakeQuantSTE` with the integer range given as bits (``quant.qrange``)."""
    qmin, qmax = quant.qrange(bits, signed, narrow_range)
    return FakeQuantSTE.apply(x, torch.as_tensor(scale), torch.as_tensor(zero_point), qmin, qmax, axis)


def lsq_scale_grad(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Elementwise ``∂x̂/∂s`` of the fake quantizer under the STE (LSQ, Esser et al. 2020, eq. 3).

    With ``q = round(x·(1/s)) + z`` (float32, half to even)::

        ∂x̂/∂s = round(x·(1/s)) − x·(1/s)   if qmin ≤ q ≤ qmax
                qmin − z                     if q < qmin
                qmax − z                     if q > qmax

    Inside the range x̂ = (round(x/s))·s and the STE treats round as the identity, so
    d/ds [round(x/s)·s] = round(x/s) + s·(−x/s²). Returns float32 of x's shape.
    """
    _check_qlimits(qmin, qmax)
    s, z = _view(x, scale, zero_point, axis)
    v = x * torch.reciprocal(s)
    q, inside = _round_and_mask(x, s, z, qmin, qmax)
    outside = torch.where(q < qmin, qmin - z, qmax - z)
    return torch.where(inside, torch.round(v) - v, outside)


def lsq_grad_factor(numel: int, qmax: int) -> float:
    """LSQ's gradient scale ``g = 1 / sqrt(N · qmax)`` for a scale shared by N values.

    Without it the scale's gradient, a sum over N values, dwarfs a weight's gradient;
    g brings the ratio update/value of the scale close to that of the weights.
    """
    if numel < 1 or qmax < 1:
        raise ValueError(f"numel and qmax must be ≥ 1, got numel={numel}, qmax={qmax}")
    return 1.0 / math.sqrt(numel * qmax)


class LSQFakeQuant(torch.autograd.Function):
    """Fake quantization with a learned scale (LSQ): :class:`FakeQuantSTE` plus ``∂L/∂s``.

    ``LSQFakeQuant.apply(x, scale, zero_point, qmin, qmax, grad_factor, axis=None)``.
    Forward as :class:`FakeQuantSTE`. Backward: ``∂L/∂x = grad · mask`` and
    ``∂L/∂s = grad_factor · Σ grad · lsq_scale_grad(x, s, z)`` summed over every element
    that shares the scale (all of them, or all but ``axis``). The zero point is fixed.
    Same gradients as ``torch._fake_quantize_learnable_per_tensor_affine`` /
    ``_per_channel_affine`` with the same ``grad_factor`` (up to float32 rounding).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                grad_factor: float, axis: int | None = None) -> Tensor:
        _check_qlimits(qmin, qmax)
        s, z = _view(x, scale, zero_point, axis)
        q, inside = _round_and_mask(x, s, z, qmin, qmax)
        ctx.save_for_backward(x, scale, zero_point, inside)
        ctx.qlimits, ctx.grad_factor, ctx.axis = (qmin, qmax), grad_factor, axis
        return (q.clamp(qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, scale, zero_point, inside = ctx.saved_tensors
        per_element = grad_out * lsq_scale_grad(x, scale, zero_point, *ctx.qlimits, ctx.axis)
        if ctx.axis is None:
            grad_scale = per_element.sum().reshape(scale.shape)
        else:
            axis = ctx.axis % x.dim()
            grad_scale = per_element.movedim(axis, 0).reshape(x.shape[axis], -1).sum(dim=1)
        return grad_out * inside, grad_scale * ctx.grad_factor, None, None, None, None, None


# ------------------------------------------------------------------ quantizer modules


def mse_weight_scale(w: Tensor, bits: int, *, grid: int = 100) -> Tensor:
    """Per-output-channel symmetric scale that minimises ``‖fake_quantize(w) − w‖²``.

    Tries clipping thresholds ``t = α · max|w_c|`` for ``α`` in ``(0, 1]`` (``grid`` steps)
    with ``s = t / qmax`` (narrow signed range) and keeps the best per channel.
    Min-max (α = 1) never clips but wastes levels on rare large weights; at 2–4 bits
    clipping a few of them usually costs less than the coarse steps they force.
    """
    qmin, qmax = quant.qrange(bits, signed=True, narrow_range=True)
    rows = w.detach().reshape(w.shape[0], -1)
    max_abs = rows.abs().amax(dim=1).clamp_min(MIN_SCALE)
    alphas = torch.arange(1, grid + 1, dtype=torch.float32) / grid
    scales = (alphas[:, None] * max_abs[None, :] / qmax).clamp_min(MIN_SCALE)  # (grid, C)
    q = torch.clamp(torch.round(rows[None] * torch.reciprocal(scales)[..., None]), qmin, qmax)
    err = ((q * scales[..., None] - rows[None]) ** 2).sum(dim=-1)  # (grid, C)
    return scales.gather(0, err.argmin(dim=0, keepdim=True)).squeeze(0)


class LSQWeightFakeQuant(nn.Module):
    """Per-output-channel symmetric weight fake quantizer with a learned (LSQ) scale.

    Codes in the narrow signed range ``[-(2^(b-1) − 1), 2^(b-1) − 1]`` (TFLite/XNNPACK's
    int8 weight range; 2 bits gives the ternary codes {−1, 0, 1}), zero point 0.
    ``init``: ``"minmax"`` (s = max|w_c| / qmax, no clipping: PyTorch's per-channel
    observer) or ``"mse"`` (:func:`mse_weight_scale`). The scale is an ``nn.Parameter``
    trained with gradient factor ``g = 1/sqrt(N · qmax)``, N = weights per channel.
    """

    def __init__(self, weight: Tensor, bits: int, *, init: str = "minmax") -> None:
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = quant.qrange(bits, signed=True, narrow_range=True)
        if init == "minmax":
            scale, _ = quant.qparams_from_tensor(
                weight.detach(), bits, symmetric=True, narrow_range=True, axis=0
            )
        elif init == "mse":
            scale = mse_weight_scale(weight, bits)
        else:
            raise ValueError(f"init must be 'minmax' or 'mse', got {init!r}")
        self.scale = nn.Parameter(scale.clone().float())
        self.register_buffer("zero_point", torch.zeros(weight.shape[0], dtype=torch.int64))
        self.grad_factor = lsq_grad_factor(weight[0].numel(), self.qmax)

    def forward(self, w: Tensor) -> Tensor:
        scale = self.scale.clamp_min(MIN_SCALE)
        return LSQFakeQuant.apply(w, scale, self.zero_point, self.qmin, self.qmax, self.grad_factor, 0)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, qrange=[{self.qmin}, {self.qmax}], per_channel"


class ActivationFakeQuant(nn.Module):
    """Per-tensor affine activation fake quantizer whose range an EMA observer sets.

    While observing (training mode, not frozen) each batch updates
    ``min ← min + c·(batch_min − min)`` (same for max; the first batch sets them), as
    torch's ``MovingAverageMinMaxObserver`` does, and the qparams follow
    (``quant.qparams_from_range``, asymmetric, signed ``bits``-bit codes).
    :func:`freeze_observers` fixes the range. In eval mode the range is only used.
    """

    def __init__(self, bits: int = 8, *, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.bits, self.averaging_constant = bits, averaging_constant
        self.qmin, self.qmax = quant.qrange(bits, signed=True)
        self.frozen = False
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int64))

    @property
    def has_range(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        if not self.has_range:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            c = self.averaging_constant
            self.min_val.add_(c * (lo - self.min_val))
            self.max_val.add_(c * (hi - self.max_val))
        scale, zero_point = quant.qparams_from_range(self.min_val, self.max_val, self.bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self.frozen:
            self.observe(x)
        if not self.has_range:
            raise RuntimeError(
                "this activation quantizer has not seen any data yet: run "
                "calibrate_observers(model, images) or a training step first"
            )
        return FakeQuantSTE.apply(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        rng = f"[{float(self.min_val):.4g}, {float(self.max_val):.4g}]" if self.has_range else "unset"
        return f"bits={self.bits}, range={rng}, frozen={self.frozen}"


class QuantConv2d(nn.Conv2d):
    """Conv2d that fake-quantizes its input (per tensor) and its weight (per channel, LSQ)."""

    input_fq: ActivationFakeQuant
    weight_fq: LSQWeightFakeQuant

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, *, weight_init: str = "minmax",
                   averaging_constant: float = 0.01) -> QuantConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode)
        new.load_state_dict(conv.state_dict())
        new.input_fq = ActivationFakeQuant(a_bits, averaging_constant=averaging_constant)
        new.weight_fq = LSQWeightFakeQuant(new.weight, w_bits, init=weight_init)
        return new.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_fq(x), self.weight_fq(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """Linear that fake-quantizes its input (per tensor) and its weight (per channel, LSQ)."""

    input_fq: ActivationFakeQuant
    weight_fq: LSQWeightFakeQuant

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, *, weight_init: str = "minmax",
                   averaging_constant: float = 0.01) -> QuantLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.load_state_dict(linear.state_dict())
        new.input_fq = ActivationFakeQuant(a_bits, averaging_constant=averaging_constant)
        new.weight_fq = LSQWeightFakeQuant(new.weight, w_bits, init=weight_init)
        return new.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_fq(x), self.weight_fq(self.weight), self.bias)


# ------------------------------------------------------------------ BatchNorm


def frozen_batch_norm(x: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """BatchNorm with its running statistics, which it leaves untouched.

    ``y = γ · (x − μ_run) / sqrt(σ²_run + ε) + β`` per channel (dim 1), float32.
    Gradients flow to x, γ and β; μ_run, σ²_run and ``num_batches_tracked`` do not change.
    """
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training=False, momentum=0.0, eps=bn.eps)


class FreezableBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that :func:`freeze_bn` can freeze for good.

    ``model.eval()`` on a BN layer is not enough: the next ``model.train()`` puts it back
    on batch statistics. Once ``frozen``, this layer always computes
    :func:`frozen_batch_norm`; γ and β still train.
    """

    frozen: bool = False

    @classmethod
    def from_float(cls, bn: nn.BatchNorm2d) -> FreezableBatchNorm2d:
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        return new.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.frozen:
            return frozen_batch_norm(x, self)
        return super().forward(x)


def freeze_bn(model: nn.Module) -> int:
    """Freeze every :class:`FreezableBatchNorm2d` in ``model``; returns how many.

    Raises ValueError if the model holds a plain BatchNorm (run :func:`prepare_qat` first).
    """
    count = 0
    for name, m in model.named_modules():
        if isinstance(m, FreezableBatchNorm2d):
            m.frozen = True
            count += 1
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"{name} is a plain {type(m).__name__}: prepare the model with prepare_qat")
    return count


def freeze_observers(model: nn.Module) -> int:
    """Stop every :class:`ActivationFakeQuant` of ``model`` from updating its range; returns how many.

    Raises RuntimeError if one of them has never observed data (its range would be undefined).
    """
    count = 0
    for name, m in model.named_modules():
        if isinstance(m, ActivationFakeQuant):
            if not m.has_range:
                raise RuntimeError(f"{name} has not observed any data: calibrate before freezing")
            m.frozen = True
            count += 1
    return count


# ------------------------------------------------------------------ whole model


def _check_bits(bits: Any, name: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an int from 2 to 8, got {bits!r}")


def prepare_qat(
    model: nn.Module,
    w_bits: int = 8,
    a_bits: int = 8,
    *,
    weight_init: str = "minmax",
    averaging_constant: float = 0.01,
) -> nn.Module:
    """A copy of ``model`` ready for QAT; the original is left untouched.

    Every ``nn.Conv2d`` → :class:`QuantConv2d`, ``nn.Linear`` → :class:`QuantLinear`
    (``w_bits`` per-channel LSQ weights, ``a_bits`` per-tensor EMA activations on the
    layer's input), every ``nn.BatchNorm2d`` → :class:`FreezableBatchNorm2d`. The
    activation ranges are unset until :func:`calibrate_observers` or the first training step.
    """
    _check_bits(w_bits, "w_bits")
    _check_bits(a_bits, "a_bits")
    qat_model = copy.deepcopy(model)
    _swap_modules(qat_model, w_bits, a_bits, weight_init, averaging_constant)
    return qat_model


def _swap_modules(parent: nn.Module, w_bits: int, a_bits: int, weight_init: str, c: float) -> None:
    for name, child in parent.named_children():
        if isinstance(child, QuantConv2d | QuantLinear | FreezableBatchNorm2d):
            continue
        if type(child) is nn.Conv2d:
            new: nn.Module = QuantConv2d.from_float(child, w_bits, a_bits, weight_init=weight_init,
                                                    averaging_constant=c)
        elif type(child) is nn.Linear:
            new = QuantLinear.from_float(child, w_bits, a_bits, weight_init=weight_init,
                                         averaging_constant=c)
        elif type(child) is nn.BatchNorm2d:
            new = FreezableBatchNorm2d.from_float(child)
        else:
            _swap_modules(child, w_bits, a_bits, weight_init, c)
            continue
        setattr(parent, name, new)


@torch.no_grad()
def calibrate_observers(model: nn.Module, images: Tensor | Iterable[Tensor]) -> nn.Module:
    """Set the activation ranges of a QAT model from calibration images (post-training).

    The model runs in eval mode (BN on running statistics) while its
    :class:`ActivationFakeQuant` layers observe; a single tensor of images is one batch,
    so the range is its exact min-max. Frozen observers are left alone. Returns the model
    in eval mode.
    """
    fqs = [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]
    if not fqs:
        raise ValueError("the model has no ActivationFakeQuant layers: run prepare_qat first")
    model.eval()
    for fq in fqs:
        fq.train()
    try:
        for batch in [images] if isinstance(images, Tensor) else images:
            model(batch[0] if isinstance(batch, list | tuple) else batch)
    finally:
        model.eval()
    return model


def qat_step(model: nn.Module, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer) -> float:
    """One training step: train mode, zero the gradients, cross-entropy, backward, step.

    Returns the batch's mean loss as a Python float. With fake quantizers in the model the
    forward sees quantized weights and activations and the STE carries the gradient back
    to the float weights (and, with LSQ, to the scales).
    """
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_qat(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 1,
    freeze_bn_after: int | None = None,
    freeze_observers_after: int | None = None,
    eval_every: int | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    progress: bool = True,
    desc: str = "QAT",
) -> dict[str, list[float]]:
    """Run :func:`qat_step` over ``loader`` for ``epochs``; returns the training history.

    After ``freeze_bn_after`` steps :func:`freeze_bn`, after ``freeze_observers_after``
    steps :func:`freeze_observers` (None: never). Every ``eval_every`` steps (and at the
    end) ``evaluate(model)`` (e.g. test accuracy) is recorded with the mean training loss
    of the steps since the last record. History keys: ``step``, ``loss``, ``metric``.
    Progress is a tqdm bar (``tqdm.auto``).
    """
    from tqdm.auto import tqdm

    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    total = epochs * len(loader)  # type: ignore[arg-type]
    history: dict[str, list[float]] = {"step": [], "loss": [], "metric": []}
    losses: list[float] = []
    step = 0
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            for images, labels in loader:
                if freeze_bn_after is not None and step == freeze_bn_after:
                    freeze_bn(model)
                if freeze_observers_after is not None and step == freeze_observers_after:
                    freeze_observers(model)
                losses.append(qat_step(model, images, labels, optimizer))
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if (eval_every and step % eval_every == 0) or step == total:
                    history["step"].append(step)
                    history["loss"].append(sum(losses) / len(losses))
                    history["metric"].append(evaluate(model) if evaluate is not None else math.nan)
                    losses = []
    model.eval()
    return history


# ------------------------------------------------------------------ to lesson 04's integer network


def weight_codes(layer: QuantConv2d | QuantLinear) -> Tensor:
    """The integer weight codes a QAT layer computes with, int32 (O, …).

    ``clamp(round(W · (1/s_c)), qmin, qmax)`` per output channel with the learned scale
    (round half to even, as the forward pass): ``ŵ = codes · s_c`` exactly.
    """
    fq = layer.weight_fq
    scale = fq.scale.detach().clamp_min(MIN_SCALE)
    return quant.quantize(layer.weight.detach(), scale, fq.zero_point, fq.bits, narrow_range=True, axis=0)


def _folded_integer_layer(
    layer: QuantConv2d | QuantLinear,
    bn: nn.BatchNorm2d | None,
    output_qparams: tuple[float, int],
    activation: str | None,
) -> kernels.IntegerLayer:
    """One int8 layer from a trained QAT layer and the frozen BN after it.

    BN multiplies channel c by ``k_c = γ_c / sqrt(σ²_c + ε)``; since the weights are
    quantized per channel, ``k_c · (codes_c · s_c) = (sign(k_c) · codes_c) · (|k_c| · s_c)``:
    the same codes (signs flipped where k_c < 0) with a rescaled scale. Bias
    ``k_c · (b_c − μ_c) + β_c``; computed in float64, stored as float32.
    """
    codes = weight_codes(layer).to(torch.float64)
    scale = layer.weight_fq.scale.detach().clamp_min(MIN_SCALE).double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(codes.shape[0], dtype=torch.float64)
    if bn is not None:
        k = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        sign = torch.where(k < 0, -1.0, 1.0).double()
        codes = codes * sign.reshape(-1, *([1] * (codes.dim() - 1)))
        scale = (scale * k.abs()).clamp_min(quant.TINY)
        bias = k * (bias - bn.running_mean.double()) + bn.bias.detach().double()
    fq_in = layer.input_fq
    padding = int(layer.padding[0]) if isinstance(layer, nn.Conv2d) else 0
    return kernels.integer_layer_from_codes(
        codes.numpy().astype(np.int8), scale.float().numpy(), bias.float(),
        input_scale=float(fq_in.scale), input_zero_point=int(fq_in.zero_point),
        output_scale=output_qparams[0], output_zero_point=output_qparams[1],
        activation=activation, padding=padding,
    )


@torch.no_grad()
def convert_to_integer(model: nn.Module, calib_images: Tensor) -> kernels.IntegerTinyCNN:
    """A trained QAT TinyCNN as lesson 04's integer-only ``kernels.IntegerTinyCNN``.

    Weights: the codes the QAT model trained with (:func:`weight_codes`), each frozen BN
    folded in per channel (same codes, scale ``|k_c| · s_c``). Activations: the frozen
    ranges of the ``input_fq`` quantizers: conv1's input, conv2's input (= conv1's
    output: max-pooling keeps (S, Z)) and fc's input (= conv2's output). The QAT model
    keeps its logits float; the integer network needs int8 logits, so their range is the
    min-max of the QAT model's logits on ``calib_images`` (int8 asymmetric).
    Biases become int32 and the multipliers ``S_in·S_w/S_out`` fixed point
    (``kernels.integer_layer_from_codes``); requantization rounds like TFLite, not like
    the float simulation, so a few logits may differ by one step.
    """
    for name in ("conv1", "bn1", "conv2", "bn2", "fc", "pool1"):
        if not hasattr(model, name):
            raise ValueError(f"convert_to_integer converts a QAT TinyCNN; the model has no {name}")
    if not all(isinstance(m, QuantConv2d) for m in (model.conv1, model.conv2)) or not isinstance(model.fc, QuantLinear):
        raise ValueError("conv1, conv2 and fc must be QAT layers: run prepare_qat and train first")
    for bn in (model.bn1, model.bn2):
        if isinstance(bn, FreezableBatchNorm2d) and not bn.frozen:
            raise ValueError("freeze the BatchNorm layers (freeze_bn) before converting: the integer "
                             "model folds their running statistics")
    model.eval()
    logits = model(calib_images)
    out_scale, out_zp = quant.qparams_from_range(logits.min(), logits.max(), 8)

    def qparams(fq: ActivationFakeQuant) -> tuple[float, int]:
        return float(fq.scale), int(fq.zero_point)

    conv1 = _folded_integer_layer(model.conv1, model.bn1, qparams(model.conv2.input_fq), "relu")
    conv2 = _folded_integer_layer(model.conv2, model.bn2, qparams(model.fc.input_fq), "relu")
    fc = _folded_integer_layer(model.fc, None, (float(out_scale), int(out_zp)), None)
    pool = model.pool1.kernel_size if isinstance(model.pool1.kernel_size, int) else model.pool1.kernel_size[0]
    return kernels.IntegerTinyCNN(float(model.conv1.input_fq.scale), int(model.conv1.input_fq.zero_point),
                                  conv1, conv2, fc, int(pool))
