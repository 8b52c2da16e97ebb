"""Tests of course_lib.sizes: one home for the byte counts of lessons 03, 07 and 08."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from course_lib import compress, deploy, granularity, models, sizes


def test_old_names_are_the_sizes_functions() -> None:
    # lessons 03 and 07 call these through their own modules; they must be the same code
    assert compress.model_bytes is sizes.model_bytes
    assert compress.weight_bytes is sizes.weight_bytes
    assert compress.written_size is sizes.written_size
    assert compress.FLOAT_BITS == sizes.FLOAT_BITS == 32
    assert granularity.payload_bytes is sizes.payload_bytes
    assert granularity.saved_size is sizes.saved_size
    assert models.model_size_bytes is sizes.model_size_bytes
    assert deploy.model_param_bytes is sizes.model_param_bytes


def test_model_bytes_counts_codes_scales_and_float_rest() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(7, 2, bias=False))
    # conv: 135 weights at 4 bits = 68 bytes (67.5 rounded up) + 5 float32 scales; linear: 14 float32 weights
    # other float tensors: conv bias 5, BN weight/bias/mean/var 4·5 → 25 values · 4 bytes
    want = math.ceil(135 * 4 / 8) + 5 * 4 + 14 * 4 + 25 * 4
    assert sizes.model_bytes(model, {"0": 4}) == want
    with pytest.raises(ValueError, match="no Conv2d/Linear layer named"):
        sizes.model_bytes(model, {"conv": 4})
    with pytest.raises(ValueError, match="bits"):
        sizes.weight_bytes(model[0], 0)


def test_state_dict_and_file_sizes(tmp_path) -> None:
    model = nn.Linear(3, 4)
    assert sizes.model_size_bytes(model) == (12 + 4) * 4
    state = {"w": torch.zeros(10, dtype=torch.int8), "s": torch.ones(2), "note": "not a tensor"}
    assert sizes.payload_bytes(state) == 10 + 8
    assert sizes.written_size(b"x" * 1234, tmp_path) == 1234
    assert sizes.saved_size(state, tmp_path / "s.pt") > sizes.payload_bytes(state)  # torch.save adds a format


def test_layer_param_bytes_parts() -> None:
    p = sizes.layer_param_bytes((32, 16, 3, 3), 8, zero_point_bytes=1, bias_bytes=12)
    assert (p.weights, p.scales, p.zero_points, p.biases) == (4608, 128, 32, 384)
    assert sizes.layer_param_bytes((10, 7), 32).total == 70 * 4 + 10 * 4  # float: no scales
