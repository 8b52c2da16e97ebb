"""Tests of course_lib.litert and the shipped .tflite files (lesson 08; lesson 09 uses the int8 one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib import DATA_DIR, data, kernels, litert, models

INT8 = DATA_DIR / "tinycnn_int8.tflite"
FLOAT = DATA_DIR / "tinycnn_float.tflite"


def test_int8_model_interface_is_int8_with_stored_qparams() -> None:
    runner = litert.LiteRTRunner(INT8, kernels_="reference")
    assert runner.int8 and runner.output["dtype"] == np.int8
    assert list(runner.input["shape"]) == [1, 1, 28, 28]  # PyTorch's N×C×H×W
    scale, zero_point = runner.input_qparams
    assert scale > 0 and -128 <= zero_point <= 127
    ops = [op["op_name"] for op in runner.interpreter._get_ops_details()]
    assert ops.count("FULLY_CONNECTED") == 1 and "QUANTIZE" not in ops and "DEQUANTIZE" not in ops


def test_quantize_input_is_tflites_rounding() -> None:
    runner = litert.LiteRTRunner(INT8, kernels_="reference")
    scale, zero_point = runner.input_qparams
    ties = (np.arange(-300, 301, dtype=np.float32) / 2) * np.float32(scale)  # exact halves, and clipping
    x = data.get_split("test")[0][:20].numpy()
    for v in (ties, x):
        np.testing.assert_array_equal(runner.quantize_input(v), kernels.quantize_tflite(v, scale, zero_point))


@pytest.mark.parametrize("path, want", [(FLOAT, 0.98), (INT8, 0.98)])
@pytest.mark.parametrize("kernels_", litert.KERNELS)
def test_accuracy_and_agreement_with_pytorch(path, want: float, kernels_: str) -> None:
    x, y = data.get_split("test")
    x, y = x[:300], y[:300].numpy()
    logits = litert.LiteRTRunner(path, kernels_=kernels_)(x.numpy())
    with torch.no_grad():
        ref = models.load_pretrained("tinycnn")(x).numpy()
    assert (logits.argmax(1) == y).mean() >= want
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.99
    if path == FLOAT:
        np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=1e-3)


def test_convolutions_equal_lesson_04_kernels_bit_for_bit() -> None:
    x = data.get_split("test")[0][:60]
    matches = litert.compare_layers(INT8, x, kernels_="reference")
    assert [m.op_name for m in matches] == ["DEPTHWISE_CONV_2D", "CONV_2D", "FULLY_CONNECTED"]
    conv, dw_outputs = matches[:2], 60 * 16 * 28 * 28
    assert matches[0].outputs == dw_outputs
    for m in conv:
        assert m.differ == 0, m
        assert m.differ_single_rounding > 0, m  # the check can tell the two roundings apart
    assert matches[2].max_abs_diff <= 1


def test_load_interpreter_rejects_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="kernels_"):
        litert.load_interpreter(INT8, kernels_="fast")
    with pytest.raises(ValueError, match="threads"):
        litert.load_interpreter(INT8, threads=0)
    with pytest.raises(ValueError, match="delegate"):
        litert.load_interpreter(INT8, preserve_all_tensors=True)
    with pytest.raises(FileNotFoundError, match="export_tflite"):
        litert.load_interpreter(tmp_path / "missing.tflite")
    with pytest.raises(ValueError, match="N×C×H×W"):
        litert.LiteRTRunner(INT8)(np.zeros((28, 28), np.float32))
