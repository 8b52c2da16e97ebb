"""The static PTQ pipeline of lesson 05 (course_lib/ptq.py) on the shipped TinyCNN.

Expected values come from independent computations (the float model run by hand, torch's
own fusion, lesson 04's reference integer model, a numpy rounding rule), never from the
function under test.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from course_lib import ptq
from course_lib.data import get_split
from course_lib.kernels import IntegerTinyCNN
from course_lib.models import TinyCNN, load_pretrained


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return load_pretrained("tinycnn")


@pytest.fixture(scope="module")
def calibrated(model: nn.Module) -> ptq.ObservedModel:
    return ptq.calibrate(ptq.attach_observers(ptq.fold_bn(model)), "calib")


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return get_split("test")


def _float_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _same_integer_model(a: IntegerTinyCNN, b: IntegerTinyCNN) -> bool:
    if (a.input_scale, a.input_zero_point, a.pool) != (b.input_scale, b.input_zero_point, b.pool):
        return False
    for name in ("conv1", "conv2", "fc"):
        la, lb = getattr(a, name), getattr(b, name)
        for field in la.__dataclass_fields__:
            va, vb = getattr(la, field), getattr(lb, field)
            same = np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb
            if not same:
                return False
    return True


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.slow
def test_w8a8_per_channel_is_within_half_a_point_of_float(model, calibrated, test_split) -> None:
    x, y = test_split
    float_acc = _float_accuracy(model, x, y)
    qmodel = ptq.convert(calibrated, 8, "per-channel")
    acc = float((qmodel.predict(x) == y.numpy()).mean())  # lesson 04's reference forward pass
    assert abs(acc - float_acc) <= 0.005, f"W8A8 min-max {acc:.3f} vs float {float_acc:.3f}"
    assert ptq.evaluate(qmodel, "test") == acc
    acc_mse = ptq.evaluate(ptq.convert(calibrated, 8, "per-channel", method="mse"), (x, y))
    assert abs(acc_mse - float_acc) <= 0.005, f"W8A8 mse {acc_mse:.3f} vs float {float_acc:.3f}"


@pytest.mark.slow
def test_fewer_weight_bits_cost_accuracy(calibrated, test_split) -> None:
    x, y = test_split
    acc = {(b, g): ptq.evaluate(ptq.convert(calibrated, b, g), (x, y))
           for b in (8, 2) for g in ptq.GRANULARITIES}
    assert acc[2, "per-tensor"] < acc[8, "per-tensor"] - 0.3  # ternary weights break TinyCNN
    assert acc[2, "per-channel"] > acc[2, "per-tensor"]  # per-channel scales help most at few bits


@pytest.mark.slow
def test_kl_calibration_clips_relu1_from_nvidias_first_candidate(calibrated, test_split) -> None:
    # NVIDIA's entropy calibration (candidates from bin 128 of 2,048, the spike of exact zeros
    # flattened, 256 levels for a non-negative tensor) never picks a threshold below max/16.
    # On TinyCNN's relu1 it clips hard, and lesson 05 shows what that costs against min-max.
    kl = calibrated.with_method("kl")
    relu1_max = calibrated.observers["relu1"].max_val
    assert relu1_max / 16 * (1 - 1e-6) <= kl.ranges()["relu1"][1] < 0.25 * relu1_max
    minmax_accuracy = ptq.evaluate(ptq.convert(calibrated.with_method("minmax"), 8, "per-channel"), test_split)
    assert ptq.evaluate(ptq.convert(kl, 8, "per-channel"), test_split) < minmax_accuracy


# ----------------------------------------------------------------------------- fold


def test_folded_model_equals_unfolded_in_float(model, test_split) -> None:
    x, _ = test_split
    before = copy.deepcopy(model.state_dict())
    folded = ptq.fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        ref, got = model(x), folded(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # the input model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_folded_weights_match_torch_fusion(model) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = ptq.fold_bn(model)
    fused = fuse_conv_bn_eval(copy.deepcopy(model.conv2), copy.deepcopy(model.bn2))
    torch.testing.assert_close(folded.conv2.weight, fused.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(folded.conv2.bias, fused.bias, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- calibrate


def test_calibration_sees_exactly_the_500_calibration_images(model, calibrated) -> None:
    x_calib, _ = get_split("calib")
    assert calibrated.images_seen == 500
    assert calibrated.observers["input"].count == 500 * 28 * 28
    assert calibrated.observers["relu1"].count == 500 * 16 * 28 * 28
    assert calibrated.observers["fc"].count == 500 * 10
    # The min-max ranges are those of the calibration images run through the model by hand.
    folded = ptq.fold_bn(model)
    with torch.no_grad():
        a1 = torch.relu(folded.conv1(x_calib))
        logits = folded(x_calib)
    r = calibrated.ranges()
    assert r["input"] == pytest.approx((float(x_calib.min()), float(x_calib.max())), rel=1e-6)
    assert r["relu1"] == pytest.approx((0.0, float(a1.max())), rel=1e-5)
    assert r["fc"] == pytest.approx((float(logits.min()), float(logits.max())), rel=1e-5)


def test_calibration_split_only(model) -> None:
    observed = ptq.attach_observers(ptq.fold_bn(model))
    for split in ("test", "train"):
        with pytest.raises(ValueError, match="calib"):
            ptq.calibrate(observed, split)
    assert observed.images_seen == 0
    with pytest.raises(ValueError, match="calibrate"):
        ptq.convert(observed)  # nothing observed yet


def test_a_loader_of_pairs_calibrates_like_the_split_name(model, calibrated) -> None:
    from course_lib.data import make_loader

    observed = ptq.calibrate(ptq.attach_observers(ptq.fold_bn(model)), make_loader("calib", batch_size=250))
    assert observed.images_seen == 500
    assert observed.ranges() == calibrated.ranges()  # same images, same batches: same histograms


def test_one_calibration_serves_every_method(calibrated) -> None:
    r = {m: calibrated.with_method(m).ranges() for m in ptq.METHODS}
    assert calibrated.method == "minmax" and calibrated.ranges() == r["minmax"]  # original unchanged
    for m in ptq.METHODS:
        assert r[m]["input"] == r["minmax"]["input"]  # the input stays min-max
        assert r[m]["relu1"][0] == 0.0 or m == "percentile"
        assert r[m]["relu1"][1] <= r["minmax"]["relu1"][1]
    assert r["percentile"]["relu1"][1] < r["minmax"]["relu1"][1]  # clipping methods clip
    assert r["mse"]["relu1"][1] < r["minmax"]["relu1"][1]


# ----------------------------------------------------------------------------- convert


def test_convert_matches_lesson_04_integer_model(model, calibrated) -> None:
    x_calib, _ = get_split("calib")
    reference = IntegerTinyCNN.from_float(model, x_calib)  # lesson 04: fold, min-max, per-channel W8
    # from_float runs the 500 images as one batch; calibrate in one batch too, because a
    # float matmul's last bits depend on the batch size (so would the logits' min-max).
    one_batch = ptq.calibrate(ptq.attach_observers(ptq.fold_bn(model)), "calib", batch_size=500)
    assert _same_integer_model(ptq.convert(one_batch, 8, "per-channel"), reference)
    converted = ptq.convert(calibrated, 8, "per-channel")  # 250-image batches: same up to float noise
    np.testing.assert_allclose(converted.fc.output_scale, reference.fc.output_scale, rtol=1e-5)


def test_converting_twice_is_deterministic(model, calibrated) -> None:
    for bits, gran, method in [(8, "per-channel", "mse"), (4, "per-tensor", "kl"), (2, "per-channel", "percentile")]:
        a = ptq.convert(calibrated, bits, gran, method=method)
        b = ptq.convert(calibrated, bits, gran, method=method)
        assert _same_integer_model(a, b)
    again = ptq.calibrate(ptq.attach_observers(ptq.fold_bn(model)), "calib")  # a second calibration
    assert _same_integer_model(ptq.convert(again, 4, "per-tensor", method="mse"),
                               ptq.convert(calibrated, 4, "per-tensor", method="mse"))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_weight_codes(model, bits: int, granularity: str) -> None:
    w = ptq.fold_bn(model).conv2.weight.detach()
    codes, scale = ptq.quantize_weight_codes(w, bits, granularity)
    q_max = 2 ** (bits - 1) - 1
    assert codes.dtype == np.int8 and codes.shape == tuple(w.shape)
    assert scale.dtype == np.float32 and scale.shape == (w.shape[0],)
    absmax = w.reshape(w.shape[0], -1).abs().amax(1).numpy()
    expected_scale = np.full(w.shape[0], absmax.max()) / q_max if granularity == "per-tensor" else absmax / q_max
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    # TFLite's rule, computed independently: float32 division, ties away from zero.
    v = w.numpy() / scale.reshape(-1, 1, 1, 1)
    expected = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -q_max, q_max)
    np.testing.assert_array_equal(codes, expected.astype(np.int8))
    assert codes.min() == -q_max or codes.max() == q_max  # the largest weight reaches the end code


def test_narrow_weights_run_in_the_int8_integer_model(calibrated, test_split) -> None:
    x, _ = test_split
    q = ptq.convert(calibrated, 2, "per-tensor")
    for layer in (q.conv1, q.conv2, q.fc):
        assert set(np.unique(layer.weight_q)) <= {-1, 0, 1}
        assert len(np.unique(layer.weight_scale)) == 1
    out = q(x[:50])  # lesson 04's integer forward pass, int8 in and out
    assert out.dtype == np.int8 and out.shape == (50, 10)


@pytest.mark.slow
def test_fast_forward_is_bit_exact(calibrated, test_split) -> None:
    x, _ = test_split
    for bits, gran, method in [(8, "per-channel", "minmax"), (4, "per-tensor", "kl"), (2, "per-channel", "mse")]:
        q = ptq.convert(calibrated, bits, gran, method=method)
        xq = q.quantize_input(x[:200])
        np.testing.assert_array_equal(ptq.forward_int8(q, xq, batch_size=64), q.forward_int8(xq))


def test_explicit_ranges_replace_the_observers(calibrated) -> None:
    ranges = calibrated.ranges()
    ranges["relu1"] = (0.0, 2.55)
    q = ptq.convert(calibrated, 8, "per-channel", ranges=ranges)
    assert q.conv1.output_scale == pytest.approx(0.01, rel=1e-6)
    assert q.conv1.output_zero_point == -128
    with pytest.raises(ValueError, match="exactly"):
        ptq.convert(calibrated, ranges={"relu1": (0.0, 1.0)})
    with pytest.raises(ValueError, match="lo <= hi"):
        ptq.convert(calibrated, ranges={**ranges, "fc": (1.0, -1.0)})


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_and_compare(model, calibrated, test_split) -> None:
    x, y = test_split
    assert ptq.evaluate(model, (x, y)) == pytest.approx(_float_accuracy(model, x, y))
    q = ptq.convert(calibrated)
    ours = ptq.logits(q, x[:100])
    expected = torch.from_numpy(q.dequantize_logits(q.forward_int8(q.quantize_input(x[:100]))))
    assert torch.equal(ours, expected)
    shifted = ours.clone()
    shifted[0, 0] += 3 * q.fc.output_scale
    c = ptq.compare_logits(ours, shifted, q.fc.output_scale)
    assert c["max_diff_steps"] == pytest.approx(3.0, rel=1e-5)
    assert ptq.compare_logits(ours, ours, 1.0) == {"top1_agreement": 1.0, "max_diff_steps": 0.0, "mean_diff_steps": 0.0}


@pytest.mark.slow
def test_accuracy_sweep_rows(calibrated, test_split) -> None:
    rows = ptq.accuracy_sweep(calibrated, w_bits=(4,), granularities=("per-tensor",),
                              methods=("minmax", "mse"), data=test_split, progress=False)
    assert [(r["w_bits"], r["granularity"], r["method"]) for r in rows] == [
        (4, "per-tensor", "minmax"), (4, "per-tensor", "mse")]
    assert rows[1]["accuracy"] == ptq.evaluate(ptq.convert(calibrated, 4, "per-tensor", method="mse"), test_split)
    assert rows[0]["accuracy"] == ptq.evaluate(ptq.convert(calibrated, 4, "per-tensor"), test_split)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_error(model, calibrated) -> None:
    for bits in (1, 9, 8.0, True, "8"):
        with pytest.raises(ValueError, match="w_bits"):
            ptq.convert(calibrated, bits)
    with pytest.raises(ValueError, match="granularity"):
        ptq.convert(calibrated, 8, "per-group")
    with pytest.raises(ValueError, match="method"):
        ptq.convert(calibrated, 8, method="entropy")
    with pytest.raises(ValueError, match="method"):
        ptq.attach_observers(ptq.fold_bn(model), method="max")
    with pytest.raises(ValueError, match="fold_bn"):
        ptq.attach_observers(model)  # BatchNorm still there
    with pytest.raises(ValueError, match="TinyCNN"):
        ptq.fold_bn(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="TinyCNN"):
        ptq.attach_observers(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="attach_observers"):
        ptq.calibrate(TinyCNN(), "calib")
    with pytest.raises(ValueError, match="ObservedModel"):
        ptq.convert(ptq.fold_bn(model))
    with pytest.raises(ValueError, match="no batches"):
        ptq.calibrate(ptq.attach_observers(ptq.fold_bn(model)), [])
    with pytest.raises(ValueError, match="N×C×H×W"):
        ptq.attach_observers(ptq.fold_bn(model))(torch.zeros(3, 784))
    with pytest.raises(ValueError, match="split"):
        ptq.evaluate(ptq.convert(calibrated), 42)
    with pytest.raises(ValueError, match="equal lengths"):
        ptq.evaluate(ptq.convert(calibrated), (torch.zeros(3, 1, 28, 28), torch.zeros(2, dtype=torch.int64)))
    with pytest.raises(ValueError, match="empty"):
        ptq.evaluate(ptq.convert(calibrated), (torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(ValueError, match="one shape"):
        ptq.compare_logits(torch.zeros(4, 10), torch.zeros(4, 9), 0.1)
    with pytest.raises(ValueError, match="step"):
        ptq.compare_logits(torch.zeros(4, 10), torch.zeros(4, 10), 0.0)
    with pytest.raises(ValueError, match="int8"):
        ptq.forward_int8(ptq.convert(calibrated), np.zeros((2, 1, 28, 28), np.int16))
