"""Train the course's float checkpoints and write their metrics (``make checkpoints``).

For each model: seed, build, train on the 3,500-image train split with
``course_lib.training.fit`` (AdamW, one-cycle learning rate, light affine
augmentation), save the float32 state dict to ``<out-dir>/<name>.pt``, load it back
with ``course_lib.models.load_pretrained`` and measure it; the figures go to
``<out-dir>/checkpoints.json`` (other models' entries in that file are kept).

Deterministic: ``torch.manual_seed(seed)`` before building each model, seeded
generators for shuffling and augmentation, ``torch.use_deterministic_algorithms(True)``
and a fixed thread count. The same command on the same machine and software gives the
same weights; another CPU or library build may differ in the last bits.

Usage (from the repository root)::

    .venv/bin/python scripts/train_checkpoints.py                   # both models into data/
    .venv/bin/python scripts/train_checkpoints.py --only tinycnn
    .venv/bin/python scripts/train_checkpoints.py --only tinycnn --epochs 1 --limit 256 --out-dir /tmp/ck
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

from course_lib import DATA_DIR
from course_lib.models import (
    MODEL_NAMES,
    TinyCNN,
    count_macs,
    count_params,
    load_pretrained,
    mobilenet_v2_small,
    model_size_bytes,
)
from course_lib.training import evaluate, fit

SEED = 0
THREADS = 2
# One recipe per model: what fit() gets, and the input the model expects.
RECIPES = {
    "tinycnn": {
        "build": TinyCNN,
        "rgb32": False,
        "input_shape": (1, 1, 28, 28),
        "epochs": 15,
        "lr": 1e-2,
        "batch_size": 128,
        "weight_decay": 1e-4,
    },
    "mobilenetv2": {
        "build": mobilenet_v2_small,
        "rgb32": True,
        "input_shape": (1, 3, 32, 32),
        "epochs": 10,
        "lr": 5e-3,
        "batch_size": 128,
        "weight_decay": 1e-4,
    },
}


def train_one(name: str, out_dir: Path, *, seed: int, epochs: int | None, limit: int | None,
              progress: bool) -> dict:
    """Train model ``name``, save ``<out_dir>/<name>.pt``, return its metrics entry."""
    recipe = RECIPES[name]
    epochs = recipe["epochs"] if epochs is None else epochs
    torch.manual_seed(seed)
    model = recipe["build"]()
    print(f"== {name}: {count_params(model):,} parameters, {epochs} epochs, seed {seed}")
    start = time.perf_counter()
    history = fit(
        model, epochs=epochs, lr=recipe["lr"], rgb32=recipe["rgb32"], seed=seed,
        batch_size=recipe["batch_size"], weight_decay=recipe["weight_decay"], limit=limit,
        progress=progress,
    )
    train_seconds = time.perf_counter() - start

    path = out_dir / f"{name}.pt"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, path)

    # Measure the model exactly as the lessons will get it: loaded back from the file.
    loaded = load_pretrained(name, path=path)
    rgb32 = recipe["rgb32"]
    return {
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "test_accuracy": evaluate(loaded, "test", rgb32=rgb32),
        "calib_accuracy": evaluate(loaded, "calib", rgb32=rgb32),
        "train_accuracy": evaluate(loaded, "train", rgb32=rgb32),
        "params": count_params(loaded),
        "macs": count_macs(loaded, recipe["input_shape"]),
        "state_dict_bytes": model_size_bytes(loaded),
        "size_bytes": path.stat().st_size,
        "input_shape": list(recipe["input_shape"]),
        "rgb32": rgb32,
        "epochs": epochs,
        "lr": recipe["lr"],
        "batch_size": recipe["batch_size"],
        "weight_decay": recipe["weight_decay"],
        "train_images": limit if limit is not None else 3500,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "history": [
            {"epoch": h["epoch"], "loss": round(h["loss"], 5), "calib_accuracy": h["calib_accuracy"]}
            for h in history
        ],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=MODEL_NAMES, help="train one model (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="default: data/")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke tests)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    names = [args.only] if args.only else list(MODEL_NAMES)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out_dir / "checkpoints.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}

    # Determinism settings are process-wide: set them for the run, restore them after
    # (a test may call main() inside its own process).
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        for name in names:
            entry = train_one(name, args.out_dir, seed=args.seed, epochs=args.epochs,
                              limit=args.limit, progress=not args.no_progress)
            metrics[name] = entry
            print(
                f"{name}: test accuracy {entry['test_accuracy']:.4f}, calib {entry['calib_accuracy']:.4f}, "
                f"{entry['params']:,} params, {entry['macs']:,} MACs, {entry['size_bytes']:,} bytes, "
                f"{entry['train_seconds']:.0f} s"
            )
            # Written after every model, so an interrupted run keeps what it finished.
            metrics_path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
    print(f"wrote {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
