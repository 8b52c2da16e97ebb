"""course_lib.compress: sensitivity, size accounting, bit allocation, pruning, encodings.

Oracles are independent of the code under test where one exists: torch's own
fake-quantization for the weights, torch.nn.utils.prune for the masks, brute force
and hand-worked examples for the allocator, hand-counted bytes for the sizes, Lloyd's
algorithm written out plainly for k-means, and ordinary autograd on the shared weight for
the centroid fine-tuning.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from course_lib import compress as C
from course_lib import granularity
from course_lib.models import TinyCNN, model_size_bytes

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN().eval()


def small_net(seed: int = 0) -> nn.Sequential:
    """Conv → ReLU → flatten → Linear on 1×6×6 inputs: small enough to recompute by hand."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()


def torch_fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel symmetric narrow-range fake quant via torch's own kernel (the oracle)."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1) / qmax
    scale = torch.clamp(scale, min=torch.finfo(torch.float32).eps)
    zp = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.detach(), scale, zp, 0, -qmax, qmax)


# --------------------------------------------------------------------------- sensitivity
def test_quantized_weights_matches_torch_and_restores_the_float_weights() -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with C.quantized_weights(model, {"conv2": 4}):
        assert torch.equal(model.conv2.weight, torch_fake_quant_weight(before["conv2.weight"], 4))
        assert torch.equal(model.conv1.weight, before["conv1.weight"])  # not in the plan: float
        assert model.conv2.weight.reshape(32, -1).unique(dim=None).numel() <= 32 * 15
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_quantized_weights_restores_even_when_the_block_raises() -> None:
    model = tiny_model()
    w = model.fc.weight.detach().clone()
    with pytest.raises(RuntimeError), C.quantized_weights(model, 2):
        raise RuntimeError("boom")
    assert torch.equal(model.fc.weight, w)


def test_layer_sensitivity_matches_a_hand_computation() -> None:
    model = small_net()
    torch.manual_seed(1)
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 5, (40,))
    ref = model(x).detach()
    w_hat = torch_fake_quant_weight(model[3].weight, 2)
    h = model[2](model[1](model[0](x)))
    logits = (h @ w_hat.T + model[3].bias).detach()
    want_acc = (logits.argmax(1) == y).double().mean().item()
    want_rel = float(((logits.double() - ref.double()) ** 2).sum() / (ref.double() ** 2).sum())
    acc, rel = C.layer_sensitivity(model, "3", 2, x, y)
    assert acc == pytest.approx(want_acc, abs=1e-12)
    assert rel == pytest.approx(want_rel, rel=1e-5)
    assert torch.equal(model(x), ref)  # the model came back unchanged


def test_fewer_bits_give_larger_output_error_on_every_layer() -> None:
    model = tiny_model()
    torch.manual_seed(2)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    sweep = C.sensitivity_sweep(model, x, y, bits=(8, 4, 2))
    assert list(sweep) == ["conv1", "conv2", "fc"]
    for layer, row in sweep.items():
        assert row[2].relative_mse > row[4].relative_mse > row[8].relative_mse > 0, layer
        assert row[8].sqnr_db == pytest.approx(-10 * math.log10(row[8].relative_mse))
        assert row[8].sqnr_db > 30  # 8-bit per-channel on one layer: a small change


class Residual(nn.Module):
    """A skip connection: quantizing `branch` must not reuse a stale `branch` output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head((h + self.branch(h)).flatten(1))


def test_sweep_reusing_activations_equals_whole_forward_passes() -> None:
    torch.manual_seed(6)
    model = Residual().eval()
    x, y = torch.randn(20, 1, 6, 6), torch.randint(0, 3, (20,))
    fast = C.sensitivity_sweep(model, x, y, bits=(4, 2))
    slow = C.sensitivity_sweep(model, x, y, bits=(4, 2), reuse_activations=False)
    for layer in ("stem", "branch", "head"):
        for b in (4, 2):
            want = C.layer_sensitivity(model, layer, b, x, y)
            assert slow[layer][b].accuracy == fast[layer][b].accuracy == want[0]
            assert fast[layer][b].relative_mse == pytest.approx(want[1], rel=1e-6)
            assert slow[layer][b].relative_mse == pytest.approx(want[1], rel=1e-6)
    assert fast["stem"][2].relative_mse > 0 and fast["branch"][2].relative_mse > 0


def test_layer_sensitivity_rejects_unknown_layer() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="no Conv2d/Linear layer named 'bn1'"):
        C.layer_sensitivity(model, "bn1", 4, torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------- bytes
def test_weight_bytes_by_hand() -> None:
    conv = nn.Conv2d(3, 8, 3)  # 216 weights, 8 channels
    assert C.weight_bytes(conv, 4) == 108 + 8 * 4
    assert C.weight_bytes(conv, 8) == 216 + 8 * 4
    assert C.weight_bytes(conv, 32) == 216 * 4
    lin = nn.Linear(10, 5)  # 50 weights: 100 bits at 2 bits -> 13 bytes (rounded up)
    assert C.weight_bytes(lin, 2) == 13 + 5 * 4
    with pytest.raises(ValueError):
        C.weight_bytes(nn.BatchNorm2d(3), 8)


def test_model_bytes_of_tinycnn_by_hand() -> None:
    model = tiny_model()
    # weights: conv1 144 (16 ch), conv2 4,608 (32 ch), fc 15,680 (10 outputs)
    # other float tensors: biases 16 + 32 + 10, BatchNorm 4 × (16 + 32) -> 250 floats
    assert C.model_bytes(model, 8) == (144 + 64) + (4608 + 128) + (15680 + 40) + 250 * 4
    assert C.model_bytes(model, {"fc": 4}) == 4 * (144 + 4608) + (7840 + 40) + 250 * 4
    # float: everything in the state dict except the two int64 num_batches_tracked
    assert C.model_bytes(model, 32) == model_size_bytes(model) - 2 * 8


def test_model_bytes_equals_the_dense_file_it_describes() -> None:
    model = tiny_model()
    for bits in (8, 4, 2, {"conv1": 8, "conv2": 2, "fc": 4}):
        blob = C.encode_weights(model, bits, "dense")
        assert C.written_size(blob) == len(blob) == C.model_bytes(model, bits)


@pytest.mark.parametrize("encoding", C.ENCODINGS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_encodings_round_trip(encoding: str, sparsity: float) -> None:
    model = tiny_model()
    C.apply_masks(model, C.pruning_masks(model, sparsity, "global"))
    bits = {"conv1": 8, "conv2": 4, "fc": 2}
    decoded = C.decode_weights(C.encode_weights(model, bits, encoding), model, bits, encoding)
    for name, layer in C.weight_layers(model).items():
        assert torch.equal(decoded[name], torch_fake_quant_weight(layer.weight, bits[name])), name


def test_bitmask_bytes_follow_the_formula_and_zeros_shrink_the_file() -> None:
    model = tiny_model()
    C.apply_masks(model, C.pruning_masks(model, 0.75, "layer"))
    expected = 250 * 4  # biases and BatchNorm
    for layer in C.weight_layers(model).values():
        q, _, _ = granularity.quantize_weight(layer.weight, 4)
        nnz = int((q != 0).sum())
        expected += math.ceil(q.numel() / 8) + math.ceil(nnz * 4 / 8) + 4 * q.shape[0]
    sizes = {e: C.written_size(C.encode_weights(model, 4, e)) for e in C.ENCODINGS}
    assert sizes["bitmask"] == expected
    assert sizes["bitmask"] < sizes["dense"] and sizes["zlib"] < sizes["dense"]


def test_float_layers_are_stored_raw() -> None:
    model = small_net()
    bits = {"0": 4}  # the Linear stays float
    decoded = C.decode_weights(C.encode_weights(model, bits, "bitmask"), model, bits, "bitmask")
    assert torch.equal(decoded["3"], model[3].weight.detach())


def test_encoding_rejects_bad_input() -> None:
    model = small_net()
    with pytest.raises(ValueError, match="encoding"):
        C.encode_weights(model, 4, "gzip")
    with pytest.raises(ValueError, match="2, 4 or 8"):
        C.encode_weights(model, 3, "dense")
    with pytest.raises(ValueError, match="shorter"):
        C.decode_weights(b"\x00" * 10, model, 4, "dense")


# --------------------------------------------------------------------------- allocation
def test_allocate_bits_hand_example() -> None:
    costs = {"a": {8: 0.0, 4: 1.0, 2: 10.0}, "b": {8: 0.0, 4: 5.5, 2: 6.0}}
    sizes = {"a": {8: 8, 4: 4, 2: 2}, "b": {8: 8, 4: 4, 2: 2}}
    assert C.allocate_bits(costs, sizes, 16) == {"a": 8, "b": 8}
    assert C.allocate_bits(costs, sizes, 15) == {"a": 4, "b": 8}  # cost 1 beats 5.5
    assert C.allocate_bits(costs, sizes, 10) == {"a": 8, "b": 2}  # 6 beats 1 + 5.5 and 10
    assert C.allocate_bits(costs, sizes, 4) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="smallest one needs 4"):
        C.allocate_bits(costs, sizes, 3)


def test_greedy_can_miss_the_optimum_that_the_dp_finds() -> None:
    # One byte must go. Greedy takes b's cheaper cost per byte (1.5 / 8) and pays 1.5;
    # a's single-byte step costs 1.0 and is enough.
    costs = {"a": {8: 0.0, 4: 1.0}, "b": {8: 0.0, 2: 1.5}}
    sizes = {"a": {8: 10, 4: 9}, "b": {8: 10, 2: 2}}
    assert C.allocate_bits_greedy(costs, sizes, 19) == {"a": 8, "b": 2}
    assert C.allocate_bits(costs, sizes, 19) == {"a": 4, "b": 8}
    assert C.allocate_bits_brute_force(costs, sizes, 19) == {"a": 4, "b": 8}


@st.composite
def problems(draw):
    n_layers = draw(st.integers(1, 5))
    costs, sizes = {}, {}
    for i in range(n_layers):
        widths = draw(st.lists(st.sampled_from([2, 3, 4, 6, 8]), min_size=1, max_size=3, unique=True))
        costs[f"l{i}"] = {b: draw(st.floats(0, 100, allow_nan=False)) for b in widths}
        sizes[f"l{i}"] = {b: draw(st.integers(0, 60)) for b in widths}
    lo = sum(min(s.values()) for s in sizes.values())
    hi = sum(max(s.values()) for s in sizes.values())
    return costs, sizes, draw(st.integers(lo, hi + 5))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_dp_is_optimal_and_feasible_like_brute_force(problem) -> None:
    costs, sizes, budget = problem
    dp = C.allocate_bits(costs, sizes, budget)
    brute = C.allocate_bits_brute_force(costs, sizes, budget)
    greedy = C.allocate_bits_greedy(costs, sizes, budget)
    assert list(dp) == list(costs)
    assert all(dp[layer] in costs[layer] for layer in costs)
    for alloc in (dp, greedy):
        assert C.allocation_size(sizes, alloc) <= budget
    assert C.allocation_cost(costs, dp) == pytest.approx(C.allocation_cost(costs, brute), abs=1e-9)
    assert C.allocation_cost(costs, dp) <= C.allocation_cost(costs, greedy) + 1e-9


def test_dp_handles_many_layers_quickly() -> None:
    rng = np.random.default_rng(0)
    costs = {f"l{i}": {8: float(rng.random()), 4: float(rng.random() * 10), 2: float(rng.random() * 100)}
             for i in range(60)}
    sizes = {f"l{i}": {8: int(s), 4: int(s) // 2, 2: int(s) // 4}
             for i, s in enumerate(rng.integers(400, 4000, 60))}
    budget = C.allocation_size(sizes, dict.fromkeys(costs, 4))
    dp = C.allocate_bits(costs, sizes, budget)
    assert C.allocation_size(sizes, dp) <= budget
    # never worse than uniform 4-bit (which fits exactly) nor than greedy
    assert C.allocation_cost(costs, dp) <= C.allocation_cost(costs, dict.fromkeys(costs, 4))
    assert C.allocation_cost(costs, dp) <= C.allocation_cost(costs, C.allocate_bits_greedy(costs, sizes, budget))


@pytest.mark.parametrize("bad", [
    ({"a": {8: 1.0}}, {"b": {8: 1}}, 5, "same layers"),
    ({"a": {8: 1.0}}, {"a": {4: 1}}, 5, "same, non-empty"),
    ({"a": {8: float("nan")}}, {"a": {8: 1}}, 5, "finite"),
    ({"a": {8: 1.0}}, {"a": {8: -1}}, 5, "non-negative int"),
    ({"a": {8: 1.0}}, {"a": {8: 1}}, -1, "budget"),
    ({}, {}, 5, "empty"),
])
def test_allocators_reject_bad_problems(bad) -> None:
    costs, sizes, budget, message = bad
    for allocate in (C.allocate_bits, C.allocate_bits_greedy, C.allocate_bits_brute_force):
        with pytest.raises(ValueError, match=message):
            allocate(costs, sizes, budget)


def test_pareto_front() -> None:
    sizes = [10, 20, 5, 20, 40, 5]
    accs = [0.9, 0.95, 0.5, 0.93, 0.95, 0.4]
    # 3 is beaten by 1 (same size, better); 4 by 1 (smaller, same); 5 by 2
    assert C.pareto_front(sizes, accs) == [2, 0, 1]
    with pytest.raises(ValueError):
        C.pareto_front([1, 2], [0.5])


# --------------------------------------------------------------------------- pruning
def torch_mask(method, w: torch.Tensor, amount: float, **kw) -> torch.Tensor:
    holder = nn.Linear(1, 1)
    holder.weight = nn.Parameter(w.clone())
    method(holder, "weight", amount=amount, **kw)
    return holder.weight_mask.bool()


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.75, 0.9, 1.0])
def test_magnitude_mask_matches_torch_prune(amount: float) -> None:
    torch.manual_seed(3)
    w = torch.randn(7, 5, 3, 3)
    got = C.magnitude_mask(w, amount)
    assert got.dtype == torch.bool and got.shape == w.shape
    assert torch.equal(got, torch_mask(prune.l1_unstructured, w, amount))
    assert int((~got).sum()) == round(amount * w.numel())


def test_magnitude_mask_ties_prune_lower_index_first() -> None:
    w = torch.tensor([[1.0, -1.0, 1.0, 2.0]])
    assert C.magnitude_mask(w, 0.5).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("amount", [0.0, 0.25, 0.5, 0.9])
def test_channel_mask_matches_torch_ln_structured(p: int, amount: float) -> None:
    torch.manual_seed(4)
    w = torch.randn(16, 3, 3, 3) * torch.linspace(0.1, 2.0, 16).reshape(-1, 1, 1, 1)
    got = C.channel_mask(w, amount, p=p)
    assert torch.equal(got, torch_mask(prune.ln_structured, w, amount, n=p, dim=0))
    per_channel = got.reshape(16, -1)
    assert bool((per_channel.all(1) | ~per_channel.any(1)).all())  # whole channels only


def test_channel_mask_l1_and_l2_can_disagree() -> None:
    # channel 0: one large weight (L1 = 3, L2 = 3); channel 1: spread (L1 = 4, L2 = 2)
    w = torch.tensor([[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert C.channel_mask(w, 0.5, p=1)[:, 0].tolist() == [False, True]
    assert C.channel_mask(w, 0.5, p=2)[:, 0].tolist() == [True, False]


def test_global_masks_match_torch_global_unstructured() -> None:
    model = tiny_model()
    masks = C.pruning_masks(model, 0.8, "global")
    ref = copy.deepcopy(model)
    params = [(m, "weight") for m in C.weight_layers(ref).values()]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.8)
    for name, module in C.weight_layers(ref).items():
        assert torch.equal(masks[name], module.weight_mask.bool()), name
    assert C.weight_sparsity(masks) == pytest.approx(round(0.8 * 20432) / 20432)


def test_channel_pruning_keeps_the_classifier_and_layer_pruning_is_uniform() -> None:
    model = tiny_model()
    masks = C.pruning_masks(model, 0.5, "channel", p=1)
    assert bool(masks["fc"].all())
    assert int(masks["conv2"].reshape(32, -1).all(1).sum()) == 16
    layer = C.pruning_masks(model, 0.5, "layer")
    for name, mask in layer.items():
        assert int((~mask).sum()) == round(0.5 * mask.numel()), name


def test_skipped_layers_keep_every_weight() -> None:
    model = tiny_model()
    for method in C.PRUNING_METHODS:
        masks = C.pruning_masks(model, 0.9, method, skip=("conv1",))
        assert bool(masks["conv1"].all()), method
        assert not bool(masks["conv2"].all()), method
    # global over the remaining layers only: exactly round(0.9 · (4,608 + 15,680)) pruned
    masks = C.pruning_masks(model, 0.9, "global", skip=("conv1",))
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * (4608 + 15680))
    with pytest.raises(ValueError, match="cannot skip"):
        C.pruning_masks(model, 0.5, "layer", skip=("bn1",))
    with pytest.raises(ValueError, match="nothing to prune"):
        C.pruning_masks(model, 0.5, "channel", skip=("conv1", "conv2"))


def test_apply_masks_and_weight_sparsity() -> None:
    model = tiny_model()
    masks = C.pruning_masks(model, 0.75, "layer")
    C.apply_masks(model, masks)
    for name, layer in C.weight_layers(model).items():
        assert bool((layer.weight[~masks[name]] == 0).all())
    assert C.weight_sparsity(model) == pytest.approx(C.weight_sparsity(masks))
    # round(0.75 · n) per layer: 108 of 144, 3,456 of 4,608, 11,760 of 15,680
    assert C.weight_sparsity(model) == pytest.approx((108 + 3456 + 11760) / 20432, abs=1e-12)
    masks = C.pruning_masks(model, 0.5, "layer")  # 144 · 0.5 = 72 exactly, 4608 / 2, 15680 / 2
    assert C.weight_sparsity(masks) == pytest.approx(0.5, abs=1e-12)


def test_masks_enforced_keeps_pruned_weights_at_zero_while_training() -> None:
    model = small_net()
    masks = C.pruning_masks(model, 0.9, "layer")
    C.apply_masks(model, masks)
    before = {n: m.weight.detach().clone() for n, m in C.weight_layers(model).items()}
    model.train()
    with C.masks_enforced(model, masks):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        torch.manual_seed(5)
        for _ in range(3):
            x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 5, (16,))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for name, layer in C.weight_layers(model).items():
        assert isinstance(layer.weight, nn.Parameter) and not hasattr(layer, "weight_orig")
        assert bool((layer.weight[~masks[name]] == 0).all()), name
        assert not torch.equal(layer.weight[masks[name]], before[name][masks[name]]), name  # trained


@pytest.mark.parametrize("call", [
    lambda: C.magnitude_mask(torch.randn(4, 4), 1.5),
    lambda: C.magnitude_mask(torch.arange(4), 0.5),
    lambda: C.channel_mask(torch.randn(4, 4), 0.5, p=3),
    lambda: C.channel_mask(torch.randn(4), 0.5),
    lambda: C.pruning_masks(tiny_model(), 0.5, "random"),
    lambda: C.apply_masks(tiny_model(), {"fc": torch.ones(3, dtype=torch.bool)}),
    lambda: C.apply_masks(tiny_model(), {"bn1": torch.ones(16, dtype=torch.bool)}),
])
def test_pruning_rejects_bad_input(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_prune_then_quantize_keeps_zeros_and_counts_them() -> None:
    model = tiny_model()
    C.apply_masks(model, C.pruning_masks(model, 0.5, "layer"))
    with C.quantized_weights(model, 4):
        zeros_after = C.weight_sparsity(model)
    assert zeros_after >= 0.5  # pruned weights quantize to exactly 0, small ones join them
    # and every combination of the 3 layers × {8, 4, 2} keeps the model runnable
    x = torch.randn(2, 1, 28, 28)
    for combo in itertools.product((8, 4, 2), repeat=3):
        with C.quantized_weights(model, dict(zip(["conv1", "conv2", "fc"], combo, strict=True))):
            assert torch.isfinite(model(x)).all()


# --------------------------------------------------------------------------- pruning per layer
def test_pruned_weights_zeroes_then_restores() -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    masks = {"conv2": C.magnitude_mask(model.conv2.weight, 0.5)}
    with C.pruned_weights(model, masks):
        assert torch.equal(model.conv2.weight, before["conv2.weight"] * masks["conv2"])
        assert torch.equal(model.fc.weight, before["fc.weight"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_pruning_sensitivity_matches_pruning_one_layer_by_hand() -> None:
    model = small_net()
    torch.manual_seed(3)
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 5, (40,))
    ref = model(x).detach()
    scan = C.pruning_sensitivity(model, x, y, (0.5, 0.9))
    assert list(scan) == ["0", "3"] and list(scan["3"]) == [0.5, 0.9]
    for name, idx in (("0", 0), ("3", 3)):
        for sparsity in (0.5, 0.9):
            pruned = copy.deepcopy(model)
            w = pruned[idx].weight
            with torch.no_grad():
                w.mul_(torch_mask(prune.l1_unstructured, w, sparsity))
            logits = pruned(x).detach()
            point = scan[name][sparsity]
            assert point.accuracy == (logits.argmax(1) == y).double().mean().item()
            want = float(((logits.double() - ref.double()) ** 2).sum() / (ref.double() ** 2).sum())
            assert point.relative_mse == pytest.approx(want, rel=1e-5)
            assert point.sqnr_db == pytest.approx(-10 * math.log10(want), rel=1e-5)
    assert scan["3"][0.9].relative_mse > scan["3"][0.5].relative_mse
    assert torch.equal(model(x), ref)  # the model came back unchanged


def test_pruning_masks_accept_one_sparsity_per_layer() -> None:
    model = tiny_model()
    masks = C.pruning_masks(model, {"conv2": 0.25, "fc": 0.9}, "layer")
    assert bool(masks["conv1"].all())  # not in the mapping: kept
    assert torch.equal(masks["conv2"], C.magnitude_mask(model.conv2.weight, 0.25))
    assert torch.equal(masks["fc"], C.magnitude_mask(model.fc.weight, 0.9))
    channel = C.pruning_masks(model, {"conv1": 0.5}, "channel")
    assert int(channel["conv1"].reshape(16, -1).all(dim=1).sum()) == 8
    with pytest.raises(ValueError, match="global"):
        C.pruning_masks(model, {"fc": 0.5}, "global")
    with pytest.raises(ValueError, match="bn1"):
        C.pruning_masks(model, {"bn1": 0.5}, "layer")


def test_allocate_sparsities_is_the_exhaustive_optimum_and_meets_the_target() -> None:
    model = tiny_model()
    levels = (0.5, 0.8, 0.95)
    rng = np.random.default_rng(0)
    scan = {n: {p: C.PruningSensitivity(n, p, 0.5, float(rng.random() * p)) for p in levels}
            for n in ("conv1", "conv2", "fc")}
    numel = {n: m.weight.numel() for n, m in C.weight_layers(model).items()}
    total = sum(numel.values())
    for target in (0.3, 0.6, 0.85):
        got = C.allocate_sparsities(scan, model, target)
        kept = sum(numel[n] - round(p * numel[n]) for n, p in got.items())
        assert kept <= total - round(target * total)
        best = min(
            (combo for combo in itertools.product((0.0, *levels), repeat=3)
             if sum(numel[n] - round(p * numel[n]) for n, p in zip(numel, combo, strict=True))
             <= total - round(target * total)),
            key=lambda combo: sum(0.0 if p == 0 else scan[n][p].relative_mse
                                  for n, p in zip(numel, combo, strict=True)))
        cost = sum(0.0 if p == 0 else scan[n][p].relative_mse for n, p in got.items())
        assert cost == pytest.approx(sum(0.0 if p == 0 else scan[n][p].relative_mse
                                         for n, p in zip(numel, best, strict=True)))
    with pytest.raises(ValueError):
        C.allocate_sparsities(scan, model, 0.99)  # beyond what 95 % per layer can give


# --------------------------------------------------------------------------- k-means
def test_kmeans_1d_finds_well_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-2.0, 0.1, 3.0])
    values = torch.cat([c + 0.01 * torch.randn(50, generator=g) for c in centres])
    centroids, idx = C.kmeans_1d(values, 3)
    assert centroids.dtype == torch.float32 and idx.dtype == torch.int64 and idx.shape == values.shape
    assert torch.equal(idx, torch.arange(3).repeat_interleave(50))
    for k in range(3):
        assert centroids[k].item() == pytest.approx(values[idx == k].double().mean().item(), abs=1e-6)


def lloyd_by_the_book(v: np.ndarray, k: int, iterations: int) -> np.ndarray:
    """Oracle: Lloyd's algorithm written out plainly (a distance matrix and argmin, not midpoints)."""
    c = np.linspace(v.min(), v.max(), k)
    for _ in range(iterations):
        idx = np.abs(v[:, None] - c[None, :]).argmin(axis=1)  # ties: the lower index, like argmin
        new = np.array([v[idx == j].mean() if (idx == j).any() else c[j] for j in range(k)])
        if np.array_equal(new, c):
            break
        c = new
    return c


def test_kmeans_1d_matches_lloyd_by_the_book_from_the_same_linear_start() -> None:
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2000, generator=g) * torch.rand(2000, generator=g)  # peaked, heavy tails
    for k in (4, 8, 16):
        centroids, _ = C.kmeans_1d(values, k, iterations=300)
        want = lloyd_by_the_book(values.double().numpy(), k, 300)
        np.testing.assert_allclose(centroids.numpy(), want, rtol=1e-6, atol=1e-7)


def test_kmeans_indices_point_to_the_nearest_centroid_and_beat_the_even_grid() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 8, 3, 3, generator=g)
    centroids, idx = C.kmeans_1d(w, 8)
    assert idx.shape == w.shape and bool((centroids[1:] >= centroids[:-1]).all())
    dist = (w.unsqueeze(-1) - centroids).abs()
    assert torch.allclose(dist.gather(-1, idx.unsqueeze(-1)).squeeze(-1), dist.min(dim=-1).values)
    grid = torch.linspace(float(w.min()), float(w.max()), 8)  # the initialisation
    err_grid = (w.unsqueeze(-1) - grid).abs().min(dim=-1).values.pow(2).sum()
    err_kmeans = (w - centroids[idx]).pow(2).sum()
    assert err_kmeans < 0.8 * err_grid


def test_kmeans_1d_keeps_an_empty_centroid_and_rejects_bad_input() -> None:
    centroids, idx = C.kmeans_1d(torch.tensor([0.0, 0.0, 1.0, 1.0]), 3)
    assert centroids.tolist() == [0.0, 0.5, 1.0] and idx.tolist() == [0, 0, 2, 2]
    with pytest.raises(ValueError):
        C.kmeans_1d(torch.tensor([]), 2)
    with pytest.raises(ValueError):
        C.kmeans_1d(torch.arange(4), 2)
    with pytest.raises(ValueError):
        C.kmeans_codebook(torch.randn(4), 0)


def test_codebook_bytes_by_hand() -> None:
    model = tiny_model()
    books = C.kmeans_codebooks(model, 3)
    assert books["fc"].nbytes == math.ceil(15680 * 3 / 8) + 4 * 8
    assert books["conv1"].nbytes == 54 + 32  # 144 × 3 bits = 54 bytes
    # biases + BatchNorm (250 floats) as in model_bytes
    assert C.codebook_model_bytes(model, books) == 54 + 1728 + 5880 + 3 * 32 + 250 * 4
    partial = C.kmeans_codebooks(model, {"fc": 2})
    assert list(partial) == ["fc"]
    assert C.codebook_model_bytes(model, partial) == 4 * (144 + 4608) + 3920 + 16 + 250 * 4


def test_codebook_weights_share_values_and_restore() -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    books = C.kmeans_codebooks(model, 2)
    with C.codebook_weights(model, books):
        for name, layer in C.weight_layers(model).items():
            assert torch.equal(layer.weight, books[name].centroids[books[name].indices])
            assert layer.weight.unique().numel() <= 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError):
        with C.codebook_weights(model, {"fc": books["conv1"]}):
            pass


def test_fine_tune_centroids_sums_the_gradients_of_shared_weights() -> None:
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    books = C.kmeans_codebooks(model, 2)
    torch.manual_seed(4)
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 5, (16,))
    # the oracle: ordinary autograd on W = C[I], then the per-centroid sum written as a loop
    shared = copy.deepcopy(model)
    with torch.no_grad():
        for name, book in books.items():
            dict(shared.named_modules())[name].weight.copy_(book.weight())
    nn.functional.cross_entropy(shared(x), y).backward()
    lr = 1e-3
    tuned = C.fine_tune_centroids(model, books, [(x, y)], steps=1, lr=lr)
    for name, book in books.items():
        grad_w = dict(shared.named_modules())[name].weight.grad
        grad_c = torch.stack([grad_w[book.indices == k].sum() for k in range(4)])
        # Adam's first step moves each parameter by lr · sign(gradient)
        want = book.centroids - lr * torch.sign(grad_c)
        assert torch.allclose(tuned[name].centroids, want, atol=1e-7), name
        assert torch.equal(tuned[name].indices, book.indices)
    for key, value in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(value, before[key]), key
    assert all(p.requires_grad for p in model.parameters())


def test_fine_tune_centroids_lowers_the_loss() -> None:
    model = small_net()
    torch.manual_seed(5)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 5, (64,))
    books = C.kmeans_codebooks(model, 2)

    def loss(b):
        with C.codebook_weights(model, b):
            return nn.functional.cross_entropy(model(x), y).item()

    tuned = C.fine_tune_centroids(model, books, [(x, y)], steps=40, lr=1e-2)
    assert loss(tuned) < loss(books)
