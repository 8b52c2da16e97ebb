"""course_lib.granularity: scales per tensor / channel / group, error metrics, BN folding, packing."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver
from torch.nn.utils.fusion import fuse_conv_bn_eval

from course_lib import granularity as gr
from course_lib.models import TinyCNN, mobilenet_v2_small

EPS = torch.finfo(torch.float32).eps


def spread_conv_weight(seed: int = 0, shape=(32, 16, 3, 3), decades: float = 2.0) -> torch.Tensor:
    """A conv weight whose output channels span ``decades`` orders of magnitude in range."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    gains = torch.logspace(0, -decades, shape[0])
    return w * gains.reshape(-1, *([1] * (len(shape) - 1)))


def with_random_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as training would."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.05)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def torch_per_channel_symmetric(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent oracle: PyTorch's observer scales + PyTorch's fake-quant kernel."""
    qmax = 2 ** (bits - 1) - 1
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                   quant_min=-qmax, quant_max=qmax)
    obs(w)
    scale, zp = obs.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, -qmax, qmax)


# --------------------------------------------------------------------------- one weight
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_per_channel_matches_torch_observer_and_fake_quant(bits: int) -> None:
    w = spread_conv_weight(1)
    expected = torch_per_channel_symmetric(w, bits)
    torch.testing.assert_close(gr.fake_quantize_weight(w, bits, "per-channel"), expected,
                               atol=0, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_tensor_matches_torch_symmetric_narrow_range(bits: int) -> None:
    w = spread_conv_weight(2)
    qmax = 2 ** (bits - 1) - 1
    scale = float(w.abs().max() / qmax)  # float32 division, as the observer does
    expected = torch.fake_quantize_per_tensor_affine(w, scale, 0, -qmax, qmax)
    got = gr.fake_quantize_weight(w, bits, "per-tensor")
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)


def test_per_group_matches_per_channel_kernel_on_reshaped_rows() -> None:
    # 16·3·3 = 144 weights per output channel, groups of 16 divide it exactly.
    w = spread_conv_weight(3)
    rows = w.reshape(-1, 16)  # each row is one group
    scale = torch.clamp(rows.abs().amax(dim=1) / 7, min=EPS)
    expected = torch.fake_quantize_per_channel_affine(
        rows, scale, torch.zeros(rows.shape[0], dtype=torch.int32), 0, -7, 7).reshape(w.shape)
    torch.testing.assert_close(gr.fake_quantize_weight(w, 4, "per-group", group_size=16),
                               expected, atol=0, rtol=0)


def test_ragged_last_group_uses_only_its_own_weights() -> None:
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(4))
    w[:, 8:] *= 0.01  # the ragged last group (2 weights) is tiny
    scale, zp = gr.weight_qparams(w, 8, "per-group", group_size=4)
    assert scale.shape == (4, 3) and bool((zp == 0).all())
    torch.testing.assert_close(scale[:, 2], w[:, 8:].abs().amax(dim=1) / 127)
    # the tiny group keeps its precision instead of being rounded to zero
    w_hat = gr.fake_quantize_weight(w, 8, "per-group", group_size=4)
    assert bool((w_hat[:, 8:] != 0).all())


def test_group_at_least_row_length_equals_per_channel() -> None:
    w = spread_conv_weight(5, shape=(24, 1, 3, 3))  # a depthwise filter: 9 weights per channel
    torch.testing.assert_close(gr.fake_quantize_weight(w, 4, "per-group", group_size=32),
                               gr.fake_quantize_weight(w, 4, "per-channel"), atol=0, rtol=0)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_finer_granularity_gives_lower_error_on_spread_channels(bits: int) -> None:
    w = spread_conv_weight(6)
    sq = {g: gr.sqnr_db(w, gr.fake_quantize_weight(w, bits, g, group_size=16))
          for g in gr.GRANULARITIES}
    # Two decades of spread: per-tensor is far worse at 8 and 4 bits. At 2 bits (ternary)
    # every granularity is poor, and the SQNR of the layer is dominated by its largest
    # channels, which get the same scale either way.
    assert sq["per-channel"] > sq["per-tensor"] + (3 if bits > 2 else 0)
    assert sq["per-group"] >= sq["per-channel"] - 0.5


@pytest.mark.parametrize("granularity", gr.GRANULARITIES)
def test_error_decreases_with_bits(granularity: str) -> None:
    w = spread_conv_weight(7, decades=0.5)
    sq = [gr.sqnr_db(w, gr.fake_quantize_weight(w, b, granularity)) for b in (2, 4, 8)]
    assert sq[0] < sq[1] < sq[2]
    # about 6 dB per bit between 4 and 8 bits, where clipping plays no part
    assert 20 < sq[2] - sq[1] < 28


def test_asymmetric_scheme_is_unsigned_with_zero_point() -> None:
    w = torch.randn(8, 20, generator=torch.Generator().manual_seed(8)) + 0.5
    q, scale, zp = gr.quantize_weight(w, 8, "per-tensor", symmetric=False)
    assert int(q.min()) == 0 and int(q.max()) == 255
    assert q.dtype == torch.int32 and scale.dtype == torch.float32 and zp.dtype == torch.int64
    assert 0 < int(zp) < 255


def test_zeroed_channels_below_half_a_step() -> None:
    w = torch.ones(3, 1, 3, 3)
    w[1] *= 1 / 300  # below max/254: rounds to zero with one scale for the layer
    w[2] *= 1 / 200  # above it: survives
    assert gr.count_zeroed_channels(w, 8, "per-tensor") == 1
    assert gr.count_zeroed_channels(w, 8, "per-channel") == 0
    w[0] = 0.0  # an all-zero channel had nothing to lose
    assert gr.count_zeroed_channels(w, 8, "per-tensor") == 0  # new max is 1/200: nothing lost
    assert torch.equal(gr.channel_max_abs(w), torch.tensor([0.0, 1 / 300, 1 / 200]))


# --------------------------------------------------------------------------- metrics
def test_sqnr_and_relative_mse_known_values() -> None:
    x = torch.ones(100)
    x_hat = x + 0.125  # exact in float32: noise/signal = 1/64
    assert gr.sqnr_db(x, x_hat) == pytest.approx(10 * math.log10(64), abs=1e-12)
    assert gr.relative_mse(x, x_hat) == 1 / 64
    assert gr.sqnr_db(x, x.clone()) == math.inf
    y = torch.randn(50, generator=torch.Generator().manual_seed(9))
    y_hat = y + 0.05 * torch.randn(50, generator=torch.Generator().manual_seed(10))
    assert gr.relative_mse(y, y_hat) == pytest.approx(10 ** (-gr.sqnr_db(y, y_hat) / 10), rel=1e-9)


@pytest.mark.parametrize(
    "x, x_hat",
    [(torch.zeros(4), torch.ones(4)), (torch.ones(4), torch.ones(5)),
     (torch.tensor([1.0, float("nan")]), torch.ones(2))],
)
def test_sqnr_rejects_bad_input(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        gr.sqnr_db(x, x_hat)


@pytest.mark.parametrize(
    "w, kwargs",
    [(torch.randn(4, 4), {"granularity": "per-row"}),
     (torch.randn(4, 4), {"granularity": "per-group", "group_size": 0}),
     (torch.randn(8), {}),
     (torch.tensor([[1.0, float("inf")]]), {}),
     (torch.ones(2, 2, dtype=torch.int32), {})],
)
def test_weight_qparams_rejects_bad_input(w: torch.Tensor, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        gr.weight_qparams(w, 8, **kwargs)


# --------------------------------------------------------------------------- models
def test_layer_errors_rows_and_kinds() -> None:
    model = mobilenet_v2_small().eval()
    rows = gr.layer_errors(model, bits=(8,), granularities=("per-tensor",))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"conv", "depthwise", "linear"}
    assert len(rows) == len(gr.quantizable_layers(model)) == 53
    assert sum(r["kind"] == "depthwise" for r in rows) == 17


def test_quantize_model_weights_copies_and_quantizes_only_weights() -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = gr.quantize_model_weights(model, 4, "per-channel")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the original changed"
    for name in ("conv1", "conv2", "fc"):
        w = getattr(qmodel, name).weight.detach()
        levels = [torch.unique(row).numel() for row in w.reshape(w.shape[0], -1)]
        assert max(levels) <= 15  # 4-bit narrow range: at most 15 values per channel
        assert torch.equal(getattr(qmodel, name).bias, getattr(model, name).bias)
    assert torch.equal(qmodel.bn1.running_var, model.bn1.running_var)


def test_quantize_model_weights_mixed_precision_mapping() -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    qmodel = gr.quantize_model_weights(model, {"conv2": 2}, "per-tensor")
    assert torch.equal(qmodel.conv1.weight, model.conv1.weight)  # not in the plan: float
    assert torch.unique(qmodel.conv2.weight).numel() <= 3  # ternary
    with pytest.raises(ValueError, match="conv3"):
        gr.quantize_model_weights(model, {"conv3": 4})


@pytest.mark.parametrize("build", [TinyCNN, mobilenet_v2_small])
def test_fold_batchnorms_agrees_with_torch_fuse_and_keeps_outputs(build) -> None:
    torch.manual_seed(0)
    model = with_random_bn_stats(build())
    folded = gr.fold_batchnorms(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    # every folded conv equals torch's own fusion of the same pair
    convs = dict(gr.quantizable_layers(folded))
    for parent_name, parent in model.named_modules():
        kids = list(parent.named_children())
        for (na, a), (_, b) in zip(kids, kids[1:], strict=False):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                ref = fuse_conv_bn_eval(a, b)
                got = convs[f"{parent_name}.{na}" if parent_name else na]
                torch.testing.assert_close(got.weight, ref.weight, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got.bias, ref.bias, rtol=1e-5, atol=1e-6)
    shape = (8, 1, 28, 28) if build is TinyCNN else (4, 3, 32, 32)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_out, got_out = model(x), folded(x)
    torch.testing.assert_close(got_out, ref_out, rtol=1e-4, atol=1e-4 * float(ref_out.abs().max()))


# --------------------------------------------------------------------------- bytes on disk
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("granularity", gr.GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_roundtrip(bits: int, granularity: str, symmetric: bool) -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    packed = gr.pack_model_weights(model, bits, granularity, symmetric=symmetric)
    state = gr.unpack_model_weights(packed, model)
    assert set(state) == set(model.state_dict())
    for name, module in gr.quantizable_layers(model):
        expected = gr.fake_quantize_weight(module.weight, bits, granularity, symmetric=symmetric)
        torch.testing.assert_close(state[f"{name}.weight"], expected, atol=0, rtol=0)


def test_packed_sizes_are_real_file_sizes(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    n_weights = sum(m.weight.numel() for _, m in gr.quantizable_layers(model))
    sizes, payload = {}, {}
    for label, obj in {
        "fp32": model.state_dict(),
        "int8": gr.pack_model_weights(model, 8, "per-channel"),
        "int4": gr.pack_model_weights(model, 4, "per-channel"),
        "int4-g32": gr.pack_model_weights(model, 4, "per-group", group_size=32),
    }.items():
        path = tmp_path / f"{label}.pt"
        sizes[label] = gr.saved_size(obj, path)
        assert sizes[label] == os.path.getsize(path) > 0
        payload[label] = gr.payload_bytes(obj)
    assert sizes["fp32"] > sizes["int8"] > sizes["int4"]
    assert sizes["int4-g32"] > sizes["int4"]  # more scales to store
    # weights alone: 4 bytes → 1 byte → half a byte each (odd counts round up per layer)
    int4_weight_bytes = sum(math.ceil(m.weight.numel() / 2) for _, m in gr.quantizable_layers(model))
    assert payload["fp32"] - payload["int8"] == 3 * n_weights - 4 * (16 + 32 + 10)  # minus scales
    assert payload["int8"] - payload["int4"] == n_weights - int4_weight_bytes
    n_groups = sum(math.ceil(m.weight[0].numel() / 32) * m.weight.shape[0]
                   for _, m in gr.quantizable_layers(model))
    assert payload["int4-g32"] - payload["int4"] == 4 * (n_groups - (16 + 32 + 10))


def test_pack_rejects_bits_that_do_not_fill_bytes() -> None:
    with pytest.raises(ValueError):
        gr.pack_model_weights(TinyCNN(), 3)


def test_rescale_depthwise_channels_keeps_the_function_and_spreads_ranges() -> None:
    torch.manual_seed(0)
    model = with_random_bn_stats(mobilenet_v2_small())
    with pytest.raises(ValueError, match="fold"):
        gr.rescale_depthwise_channels(model)
    folded = gr.fold_batchnorms(model)
    spread_out = gr.rescale_depthwise_channels(folded, decades=3.0, seed=0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = folded(x), spread_out(x)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    before = dict(gr.quantizable_layers(folded))
    after = dict(gr.quantizable_layers(spread_out))
    dw = [n for n, m in before.items() if gr.is_depthwise(m)]
    assert len(dw) == 17
    for n in dw:
        r0, r1 = gr.channel_max_abs(before[n].weight), gr.channel_max_abs(after[n].weight)
        k = r1 / r0  # each channel scaled by its own factor in [1e-3, 1]
        assert float(k.max()) <= 1.0 + 1e-6 and float(k.min()) >= 1e-3 * (1 - 1e-6)
        assert float(k.max() / k.min()) > 100
        # per-channel quantization does not care about a per-channel scale factor ...
        assert gr.count_zeroed_channels(after[n].weight, 8, "per-channel") == 0
    # ... per-tensor does: with 3 decades of spread many channels round to zero at 8 bits
    assert sum(gr.count_zeroed_channels(after[n].weight, 8, "per-tensor") for n in dw) > 100


def test_mcnemar_counts_disagreements_and_exact_p_value() -> None:
    a = torch.tensor([True] * 6 + [False] * 2 + [True] * 90 + [False] * 2)
    b = torch.tensor([False] * 6 + [True] * 2 + [True] * 90 + [False] * 2)
    n_ab, n_ba, p = gr.mcnemar(a, b)
    assert (n_ab, n_ba) == (6, 2)
    # two-sided exact binomial test of 2 successes in 8 trials at 1/2: 2 · 37/256
    assert p == pytest.approx(2 * (1 + 8 + 28) / 256, rel=1e-12)
    from scipy import stats as scipy_stats  # scikit-image brings scipy

    assert p == pytest.approx(scipy_stats.binomtest(2, 8, 0.5).pvalue, rel=1e-12)
    assert gr.mcnemar(b, a) == (2, 6, p)
    assert gr.mcnemar(a, a) == (0, 0, 1.0)  # never disagree: no evidence either way
    assert gr.mcnemar(torch.tensor([True, False]), torch.tensor([False, True]))[2] == 1.0


@pytest.mark.parametrize("a, b", [
    (torch.tensor([1, 0]), torch.tensor([True, False])),         # not boolean
    (torch.tensor([True, False]), torch.tensor([True])),          # different lengths
    (torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)),  # not 1-D
])
def test_mcnemar_rejects_bad_input(a: torch.Tensor, b: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="boolean"):
        gr.mcnemar(a, b)
