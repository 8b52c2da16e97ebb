"""Memory on a microcontroller: tensor lifetimes, an arena plan, and a part's budget.

A network's activations live in one statically allocated byte array, the *arena*. A
tensor needs its bytes only from the layer that writes it to the last layer that reads
it, so tensors whose lifetimes do not overlap can share bytes. TFLite Micro's
``GreedyMemoryPlanner`` (``greedy_memory_planner.cc``) plans the arena like this:

1. round every size up to the alignment (16 bytes in TFLite Micro);
2. take the tensors largest first (ties: in the order given);
3. put each one at the lowest offset where it overlaps no already placed tensor that is
   alive at the same time.

The arena's size is the highest ``offset + size``. It can never be below the largest
sum of sizes alive at one step (:func:`live_bytes_lower_bound`).

Flash holds the code and the constants: int8 weights, and per output channel an int32
bias, an int32 multiplier ``M0`` and an int32 shift. SRAM holds the arena, the stack and
any other static variables. :func:`check_budget` compares both with a part's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "Budget",
    "BudgetError",
    "Part",
    "TensorLife",
    "align_up",
    "budget",
    "arena_size",
    "check_budget",
    "check_plan",
    "chain_lifetimes",
    "constant_bytes",
    "fx_lifetimes",
    "live_bytes_lower_bound",
    "plan_greedy",
]

TFLM_ALIGNMENT = 16  # MicroArenaBufferAlignment() in TFLite Micro


class BudgetError(ValueError):
    """A model does not fit the flash or SRAM of a part."""


@dataclass(frozen=True)
class TensorLife:
    """A tensor of ``size`` bytes, written at step ``first`` and last read at step ``last``."""

    name: str
    size: int
    first: int
    last: int


def align_up(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-int(n) // alignment) * alignment


def _overlap(a: TensorLife, b: TensorLife) -> bool:
    return a.first <= b.last and b.first <= a.last


def plan_greedy(tensors: Sequence[TensorLife], alignment: int = TFLM_ALIGNMENT) -> list[int]:
    """Offsets (bytes) of ``tensors`` in the arena, by TFLite Micro's greedy rule (module docstring)."""
    sizes = [align_up(t.size, alignment) for t in tensors]
    for t in tensors:
        if t.size < 0 or t.first > t.last:
            raise ValueError(f"tensor {t.name!r}: size {t.size}, first {t.first}, last {t.last} is not a lifetime")
    order = sorted(range(len(tensors)), key=lambda i: (-sizes[i], i))
    offsets: list[int | None] = [None] * len(tensors)
    placed: list[int] = []
    for i in order:
        clashes = sorted((offsets[j], sizes[j]) for j in placed if _overlap(tensors[i], tensors[j]))
        offset = 0
        for start, size in clashes:  # walk the live neighbours by offset; take the first gap that fits
            if offset + sizes[i] <= start:
                break
            offset = max(offset, start + size)
        offsets[i] = offset
        placed.append(i)
    return [int(o) for o in offsets]


def arena_size(tensors: Sequence[TensorLife], offsets: Sequence[int], alignment: int = TFLM_ALIGNMENT) -> int:
    """Bytes the plan needs: the highest ``offset + aligned size``."""
    return max((o + align_up(t.size, alignment) for t, o in zip(tensors, offsets, strict=True)), default=0)


def check_plan(tensors: Sequence[TensorLife], offsets: Sequence[int]) -> None:
    """Raise ValueError if two tensors alive at the same step share a byte (or an offset is negative)."""
    if len(offsets) != len(tensors):
        raise ValueError(f"{len(offsets)} offsets for {len(tensors)} tensors")
    for i, (a, oa) in enumerate(zip(tensors, offsets, strict=True)):
        if oa < 0:
            raise ValueError(f"tensor {a.name!r} has a negative offset {oa}")
        for b, ob in zip(tensors[i + 1:], offsets[i + 1:], strict=True):
            if _overlap(a, b) and oa < ob + b.size and ob < oa + a.size:
                raise ValueError(f"tensors {a.name!r} [{oa}, {oa + a.size}) and {b.name!r} [{ob}, {ob + b.size}) "
                                 f"are both alive at steps {max(a.first, b.first)}–{min(a.last, b.last)} "
                                 "and share bytes")


def live_bytes_lower_bound(tensors: Sequence[TensorLife]) -> tuple[int, int]:
    """(largest sum of sizes alive at one step, that step): no plan can use less."""
    steps = range(min(t.first for t in tensors), max(t.last for t in tensors) + 1)
    best = max(steps, key=lambda s: (sum(t.size for t in tensors if t.first <= s <= t.last), -s))
    return sum(t.size for t in tensors if t.first <= best <= t.last), best


def chain_lifetimes(names: Sequence[str], sizes: Sequence[int]) -> list[TensorLife]:
    """Lifetimes in a chain network: tensor 0 is the input, tensor i + 1 the output of layer i.

    Step s runs layer s: it reads tensor s and writes tensor s + 1. So the input lives over
    [0, 0], tensor i over [i - 1, i], and the network's output over its last step only.
    """
    n = len(sizes)
    if len(names) != n or n < 2:
        raise ValueError("need a name and a size for the input and every layer's output")
    lives = [TensorLife(names[0], int(sizes[0]), 0, 0)]
    for i in range(1, n):
        lives.append(TensorLife(names[i], int(sizes[i]), i - 1, min(i, n - 2)))
    return lives


def fx_lifetimes(model, example) -> list[TensorLife]:
    """Lifetimes of a PyTorch model's activations as an int8 runtime holds them (1 byte per element).

    Traced with torch.fx; fused conv-BN-ReLU modules (``fuse_model()``) are single steps.
    What a microcontroller runtime does not store separately is an *alias* of its input:
    BatchNorm (folded), ReLU/ReLU6 (a clamp in the producer's requantization), Identity,
    Dropout, Quant/DeQuant stubs and flatten/reshape/view. A tensor lives from its step to
    the last step that reads it or any alias of it, so a residual connection (MobileNetV2's
    add) keeps the block's input alive across the whole block.
    """
    import torch
    from torch import fx, nn
    from torch.ao.nn.intrinsic import _FusedModule
    from torch.fx.passes.shape_prop import ShapeProp

    class LeafFused(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, _FusedModule) or super().is_leaf_module(m, qualname)

    model = model.eval()
    gm = fx.GraphModule(model, LeafFused().trace(model))
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    alias_modules = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.Flatten,
                     torch.ao.quantization.QuantStub, torch.ao.quantization.DeQuantStub)
    alias_calls = {"flatten", "reshape", "view", "relu", "relu_", "contiguous"}

    def is_alias(n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(modules[n.target], alias_modules)
        if n.op in ("call_function", "call_method"):
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
            return name in alias_calls
        return False

    root: dict[fx.Node, fx.Node] = {}
    tensors: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n.op == "output" or not hasattr(n.meta.get("tensor_meta"), "shape"):
            continue
        src = next((a for a in n.all_input_nodes if a in root), None)
        if is_alias(n) and src is not None:
            root[n] = root[src]
        else:
            root[n] = n
            tensors.append(n)
    step = {n: i for i, n in enumerate(tensors)}
    last = {n: step[n] for n in tensors}
    for n in gm.graph.nodes:  # a read of any alias is a read of its root tensor, at the reader's step
        if n not in root or is_alias(n) and root[n] is not n:
            continue
        for a in n.all_input_nodes:
            if a in root:
                last[root[a]] = max(last[root[a]], step[n])
    return [TensorLife(n.name, int(np.prod(n.meta["tensor_meta"].shape[1:])), step[n], last[n]) for n in tensors]


# ----------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Part:
    """A microcontroller's memories, in bytes."""

    name: str
    flash: int
    sram: int


def constant_bytes(out_channels: int, weight_count: int) -> int:
    """Flash for one int8 layer's constants: the int8 weights + int32 (bias, M0, shift) per output channel."""
    return int(weight_count) + 12 * int(out_channels)


def check_budget(model_name: str, part: Part, *, flash: int, sram: int,
                 flash_items: dict[str, int] | None = None, sram_items: dict[str, int] | None = None) -> None:
    """Raise :class:`BudgetError` if ``flash`` or ``sram`` bytes exceed the part's.

    ``flash_items`` / ``sram_items`` (name → bytes) let the message name the largest
    contributors (a layer's weights, the arena, the stack).
    """
    problems = []
    for what, need, have, items in (("flash", flash, part.flash, flash_items), ("SRAM", sram, part.sram, sram_items)):
        if need > have:
            detail = ""
            if items:
                top = sorted(items.items(), key=lambda kv: -kv[1])[:3]
                detail = "; largest: " + ", ".join(f"{k} {v:,} bytes" for k, v in top)
            problems.append(f"{what}: needs {need:,} bytes, {part.name} has {have:,} ({need - have:,} too many){detail}")
    if problems:
        raise BudgetError(f"{model_name} does not fit {part.name}: " + " | ".join(problems))


class Budget(NamedTuple):
    flash: int
    sram: int
    fits: bool


def budget(layers: Sequence[tuple[int, int]], *, code_bytes: int, arena_bytes: int, stack_bytes: int,
           part: Part) -> Budget:
    """Flash and SRAM a model needs on ``part``: ``Budget(flash, sram, fits)``.

    ``layers``: one ``(out_channels, weight_count)`` pair per int8 conv/linear layer.
    flash = code + Σ :func:`constant_bytes`; sram = arena + stack; fits when both are
    within the part's flash and SRAM.
    """
    flash = int(code_bytes) + sum(constant_bytes(c, w) for c, w in layers)
    sram = int(arena_bytes) + int(stack_bytes)
    return Budget(flash, sram, flash <= part.flash and sram <= part.sram)
