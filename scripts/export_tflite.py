"""Convert the shipped TinyCNN checkpoint to LiteRT (.tflite) files in data/.

    make tflite            # creates .venv-litert (the converter's own venv), then runs this

Writes ``data/tinycnn_float.tflite`` (float32) and ``data/tinycnn_int8.tflite``: int8 in,
int8 out, int8 per-channel symmetric weights, int8 per-tensor activations, int32 biases,
calibrated on the course's calibration split (500 images). With ``--mobilenet`` it also
writes the MobileNetV2 pair.

The converter is ``litert-torch`` 0.10.0, the only release that accepts torch 2.14.1. It
cannot live in the course's pinned environment (its dependency ``xdsl`` pins
typing-extensions < 4.13, which jupyter-client rejects), so it runs from ``.venv-litert``,
a venv that sees ``.venv``'s packages through a ``.pth`` file and adds litert-torch (and
its ~0.9 GB of jax, jaxlib and litert-converter) on top. The lessons only need the
runtime, ``ai-edge-litert``, which is in the pinned set.

The int8 steps are the PT2E flow of lesson 05, with LiteRT's quantizer:

1. ``torch.export`` the float model (dynamic batch, so calibration runs in batches);
2. ``prepare_pt2e`` with ``PT2EQuantizer`` + ``get_symmetric_quantization_config(
   is_per_channel=True)``: symmetric int8 weights per output channel, int8 activations
   per tensor with a histogram observer;
3. one forward pass per calibration batch, then ``convert_pt2e`` (explicit
   quantize/dequantize ops);
4. ``litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...))`` folds each
   dequantize → op → quantize pattern into one TFLite integer operator. The graph's first
   quantize and last dequantize become the model's interface: the ``.tflite`` takes and
   returns int8 codes, with the input's and the output's scale and zero point stored on
   its input and output tensors (a microcontroller has no float input to quantize).

Every step is deterministic: running the script again writes the same bytes (it checks
this with ``--check``, which converts again and compares with the files in data/).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # course_lib from this checkout (the converter venv has no editable install)

import course_lib  # noqa: E402
import course_lib.data  # noqa: E402
import course_lib.models  # noqa: E402

MODELS = {"tinycnn": False, "mobilenetv2": True}  # name → rgb32 input (3×32×32)
Q = torch.ops.quantized_decomposed


def quantize_pt2e_litert(model: torch.nn.Module, calib: torch.Tensor, batch_size: int = 100):
    """Steps 1–3: PT2E static int8 with LiteRT's quantizer. Returns (converted graph, quantizer)."""
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from torch.export import Dim, export
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = export(model.eval(), (calib[:2],), dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}}).module()
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in calib.split(batch_size):
            prepared(batch)
    converted = convert_pt2e(prepared, fold_quantize=False)
    move_exported_model_to_eval(converted)
    # An exported module refuses .eval(); move_exported_model_to_eval has already swapped its
    # train-mode ops, so only the flag the converter warns about is left to set.
    converted.training = False
    return converted, quantizer


def convert(name: str, out_dir: Path) -> dict[str, Path]:
    """Write <name>_float.tflite and <name>_int8.tflite into out_dir."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    rgb32 = MODELS[name]
    model = course_lib.models.load_pretrained(name).eval()
    calib, _ = course_lib.data.get_split("calib", rgb32=rgb32)
    example = (calib[:1].clone(),)
    paths = {"float": out_dir / f"{name}_float.tflite", "int8": out_dir / f"{name}_int8.tflite"}

    litert_torch.convert(model, example).export(str(paths["float"]))

    converted, quantizer = quantize_pt2e_litert(model, calib)
    edge = litert_torch.convert(converted, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    edge.export(str(paths["int8"]))
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mobilenet", action="store_true", help="also convert MobileNetV2")
    parser.add_argument("--out", type=Path, default=course_lib.DATA_DIR, help="output folder (default: data/)")
    parser.add_argument("--check", action="store_true",
                        help="convert into a temporary folder and compare with the files in --out")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("absl").setLevel(logging.ERROR)
    torch.manual_seed(0)
    names = ["tinycnn"] + (["mobilenetv2"] if args.mobilenet else [])
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) if args.check else args.out
        target.mkdir(parents=True, exist_ok=True)
        status = 0
        for name in names:
            for path in convert(name, target).values():
                line = f"{path.name}: {path.stat().st_size:,d} bytes, sha256 {sha256(path)[:16]}"
                if args.check:
                    shipped = args.out / path.name
                    same = shipped.exists() and shipped.read_bytes() == path.read_bytes()
                    status |= not same
                    line += " — " + ("identical to the shipped file" if same else f"DIFFERS from {shipped}")
                print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
