"""Mixed precision and pruning: which layers can take fewer bits, and what the bytes are.

Lesson 07 uses four pieces, each a few short functions:

1. **Sensitivity.** Quantize the weights of *one* layer (per-channel, symmetric, signed,
   narrow range: :func:`course_lib.granularity.fake_quantize_weight`), keep every other
   layer and all activations float, and measure on a labelled batch

       accuracy      = mean(argmax(logits) == label)
       relative MSE  = Σ (ŷ - y)² / Σ y²        (y: float logits, ŷ: logits with that layer quantized)
       SQNR          = -10 · log10(relative MSE)  dB

2. **Size accounting** (:func:`weight_bytes`, :func:`model_bytes`). A Conv2d/Linear weight
   quantized to ``b`` bits costs

       ceil(numel · b / 8)  bytes of packed integers
       + 4 · C_out          bytes of float32 scales (one per output channel)

   and nothing for zero points: the scheme is symmetric, so they are all 0 and are not
   stored. Float weights (``b = 32``) cost ``4 · numel`` and have no scale. Every other
   floating-point tensor of the state dict (biases, BatchNorm γ, β and statistics) is
   counted at its own size, float32 = 4 bytes. After BatchNorm folding the only such
   tensors are the biases, one float32 per output channel.

3. **Bit allocation** under a byte budget. Given a cost ``c[l][b]`` (the sensitivity of
   layer ``l`` at ``b`` bits) and a size ``s[l][b]``, choose one ``b`` per layer to

       minimise Σ_l c[l][b_l]   subject to   Σ_l s[l][b_l] ≤ budget.

   Summing per-layer costs assumes the layers' errors add up independently, which
   holds roughly while each error is small. :func:`allocate_bits` solves the problem
   exactly (dynamic programming over bytes, a multiple-choice knapsack);
   :func:`allocate_bits_greedy` takes the cheapest step down at a time;
   :func:`allocate_bits_brute_force` tries every combination (small problems only).

4. **Magnitude pruning.** Masks (bool, ``True`` = keep) that zero the smallest weights:
   per layer (:func:`magnitude_mask`), across layers (:func:`global_magnitude_masks`), or
   whole output channels by their L1/L2 norm (:func:`channel_mask`). The number pruned
   is ``round(sparsity · n)`` with Python's round (half to even), as in
   ``torch.nn.utils.prune``. Then quantize, and count real bytes with an encoding
   (:func:`encode_weights`) written to a file. How much each layer can lose is measured
   like its bit sensitivity (:func:`pruning_sensitivity`), and the same knapsack chooses
   one sparsity per layer (:func:`allocate_sparsities`).

5. **k-means (codebook) quantization** (Han et al., *Deep Compression*, ICLR 2016). Each
   layer's weights are clustered into ``2^b`` centroids by 1-D k-means
   (:func:`kmeans_1d`); the layer stores a ``b``-bit index per weight and the ``2^b``
   float32 centroids:

       bytes = ceil(numel · b / 8) + 4 · 2^b

   With the indices fixed, the centroids are then fine-tuned by gradient descent
   (:func:`fine_tune_centroids`): a centroid's gradient is the sum of the gradients of
   the weights that share it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.fx
from torch import Tensor, nn

from course_lib import granularity, quant
from course_lib.sizes import (  # lesson 07's byte counts live in sizes
    FLOAT_BITS,
    model_bytes,
    weight_bytes,
    written_size,
)
from course_lib.sizes import SCALE_BYTES as _SCALE_BYTES
from course_lib.sizes import bits_plan as _bits_plan
from course_lib.sizes import other_float_bytes as _other_float_bytes
from course_lib.training import EVAL_BATCH_SIZE

__all__ = [
    "BIT_CHOICES",
    "ENCODINGS",
    "FLOAT_BITS",
    "PRUNING_METHODS",
    "Codebook",
    "PruningSensitivity",
    "Sensitivity",
    "allocate_bits",
    "allocate_bits_brute_force",
    "allocate_bits_greedy",
    "allocate_sparsities",
    "allocation_cost",
    "allocation_size",
    "apply_masks",
    "channel_mask",
    "codebook_model_bytes",
    "codebook_weights",
    "decode_weights",
    "encode_weights",
    "fine_tune_centroids",
    "global_magnitude_masks",
    "kmeans_1d",
    "kmeans_codebook",
    "kmeans_codebooks",
    "layer_sensitivity",
    "layer_sizes",
    "logits_of",
    "magnitude_mask",
    "masks_enforced",
    "model_bytes",
    "pareto_front",
    "plain_log_xaxis",
    "plot_pareto",
    "plot_sensitivity",
    "pruned_weights",
    "pruning_masks",
    "pruning_sensitivity",
    "quantized_weights",
    "replaced_weights",
    "sensitivity_sweep",
    "top1",
    "weight_bytes",
    "weight_layers",
    "weight_sparsity",
    "written_size",
]

BIT_CHOICES: tuple[int, ...] = (8, 4, 2)
_PACKABLE = (2, 4, 8)  # widths that quant.pack_bits fills whole bytes with


# --------------------------------------------------------------------------- layers
def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every Conv2d and Linear, in registration (forward) order."""
    return dict(granularity.quantizable_layers(model))


@contextlib.contextmanager
def quantized_weights(model: nn.Module, bits: int | Mapping[str, int]) -> Iterator[nn.Module]:
    """Temporarily fake-quantize weights in place; the float weights come back on exit.

    ``bits``: one width for every Conv2d/Linear, or ``{layer: bits}`` (others stay float).
    Per-channel symmetric narrow-range weights (round half to even, float32 reciprocal);
    biases, BatchNorm and activations stay float32. Swapping in place instead of copying
    the model keeps a 150-point sensitivity sweep cheap.
    """
    plan = {n: b for n, b in _bits_plan(model, bits).items() if b != FLOAT_BITS}
    with replaced_weights(model, {n: (lambda w, b=b: granularity.fake_quantize_weight(w, b))
                                  for n, b in plan.items()}):
        yield model


@contextlib.contextmanager
def replaced_weights(model: nn.Module, new_weight: Mapping[str, Callable[[Tensor], Tensor]]) -> Iterator[nn.Module]:
    """Temporarily set each named layer's weight to ``new_weight[name](float weight)``.

    The float weights are copied first and written back on exit, even after an error:
    swapping in place instead of copying the model keeps sweeps over many layers cheap.
    """
    layers = weight_layers(model)
    saved = {n: layers[n].weight.detach().clone() for n in new_weight}
    try:
        with torch.no_grad():
            for name, make in new_weight.items():
                layers[name].weight.copy_(make(saved[name]))
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                layers[name].weight.copy_(w)


# --------------------------------------------------------------------------- measuring
def logits_of(model: nn.Module, images: Tensor, *, batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """``model(images)`` in eval mode without gradients, in batches; float32 N×classes."""
    if not isinstance(images, Tensor) or images.ndim < 2 or len(images) == 0:
        raise ValueError("images must be a non-empty N×... tensor")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


def top1(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy ``mean(argmax(logits, dim=1) == labels)`` as a Python float in [0, 1]."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits N×K and labels N, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return float((logits.argmax(dim=1) == labels).double().mean())


def _sqnr_db(relative_mse: float) -> float:
    """``-10 · log10(relative_mse)``; +inf when the logits did not change at all."""
    return math.inf if relative_mse == 0 else -10.0 * math.log10(relative_mse)


@dataclass(frozen=True)
class Sensitivity:
    """One point of a sensitivity sweep: ``layer`` quantized to ``bits``, all else float."""

    layer: str
    bits: int
    accuracy: float
    relative_mse: float

    @property
    def sqnr_db(self) -> float:
        return _sqnr_db(self.relative_mse)


def layer_sensitivity(
    model: nn.Module,
    layer: str,
    bits: int,
    images: Tensor,
    labels: Tensor,
    reference_logits: Tensor | None = None,
) -> tuple[float, float]:
    """(accuracy, relative MSE of the logits) with only ``layer``'s weight quantized.

    Weight: per-channel symmetric signed narrow-range fake quantization at ``bits``
    (:func:`course_lib.granularity.fake_quantize_weight`); everything else float.
    ``relative MSE = Σ (ŷ - y)² / Σ y²`` in float64, with ``y`` the float model's logits
    (``reference_logits``, computed here when None). The model is unchanged afterwards.
    """
    if layer not in weight_layers(model):
        raise ValueError(f"no Conv2d/Linear layer named {layer!r}; known: {list(weight_layers(model))}")
    if reference_logits is None:
        reference_logits = logits_of(model, images)
    with quantized_weights(model, {layer: bits}):
        logits = logits_of(model, images)
    return top1(logits, labels), granularity.relative_mse(reference_logits, logits)


class _ActivationCache:
    """The float model traced by ``torch.fx``, with every node's output on ``images`` kept.

    Quantizing layer ``l`` changes only the nodes that depend on it; every other node's
    value is taken from the cache (``Interpreter.run(initial_env=...)``), so a sweep
    re-runs on average half of the network instead of all of it. Exactly the same
    arithmetic as a full forward pass, only less of it.
    """

    def __init__(self, model: nn.Module, images: Tensor) -> None:
        self.graph_module = torch.fx.symbolic_trace(model)
        recorder = torch.fx.Interpreter(self.graph_module, garbage_collect_values=False)
        with torch.no_grad():
            self.logits = recorder.run(images)
        self.env = recorder.env
        self.nodes = {n.target: n for n in self.graph_module.graph.nodes if n.op == "call_module"}

    def logits_with(self, layer: str) -> Tensor:
        """Logits after re-running ``layer`` and everything downstream of it."""
        stale, frontier = set(), [self.nodes[layer]]
        while frontier:  # the layer's node and all its descendants
            node = frontier.pop()
            if node not in stale:
                stale.add(node)
                frontier.extend(node.users)
        env = {n: v for n, v in self.env.items() if n not in stale}
        with torch.no_grad():
            return torch.fx.Interpreter(self.graph_module).run(initial_env=env)


def sensitivity_sweep(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    bits: Sequence[int] = BIT_CHOICES,
    *,
    progress: bool = False,
    reuse_activations: bool = True,
) -> dict[str, dict[int, Sensitivity]]:
    """:func:`layer_sensitivity` of every Conv2d/Linear at every width in ``bits``.

    Returns ``{layer: {bits: Sensitivity}}`` in forward order. Measure on the
    calibration split: these numbers choose the allocation, so the test split must not
    be used here. With ``reuse_activations`` (and a model ``torch.fx`` can trace) the
    layers before the quantized one are not recomputed; the results are the same.
    """
    was_training = model.training
    model.eval()  # BatchNorm with running statistics, as deployed
    try:
        return _sweep(model, images, labels, bits, progress, reuse_activations)
    finally:
        model.train(was_training)


def _sweep(model: nn.Module, images: Tensor, labels: Tensor, bits: Sequence[int], progress: bool,
           reuse_activations: bool) -> dict[str, dict[int, Sensitivity]]:
    def quantize(name: str, b: int) -> contextlib.AbstractContextManager:
        return quantized_weights(model, {name: b})

    measured = _one_layer_at_a_time(model, images, labels, bits, quantize, progress, reuse_activations,
                                    "sensitivity")
    return {n: {b: Sensitivity(n, b, *m) for b, m in row.items()} for n, row in measured.items()}


def _one_layer_at_a_time(model: nn.Module, images: Tensor, labels: Tensor, settings: Sequence,
                         change, progress: bool, reuse_activations: bool,
                         desc: str) -> dict[str, dict[object, tuple[float, float]]]:
    """``{layer: {setting: (accuracy, relative MSE)}}`` with ``change(layer, setting)`` (a
    context manager that alters that layer's weight) applied to one layer at a time."""
    names = list(weight_layers(model))
    cache = None
    if reuse_activations:
        try:
            cache = _ActivationCache(model, images)
        except torch.fx.proxy.TraceError:  # data-dependent control flow: run whole forwards instead
            cache = None
    reference = cache.logits if cache is not None else logits_of(model, images)
    pairs = [(n, v) for n in names for v in settings]
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc=desc, unit="eval")
    out: dict[str, dict[object, tuple[float, float]]] = {n: {} for n in names}
    for name, v in pairs:
        with change(name, v):
            logits = logits_of(model, images) if cache is None else cache.logits_with(name)
        out[name][v] = (top1(logits, labels), granularity.relative_mse(reference, logits))
    return out


# --------------------------------------------------------------------------- bytes


def layer_sizes(model: nn.Module, bits: Sequence[int] = BIT_CHOICES) -> dict[str, dict[int, int]]:
    """``{layer: {bits: weight_bytes(layer, bits)}}`` for the bit allocator."""
    return {n: {b: weight_bytes(m, b) for b in bits} for n, m in weight_layers(model).items()}


# --------------------------------------------------------------------------- allocation
Costs = Mapping[str, Mapping[int, float]]
Sizes = Mapping[str, Mapping[int, int]]


def _check_problem(costs: Costs, sizes: Sizes, budget: int) -> None:
    if not costs:
        raise ValueError("costs is empty: there is no layer to allocate bits to")
    if list(costs) != list(sizes):
        raise ValueError(f"costs and sizes must name the same layers in the same order: "
                         f"{list(costs)} vs {list(sizes)}")
    for layer in costs:
        if not costs[layer] or set(costs[layer]) != set(sizes[layer]):
            raise ValueError(f"layer {layer!r}: costs and sizes must give the same, non-empty "
                             f"bit widths, got {sorted(costs[layer])} and {sorted(sizes[layer])}")
        for b, c in costs[layer].items():
            if not math.isfinite(c):
                raise ValueError(f"cost of {layer!r} at {b} bits is {c}: costs must be finite")
            s = sizes[layer][b]
            if not isinstance(s, int | np.integer) or s < 0:
                raise ValueError(f"size of {layer!r} at {b} bits must be a non-negative int, got {s!r}")
    if not isinstance(budget, int | np.integer) or budget < 0:
        raise ValueError(f"budget must be a non-negative number of bytes (int), got {budget!r}")
    smallest = sum(min(sizes[layer].values()) for layer in sizes)
    if smallest > budget:
        raise ValueError(f"no allocation fits in {budget} bytes: the smallest one needs {smallest}")


def allocation_cost(costs: Costs, allocation: Mapping[str, int]) -> float:
    """``Σ_l costs[l][allocation[l]]``."""
    return float(sum(costs[layer][b] for layer, b in allocation.items()))


def allocation_size(sizes: Sizes, allocation: Mapping[str, int]) -> int:
    """``Σ_l sizes[l][allocation[l]]`` in bytes."""
    return int(sum(sizes[layer][b] for layer, b in allocation.items()))


def allocate_bits(costs: Costs, sizes: Sizes, budget: int) -> dict[str, int]:
    """The allocation of least total cost whose size fits ``budget`` bytes (exact).

    Dynamic programming over layers and bytes: after layer ``i``,
    ``best[c] = min_b (best_prev[c - s[i][b]] + cost[i][b])`` is the least cost of the
    first ``i`` layers within ``c`` bytes; one backward pass reads the choices.
    O(layers · widths · budget) time (numpy over the byte axis),
    O(layers · budget) memory. Among equal costs the first width listed wins.
    Raises ValueError when even the smallest allocation does not fit.
    """
    _check_problem(costs, sizes, budget)
    layers = list(costs)
    budget = int(budget)
    best = np.zeros(budget + 1)  # no layer yet: cost 0 within any number of bytes
    choice = np.empty((len(layers), budget + 1), dtype=np.int8)
    for i, layer in enumerate(layers):
        new = np.full(budget + 1, np.inf)
        arg = np.full(budget + 1, -1, dtype=np.int8)
        for k, b in enumerate(costs[layer]):
            s = int(sizes[layer][b])
            if s > budget:
                continue
            candidate = np.full(budget + 1, np.inf)
            candidate[s:] = best[: budget + 1 - s] + costs[layer][b]
            better = candidate < new
            new[better], arg[better] = candidate[better], k
        best, choice[i] = new, arg
    allocation: dict[str, int] = {}
    c = budget
    for i in reversed(range(len(layers))):
        layer = layers[i]
        b = list(costs[layer])[choice[i, c]]
        allocation[layer] = b
        c -= int(sizes[layer][b])
    return {layer: allocation[layer] for layer in layers}


def allocate_bits_brute_force(costs: Costs, sizes: Sizes, budget: int, *,
                              max_combinations: int = 1_000_000) -> dict[str, int]:
    """Try every combination of widths; keep the cheapest that fits (first one on ties).

    ``Π_l |widths_l|`` evaluations, so only for small problems (3 layers × 3 widths = 27).
    """
    _check_problem(costs, sizes, budget)
    layers = list(costs)
    n = math.prod(len(costs[layer]) for layer in layers)
    if n > max_combinations:
        raise ValueError(f"{n} combinations exceed max_combinations={max_combinations}; "
                         "use allocate_bits (dynamic programming)")
    best, best_cost = None, math.inf
    for combo in itertools.product(*(list(costs[layer]) for layer in layers)):
        allocation = dict(zip(layers, combo, strict=True))
        if allocation_size(sizes, allocation) <= budget:
            cost = allocation_cost(costs, allocation)
            if cost < best_cost:
                best, best_cost = allocation, cost
    assert best is not None  # _check_problem guarantees that the smallest fits
    return best


def allocate_bits_greedy(costs: Costs, sizes: Sizes, budget: int) -> dict[str, int]:
    """Start every layer at its cheapest width; while over budget, make the one change
    (one layer to any smaller width) with the least extra cost per byte saved,
    ``Δcost / Δbytes``.

    Fast and usually close, not always optimal (compare with :func:`allocate_bits`).
    """
    _check_problem(costs, sizes, budget)
    allocation = {layer: min(costs[layer], key=lambda b, lay=layer: (costs[lay][b], sizes[lay][b]))
                  for layer in costs}
    while allocation_size(sizes, allocation) > budget:
        best, best_ratio = None, math.inf
        for layer, now in allocation.items():
            for b in costs[layer]:
                saved = sizes[layer][now] - sizes[layer][b]
                if saved > 0:
                    ratio = (costs[layer][b] - costs[layer][now]) / saved
                    if ratio < best_ratio:
                        best, best_ratio = (layer, b), ratio
        # each step shrinks the total, and _check_problem made sure the smallest fits
        assert best is not None
        allocation[best[0]] = best[1]
    return allocation


def pareto_front(sizes: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats, sorted by size.

    Point ``j`` dominates ``i`` when ``size_j ≤ size_i`` and ``acc_j ≥ acc_i`` with at
    least one strict. Equal points are both kept.
    """
    if len(sizes) != len(accuracies):
        raise ValueError(f"{len(sizes)} sizes but {len(accuracies)} accuracies")
    front = []
    for i, (si, ai) in enumerate(zip(sizes, accuracies, strict=True)):
        dominated = any(sj <= si and aj >= ai and (sj < si or aj > ai)
                        for sj, aj in zip(sizes, accuracies, strict=True))
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (sizes[i], -accuracies[i]))


# --------------------------------------------------------------------------- pruning
PRUNING_METHODS = ("layer", "global", "channel")


def _check_sparsity(value: float) -> float:
    if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1], got {value!r}")
    return float(value)


def _n_pruned(fraction: float, n: int) -> int:
    # torch.nn.utils.prune's rule: Python round, so ties go to the even count.
    return round(fraction * n)


def magnitude_mask(w: Tensor, sparsity: float) -> Tensor:
    """Unstructured mask of one tensor: False on its ``round(sparsity·numel)`` smallest |w|.

    Returns a bool tensor of ``w``'s shape (True = keep). Equal magnitudes are pruned in
    flat (row-major) index order, lowest index first.
    """
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError("w must be a floating-point tensor")
    k = _n_pruned(_check_sparsity(sparsity), w.numel())
    order = torch.argsort(w.detach().abs().flatten(), stable=True)
    mask = torch.ones(w.numel(), dtype=torch.bool)
    mask[order[:k]] = False
    return mask.reshape(w.shape)


def global_magnitude_masks(weights: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Unstructured masks with one threshold across all tensors.

    The ``round(sparsity·N)`` smallest |w| of all ``N`` weights together are pruned, so
    layers with small weights lose more. Ties: lower position in the concatenation
    (tensors in the mapping's order, each flattened) first.
    """
    if not weights:
        raise ValueError("weights is empty")
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    k = _n_pruned(_check_sparsity(sparsity), flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    return masks


def channel_mask(w: Tensor, sparsity: float, *, p: int = 2) -> Tensor:
    """Structured mask: whole output channels (dim 0) with the smallest L``p`` norms off.

    ``norm_c = (Σ_{i in channel c} |w_i|^p)^(1/p)``, p = 1 or 2; the
    ``round(sparsity·C_out)`` channels of smallest norm are pruned (ties: lower channel
    index first). Returns a bool tensor of ``w``'s shape, each channel all True or all False.
    """
    if not isinstance(w, Tensor) or not w.is_floating_point() or w.ndim < 2:
        raise ValueError("w must be a floating-point tensor with an output-channel dim 0 (≥ 2 dims)")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    norms = torch.linalg.vector_norm(w.detach().reshape(w.shape[0], -1).double(), ord=p, dim=1)
    k = _n_pruned(_check_sparsity(sparsity), w.shape[0])
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    keep[torch.argsort(norms, stable=True)[:k]] = False
    return keep.reshape(-1, *([1] * (w.ndim - 1))).expand(w.shape).clone()


def pruning_masks(
    model: nn.Module,
    sparsity: float | Mapping[str, float],
    method: Literal["layer", "global", "channel"] = "layer",
    *,
    p: int = 2,
    skip: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Masks for every Conv2d/Linear weight of ``model``; layers in ``skip`` keep everything.

    - ``"layer"``: :func:`magnitude_mask` on each layer at ``sparsity``;
    - ``"global"``: :func:`global_magnitude_masks` over the layers not skipped, together;
    - ``"channel"``: :func:`channel_mask` (L``p`` norm) on each layer, and the last layer
      is always skipped: its output channels are the classes (pruning one would delete
      a class).

    ``sparsity`` may be ``{layer: fraction}`` for ``"layer"`` and ``"channel"`` (one
    fraction per layer, e.g. from :func:`allocate_sparsities`; missing layers keep all).
    """
    if method not in PRUNING_METHODS:
        raise ValueError(f"method must be one of {PRUNING_METHODS}, got {method!r}")
    weights = {n: m.weight for n, m in weight_layers(model).items()}
    unknown = sorted(set(skip) - set(weights))
    if unknown:
        raise ValueError(f"cannot skip {unknown}: no Conv2d/Linear layer of that name")
    skipped = set(skip) | ({list(weights)[-1]} if method == "channel" else set())
    kept = {n: w for n, w in weights.items() if n not in skipped}
    if not kept:
        raise ValueError("every layer is skipped: nothing to prune")
    if isinstance(sparsity, Mapping):
        if method == "global":
            raise ValueError("method 'global' takes one sparsity for the whole model, not a mapping")
        unknown = sorted(set(sparsity) - set(weights))
        if unknown:
            raise ValueError(f"no Conv2d/Linear layer named {unknown}; known: {list(weights)}")
        per_layer = {n: sparsity.get(n, 0.0) for n in kept}
    else:
        per_layer = dict.fromkeys(kept, sparsity)
    if method == "global":
        masks = global_magnitude_masks(kept, sparsity)
    elif method == "layer":
        masks = {n: magnitude_mask(w, per_layer[n]) for n, w in kept.items()}
    else:
        masks = {n: channel_mask(w, per_layer[n], p=p) for n, w in kept.items()}
    return {n: masks[n] if n in masks else torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}


@dataclass(frozen=True)
class PruningSensitivity:
    """One point of a pruning scan: ``layer`` magnitude-pruned to ``sparsity``, all else intact."""

    layer: str
    sparsity: float
    accuracy: float
    relative_mse: float

    @property
    def sqnr_db(self) -> float:
        return _sqnr_db(self.relative_mse)


@contextlib.contextmanager
def pruned_weights(model: nn.Module, masks: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily zero the masked-out weights (``w · mask``); the weights come back on exit."""
    _check_masks(model, masks)
    with replaced_weights(model, {n: (lambda w, m=m: w * m.to(w.dtype)) for n, m in masks.items()}):
        yield model


def pruning_sensitivity(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    *,
    progress: bool = False,
) -> dict[str, dict[float, PruningSensitivity]]:
    """Prune one layer at a time (:func:`magnitude_mask` at each sparsity), keep the rest.

    Returns ``{layer: {sparsity: PruningSensitivity}}`` (accuracy and relative logit MSE
    against the unpruned model, as in :func:`sensitivity_sweep`), in forward order.
    Measure on the calibration split: the scan chooses the per-layer sparsities.
    """
    for v in sparsities:
        _check_sparsity(v)
    layers = weight_layers(model)

    def prune_one(name: str, sparsity: float) -> contextlib.AbstractContextManager:
        return pruned_weights(model, {name: magnitude_mask(layers[name].weight, sparsity)})

    was_training = model.training
    model.eval()
    try:
        measured = _one_layer_at_a_time(model, images, labels, sparsities, prune_one, progress, True, "pruning")
    finally:
        model.train(was_training)
    return {n: {v: PruningSensitivity(n, v, *m) for v, m in row.items()} for n, row in measured.items()}


def allocate_sparsities(
    scan: Mapping[str, Mapping[float, PruningSensitivity]],
    model: nn.Module,
    sparsity: float,
) -> dict[str, float]:
    """One sparsity per scanned layer: least summed relative MSE with ``sparsity`` overall.

    The multiple-choice knapsack of :func:`allocate_bits` with another knob: layer ``l``
    at sparsity ``p`` costs ``scan[l][p].relative_mse`` (0 at ``p = 0``, always allowed)
    and keeps ``numel_l − round(p · numel_l)`` weights; the kept weights of all
    Conv2d/Linear layers (unscanned ones keep everything) must fit in
    ``N − round(sparsity · N)``. Raises ValueError when even the largest scanned
    sparsities do not reach ``sparsity``.
    """
    layers = weight_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    unscanned = sum(m.weight.numel() for n, m in layers.items() if n not in scan)
    budget = total - _n_pruned(_check_sparsity(sparsity), total) - unscanned
    if budget < 0:
        raise ValueError(f"{sparsity:.0%} overall needs more than the scanned layers hold")
    levels = {n: sorted({0.0, *row}) for n, row in scan.items()}
    costs = {n: {i: 0.0 if v == 0 else scan[n][v].relative_mse for i, v in enumerate(levels[n])} for n in scan}
    sizes = {n: {i: layers[n].weight.numel() - _n_pruned(v, layers[n].weight.numel())
                 for i, v in enumerate(levels[n])} for n in scan}
    choice = allocate_bits(costs, sizes, budget)
    return {n: levels[n][i] for n, i in choice.items()}


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Module]:
    layers = weight_layers(model)
    for name, mask in masks.items():
        if name not in layers:
            raise ValueError(f"no Conv2d/Linear layer named {name!r}")
        if mask.shape != layers[name].weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask of {name!r} must be bool of shape {tuple(layers[name].weight.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
    return layers


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Zero the masked-out weights in place (``w ← w · mask``); returns ``model``."""
    layers = _check_masks(model, masks)
    with torch.no_grad():
        for name, mask in masks.items():
            layers[name].weight.mul_(mask.to(layers[name].weight.dtype))
    return model


def weight_sparsity(masks_or_model: Mapping[str, Tensor] | nn.Module) -> float:
    """Fraction of zeros over all Conv2d/Linear weights (of a model) or all masks."""
    if isinstance(masks_or_model, nn.Module):
        tensors = [m.weight.detach() != 0 for m in weight_layers(masks_or_model).values()]
    else:
        tensors = list(masks_or_model.values())
    total = sum(t.numel() for t in tensors)
    if total == 0:
        raise ValueError("no weights to measure")
    return 1.0 - sum(int(t.sum()) for t in tensors) / total


@contextlib.contextmanager
def masks_enforced(model: nn.Module, masks: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Fine-tune with pruned weights held at zero.

    Inside the block each masked weight is ``weight_orig · mask`` (torch's
    ``prune.custom_from_mask`` re-parametrisation), so gradient steps cannot revive a
    pruned weight; on exit the product is written back as a plain parameter.
    """
    from torch.nn.utils import prune

    layers = _check_masks(model, masks)
    for name, mask in masks.items():
        prune.custom_from_mask(layers[name], "weight", mask)
    try:
        yield model
    finally:
        for name in masks:
            prune.remove(layers[name], "weight")


# --------------------------------------------------------------------------- encoding
ENCODINGS = ("dense", "bitmask", "zlib")


def _float32_bytes(t: Tensor) -> bytes:
    return t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()


def _layer_payload(w: Tensor, bits: int, encoding: str) -> bytes:
    """One weight layer: packed integers (+ a bitmask) and the float32 scales."""
    if bits == FLOAT_BITS:
        return _float32_bytes(w)
    if bits not in _PACKABLE:
        raise ValueError(f"the encoding packs 2, 4 or 8 bits (or {FLOAT_BITS} = float), got {bits}")
    q, scale, _ = granularity.quantize_weight(w, bits)  # symmetric: zero points are 0, not stored
    q = q.flatten()
    if encoding == "bitmask":
        nonzero = q != 0
        mask = np.packbits(nonzero.numpy(), bitorder="little").tobytes()
        values = quant.pack_bits(q[nonzero], bits).numpy().tobytes() if bool(nonzero.any()) else b""
        return mask + values + _float32_bytes(scale)
    return quant.pack_bits(q, bits).numpy().tobytes() + _float32_bytes(scale)


def encode_weights(
    model: nn.Module,
    bits: int | Mapping[str, int],
    encoding: Literal["dense", "bitmask", "zlib"] = "bitmask",
) -> bytes:
    """Serialise a model's weights as quantized integers; returns the bytes to write.

    For each Conv2d/Linear in forward order (shapes come from the architecture, so the
    file stores none):

    - ``"dense"``: ``pack_bits(q, bits)`` (8/bits values per byte, first value in the
      low bits), then ``C_out`` float32 scales;
    - ``"bitmask"``: one bit per weight (``np.packbits``, little bit order: 1 = non-zero),
      then ``pack_bits`` of the non-zero values only, then the scales. Costs
      ``1 + (1 - sparsity)·bits`` bits per weight, so it pays off once
      ``sparsity > 1/bits``;
    - ``"zlib"``: the dense bytes compressed with ``zlib`` level 9 (entropy coding finds
      the runs of zeros by itself).

    Then every other float state-dict tensor (biases, BatchNorm) as little-endian float32.
    ``q`` is per-channel symmetric narrow-range (:func:`course_lib.granularity.quantize_weight`),
    so weights that were pruned to zero stay exactly 0.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    plan = _bits_plan(model, bits)
    layers = weight_layers(model)
    layer_encoding = "dense" if encoding == "zlib" else encoding
    parts = [_layer_payload(layers[n].weight, b, layer_encoding) for n, b in plan.items()]
    weight_keys = {f"{n}.weight" for n in layers}
    parts += [_float32_bytes(v) for k, v in model.state_dict().items()
              if k not in weight_keys and v.is_floating_point()]
    blob = b"".join(parts)
    return zlib.compress(blob, 9) if encoding == "zlib" else blob


def decode_weights(
    blob: bytes,
    model: nn.Module,
    bits: int | Mapping[str, int],
    encoding: Literal["dense", "bitmask", "zlib"] = "bitmask",
) -> dict[str, Tensor]:
    """Inverse of :func:`encode_weights`: ``{layer: dequantized weight q·s}`` (float32).

    ``model`` supplies the shapes (its weights are not read). Proves that the
    encoding holds everything needed to rebuild the weights.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    data = zlib.decompress(blob) if encoding == "zlib" else blob
    plan = _bits_plan(model, bits)
    layers = weight_layers(model)
    pos, out = 0, {}

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ValueError("the blob is shorter than the architecture needs")
        chunk, pos = data[pos:pos + n], pos + n
        return chunk

    for name, b in plan.items():
        shape = layers[name].weight.shape
        numel, channels = shape.numel(), shape[0]
        if b == FLOAT_BITS:
            out[name] = torch.from_numpy(np.frombuffer(take(4 * numel), "<f4").copy()).reshape(shape)
            continue
        if encoding == "bitmask":
            bitmask = np.unpackbits(np.frombuffer(take(math.ceil(numel / 8)), np.uint8),
                                    count=numel, bitorder="little").astype(bool)
            n_nonzero = int(bitmask.sum())
            packed = torch.from_numpy(np.frombuffer(take(math.ceil(n_nonzero * b / 8)), np.uint8).copy())
            q = torch.zeros(numel, dtype=torch.int32)
            if n_nonzero:
                q[torch.from_numpy(bitmask)] = quant.unpack_bits(packed, b, n_nonzero)
        else:
            packed = torch.from_numpy(np.frombuffer(take(math.ceil(numel * b / 8)), np.uint8).copy())
            q = quant.unpack_bits(packed, b, numel)
        scale = torch.from_numpy(np.frombuffer(take(_SCALE_BYTES * channels), "<f4").copy())
        out[name] = quant.dequantize(q.reshape(shape), scale, torch.zeros(channels, dtype=torch.int64),
                                     axis=0)
    return out


# --------------------------------------------------------------------------- k-means
def kmeans_1d(values: Tensor, k: int, *, iterations: int = 30) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on scalars: ``(centroids, indices)``.

    Start: ``k`` centroids spaced linearly from ``min`` to ``max`` (Han et al. found
    linear initialisation best, because it keeps centroids for the few large weights
    that matter most). Repeat at most ``iterations`` times: assign every value to its
    nearest centroid (a value exactly half-way goes to the lower one), then move every
    centroid to the mean of its values (float64); a centroid with no value stays put.
    Stops early when no centroid moves. In 1-D the clusters are intervals, so the
    centroids stay sorted.

    Returns centroids float32 of shape (k,), ascending, and indices int64 of ``values``'
    shape: each value's nearest centroid among the returned ones.
    """
    if not isinstance(values, Tensor) or not values.is_floating_point() or values.numel() == 0:
        raise ValueError("values must be a non-empty floating-point tensor")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    v = values.detach().flatten().double()
    centroids = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)

    def assign(c: Tensor) -> Tensor:  # nearest centroid, via the midpoints between sorted centroids
        return torch.bucketize(v, (c[1:] + c[:-1]) / 2, right=False)

    for _ in range(iterations):
        idx = assign(centroids)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.bincount(idx, weights=v, minlength=k)
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    centroids = centroids.float()
    return centroids, assign(centroids.double()).reshape(values.shape)


@dataclass(frozen=True)
class Codebook:
    """A weight stored as a ``bits``-bit index per value into ``2^bits`` shared centroids."""

    centroids: Tensor  # float32, (2**bits,)
    indices: Tensor    # int64, the weight's shape, values in [0, 2**bits)
    bits: int

    def weight(self) -> Tensor:
        """The shared weight ``centroids[indices]`` (float32)."""
        return self.centroids[self.indices]

    @property
    def nbytes(self) -> int:
        """``ceil(numel · bits / 8)`` packed indices + ``4 · 2^bits`` float32 centroids."""
        return math.ceil(self.indices.numel() * self.bits / 8) + 4 * self.centroids.numel()


def kmeans_codebook(w: Tensor, bits: int, *, iterations: int = 30) -> Codebook:
    """One codebook per tensor: :func:`kmeans_1d` of all of ``w``'s values, ``k = 2^bits``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    centroids, indices = kmeans_1d(w, 2 ** bits, iterations=iterations)
    return Codebook(centroids, indices, bits)


def kmeans_codebooks(model: nn.Module, bits: int | Mapping[str, int], *,
                     iterations: int = 30) -> dict[str, Codebook]:
    """``{layer: Codebook}`` for every Conv2d/Linear (a mapping: only its layers, the others float)."""
    plan = _bits_plan(model, bits)
    layers = weight_layers(model)
    return {n: kmeans_codebook(layers[n].weight, b, iterations=iterations)
            for n, b in plan.items() if b != FLOAT_BITS}


def codebook_model_bytes(model: nn.Module, codebooks: Mapping[str, Codebook]) -> int:
    """Deployed size: Σ ``Codebook.nbytes`` + float32 layers without a codebook + every
    other float tensor (biases), as :func:`model_bytes` counts them."""
    layers = weight_layers(model)
    unknown = sorted(set(codebooks) - set(layers))
    if unknown:
        raise ValueError(f"no Conv2d/Linear layer named {unknown}")
    return (sum(cb.nbytes for cb in codebooks.values())
            + sum(4 * m.weight.numel() for n, m in layers.items() if n not in codebooks)
            + _other_float_bytes(model))


@contextlib.contextmanager
def codebook_weights(model: nn.Module, codebooks: Mapping[str, Codebook]) -> Iterator[nn.Module]:
    """Temporarily replace each layer's weight by ``centroids[indices]``; restored on exit."""
    layers = weight_layers(model)
    for name, cb in codebooks.items():
        if name not in layers or cb.indices.shape != layers[name].weight.shape:
            raise ValueError(f"codebook {name!r} does not fit a Conv2d/Linear weight of the model")
    with replaced_weights(model, {n: (lambda _w, cb=cb: cb.weight()) for n, cb in codebooks.items()}):
        yield model


def fine_tune_centroids(
    model: nn.Module,
    codebooks: Mapping[str, Codebook],
    loader,
    *,
    steps: int,
    lr: float = 1e-3,
    progress: bool = False,
) -> dict[str, Codebook]:
    """Deep Compression's fine-tuning: the indices stay, the centroids learn.

    Each weight is the gather ``W = C[I]``, so back-propagation gives centroid ``k`` the
    sum of the gradients of the weights that share it,
    ``∂L/∂C_k = Σ_{i: I_i = k} ∂L/∂W_i`` (Han et al., 2016). Adam (``lr``) on the
    centroids only, cross-entropy, train mode, for ``steps`` batches of ``loader``
    (cycled if shorter). The model's own parameters are not changed; returns new
    codebooks with the same indices and the trained centroids.
    """
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    centroids = {n: nn.Parameter(cb.centroids.detach().clone()) for n, cb in codebooks.items()}
    optimizer = torch.optim.Adam(list(centroids.values()), lr=lr)
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    batches = itertools.islice(itertools.cycle(loader), steps)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=steps, desc="fine-tune centroids", unit="batch")
    model.train()
    try:
        for images, labels in batches:
            shared = {f"{n}.weight": centroids[n][codebooks[n].indices] for n in centroids}
            loss = nn.functional.cross_entropy(torch.func.functional_call(model, shared, (images,)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        model.train(was_training)
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {n: Codebook(centroids[n].detach().clone(), cb.indices, cb.bits) for n, cb in codebooks.items()}


# --------------------------------------------------------------------------- figures
def plot_sensitivity(sweep: Mapping[str, Mapping[int, Sensitivity]], *, title: str = "",
                     float_accuracy: float | None = None):
    """Two panels over the layers (forward order): logit SQNR (dB) and accuracy, one line
    per bit width. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    names = list(sweep)
    widths = sorted({b for row in sweep.values() for b in row}, reverse=True)
    x = np.arange(len(names))
    fig, (ax_s, ax_a) = plt.subplots(2, 1, figsize=(max(6.0, 0.16 * len(names) + 4), 5.4), sharex=True)
    colors = {8: "tab:blue", 4: "tab:orange", 2: "tab:red"}
    for b in widths:
        sqnr = [min(sweep[n][b].sqnr_db, 80.0) for n in names]  # +inf (no change) drawn at 80 dB
        acc = [100 * sweep[n][b].accuracy for n in names]
        ax_s.plot(x, sqnr, marker="o", ms=3, lw=1, color=colors.get(b), label=f"{b}-bit")
        ax_a.plot(x, acc, marker="o", ms=3, lw=1, color=colors.get(b), label=f"{b}-bit")
    if float_accuracy is not None:
        ax_a.axhline(100 * float_accuracy, color="0.3", ls="--", lw=1, label="float")
    ax_s.set_ylabel("logit SQNR (dB)\nhigher = less sensitive")
    ax_a.set_ylabel("accuracy (%)")
    ax_a.set_xlabel("layer quantized alone (forward order)")
    for ax in (ax_s, ax_a):
        ax.grid(alpha=0.3)
    ax_s.legend(loc="best", fontsize=8, ncol=len(widths))
    ax_a.legend(loc="lower left", fontsize=8, ncol=len(widths) + 1)
    if len(names) <= 8:
        ax_a.set_xticks(x, names)
    if title:
        ax_s.set_title(title)
    fig.tight_layout()
    return fig


def plain_log_xaxis(ax) -> None:
    """Log-scale x axis labelled 200, 300, 500, 1000 rather than 2×10², 3×10², ..."""
    from matplotlib.ticker import FuncFormatter

    def label(v: float, _pos: int) -> str:
        lead = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
        return f"{v:g}" if round(lead, 6) in (1, 2, 3, 5) else ""

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.xaxis.set_minor_formatter(FuncFormatter(label))
    ax.tick_params(axis="x", which="both", labelsize=8)


def plot_pareto(points: Sequence[Mapping[str, object]], *, ax=None, title: str = "",
                annotate: bool = True):
    """Size (log x) vs accuracy; the Pareto front joined by a line.

    ``points``: dicts with ``size`` (bytes), ``accuracy`` ([0, 1]), ``label`` and
    optionally ``kind`` (points of one kind share a colour and marker: "float",
    "uniform", "mixed", "greedy", "all") and ``offset`` (of the label, in points).
    Labels of uniform points go below the point and the others above by default, so a
    mixed and a uniform model of the same size stay readable.
    Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.6))
    sizes = [float(p["size"]) / 1024 for p in points]
    accs = [100 * float(p["accuracy"]) for p in points]
    styles = {"float": ("0.2", "*", 120), "uniform": ("tab:blue", "s", 50),
              "mixed": ("tab:orange", "o", 45), "greedy": ("tab:purple", "D", 40),
              "all": ("0.75", ".", 30)}
    for kind in dict.fromkeys(str(p.get("kind", "mixed")) for p in points):
        idx = [i for i, p in enumerate(points) if str(p.get("kind", "mixed")) == kind]
        color, marker, size = styles.get(kind, ("tab:green", "D", 40))
        ax.scatter([sizes[i] for i in idx], [accs[i] for i in idx], c=color, marker=marker,
                   s=size, label=kind, zorder=3)
    front = pareto_front(sizes, accs)
    ax.plot([sizes[i] for i in front], [accs[i] for i in front], color="tab:green", lw=1.5,
            ls="-", zorder=2, label="Pareto front")
    if annotate:
        for i, p in enumerate(points):
            if p.get("label"):
                offset = p.get("offset", (5, -11) if p.get("kind") == "uniform" else (5, 5))
                ax.annotate(str(p["label"]), (sizes[i], accs[i]), textcoords="offset points",
                            xytext=offset, fontsize=8)
    plain_log_xaxis(ax)
    ax.set_xlabel("model size (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    return ax
