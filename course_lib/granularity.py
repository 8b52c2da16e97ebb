"""Quantization granularity: one scale per tensor, per output channel, or per group.

Lesson 03 uses these helpers on the trained weights of the shipped models; lessons 05
and 07 can reuse :func:`fake_quantize_weight`, :func:`quantize_model_weights` (one bit
width, or a ``{layer: bits}`` plan), :func:`layer_errors` and :func:`fold_batchnorms`.

Weights are quantized **symmetric, signed, narrow range** (TFLite's weight scheme):

    q_max = 2^(b-1) - 1                       (127 at 8 bits, 7 at 4 bits, 1 at 2 bits)
    s     = max|w| / q_max                    over the weights that share one scale
    q     = clamp(round_half_even(w · (1/s)), -q_max, q_max)        int32
    ŵ     = q · s                                                    float32

(``q_max`` equals PyTorch's ``(qmax - qmin) / 2`` for the narrow range, so the scales
match ``PerChannelMinMaxObserver(qscheme=torch.per_channel_symmetric,
quant_min=-q_max, quant_max=q_max)``.) Only *which* weights share a scale changes:

- ``"per-tensor"``:  all weights of the layer (one scale per layer);
- ``"per-channel"``: one output channel, dim 0 of a Conv2d or Linear weight;
- ``"per-group"``:   ``group_size`` consecutive weights of one output channel, taken in
  the flattened ``(in_channels, kh, kw)`` order. A last, shorter group is padded with
  zeros, which cannot change its max|w|; a row shorter than ``group_size`` (a 3×3
  depthwise filter has 9 weights) is a single group, so per-group equals per-channel there.

``symmetric=False`` selects the asymmetric *unsigned* scheme ([0, 2^b - 1] with a zero
point), the "asymmetric per-layer" of Krishnamoorthi (2018).

The arithmetic itself (qparams, rounding, clamping) is :mod:`course_lib.quant`; this
module only chooses the groups, walks a model and measures.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course_lib import quant
from course_lib.sizes import payload_bytes, saved_size  # byte counts live in course_lib.sizes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "GRANULARITIES",
    "channel_max_abs",
    "count_zeroed_channels",
    "dequantize_weight",
    "fake_quantize_weight",
    "fold_batchnorms",
    "is_depthwise",
    "layer_errors",
    "mcnemar",
    "pack_model_weights",
    "payload_bytes",
    "plot_layer_sqnr",
    "quantizable_layers",
    "quantize_model_weights",
    "quantize_weight",
    "relative_mse",
    "rescale_depthwise_channels",
    "saved_size",
    "sqnr_db",
    "unpack_model_weights",
    "weight_qparams",
]

GRANULARITIES: tuple[str, ...] = ("per-tensor", "per-channel", "per-group")
DEFAULT_GROUP_SIZE = 32  # GGML's Q4_0 block; torchao's int4 weight-only default is 128


# --------------------------------------------------------------------------- checks
def _check_weight(w: Tensor) -> None:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight tensor, got {type(w).__name__}"
                         + (f" of dtype {w.dtype}" if isinstance(w, Tensor) else ""))
    if w.dim() < 2:
        raise ValueError(
            f"expected a Conv/Linear weight with an output-channel dim 0 (≥ 2 dims), got shape "
            f"{tuple(w.shape)}"
        )
    if w.numel() == 0:
        raise ValueError("the weight is empty")
    if not torch.isfinite(w.detach().abs().amax()):  # one reduction: NaN or Inf anywhere shows up
        raise ValueError("the weight contains NaN or Inf: no finite scale exists")


def _check_granularity(granularity: str, group_size: int) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "per-group" and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def _scheme(symmetric: bool) -> dict[str, bool]:
    # Symmetric weights: signed, narrow range [-q_max, q_max] (zero point 0).
    # Asymmetric weights: unsigned full range [0, 2^b - 1] with a zero point.
    if symmetric:
        return {"signed": True, "symmetric": True, "narrow_range": True}
    return {"signed": False, "symmetric": False, "narrow_range": False}


def _grouped_rows(w: Tensor, group_size: int) -> Tensor:
    """``w`` as (C_out, K) rows, zero-padded on the right to a multiple of ``group_size``."""
    rows = w.detach().reshape(w.shape[0], -1).float()
    pad = -rows.shape[1] % group_size
    return F.pad(rows, (0, pad)) if pad else rows


# --------------------------------------------------------------------------- one weight
def weight_qparams(
    w: Tensor,
    bits: int = 8,
    granularity: str = "per-channel",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
) -> tuple[Tensor, Tensor]:
    """Scales (float32) and zero points (int64) of a weight at a granularity.

    Shapes: per-tensor ``()``; per-channel ``(C_out,)``; per-group
    ``(C_out, ceil(K / group_size))`` with ``K = w[0].numel()``. Symmetric: ``s = max|w| /
    q_max`` (never below float32 eps), zero point 0.
    """
    _check_weight(w)
    _check_granularity(granularity, group_size)
    scheme = _scheme(symmetric)
    x = w.detach().float()
    if granularity == "per-tensor":
        return quant.qparams_from_tensor(x, bits, **scheme)
    if granularity == "per-channel":
        return quant.qparams_from_tensor(x, bits, axis=0, **scheme)
    return quant.qparams_from_tensor(_grouped_rows(x, group_size), bits, group_size=group_size,
                                     **scheme)


def quantize_weight(
    w: Tensor,
    bits: int = 8,
    granularity: str = "per-channel",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Integer weight ``q`` (int32, shape of ``w``), its scales and zero points.

    ``q = clamp(zero_point + round_half_even(w · (1/s)), qmin, qmax)`` with the float32
    reciprocal (PyTorch's rule, :func:`course_lib.quant.quantize`).
    """
    scale, zero_point = weight_qparams(w, bits, granularity, group_size=group_size,
                                       symmetric=symmetric)
    scheme = _scheme(symmetric)
    kw = {"signed": scheme["signed"], "narrow_range": scheme["narrow_range"]}
    x = w.detach().float()
    if granularity == "per-tensor":
        q = quant.quantize(x, scale, zero_point, bits, **kw)
    elif granularity == "per-channel":
        q = quant.quantize(x, scale, zero_point, bits, axis=0, **kw)
    else:
        rows = _grouped_rows(x, group_size)
        q = quant.quantize(rows, scale, zero_point, bits, group_size=group_size, **kw)
        q = q[:, : x[0].numel()].reshape(x.shape)
    return q, scale, zero_point


def dequantize_weight(
    q: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    granularity: str = "per-channel",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> Tensor:
    """``ŵ = (q - zero_point) · s`` (float32, shape of ``q``), the scales laid out as
    :func:`weight_qparams` returns them."""
    _check_granularity(granularity, group_size)
    if granularity == "per-tensor":
        return quant.dequantize(q, scale, zero_point)
    if granularity == "per-channel":
        return quant.dequantize(q, scale, zero_point, axis=0)
    rows = _grouped_rows(q.float(), group_size).to(q.dtype)
    w_hat = quant.dequantize(rows, scale, zero_point, group_size=group_size)
    return w_hat[:, : q[0].numel()].reshape(q.shape)


def fake_quantize_weight(
    w: Tensor,
    bits: int = 8,
    granularity: str = "per-channel",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
) -> Tensor:
    """Quantize then dequantize a weight: ``ŵ = (q - zero_point) · s`` (float32, shape of ``w``).

    Equal to :func:`course_lib.quant.fake_quantize` with the scales of
    :func:`weight_qparams` (bit-exact with ``torch.fake_quantize_per_channel_affine``).
    """
    q, scale, zero_point = quantize_weight(w, bits, granularity, group_size=group_size,
                                           symmetric=symmetric)
    return dequantize_weight(q, scale, zero_point, granularity, group_size=group_size)


def channel_max_abs(w: Tensor) -> Tensor:
    """``max|w|`` of each output channel (dim 0), float32 of shape ``(C_out,)``."""
    _check_weight(w)
    return w.detach().float().reshape(w.shape[0], -1).abs().amax(dim=1)


def count_zeroed_channels(
    w: Tensor,
    bits: int = 8,
    granularity: str = "per-tensor",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
) -> int:
    """Output channels that hold a non-zero weight but quantize to all zeros.

    Symmetric per-tensor: channel c vanishes when ``max|w_c| ≤ s/2``, i.e. when its range
    is below ``1 / (2 q_max)`` of the layer's largest channel (1/254 at 8 bits).
    """
    w_hat = fake_quantize_weight(w, bits, granularity, group_size=group_size, symmetric=symmetric)
    had_signal = w.detach().reshape(w.shape[0], -1).ne(0).any(dim=1)
    lost = w_hat.reshape(w.shape[0], -1).eq(0).all(dim=1)
    return int((had_signal & lost).sum())


# --------------------------------------------------------------------------- metrics
def _noise_and_signal(x: Tensor, x_hat: Tensor) -> tuple[float, float]:
    if not isinstance(x, Tensor) or not isinstance(x_hat, Tensor):
        raise ValueError("sqnr_db / relative_mse take two tensors")
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    x64 = x.detach().double()
    e64 = x64 - x_hat.detach().double()
    signal, noise = float(x64.square().sum()), float(e64.square().sum())
    if not (math.isfinite(signal) and math.isfinite(noise)):  # a NaN or Inf anywhere reaches the sums
        raise ValueError("the inputs contain NaN or Inf")
    if signal == 0.0:
        raise ValueError("the reference signal is all zeros: its SQNR is undefined")
    return noise, signal


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 · log10(Σ x² / Σ (x - x̂)²)``.

    Sums in float64. +inf when ``x̂ == x``; ValueError when ``x`` is all zeros.
    Each extra bit of a uniform quantizer adds about 6.02 dB.
    """
    noise, signal = _noise_and_signal(x, x_hat)
    return _db(noise / signal)


def _db(ratio: float) -> float:
    """``-10 · log10(noise / signal)``: +inf for a zero noise."""
    return math.inf if ratio == 0.0 else -10.0 * math.log10(ratio)


def relative_mse(x: Tensor, x_hat: Tensor) -> float:
    """``Σ (x - x̂)² / Σ x²`` (float64 sums), i.e. ``10^(-SQNR/10)``."""
    noise, signal = _noise_and_signal(x, x_hat)
    return noise / signal


def mcnemar(correct_a: Tensor, correct_b: Tensor) -> tuple[int, int, float]:
    """McNemar's exact test of two classifiers scored on the **same** images.

    ``correct_a`` and ``correct_b`` are boolean tensors (one entry per image, True when
    that model's prediction is right). Only the images on which the two disagree carry
    information about which is better:

        n_ab = #(A right, B wrong),   n_ba = #(A wrong, B right)
        p    = min(1, 2 · P[X ≤ min(n_ab, n_ba)]),   X ~ Binomial(n_ab + n_ba, 1/2)

    the two-sided exact p-value of "A and B are equally accurate" (1.0 when they never
    disagree). The accuracy difference is ``(n_ab - n_ba) / len(correct_a)``.
    Returns ``(n_ab, n_ba, p)``.
    """
    a, b = torch.as_tensor(correct_a), torch.as_tensor(correct_b)
    if a.dtype != torch.bool or b.dtype != torch.bool or a.shape != b.shape or a.dim() != 1:
        raise ValueError("expected two 1-D boolean tensors of the same length (one entry per image)")
    n_ab, n_ba = int((a & ~b).sum()), int((~a & b).sum())
    n, k = n_ab + n_ba, min(n_ab, n_ba)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n  # exact integers, then one division
    return n_ab, n_ba, min(1.0, 2.0 * tail)


# --------------------------------------------------------------------------- models
def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Conv2d and Linear, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def is_depthwise(module: nn.Module) -> bool:
    """A Conv2d with one input channel per group (``groups == in_channels > 1``)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def layer_errors(
    model: nn.Module,
    bits: Iterable[int] = (8, 4, 2),
    granularities: Iterable[str] = GRANULARITIES,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
) -> list[dict[str, Any]]:
    """Weight error of every Conv2d/Linear layer at each bit width and granularity.

    Returns one row per (layer, bits, granularity): ``index`` (layer position), ``layer``,
    ``kind`` ("conv", "depthwise" or "linear"), ``bits``, ``granularity``, ``sqnr_db``
    and ``relative_mse`` (see :func:`sqnr_db`). Activations are not involved.
    """
    rows: list[dict[str, Any]] = []
    bits, granularities = list(bits), list(granularities)
    for index, (name, module) in enumerate(quantizable_layers(model)):
        w = module.weight.detach()
        kind = "linear" if isinstance(module, nn.Linear) else (
            "depthwise" if is_depthwise(module) else "conv")
        for b in bits:
            for g in granularities:
                w_hat = fake_quantize_weight(w, b, g, group_size=group_size, symmetric=symmetric)
                noise, signal = _noise_and_signal(w, w_hat)
                rows.append({"index": index, "layer": name, "kind": kind, "bits": b,
                             "granularity": g, "sqnr_db": _db(noise / signal),
                             "relative_mse": noise / signal})
    return rows


def quantize_model_weights(
    model: nn.Module,
    bits: int | Mapping[str, int],
    granularity: str = "per-channel",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
) -> nn.Module:
    """A copy of ``model`` whose Conv2d/Linear weights are fake-quantized (weight-only).

    ``bits`` is one bit width for every layer, or ``{layer name: bits}`` (layers not in
    the mapping stay float: mixed precision). Biases, BatchNorm and activations stay
    float32. The original model is not modified.
    """
    _check_granularity(granularity, group_size)
    layers = dict(quantizable_layers(model))
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(layers))
        if unknown:
            raise ValueError(f"no Conv2d/Linear layer named {unknown}; known: {sorted(layers)}")
        plan = dict(bits)
    else:
        plan = dict.fromkeys(layers, bits)
    qmodel = copy.deepcopy(model)
    qlayers = dict(quantizable_layers(qmodel))
    with torch.no_grad():
        for name, b in plan.items():
            w = qlayers[name].weight
            w.copy_(fake_quantize_weight(w, b, granularity, group_size=group_size,
                                         symmetric=symmetric))
    return qmodel


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm2d folded into the Conv2d before it.

    A pair is a Conv2d child immediately followed by a BatchNorm2d child of the same
    parent (registration order, which is the forward order in ``nn.Sequential``, in
    torchvision's MobileNetV2 and in TinyCNN). The conv gets
    ``W' = W · γ/σ`` and ``b' = (b - μ) · γ/σ + β`` with ``σ = sqrt(var + eps)``
    (:func:`course_lib.kernels.fold_batchnorm`) and the BatchNorm becomes ``nn.Identity``.
    Only valid in eval mode, where BatchNorm uses its running statistics. The folded
    parameters are frozen (``requires_grad=False``): the copy is made for inference and
    quantization; call ``.requires_grad_(True)`` on it to train it.
    """
    from course_lib.kernels import fold_batchnorm  # imported late: kernels is a sibling lesson's

    folded = copy.deepcopy(model).eval()
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (_, a), (name_b, b) in zip(children, children[1:], strict=False):
            if isinstance(a, nn.Conv2d) and type(b) is nn.BatchNorm2d:
                weight, bias = fold_batchnorm(a, b)
                a.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
                a.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
                setattr(parent, name_b, nn.Identity())
    return folded


def rescale_depthwise_channels(folded: nn.Module, decades: float = 3.0, *, seed: int = 0) -> nn.Module:
    """A copy of a BN-folded MobileNetV2 that computes the same function with depthwise
    channel ranges spread over ``decades`` orders of magnitude.

    For every depthwise conv inside a ``(conv, Identity, ReLU)`` block that is followed by
    a Conv2d (the 1×1 projection), output channel c is scaled by
    ``k_c = 10^(-decades · u_c)`` with ``u_c ~ U[0, 1)`` (seeded) and the projection's
    input channel c by ``1 / k_c``:

        W_dw[c] ← k_c · W_dw[c],   b_dw[c] ← k_c · b_dw[c],   W_proj[:, c] ← W_proj[:, c] / k_c

    Exact in real arithmetic because ``relu(k·x) = k·relu(x)`` for ``k > 0`` (not true for
    ReLU6, hence the check). It imitates the spread that BatchNorm folding produces in
    ImageNet-trained MobileNets, without changing what the float network computes.
    """
    if decades < 0:
        raise ValueError(f"decades must be ≥ 0, got {decades}")
    if any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()):
        raise ValueError("fold the BatchNorms first (fold_batchnorms): the rescaling assumes conv → ReLU")
    model = copy.deepcopy(folded).eval()
    gen = torch.Generator().manual_seed(seed)
    found = 0
    with torch.no_grad():
        for parent in model.modules():
            kids = list(parent.children())
            for block, proj in zip(kids, kids[1:], strict=False):
                if not (isinstance(block, nn.Sequential) and len(block) == 3
                        and is_depthwise(block[0]) and isinstance(block[1], nn.Identity)
                        and isinstance(proj, nn.Conv2d) and proj.groups == 1):
                    continue
                if type(block[2]) is not nn.ReLU:
                    raise ValueError(f"{type(block[2]).__name__} is not positively homogeneous: "
                                     "the rescaling needs a plain ReLU")
                dw = block[0]
                k = 10.0 ** (-decades * torch.rand(dw.out_channels, generator=gen))
                dw.weight.mul_(k.reshape(-1, 1, 1, 1))
                if dw.bias is not None:
                    dw.bias.mul_(k)
                proj.weight.div_(k.reshape(1, -1, 1, 1))
                found += 1
    if not found:
        raise ValueError("no (depthwise conv, Identity, ReLU) block followed by a Conv2d was found")
    return model


# --------------------------------------------------------------------------- bytes on disk
def pack_model_weights(
    model: nn.Module,
    bits: int,
    granularity: str = "per-channel",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """A state dict with integer Conv2d/Linear weights, ready for ``torch.save``.

    For each layer ``name``: ``name.weight_q`` (int8 at 8 bits; otherwise
    :func:`course_lib.quant.pack_bits`, ``8 // bits`` weights per uint8 byte),
    ``name.weight_scale`` (``scale_dtype``) and, for the asymmetric scheme only,
    ``name.weight_zero_point`` (uint8; symmetric zero points are all 0, so none is
    stored). Every other state-dict tensor (biases, BatchNorm) is kept as it is.
    ``"meta"`` records bits, granularity, group size and scheme.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8 to fill whole bytes, got {bits}")
    if scale_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"scale_dtype must be a float dtype, got {scale_dtype}")
    packed: dict[str, Any] = {"meta": {"bits": bits, "granularity": granularity,
                                       "group_size": group_size, "symmetric": symmetric}}
    layers = dict(quantizable_layers(model))
    weight_keys = {f"{n}.weight" for n in layers}
    for key, value in model.state_dict().items():
        if key not in weight_keys:
            packed[key] = value.detach().clone()
    for name, module in layers.items():
        q, scale, zero_point = quantize_weight(module.weight, bits, granularity,
                                               group_size=group_size, symmetric=symmetric)
        if bits == 8 and symmetric:
            packed[f"{name}.weight_q"] = q.to(torch.int8)
        else:
            packed[f"{name}.weight_q"] = quant.pack_bits(q.flatten(), bits)
        packed[f"{name}.weight_scale"] = scale.to(scale_dtype)
        if not symmetric:
            packed[f"{name}.weight_zero_point"] = zero_point.to(torch.uint8)
    return packed


def unpack_model_weights(packed: Mapping[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """Inverse of :func:`pack_model_weights`: a float32 state dict for ``model``.

    Weights come back as ``(q - zero_point) · scale`` (dequantized); the shapes are taken
    from ``model``, whose architecture the file does not store.
    """
    meta = packed["meta"]
    bits, granularity, group_size = meta["bits"], meta["granularity"], meta["group_size"]
    state = {k: v for k, v in packed.items() if k != "meta" and ".weight_" not in k}
    for name, module in quantizable_layers(model):
        shape = module.weight.shape
        stored = packed[f"{name}.weight_q"]
        if stored.dtype == torch.int8:
            q = stored.to(torch.int32).reshape(shape)
        else:
            q = quant.unpack_bits(stored, bits, shape.numel(),
                                  signed=meta["symmetric"]).reshape(shape)
        scale = packed[f"{name}.weight_scale"].float()
        zp_key = f"{name}.weight_zero_point"
        zero_point = (packed[zp_key].long() if zp_key in packed
                      else torch.zeros(scale.shape, dtype=torch.int64))
        state[f"{name}.weight"] = dequantize_weight(q, scale, zero_point, granularity,
                                                    group_size=group_size)
    return state


# --------------------------------------------------------------------------- figure
def plot_layer_sqnr(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "",
    granularities: Sequence[str] = GRANULARITIES,
    shade_depthwise: bool = True,
) -> Figure:
    """One panel per bit width: SQNR (dB) of each layer, one line per granularity.

    ``rows`` is the output of :func:`layer_errors`. Depthwise layers get a grey band,
    so the layers where per-tensor and per-channel part ways stand out.
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    bits = sorted({r["bits"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(bits), figsize=(4.2 * len(bits), 3.4), sharey=True,
                             squeeze=False)
    styles = {"per-tensor": ("tab:red", "o"), "per-channel": ("tab:blue", "s"),
              "per-group": ("tab:green", "^")}
    for ax, b in zip(axes[0], bits, strict=True):
        sel = [r for r in rows if r["bits"] == b]
        if shade_depthwise:
            for i in sorted({r["index"] for r in sel if r["kind"] == "depthwise"}):
                ax.axvspan(i - 0.5, i + 0.5, color="0.9", lw=0)
        for g in granularities:
            pts = sorted((r["index"], r["sqnr_db"]) for r in sel if r["granularity"] == g)
            if not pts:
                continue
            color, marker = styles.get(g, (None, "."))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=4, lw=1.2,
                    color=color, label=g)
        ax.set_title(f"{b}-bit weights")
        ax.set_xlabel("layer (forward order)")
        ax.grid(alpha=0.3)
        layer_names = sorted({(r["index"], r["layer"]) for r in sel})
        if len(layer_names) <= 6:
            ax.set_xticks([i for i, _ in layer_names], [n for _, n in layer_names])
    axes[0][0].set_ylabel("weight SQNR (dB, higher is better)")
    axes[0][-1].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
