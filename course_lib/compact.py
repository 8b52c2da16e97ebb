"""Structured pruning made real: rebuild TinyCNN with fewer channels (lessons 07 and 08).

Lesson 07's channel masks (:func:`course_lib.compress.pruning_masks` with
``method="channel"``) zero whole output channels of ``conv2`` but leave every tensor at
its full shape: a runtime still stores and multiplies the zeros. :func:`compact_tinycnn`
builds the network those masks describe: an ordinary dense TinyCNN whose ``conv2`` has
only the kept channels, whose ``fc`` reads only their features, with BatchNorm folded.
It computes exactly what the masked model computes, so any runtime realizes the gain.

A removed channel is not simply forgotten. With its weights zero, its convolution
outputs its bias ``b_c`` at every position, BatchNorm maps that to a constant, ReLU and
max-pooling keep it constant: ``k_c = ReLU(BN(b_c))`` everywhere. The ``fc`` weights
that read the channel therefore add ``Σ_positions w · k_c`` to every logit, a constant
that moves into the ``fc`` bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from course_lib.granularity import fold_batchnorms
from course_lib.models import TinyCNN

__all__ = ["compact_tinycnn", "kept_channels"]


def kept_channels(mask: Tensor) -> Tensor:
    """The bool vector of kept output channels of a channel mask (dim 0 = output channel).

    Raises ``ValueError`` if some channel is only partly masked: that mask is
    unstructured, and no smaller dense layer computes what it does.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim < 2:
        raise ValueError("mask must be a bool tensor with the output channel as dim 0 (≥ 2 dims)")
    rows = mask.reshape(mask.shape[0], -1)
    keep, drop = rows.all(dim=1), ~rows.any(dim=1)
    partial = (~(keep | drop)).nonzero().flatten().tolist()
    if partial:
        raise ValueError(f"channels {partial} of {mask.shape[0]} are only partly masked: not a channel mask")
    return keep


def compact_tinycnn(model: nn.Module, keep: Tensor) -> nn.Module:
    """A folded TinyCNN with only the ``conv2`` output channels in ``keep`` (bool, one per channel).

    ``model`` is a TinyCNN, with or without its BatchNorms folded, whose pruned ``conv2``
    channels have zero weights (e.g. after :func:`course_lib.compress.apply_masks`). The
    result, in eval mode, computes the same logits: kept channels are copied, and each
    removed channel's constant output (module docstring) goes into the ``fc`` bias.
    Raises ``ValueError`` if a removed channel still has non-zero weights, if ``keep``
    has the wrong length, or if it keeps no channel.
    """
    if not isinstance(model, TinyCNN):
        raise ValueError(f"compact_tinycnn takes a course_lib.models.TinyCNN, got {type(model).__name__}")
    folded = fold_batchnorms(model)  # a copy; BatchNorm (if any) inside conv2's weights and bias
    c2 = folded.conv2.out_channels
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool or keep.shape != (c2,):
        raise ValueError(f"keep must be a bool vector of {c2} conv2 channels, got {keep.dtype} {tuple(keep.shape)}")
    if not keep.any():
        raise ValueError("keep selects no conv2 channel: nothing would reach the classifier")
    live = folded.conv2.weight.detach()[~keep].reshape(int((~keep).sum()), -1).abs().amax(dim=1)
    if (live > 0).any():
        removed = (~keep).nonzero().flatten()[live > 0].tolist()
        raise ValueError(f"conv2 channels {removed} are to be removed but have non-zero weights: "
                         "apply the channel mask first")
    positions = folded.fc.in_features // c2
    small = fold_batchnorms(TinyCNN(in_channels=folded.conv1.in_channels, num_classes=folded.fc.out_features,
                                    image_size=4 * round(positions**0.5),
                                    channels=(folded.conv1.out_channels, int(keep.sum())))).eval()
    w_fc = folded.fc.weight.detach().reshape(folded.fc.out_features, c2, positions)  # (classes, channel, position)
    const = torch.relu(folded.conv2.bias.detach()[~keep])  # what a removed channel outputs everywhere
    with torch.no_grad():
        small.conv1.weight.copy_(folded.conv1.weight)
        small.conv1.bias.copy_(folded.conv1.bias)
        small.conv2.weight.copy_(folded.conv2.weight[keep])
        small.conv2.bias.copy_(folded.conv2.bias[keep])
        small.fc.weight.copy_(w_fc[:, keep].reshape(folded.fc.out_features, -1))
        small.fc.bias.copy_(folded.fc.bias + (w_fc[:, ~keep] * const[None, :, None]).sum(dim=(1, 2)))
    for p in small.parameters():
        p.requires_grad_(True)  # an ordinary model: fine-tune it like any other
    return small
