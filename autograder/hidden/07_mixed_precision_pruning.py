"""Hidden tests of lesson 07, run in the grader's process (never in the student's).

The exercises that take a model (`layer_sensitivity`) get it built inside the sandbox by
trusted code (`student.run`); only numbers and tensors come back. Every expected value
is computed here, with the grader's own `course_lib` or with torch's pruning utilities.
The cases differ from the notebook's visible ones: other layers, other bit widths, other
image slices, other shapes and sparsities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from autograder.hidden import HiddenTests
from course_lib import compress, data, grading, granularity, models

tests = HiddenTests("07_mixed_precision_pruning")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The sandbox runs the lesson's set-up cell (one intra-op thread); so does the grader,
    so that the same float model on the same images gives bit-identical logits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- exercise 1
# (model, layer, bits, split, first n images); the visible check uses TinyCNN conv2@4 and
# fc@2 on all 500 calibration images.
_SENSITIVITY_CASES = [
    ("tinycnn", "conv1", 2, "calib", 300),
    ("tinycnn", "fc", 3, "train", 200),
    ("mobilenetv2", "features.3.conv.1.0", 2, "calib", 48),
    ("mobilenetv2", "classifier.1", 4, "calib", 48),
]

_SENSITIVITY_CODE = """
import torch
import course_lib.data, course_lib.granularity, course_lib.models
torch.set_num_threads(1)
_models = {name: course_lib.granularity.fold_batchnorms(course_lib.models.load_pretrained(name))
           for name in ("tinycnn", "mobilenetv2")}
_out = []
for _name, _layer, _bits, _split, _n in cases:
    _x, _y = course_lib.data.get_split(_split, rgb32=(_name == "mobilenetv2"))
    _x, _y = _x[:_n], _y[:_n]
    _model = _models[_name]
    with torch.no_grad():
        _ref = _model.eval()(_x)
    _acc, _rel = layer_sensitivity(_model, _layer, _bits, _x, _y, _ref)
    _out.append([float(_acc), float(_rel)])
result = {"results": _out,
          "weights": {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                      for name, m in _models.items()}}
"""


@tests.case("test-layer-sensitivity", disabled=[
    "course_lib.compress.layer_sensitivity", "course_lib.compress.sensitivity_sweep",
    "course_lib.compress.quantized_weights",
])
def layer_sensitivity(student) -> None:
    got = student.run(_SENSITIVITY_CODE, cases=[list(c) for c in _SENSITIVITY_CASES])
    with _one_thread():
        folded = {name: granularity.fold_batchnorms(models.load_pretrained(name))
                  for name in ("tinycnn", "mobilenetv2")}
        for (name, layer, bits, split, n), pair in zip(_SENSITIVITY_CASES, got["results"], strict=True):
            x, y = data.get_split(split, rgb32=(name == "mobilenetv2"))
            want = compress.layer_sensitivity(folded[name], layer, bits, x[:n], y[:n])
            grading.check("layer_sensitivity (hidden) → (accuracy, relative MSE)", tuple(pair), want,
                          inputs=f"{name}, layer={layer!r}, bits={bits}, first {n} {split} images",
                          rtol=1e-5)
    for name, model in folded.items():
        state = model.state_dict()
        grading.check(f"{name}'s weights after layer_sensitivity (hidden)",
                      [got["weights"][name][k] for k in state], list(state.values()),
                      inputs="every tensor of the model's state_dict()")


# --------------------------------------------------------------------------- exercise 2
def _random_problem(seed: int, n_layers: int, overhead: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    costs = {f"h{i}": {8: float(rng.random()), 4: float(rng.random() * 8), 2: float(rng.random() * 90)}
             for i in range(n_layers)}
    sizes = {f"h{i}": {8: int(s), 4: int(s) // 2 + overhead, 2: int(s) // 4 + overhead}
             for i, s in enumerate(rng.integers(200, 4000, n_layers))}
    return costs, sizes


def _allocation_cases() -> list[dict]:
    costs40, sizes40 = _random_problem(77, 40, 4)
    cases = [dict(costs=costs40, sizes=sizes40,
                  budget=compress.allocation_size(sizes40, dict.fromkeys(costs40, b))) for b in (2, 4)]
    cases.append(dict(costs=costs40, sizes=sizes40, budget=60_000))
    # a trap for greedy-by-ratio and for "smallest first": the exact answer is (8, 2)
    cases.append(dict(costs={"a": {8: 0.0, 4: 1.0}, "b": {8: 0.0, 2: 1.5}},
                      sizes={"a": {8: 10, 4: 9}, "b": {8: 10, 2: 2}}, budget=19))
    # widths listed in another order, and a layer with a single width
    costs7, sizes7 = _random_problem(78, 7, 0)
    costs7 = {k: dict(reversed(list(v.items()))) for k, v in costs7.items()}
    costs7["only"], sizes7["only"] = {8: 0.25}, {8: 100}
    lo = sum(min(s.values()) for s in sizes7.values())
    hi = sum(max(s.values()) for s in sizes7.values())
    cases += [dict(costs=costs7, sizes=sizes7, budget=b) for b in (lo, lo + (hi - lo) // 3, hi)]
    return cases


def _as_pairs(table: dict) -> list:
    """{layer: {bits: v}} → [[layer, [[bits, v], ...]], ...]: int dict keys are not plain data."""
    return [[layer, [[b, v] for b, v in row.items()]] for layer, row in table.items()]


_ALLOCATE_CODE = """
import time
def _table(pairs):
    return {layer: {int(b): v for b, v in row} for layer, row in pairs}
_allocs, _seconds = [], []
for _costs, _sizes, _budget in problems:
    _t = time.perf_counter()
    _a = allocate_bits(_table(_costs), _table(_sizes), _budget)
    _seconds.append(time.perf_counter() - _t)
    _allocs.append({str(k): int(v) for k, v in dict(_a).items()} if isinstance(_a, dict) else repr(_a))
try:
    allocate_bits(_table(problems[0][0]), _table(problems[0][1]), too_small)
    _raised = "nothing"
except ValueError:
    _raised = "ValueError"
except Exception as _e:
    _raised = type(_e).__name__
result = {"allocations": _allocs, "seconds": _seconds, "too_small": _raised}
"""


@tests.case("test-allocate-bits", disabled=[
    "course_lib.compress.allocate_bits", "course_lib.compress.allocate_bits_brute_force",
    "course_lib.compress.allocate_bits_greedy",
])
def allocate_bits(student) -> None:
    cases = _allocation_cases()
    too_small = sum(min(s.values()) for s in cases[0]["sizes"].values()) - 1
    got = student.run(_ALLOCATE_CODE, too_small=too_small,
                      problems=[[_as_pairs(c["costs"]), _as_pairs(c["sizes"]), c["budget"]] for c in cases])
    for case, alloc in zip(cases, got["allocations"], strict=True):
        costs, sizes, budget = case["costs"], case["sizes"], case["budget"]
        inputs = f"{len(costs)} layers, budget {budget:,d} bytes"
        if not isinstance(alloc, dict) or set(alloc) != set(costs) or any(alloc[k] not in costs[k] for k in costs):
            raise grading.ExerciseError(f"allocate_bits ({inputs}): expected {{layer: bits}} for every layer, "
                                        f"with bits among the given widths; got {alloc!r}")
        exact = compress.allocate_bits(costs, sizes, budget)
        grading.check("allocate_bits (hidden) → (fits the budget, total cost)",
                      (compress.allocation_size(sizes, alloc) <= budget, compress.allocation_cost(costs, alloc)),
                      (True, compress.allocation_cost(costs, exact)), inputs=inputs, rtol=1e-9)
    if got["too_small"] != "ValueError":
        raise grading.ExerciseError(f"allocate_bits with 40 layers and a budget of {too_small:,d} bytes, one "
                                    f"byte below the smallest allocation, should raise ValueError; "
                                    f"it raised {got['too_small']}")
    slowest = max(got["seconds"])
    if slowest > 20:
        raise grading.ExerciseError(f"allocate_bits took {slowest:.0f} s on 40 layers: "
                                    "use dynamic programming over the bytes")


# --------------------------------------------------------------------------- exercise 3
def _torch_l1_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    holder = nn.Linear(1, 1)
    holder.weight = nn.Parameter(w.detach().clone())
    prune.l1_unstructured(holder, "weight", amount=sparsity)
    return holder.weight_mask.bool()


@tests.case("test-magnitude-mask", disabled=[
    "course_lib.compress.magnitude_mask", "course_lib.compress.global_magnitude_masks",
    "course_lib.compress.pruning_masks",
    "torch.nn.utils.prune.l1_unstructured", "torch.nn.utils.prune.L1Unstructured",
    "torch.nn.utils.prune.global_unstructured",
])
def magnitude_mask(student) -> None:
    g = torch.Generator().manual_seed(707)
    cases = [(torch.randn(9, 4, 3, 3, generator=g), s) for s in (0.25, 0.75, 0.95)]
    cases.append((torch.randn(37, generator=g), 0.5))  # 18.5 → round half to even: 18
    cases.append((models.load_pretrained("mobilenetv2").classifier[1].weight.detach(), 0.5))
    for w, s in cases:
        grading.check("magnitude_mask (hidden)", student.call("magnitude_mask", w, s), _torch_l1_mask(w, s),
                      inputs=dict(shape=tuple(w.shape), sparsity=s))
    ties = torch.tensor([[0.5, 0.5], [0.5, 0.7]])
    grading.check("magnitude_mask ties (hidden)", student.call("magnitude_mask", ties, 0.5),
                  torch.tensor([[False, False], [True, True]]), inputs="w=[[0.5, 0.5], [0.5, 0.7]], sparsity=0.5")
    raised = student.run("""
try:
    magnitude_mask(torch.ones(4), -0.25)
    result = "nothing"
except ValueError:
    result = "ValueError"
except Exception as e:
    result = type(e).__name__
""")
    if raised != "ValueError":
        raise grading.ExerciseError(f"magnitude_mask(w, -0.25) should raise ValueError; it raised {raised}")


# --------------------------------------------------------------------------- exercise 4
def _torch_ln_mask(w: torch.Tensor, sparsity: float, p: int) -> torch.Tensor:
    holder = nn.Linear(1, 1)
    holder.weight = nn.Parameter(w.detach().clone())
    prune.ln_structured(holder, "weight", amount=sparsity, n=p, dim=0)
    return holder.weight_mask.bool()


@tests.case("test-channel-mask", disabled=[
    "course_lib.compress.channel_mask", "course_lib.compress.pruning_masks",
    "torch.nn.utils.prune.ln_structured", "torch.nn.utils.prune.LnStructured",
])
def channel_mask(student) -> None:
    g = torch.Generator().manual_seed(708)
    cases = [(torch.randn(20, 6, 3, 3, generator=g) * torch.rand(20, 1, 1, 1, generator=g), s, p)
             for s, p in ((0.3, 1), (0.6, 2), (0.75, 2))]
    cases.append((torch.randn(7, 12, generator=g), 0.5, 1))  # a Linear weight; 3.5 → 4 channels
    mnv2 = models.load_pretrained("mobilenetv2")
    cases.append((mnv2.features[4].conv[0][0].weight.detach(), 0.5, 1))
    for w, s, p in cases:
        grading.check("channel_mask (hidden)", student.call("channel_mask", w, s, p=p), _torch_ln_mask(w, s, p),
                      inputs=dict(shape=tuple(w.shape), sparsity=s, p=p))
