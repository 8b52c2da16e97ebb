"""The course's two float models, their shipped checkpoints, and cost counters.

- :class:`TinyCNN`: two 3×3 conv → BatchNorm → ReLU → 2×2 max-pool stages and a linear
  classifier, for 1×28×28 MNIST. Every layer is a named attribute, so lessons can fold
  BatchNorm or fuse ``["conv1", "bn1", "relu1"]``.
- :func:`mobilenet_v2_small`: torchvision's quantizable MobileNetV2 at width 0.5,
  adapted to 3×32×32 inputs the way CIFAR models usually are (stride 1 in the second
  stage), so the last feature map is 2×2 instead of 1×1.

Checkpoints (``data/tinycnn.pt``, ``data/mobilenetv2.pt``) are float32 state dicts
written by ``scripts/train_checkpoints.py``; ``data/checkpoints.json`` holds their metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from course_lib import DATA_DIR
from course_lib.sizes import model_size_bytes  # byte counts live in course_lib.sizes

__all__ = [
    "MODEL_NAMES",
    "TinyCNN",
    "checkpoint_path",
    "count_macs",
    "count_params",
    "load_pretrained",
    "load_state_dict_strict",
    "mobilenet_v2_small",
    "model_size_bytes",
]


class TinyCNN(nn.Module):
    """conv1 → bn1 → relu1 → pool1 → conv2 → bn2 → relu2 → pool2 → flatten → fc.

    Convolutions are 3×3 with padding 1 (spatial size kept), pools halve the size,
    so the classifier sees ``channels[1] × (image_size // 4)²`` features.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
    ) -> None:
        super().__init__()
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"channels must be two positive integers, got {tuple(channels)}")
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {image_size}")
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2 * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc(self.flatten(x))


# MobileNetV2's stages as (expansion t, channels c, repeats n, first stride s): the
# paper's table with the second stage's stride set to 1, as CIFAR versions of the
# network do, so a 32×32 input is downsampled 16× instead of 32×:
# 32 → stem 16 → 16 → 16 → 8 → 4 → 4 → 2 → 2, a 2×2 last feature map instead of 1×1.
# (A stride-1 stem as well would give 4×4 maps but 4× the MACs, 28.0 M instead of
# 7.0 M, and a 1,000-image evaluation ~20× slower on a 2-core CPU.)
CIFAR_INVERTED_RESIDUAL_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def mobilenet_v2_small(num_classes: int = 10, width_mult: float = 0.5) -> nn.Module:
    """torchvision's ``QuantizableMobileNetV2`` for 3×32×32 inputs (random init, float).

    Built by ``torchvision.models.quantization.mobilenet_v2(weights=None, quantize=False)``
    with :data:`CIFAR_INVERTED_RESIDUAL_SETTING`: QuantStub/DeQuantStub around the
    network, ReLU instead of ReLU6 (torchvision's choice for its quantizable models, so
    conv-BN-ReLU triples fuse), ``fuse_model(is_qat)`` and a ``FloatFunctional``
    residual add. Width 0.5 rounds channels to multiples of 8 (stem 16, last conv 1280).
    """
    from torchvision.models.quantization import mobilenet_v2

    return mobilenet_v2(
        weights=None,
        quantize=False,
        num_classes=num_classes,
        width_mult=width_mult,
        inverted_residual_setting=CIFAR_INVERTED_RESIDUAL_SETTING,
    )


_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "tinycnn": TinyCNN,
    "mobilenetv2": mobilenet_v2_small,
}
MODEL_NAMES = tuple(_BUILDERS)


def checkpoint_path(name: str) -> Path:
    """``data/<name>.pt`` for a model name in :data:`MODEL_NAMES`."""
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    return DATA_DIR / f"{name}.pt"


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into ``model`` after checking keys and shapes.

    Raises RuntimeError naming the missing keys, the unexpected keys and the keys whose
    shapes differ (model shape vs checkpoint shape) when the two do not match exactly.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: model {tuple(expected[k].shape)} vs checkpoint {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mismatched:
            problems.append(f"mismatched shapes [{'; '.join(mismatched)}]")
        raise RuntimeError(
            f"checkpoint {source} does not match {type(model).__name__}: " + ", ".join(problems)
        )
    model.load_state_dict(state)
    return model


def load_pretrained(name: str, *, path: str | Path | None = None) -> nn.Module:
    """The trained float model ``name`` ("tinycnn" or "mobilenetv2") in eval mode.

    Reads ``data/<name>.pt`` (or ``path``) with ``torch.load(weights_only=True)``.
    Raises ValueError for an unknown name, FileNotFoundError when the file is absent and
    RuntimeError (see :func:`load_state_dict_strict`) when it does not fit the architecture.
    """
    default_path = checkpoint_path(name)  # raises ValueError for an unknown name
    ckpt = Path(path) if path is not None else default_path
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} is missing; rebuild it with `make checkpoints`")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    # Building draws random initial weights; fork the RNG so that loading a checkpoint
    # leaves the caller's random stream (and so the rest of a seeded lesson) unchanged.
    with torch.random.fork_rng(devices=[]):
        model = _BUILDERS[name]()
    return load_state_dict_strict(model, state, source=ckpt.name).eval()


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not); buffers such as BN statistics are not counted."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass per example, over Conv2d and Linear layers.

    Conv2d: out_h · out_w · out_c · (in_c / groups) · k_h · k_w;
    Linear: out_features · in_features (per row of its input).
    Other layers (BN, pooling, activations, additions) are not counted: they are a
    small share of the work and are not multiply-accumulates.

    ``input_shape`` is the full input shape including the batch, e.g. (1, 1, 28, 28);
    a 3-tuple (C, H, W) is read as one image. The count is divided by the batch size.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"input_shape must be (N, C, H, W), (C, H, W) or (N, F), got {tuple(input_shape)}")

    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output: torch.Tensor) -> None:
        nonlocal total
        k_h, k_w = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * k_h * k_w

    def linear_hook(module: nn.Linear, inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total // shape[0]
