"""Re-measure lesson 08's deployment table on this machine (`make bench`).

For each model: export float32 and INT8 versions to ExecuTorch (.pte, XNNPACK) and
ONNX Runtime (QDQ), take the shipped LiteRT files (data/*.tflite, made by `make tflite`),
then print one table: file size, accuracy in the runtime beside PyTorch, top-1 agreement
with the float model, and median / p90 latency at batch 1 for the model alone and end to
end (PNG decode, resize, normalise, model, argmax). Then, per runtime, float32 against
INT8 timed interleaved at 1 and 2 threads (p50/p90 and a 95 % bootstrap interval of the
median ratio), the memory (ExecuTorch's planned activation bytes; peak resident memory
of a fresh process that loads and runs the model, above the runtime's own baseline),
the parameter bytes behind the file sizes, and a Raspberry-Pi-4-class budget from MAC
counts. The logic lives in course_lib (deploy, timing, litert), shared with the lesson.

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

import numpy as np  # noqa: E402

from course_lib import data, deploy, filter_quantization_warnings, hardware, models, sizes, timing  # noqa: E402

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
    flags = hardware.cpu_flags()
    print(f"CPU: {hardware.cpu_model_name()}, {os.cpu_count()} logical cores")
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
        if (r.runtime, r.precision) not in scheme:
            continue  # PyTorch's checkpoint; LiteRT's flatbuffer has its own layout
        params = sizes.model_param_bytes(model, scheme[r.runtime, r.precision])
        print(f"  {r.runtime:11s} {r.precision}: file {r.file_bytes:10,d} B = parameters {params.total:10,d} B "
              f"(weights {params.weights:,d}, scales {params.scales:,d}, zero points {params.zero_points:,d}, "
              f"biases {params.biases:,d}) + graph/format {r.file_bytes - params.total:8,d} B")


def print_verdicts(name: str, artifacts: list[deploy.Artifact], rounds: int, warmup: int) -> None:
    """float32 vs INT8 of each runtime, interleaved, model only, at 1 and 2 threads."""
    chw, rgb32 = deploy.MODEL_INPUTS[name]
    x1 = np.ascontiguousarray(data.get_split("test", rgb32=rgb32)[0][:1].numpy())
    by = {(a.runtime, a.precision): a for a in artifacts}
    print(f"\nfloat32 vs INT8, model only, batch 1, {rounds} interleaved rounds after {warmup} warm-up calls "
          "(ratio = median fp32 / median int8, 95 % bootstrap interval):")
    for threads in (1, 2):
        for runtime in deploy.RUNTIMES:
            if (runtime, "fp32") not in by or (runtime, "int8") not in by:
                continue
            f = deploy.load_runner(by[runtime, "fp32"], threads=threads)
            q = deploy.load_runner(by[runtime, "int8"], threads=threads)
            s = timing.interleaved_latency({"fp32": lambda r=f: r(x1), "int8": lambda r=q: r(x1)},
                                           warmup=warmup, rounds=rounds)
            cells = "  ".join(f"{p} p50/p90 {np.median(v):.3f}/{np.percentile(v, 90):.3f} ms" for p, v in s.items())
            print(f"  {threads} thread(s) {runtime:11s} {cells}  → "
                  f"{timing.speed_verdict(timing.ratio_interval(s['fp32'], s['int8']))}")


def print_memory(name: str, artifacts: list[deploy.Artifact]) -> None:
    """Planned activation memory (ExecuTorch) and peak RSS of a process that loads and runs the model."""
    chw, _ = deploy.MODEL_INPUTS[name]
    print("\nMemory (peak resident set of a fresh process: Python + the runtime alone, then + the model run 20×):")
    baselines: dict[str, int] = {}
    for art in artifacts:
        if art.runtime not in baselines:
            baselines[art.runtime] = deploy.peak_rss_bytes(art.runtime, None, chw)
            print(f"  {art.runtime:11s} baseline: {baselines[art.runtime] / 2**20:7.1f} MiB")
        rss = deploy.peak_rss_bytes(art.runtime, art.path, chw)
        planned = f", planned activations {art.planned_bytes:,d} B" if art.planned_bytes is not None else ""
        print(f"  {art.runtime:11s} {art.precision}: file {art.file_bytes:10,d} B, peak RSS {rss / 2**20:7.1f} MiB "
              f"(+{(rss - baselines[art.runtime]) / 2**20:6.1f} MiB over the baseline){planned}")


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
        fp32 = sizes.model_param_bytes(model, "fp32").total
        int8 = sizes.model_param_bytes(model, "xnnpack-int8").total
        print(f"  {label:20s} {macs:13,d} {fp32:13,d} {int8:13,d}")
    print("\nRaspberry-Pi-4-class estimate (4× Cortex-A72 @ 1.5 GHz, NEON 128-bit; assumptions, not measurements):")
    header = f"  {'scenario':30s} {'MAC/cycle':>9s} {'eff.':>5s} {'GMAC/s':>7s}"
    print(header + "".join(f" {label[:20]:>20s}" for label, _, _ in entries))
    for dev in hardware.PI4_SCENARIOS:
        line = f"  {dev.label:30s} {dev.macs_per_cycle:9.0f} {dev.efficiency:5.2f} {dev.macs_per_second / 1e9:7.2f}"
        line += "".join(f" {hardware.estimate_latency_ms(macs, dev):17.2f} ms" for _, macs, _ in entries)
        print(line)
    print(f"  popular claim for INT8 MobileNetV2-1.0 224 on a Pi 4: about {CLAIM_MS:.0f} ms, which lesson 08 "
          "compares with a measured naive (reference-kernel) rate and published Pi measurements")


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
            model = models.load_pretrained(name)
            artifacts = deploy.build_artifacts(name, out_dir / name, model=model, runtimes=args.runtimes,
                                               progress=not args.no_progress)
            rows = deploy.measure_artifacts(name, artifacts, model=model, repeats=args.repeats, warmup=args.warmup,
                                            threads=args.threads, eval_limit=args.eval_limit,
                                            progress=not args.no_progress)
            print(f"\n{deploy.DISPLAY_NAMES[name]} (accuracy on {rows[0].eval_images} test images; "
                  "'PyTorch': the same model in PyTorch, '-' where there is no PyTorch twin; "
                  "LiteRT's files are shipped, so no export time)")
            print(deploy.format_table(rows))
            print_verdicts(name, artifacts, rounds=4 * args.repeats, warmup=args.warmup)
            print_memory(name, artifacts)
            print_sizes(name, rows)
    print_budget(args.models)
    print(f"\nbenchmark ran in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
