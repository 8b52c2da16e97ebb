"""course_lib.qat: the STE fake quantizer, LSQ, the QAT modules and BN/observer freezing.

Oracles are independent of the code under test: torch's own fake-quantize kernels
(values and gradient masks), torch's learnable (LSQ) fake-quantize ops, finite
differences, and torch.ao's moving-average observer.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from course_lib import qat, quant

QRANGES = [(-128, 127), (0, 255), (-127, 127), (-8, 7), (-7, 7), (-2, 1), (-1, 1), (0, 3)]


def _ours_and_torch(x: torch.Tensor, ours, theirs, grad: torch.Tensor):
    """Forward both functions on copies of x, backward ``grad``; return (y, dx) for each."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    ya.backward(grad)
    yb.backward(grad)
    return (ya.detach(), xa.grad), (yb.detach(), xb.grad)


def _assert_same_as_torch(x, scale, zp, qmin, qmax):
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (ya, ga), (yb, gb) = _ours_and_torch(
        x,
        lambda t: qat.FakeQuantSTE.apply(t, torch.tensor(scale), torch.tensor(zp), qmin, qmax),
        lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp, qmin, qmax),
        grad,
    )
    assert torch.equal(ya, yb), f"values differ at {int((ya != yb).sum())} positions"
    assert torch.equal(ga != 0, gb != 0), "gradient masks differ"
    assert torch.equal(ga, gb)


# ------------------------------------------------------------------ FakeQuantSTE


@pytest.mark.parametrize("qmin, qmax", QRANGES)
def test_ste_per_tensor_matches_torch_on_random_values(qmin: int, qmax: int) -> None:
    g = torch.Generator().manual_seed(qmax - qmin)
    x = torch.randn(20_000, generator=g) * 4
    for scale in (0.013, 0.1, 0.37, 2.0):
        for zp in (qmin, (qmin + qmax) // 2, qmax):
            _assert_same_as_torch(x, scale, zp, qmin, qmax)


@pytest.mark.parametrize("zp", [0, 1, -3, 7])
def test_ste_ties_round_half_to_even_like_torch(zp: int) -> None:
    # s = 1/4 makes x * (1/s) exact, so every x below sits on a tie k + 0.5.
    x = (torch.arange(-140, 140, dtype=torch.float32) + 0.5) * 0.25
    _assert_same_as_torch(x, 0.25, zp, -128, 127)
    y = qat.FakeQuantSTE.apply(x, torch.tensor(0.25), torch.tensor(0), -128, 127)
    assert y[(x == 0.125)].item() == 0.0  # 0.5 → 0 (even), not 1
    assert y[(x == 0.375)].item() == 0.5  # 1.5 → 2


def test_ste_mask_at_the_clamp_boundaries() -> None:
    # With s = 1, z = 0 and int8: q = 127 is inside, 128 outside; the tie 127.5 rounds
    # to the even 128 (outside), -128.5 to -128 (inside), -129 is outside.
    x = torch.tensor([126.0, 127.0, 127.4, 127.5, 128.0, -128.0, -128.5, -128.6, -129.0])
    expected_mask = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.float32)
    xr = x.clone().requires_grad_()
    y = qat.FakeQuantSTE.apply(xr, torch.tensor(1.0), torch.tensor(0), -128, 127)
    y.sum().backward()
    assert torch.equal(xr.grad, expected_mask)
    assert torch.equal(y, torch.tensor([126.0, 127, 127, 127, 127, -128, -128, -128, -128]))
    _assert_same_as_torch(x, 1.0, 0, -128, 127)
    _assert_same_as_torch(x + 3, 1.0, 3, -128, 127)  # the zero point shifts the boundaries


@pytest.mark.parametrize("axis", [0, 1, 3, -1])
def test_ste_per_channel_matches_torch(axis: int) -> None:
    g = torch.Generator().manual_seed(axis + 10)
    x = torch.randn(6, 5, 3, 4, generator=g) * 2
    channels = x.shape[axis]
    scale = torch.rand(channels, generator=g) * 0.3 + 0.02
    zp = torch.randint(-4, 4, (channels,), generator=g)
    grad = torch.randn(x.shape, generator=g)
    (ya, ga), (yb, gb) = _ours_and_torch(
        x,
        lambda t: qat.FakeQuantSTE.apply(t, scale, zp, -8, 7, axis),
        lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp.int(), axis % 4, -8, 7),
        grad,
    )
    assert torch.equal(ya, yb)
    assert torch.equal(ga, gb)


def test_ste_per_channel_ties_and_boundaries_match_torch() -> None:
    # Power-of-two scales make x * (1/s) exact: every value sits on a tie k + 0.5, and
    # the codes run past both ends of [-8, 7] for each channel's own zero point.
    scale = torch.tensor([0.25, 0.5, 1.0, 2.0])
    zp = torch.tensor([0, 1, -3, 6])
    k = torch.arange(-14, 14, dtype=torch.float32) + 0.5
    x = k[None, :] * scale[:, None]
    grad = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    (ya, ga), (yb, gb) = _ours_and_torch(
        x,
        lambda t: qat.FakeQuantSTE.apply(t, scale, zp, -8, 7, 0),
        lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp.int(), 0, -8, 7),
        grad,
    )
    assert torch.equal(ya, yb) and torch.equal(ga, gb)
    assert 0 < int((gb == 0).sum()) < x.numel()  # both clipped and passed values are present


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64),
    scale=st.floats(2.0**-10, 10.0, width=32),
    bits=st.sampled_from([2, 4, 8]),
    signed=st.booleans(),
    data=st.data(),
)
def test_ste_matches_torch_on_arbitrary_inputs(values, scale, bits, signed, data) -> None:
    qmin, qmax = quant.qrange(bits, signed)
    zp = data.draw(st.integers(qmin, qmax))
    _assert_same_as_torch(torch.tensor(values, dtype=torch.float32), scale, zp, qmin, qmax)


def test_ste_agrees_with_course_fake_quantize_and_bits_wrapper() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    expected = quant.fake_quantize(x, 0.05, 3, 4, signed=False)
    got = qat.fake_quantize_ste(x, 0.05, 3, 4, signed=False)
    assert torch.equal(got, expected)


def test_ste_gives_no_gradient_to_scale_and_zero_point() -> None:
    scale = torch.tensor(0.1, requires_grad=True)
    x = torch.randn(10, requires_grad=True)
    qat.FakeQuantSTE.apply(x, scale, torch.tensor(0), -8, 7).sum().backward()
    assert scale.grad is None and x.grad is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": torch.tensor(0.0)}, "scale"),
        ({"scale": torch.tensor(-0.1)}, "scale"),
        ({"scale": torch.tensor(float("nan"))}, "scale"),
        ({"zero_point": torch.tensor(0.5)}, "zero_point"),
        ({"qmin": 7, "qmax": -8}, "qmin"),
        ({"scale": torch.tensor([0.1, 0.2])}, "per-tensor"),
        ({"axis": 0, "scale": torch.tensor([0.1, 0.2])}, "shape"),
        ({"axis": 3}, "axis"),
        ({"x": torch.tensor([1.0, float("nan")])}, "NaN"),
        ({"x": torch.tensor([float("inf"), 0.0])}, "Inf"),
    ],
)
def test_ste_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"x": torch.randn(4, 3), "scale": torch.tensor(0.1), "zero_point": torch.tensor(0),
            "qmin": -8, "qmax": 7, "axis": None}
    args.update(kwargs)
    if args["axis"] is not None and args["zero_point"].numel() != args["scale"].numel():
        args["zero_point"] = torch.zeros(args["scale"].shape, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        qat.FakeQuantSTE.apply(args["x"], args["scale"], args["zero_point"],
                               args["qmin"], args["qmax"], args["axis"])


# ------------------------------------------------------------------ LSQ


def test_lsq_scale_grad_closed_form_on_hand_picked_values() -> None:
    # s = 0.5, z = 1, range [-2, 1]: x/s = 0.6 → round 1, q = 2 > 1 (above: qmax - z = 0);
    # x/s = -0.6 → q = 0 (inside: round - x/s = -1 + 0.6 = -0.4);
    # x/s = -4 → q = -3 < -2 (below: qmin - z = -3); x/s = 0.2 → q = 1 (inside: -0.2).
    x = torch.tensor([0.3, -0.3, -2.0, 0.1])
    got = qat.lsq_scale_grad(x, torch.tensor(0.5), torch.tensor(1), -2, 1)
    assert torch.allclose(got, torch.tensor([0.0, -0.4, -3.0, -0.2]), atol=1e-6)


def _lsq_loss_grad(x, scale, zp, qmin, qmax, grad_factor=1.0, axis=None):
    s = scale.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    w = torch.linspace(-1, 1, x.numel()).reshape(x.shape)  # a loss L = Σ w · x̂
    (qat.LSQFakeQuant.apply(xr, s, zp, qmin, qmax, grad_factor, axis) * w).sum().backward()
    return s.grad, xr.grad, w


def test_lsq_gradient_matches_finite_differences_away_from_rounding_steps() -> None:
    """Check d/ds of L = Σ w · x̂(s) numerically, on x chosen away from rounding steps.

    Away from a rounding step, x̂(s) = (clamp(q) − z)·s is smooth in s, with derivative
    clamp(q) − z. LSQ's STE adds −x/s for values inside the range (it differentiates
    through round as if it were the identity), so the central difference of the true
    function plus Σ w·(−x/s)·inside must equal the LSQ gradient.
    """
    scale, zp, qmin, qmax = torch.tensor(0.2), torch.tensor(2), -8, 7
    # x/s at integer ± 0.2 or 0.3: never within 0.2 of a tie (k + 0.5), where round jumps,
    # nor of a clamp boundary (also at k + 0.5); q = round(x/s) + z spans [-13, 12].
    k = torch.arange(-15, 11, dtype=torch.float32)
    v = torch.cat([k + 0.2, k - 0.3])
    x = v * scale
    grad_s, _, w = _lsq_loss_grad(x, scale, zp, qmin, qmax)

    def loss(s: float) -> float:
        s_t = torch.tensor(s, dtype=torch.float64)
        q = torch.round(x.double() / s_t) + zp
        return float(((q.clamp(qmin, qmax) - zp) * s_t * w.double()).sum())

    h = 1e-5
    fd = (loss(0.2 + h) - loss(0.2 - h)) / (2 * h)
    q = torch.round(v) + zp
    inside = (q >= qmin) & (q <= qmax)
    ste_term = float((w * -v * inside).sum())
    assert math.isclose(float(grad_s), fd + ste_term, rel_tol=1e-4, abs_tol=1e-4)


def test_lsq_gradient_is_the_derivative_of_the_frozen_residual_surrogate() -> None:
    """LSQ's gradient is the exact derivative of x̂ with round(u) replaced by u + (round(u0) − u0).

    That surrogate equals x̂ at s0 and is smooth, so finite differences apply everywhere,
    ties and boundaries excepted.
    """
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, generator=g) * 1.5
    s0, zp, qmin, qmax = 0.11, 0, -8, 7
    u0 = x / s0
    keep = ((u0 - u0.floor() - 0.5).abs() > 0.05) & ((torch.round(u0) - qmin).abs() > 0.5)
    keep &= (torch.round(u0) - qmax).abs() > 0.5
    x = x[keep]
    residual = torch.round(x / s0) - x / s0
    w = torch.linspace(-1, 1, x.numel())

    def surrogate(s: float) -> float:
        u = x.double() / s + residual.double()  # = round(x/s0) at s = s0
        return float((u.clamp(qmin, qmax) * s * w.double()).sum())

    h = 1e-6
    fd = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    s = torch.tensor(s0).requires_grad_()
    (qat.LSQFakeQuant.apply(x, s, torch.tensor(zp), qmin, qmax, 1.0) * w).sum().backward()
    assert math.isclose(float(s.grad), fd, rel_tol=1e-4, abs_tol=1e-3)


# Zero points ≥ 0 only: the backward of torch._fake_quantize_learnable_per_tensor_affine reads
# its float zero point as int(z + 0.5), truncating toward zero, i.e. z + 1 for negative z
# (its forward rounds correctly). Our gradient follows the forward.
@pytest.mark.parametrize("qmin, qmax, zp", [(-8, 7, 2), (-128, 127, 5), (0, 15, 3), (-1, 1, 0), (-8, 7, 7)])
def test_lsq_matches_torch_learnable_fake_quantize_per_tensor(qmin: int, qmax: int, zp: int) -> None:
    g = torch.Generator().manual_seed(qmax)
    x = torch.randn(4000, generator=g) * 2
    grad = torch.randn(x.shape, generator=g)
    for grad_factor in (1.0, 0.05):
        sa = torch.tensor([0.07], requires_grad=True)
        sb = torch.tensor([0.07], requires_grad=True)
        zb = torch.tensor([float(zp)], requires_grad=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = qat.LSQFakeQuant.apply(xa, sa, torch.tensor([zp]), qmin, qmax, grad_factor)
        yb = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, zb, qmin, qmax, grad_factor)
        ya.backward(grad)
        yb.backward(grad)
        assert torch.equal(ya, yb)
        assert torch.equal(xa.grad, xb.grad)
        assert torch.allclose(sa.grad, sb.grad, rtol=1e-4, atol=1e-3)


def test_lsq_matches_torch_learnable_fake_quantize_per_channel() -> None:
    g = torch.Generator().manual_seed(11)
    w = torch.randn(8, 4, 3, 3, generator=g)
    scale = torch.rand(8, generator=g) * 0.3 + 0.05
    grad = torch.randn(w.shape, generator=g)
    sa, sb = scale.clone().requires_grad_(), scale.clone().requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    ya = qat.LSQFakeQuant.apply(wa, sa, torch.zeros(8, dtype=torch.int64), -7, 7, 0.1, 0)
    yb = torch._fake_quantize_learnable_per_channel_affine(wb, sb, torch.zeros(8), 0, -7, 7, 0.1)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(ya, yb)
    assert torch.equal(wa.grad, wb.grad)
    assert torch.allclose(sa.grad, sb.grad, rtol=1e-5, atol=1e-5)


def test_lsq_grad_factor() -> None:
    assert qat.lsq_grad_factor(144, 1) == pytest.approx(1 / 12)
    assert qat.lsq_grad_factor(16 * 9, 127) == pytest.approx(1 / math.sqrt(144 * 127))
    with pytest.raises(ValueError, match="numel"):
        qat.lsq_grad_factor(0, 7)


def test_weight_quantizer_scales_the_scale_gradient_by_g() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 3, 3, 3, generator=g)
    wq = qat.LSQWeightFakeQuant(w, bits=4)
    assert wq.grad_factor == pytest.approx(1 / math.sqrt(27 * 7))
    upstream = torch.randn(w.shape, generator=g)
    wq(w).backward(upstream)
    per_element = upstream * qat.lsq_scale_grad(w, wq.scale.detach(), wq.zero_point, -7, 7, axis=0)
    assert torch.allclose(wq.scale.grad, wq.grad_factor * per_element.sum(dim=(1, 2, 3)), atol=1e-6)


def test_weight_quantizer_minmax_init_is_torch_per_channel_symmetric_observer() -> None:
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-7, quant_max=7
    )
    obs(w)
    scale, _ = obs.calculate_qparams()
    assert torch.equal(qat.LSQWeightFakeQuant(w, 4).scale.detach(), scale)


def test_mse_weight_scale_never_worse_than_minmax() -> None:
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(6))
    w[0, 0, 0, 0] = 8.0  # one outlier: min-max wastes most levels on it
    for bits in (2, 4, 8):
        q_mse = qat.LSQWeightFakeQuant(w, bits, init="mse")
        q_mm = qat.LSQWeightFakeQuant(w, bits, init="minmax")
        err_mse = ((q_mse(w) - w) ** 2).sum(dim=(1, 2, 3))
        err_mm = ((q_mm(w) - w) ** 2).sum(dim=(1, 2, 3))
        assert (err_mse <= err_mm + 1e-6).all()
        if bits == 2:  # ternary codes: min-max puts the threshold at max|w|/2, far too high
            assert (err_mse[1:] < 0.5 * err_mm[1:]).all()


# ------------------------------------------------------------------ observers, BN, model


def test_activation_observer_matches_torch_moving_average_observer() -> None:
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(64, 10, generator=g) * (1 + i) + i for i in range(5)]
    ours = qat.ActivationFakeQuant(8, averaging_constant=0.1).train()
    theirs = torch.ao.quantization.MovingAverageMinMaxObserver(
        averaging_constant=0.1, dtype=torch.qint8, quant_min=-128, quant_max=127
    )
    for b in batches:
        ours(b)
        theirs(b)
    scale, zp = theirs.calculate_qparams()
    assert torch.allclose(ours.min_val, theirs.min_val) and torch.allclose(ours.max_val, theirs.max_val)
    assert torch.allclose(ours.scale, scale.reshape(()), rtol=1e-6)
    assert int(ours.zero_point) == int(zp)


def test_activation_observer_frozen_and_eval_do_not_update() -> None:
    fq = qat.ActivationFakeQuant(8).train()
    with pytest.raises(RuntimeError, match="not seen any data"):
        fq.eval()(torch.randn(3))
    fq.train()(torch.tensor([-1.0, 2.0]))
    fq.eval()(torch.tensor([-10.0, 20.0]))
    assert (float(fq.min_val), float(fq.max_val)) == (-1.0, 2.0)
    fq.frozen = True
    fq.train()(torch.tensor([-10.0, 20.0]))
    assert (float(fq.min_val), float(fq.max_val)) == (-1.0, 2.0)
    fq.frozen = False
    fq(torch.tensor([-11.0, 22.0]))  # EMA with c = 0.01
    assert float(fq.max_val) == pytest.approx(2.0 + 0.01 * 20.0)


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv(x))))


def _small_model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = _Small()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    with torch.no_grad():  # realistic running statistics
        model.train()(x)
    return model.eval(), x, y


def test_prepare_qat_swaps_layers_and_leaves_the_original_alone() -> None:
    model, x, _ = _small_model_and_data()
    before = copy.deepcopy(model.state_dict())
    qm = qat.prepare_qat(model, 4, 8)
    assert isinstance(qm.conv, qat.QuantConv2d) and isinstance(qm.head[1], qat.QuantLinear)
    assert isinstance(qm.bn, qat.FreezableBatchNorm2d)
    assert type(model.conv) is nn.Conv2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="calibrate"):
        qm(x)
    qat.calibrate_observers(qm, x)
    # The quantized model computes what fake-quantizing each layer by hand computes.
    zeros = torch.zeros(4, dtype=torch.int64)
    wq = quant.fake_quantize(model.conv.weight, qm.conv.weight_fq.scale.detach(), zeros, 4,
                             narrow_range=True, axis=0)
    xs, xz = quant.qparams_from_tensor(x)
    h = F.conv2d(quant.fake_quantize(x, xs, xz), wq, model.conv.bias, padding=1)
    h = F.relu(model.bn(h)).flatten(1)
    hs, hz = quant.qparams_from_tensor(h)
    lw = quant.fake_quantize(model.head[1].weight, qm.head[1].weight_fq.scale.detach(), zeros[:3], 4,
                             narrow_range=True, axis=0)
    expected = F.linear(quant.fake_quantize(h, hs, hz), lw, model.head[1].bias)
    assert torch.allclose(qm(x), expected, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_prepare_qat_rejects_bad_bit_widths(bits) -> None:
    model, _, _ = _small_model_and_data()
    with pytest.raises(ValueError, match="w_bits"):
        qat.prepare_qat(model, bits, 8)
    with pytest.raises(ValueError, match="a_bits"):
        qat.prepare_qat(model, 8, bits)


def test_prepare_qat_rejects_unknown_weight_init() -> None:
    model, _, _ = _small_model_and_data()
    with pytest.raises(ValueError, match="init"):
        qat.prepare_qat(model, 4, 8, weight_init="lsq")


def test_eight_bit_qat_model_stays_close_to_float() -> None:
    model, x, _ = _small_model_and_data()
    qm = qat.calibrate_observers(qat.prepare_qat(model, 8, 8), x)
    ref = model(x)
    err = (qm(x) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05


def test_freeze_bn_survives_train_mode_and_keeps_statistics() -> None:
    model, x, y = _small_model_and_data()
    qm = qat.calibrate_observers(qat.prepare_qat(model, 8, 8), x)
    qat.freeze_observers(qm)
    stats = (qm.bn.running_mean.clone(), qm.bn.running_var.clone(), int(qm.bn.num_batches_tracked))
    eval_out = qm.eval()(x * 2 + 1)
    assert qat.freeze_bn(qm) == 1
    train_out = qm.train()(x * 2 + 1)  # a batch with other statistics
    assert torch.equal(train_out, eval_out)
    assert torch.equal(qm.bn.running_mean, stats[0]) and torch.equal(qm.bn.running_var, stats[1])
    assert int(qm.bn.num_batches_tracked) == stats[2]
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    gamma = qm.bn.weight.detach().clone()
    qat.qat_step(qm, x, y, opt)
    assert not torch.equal(qm.bn.weight.detach(), gamma)  # γ and β still train
    assert torch.equal(qm.bn.running_mean, stats[0])


def test_unfrozen_bn_updates_statistics_in_train_mode() -> None:
    model, x, _ = _small_model_and_data()
    qm = qat.calibrate_observers(qat.prepare_qat(model, 8, 8), x)
    mean = qm.bn.running_mean.clone()
    qm.train()(x * 2 + 1)
    assert not torch.equal(qm.bn.running_mean, mean)


def test_frozen_batch_norm_formula() -> None:
    bn = nn.BatchNorm2d(3)
    g = torch.Generator().manual_seed(9)
    bn.running_mean.copy_(torch.randn(3, generator=g))
    bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(3, generator=g))
        bn.bias.copy_(torch.randn(3, generator=g))
    x = torch.randn(2, 3, 4, 4, generator=g)
    view = (1, 3, 1, 1)
    expected = (x - bn.running_mean.view(view)) / torch.sqrt(bn.running_var.view(view) + bn.eps)
    expected = expected * bn.weight.view(view) + bn.bias.view(view)
    assert torch.allclose(qat.frozen_batch_norm(x, bn.train()), expected, atol=1e-6)


def test_freeze_bn_and_observers_reject_unprepared_models() -> None:
    model, _, _ = _small_model_and_data()
    with pytest.raises(ValueError, match="prepare_qat"):
        qat.freeze_bn(model)
    with pytest.raises(RuntimeError, match="calibrate"):
        qat.freeze_observers(qat.prepare_qat(model, 8, 8))
    with pytest.raises(ValueError, match="prepare_qat"):
        qat.calibrate_observers(model, torch.zeros(1, 1, 6, 6))


def test_per_channel_weights_fold_into_a_frozen_bn_exactly() -> None:
    """The deployability claim: conv(fq(w)) → frozen BN equals conv(fq'(w·k)) + b', k = γ/σ.

    With per-channel symmetric codes, BN's per-channel factor k moves into the scale
    (s' = s·|k|): the same integer codes, so QAT trained exactly the deployed weights.
    """
    model, x, _ = _small_model_and_data()
    qm = qat.calibrate_observers(qat.prepare_qat(model, 4, 8), x)
    qat.freeze_bn(qm)
    conv, bn = qm.conv, qm.bn
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    scale = conv.weight_fq.scale.detach()
    w_fold = conv.weight.detach() * k.view(-1, 1, 1, 1)
    zeros = torch.zeros(4, dtype=torch.int64)
    codes = quant.quantize(conv.weight.detach(), scale, zeros, 4, narrow_range=True, axis=0)
    codes_fold = quant.quantize(w_fold, scale * k.abs(), zeros, 4, narrow_range=True, axis=0)
    assert torch.equal(codes_fold, codes * torch.sign(k).view(-1, 1, 1, 1).int())
    b_fold = (bn.bias - bn.running_mean * k + conv.bias * k).detach()
    x_q = conv.input_fq(x)
    folded = F.conv2d(x_q, quant.dequantize(codes_fold, scale * k.abs(), zeros, axis=0), b_fold, padding=1)
    assert torch.allclose(folded, bn(conv(x)).detach(), atol=1e-5)


# ------------------------------------------------------------------ training


def test_qat_step_trains_weights_and_scales_and_lowers_the_loss() -> None:
    model, x, y = _small_model_and_data()
    qm = qat.calibrate_observers(qat.prepare_qat(model, 4, 8), x)
    opt = torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9)
    scale0, w0 = qm.conv.weight_fq.scale.detach().clone(), qm.conv.weight.detach().clone()
    losses = [qat.qat_step(qm, x, y, opt) for _ in range(30)]
    assert isinstance(losses[0], float)
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(qm.conv.weight_fq.scale.detach(), scale0)
    assert not torch.equal(qm.conv.weight.detach(), w0)


def test_train_qat_freezes_on_schedule_records_history_and_is_deterministic() -> None:
    def run():
        model, x, y = _small_model_and_data()
        qm = qat.calibrate_observers(qat.prepare_qat(model, 2, 8), x)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        opt = torch.optim.SGD(qm.parameters(), lr=0.01, momentum=0.9)
        seen = []

        def evaluate(m):
            seen.append((m.bn.frozen, m.conv.input_fq.frozen))
            return 0.5

        hist = qat.train_qat(qm, loader, opt, epochs=2, freeze_bn_after=5, freeze_observers_after=7,
                             eval_every=4, evaluate=evaluate, progress=False)
        return qm, hist, seen

    qm, hist, seen = run()
    assert hist["step"] == [4, 8, 12]  # 2 epochs × 6 batches
    assert hist["metric"] == [0.5, 0.5, 0.5] and len(hist["loss"]) == 3
    assert seen == [(False, False), (True, True), (True, True)]
    assert not qm.training
    qm2, hist2, _ = run()
    assert hist2["loss"] == hist["loss"]
    assert all(torch.equal(a, b) for a, b in zip(qm.state_dict().values(), qm2.state_dict().values(), strict=True))


# ------------------------------------------------------------------ to the integer network


def _frozen_qat_tinycnn(w_bits: int, seed: int = 0):
    """A small QAT TinyCNN with BN frozen on random statistics (one γ negative), ranges frozen."""
    from course_lib import models

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1, 28, 28, generator=g)
    qm = qat.prepare_qat(models.TinyCNN(channels=(4, 8)), w_bits, 8)
    with torch.no_grad():
        for bn in (qm.bn1, qm.bn2):
            c = bn.num_features
            bn.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(0.1 * torch.randn(c, generator=g))
        qm.bn1.weight[1] = -qm.bn1.weight[1]  # a negative γ flips that channel's codes
    qat.calibrate_observers(qm, x)
    qat.freeze_bn(qm)
    qat.freeze_observers(qm)
    return qm.eval(), x


def test_weight_codes_times_scale_is_the_fake_quantized_weight() -> None:
    qm, _ = _frozen_qat_tinycnn(4)
    for layer in (qm.conv1, qm.conv2, qm.fc):
        codes = qat.weight_codes(layer)
        assert codes.dtype == torch.int32 and int(codes.abs().max()) <= 7
        scale = layer.weight_fq.scale.detach().reshape(-1, *([1] * (codes.dim() - 1)))
        assert torch.equal(codes * scale, layer.weight_fq(layer.weight).detach())


@pytest.mark.parametrize("w_bits", [8, 4, 2])
def test_convert_to_integer_reproduces_the_fake_quantized_model(w_bits: int) -> None:
    from course_lib import kernels

    qm, x = _frozen_qat_tinycnn(w_bits)
    net = qat.convert_to_integer(qm, x)
    assert isinstance(net, kernels.IntegerTinyCNN)
    # the integer weights are the trained codes, signs flipped where BN's γ < 0
    flipped = qat.weight_codes(qm.conv1).clone()
    flipped[1] = -flipped[1]
    assert torch.equal(torch.from_numpy(net.conv1.weight_q).int(), flipped)
    assert torch.equal(torch.from_numpy(net.fc.weight_q).int(), qat.weight_codes(qm.fc))
    with torch.no_grad():
        fq_logits = qm(x)
    int_logits = torch.from_numpy(net.dequantize_logits(net(x)))
    step = net.fc.output_scale
    # within a few output steps (int8 logits, int32 biases, fixed-point requantization)
    assert float((fq_logits - int_logits).abs().max()) <= 4 * step
    assert float((int_logits.argmax(1) == fq_logits.argmax(1)).float().mean()) >= 0.9


def test_convert_to_integer_rejects_unfrozen_bn_and_float_models() -> None:
    from course_lib import models

    qm = qat.calibrate_observers(qat.prepare_qat(models.TinyCNN(channels=(4, 8)), 8, 8), torch.randn(8, 1, 28, 28))
    with pytest.raises(ValueError, match="freeze the BatchNorm"):
        qat.convert_to_integer(qm, torch.randn(8, 1, 28, 28))
    with pytest.raises(ValueError, match="QAT layers"):
        qat.convert_to_integer(models.TinyCNN(channels=(4, 8)), torch.randn(8, 1, 28, 28))
