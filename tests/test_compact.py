"""Tests of course_lib.compact: the compact TinyCNN computes what the channel-masked one does."""

from __future__ import annotations

import pytest
import torch

from course_lib import compress, granularity, models
from course_lib.compact import compact_tinycnn, kept_channels


def _random_tinycnn(seed: int, channels=(6, 10)) -> models.TinyCNN:
    """A TinyCNN with non-trivial BatchNorm statistics, so that folding matters."""
    torch.manual_seed(seed)
    model = models.TinyCNN(channels=channels)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)  # some removed channels output ReLU(bias) > 0, others 0
    return model.eval()


@pytest.mark.parametrize("fold_first", [True, False])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_compact_equals_masked(fold_first: bool, sparsity: float) -> None:
    model = _random_tinycnn(1)
    masked = granularity.fold_batchnorms(model) if fold_first else model
    masks = compress.pruning_masks(masked, sparsity, "channel", skip=("conv1",))
    compress.apply_masks(masked, masks)
    keep = kept_channels(masks["conv2"])
    small = compact_tinycnn(masked, keep)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        want, got = masked(x), small(x)
    assert small.conv2.out_channels == int(keep.sum()) == 10 - round(sparsity * 10)
    assert small.fc.in_features == int(keep.sum()) * 49
    assert not isinstance(small.bn2, torch.nn.BatchNorm2d)  # folded
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the removed channels' constant output went into the fc bias (some ReLU(b_c) > 0 here)
    assert not torch.allclose(small.fc.bias, masked.fc.bias)


def test_compact_pretrained_is_smaller_and_same() -> None:
    model = granularity.fold_batchnorms(models.load_pretrained("tinycnn"))
    masks = compress.pruning_masks(model, 0.5, "channel", skip=("conv1",))
    compress.apply_masks(model, masks)
    small = compact_tinycnn(model, kept_channels(masks["conv2"]))
    assert models.count_macs(small, (1, 1, 28, 28)) < models.count_macs(model, (1, 1, 28, 28))
    assert models.count_params(small) < models.count_params(model)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-4, rtol=1e-5)
    assert all(p.requires_grad for p in small.parameters())


def test_kept_channels_rejects_unstructured_mask() -> None:
    mask = torch.ones(4, 2, 3, 3, dtype=torch.bool)
    mask[1] = False
    assert kept_channels(mask).tolist() == [True, False, True, True]
    mask[2, 0, 0, 0] = False
    with pytest.raises(ValueError, match=r"channels \[2\] of 4 are only partly masked"):
        kept_channels(mask)
    with pytest.raises(ValueError, match="bool"):
        kept_channels(mask.float())


def test_compact_rejects_bad_input() -> None:
    model = _random_tinycnn(2)
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    with pytest.raises(ValueError, match=r"channels \[3\] .* non-zero weights"):
        compact_tinycnn(model, keep)  # the mask was never applied
    with pytest.raises(ValueError, match="bool vector of 10"):
        compact_tinycnn(model, torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="no conv2 channel"):
        with torch.no_grad():
            model.conv2.weight.zero_()
        compact_tinycnn(model, torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="TinyCNN"):
        compact_tinycnn(torch.nn.Linear(2, 2), keep)
