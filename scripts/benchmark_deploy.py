"""Re-measure lesson 08's deployment table on this machine (`make bench`).

For each model: export float32 and INT8 versions to ExecuTorch (.pte, XNNPACK) and
ONNX Runtime (QDQ), then print one table: file size, accuracy in the runtime beside
PyTorch, top-1 agreement with the float model, and median / p90 latency at batch 1
for the model alone and end to end (PNG decode, resize, normalise, model, argmax).
Then the parameter bytes behind the file sizes and a Raspberry-Pi-4-class budget
from MAC counts. All the logic lives in course_lib/deploy.py, shared with the lesson.

    .venv/bin/python scripts/benchmark_deploy.py --models tinycnn --repeats 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from course_lib import deploy, filter_quantization_warnings, models  # noqa: E402

# MobileNetV2-1.0 at 224×224 (torchvision's architecture): the network the popular
# "about 500 ms for INT8 MobileNetV2 on a Raspberry Pi 4" claim is about.
CLAIM_MS = 500.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(deploy.MODEL_INPUTS),
                        default=list(deploy.MODEL_INPUTS), help="models to export and measure")
    parser.add_argument("--runtimes", nargs="+", choices=list(deploy.RUNTIMES), default=list(deploy.RUNTIMES))
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per latency (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default 10)")
    parser.add_argument("--threads", type=int, default=deploy.THREADS, help="threads per runtime (default 2)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate accuracy on the first N test images (default: all 1,000)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="keep the exported files here (default: a temporary directory)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.eval_limit is not None and args.eval_limit < 1:
        parser.error("--eval-limit must be >= 1")
    return args


def print_cpu() -> None:
    flags = deploy.cpu_flags()
    print(f"CPU: {deploy.cpu_model_name()}, {os.cpu_count()} logical cores")
    print("INT8-relevant flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()))
    if flags["avx2"] and not (flags["avx512_vnni"] or flags["avx_vnni"]):
        print("  AVX2 without VNNI: int8 dot products take vpmaddubsw + vpmaddwd (+ add), "
              "no fused int8 instruction, so INT8 need not beat FP32 here.")


def print_sizes(name: str, rows: list[deploy.DeployRow]) -> None:
    model = models.load_pretrained(name)
    scheme = {("executorch", "fp32"): "fp32", ("onnxruntime", "fp32"): "fp32",
              ("executorch", "int8"): "xnnpack-int8", ("onnxruntime", "int8"): "onnx-qdq-int8"}
    print("\nWhere the bytes go (parameters after BN folding vs the file):")
    for r in rows:
        if r.runtime == "pytorch":
            continue
        params = deploy.model_param_bytes(model, scheme[r.runtime, r.precision])
        print(f"  {r.runtime:11s} {r.precision}: file {r.file_bytes:10,d} B = parameters {params.total:10,d} B "
              f"(weights {params.weights:,d}, scales {params.scales:,d}, zero points {params.zero_points:,d}, "
              f"biases {params.biases:,d}) + graph/format {r.file_bytes - params.total:8,d} B")


def print_budget(names: list[str]) -> None:
    from torchvision.models import mobilenet_v2

    print("\nBudget sheet (MACs per image from course_lib.models.count_macs):")
    entries = []
    for name in names:
        chw, _ = deploy.MODEL_INPUTS[name]
        model = models.load_pretrained(name)
        entries.append((deploy.DISPLAY_NAMES[name], models.count_macs(model, (1, *chw)), model))
    ref = mobilenet_v2(weights=None).eval()
    entries.append(("MobileNetV2-1.0 224", models.count_macs(ref, (1, 3, 224, 224)), ref))
    print(f"  {'model':20s} {'MACs':>13s} {'fp32 param B':>13s} {'int8 param B':>13s}")
    for label, macs, model in entries:
        fp32 = deploy.model_param_bytes(model, "fp32").total
        int8 = deploy.model_param_bytes(model, "xnnpack-int8").total
        print(f"  {label:20s} {macs:13,d} {fp32:13,d} {int8:13,d}")
    print("\nRaspberry-Pi-4-class estimate (4× Cortex-A72 @ 1.5 GHz, NEON 128-bit; assumptions, not measurements):")
    header = f"  {'scenario':30s} {'MAC/cycle':>9s} {'eff.':>5s} {'GMAC/s':>7s}"
    print(header + "".join(f" {label[:20]:>20s}" for label, _, _ in entries))
    for dev in deploy.PI4_SCENARIOS:
        line = f"  {dev.label:30s} {dev.macs_per_cycle:9.0f} {dev.efficiency:5.2f} {dev.macs_per_second / 1e9:7.2f}"
        line += "".join(f" {deploy.estimate_latency_ms(macs, dev):17.2f} ms" for _, macs, _ in entries)
        print(line)
    print(f"  popular claim for INT8 MobileNetV2-1.0 224 on a Pi 4: about {CLAIM_MS:.0f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    filter_quantization_warnings()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print_cpu()
    print(f"threads {args.threads}, batch 1, {args.warmup} warm-up + {args.repeats} timed calls per latency")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or Path(tmp)
        for name in args.models:
            rows = deploy.benchmark_model(
                name, out_dir / name, runtimes=args.runtimes, repeats=args.repeats, warmup=args.warmup,
                threads=args.threads, eval_limit=args.eval_limit, progress=not args.no_progress,
            )
            print(f"\n{deploy.DISPLAY_NAMES[name]} (accuracy on {rows[0].eval_images} test images; "
                  "'PyTorch': the same model in PyTorch, '-' where there is no PyTorch twin)")
            print(deploy.format_table(rows))
            print_sizes(name, rows)
    print_budget(args.models)
    print(f"\nbenchmark ran in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
