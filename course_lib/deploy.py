"""Run the exported models and measure them: runners, latency, the deployment table (lesson 08).

Lesson 08's other concerns each have their own module: exporting and quantizing per
runtime in :mod:`course_lib.export`, byte accounting in :mod:`course_lib.sizes`, the CPU's
int8 instructions and the Raspberry Pi budget in :mod:`course_lib.hardware`, interleaved
timing with an interval in :mod:`course_lib.timing`, LiteRT in :mod:`course_lib.litert`.
Their names are also reachable here (``D.export_onnx``, ``D.model_param_bytes``, ...), so
``D = cl.deploy`` and ``make bench`` keep one namespace.

This module:

- :func:`load_runner` / :func:`runner_logits`: one callable per artifact (ONNX Runtime
  session, ExecuTorch method, LiteRT interpreter) or PyTorch model, numpy in, logits out.
- :func:`measure_latency` / :func:`percentile`: warm-up, then ``repeats`` timed calls;
  median and p90 in milliseconds (linear interpolation between order statistics).
- :func:`encode_png` / :func:`preprocess_png`: the end-to-end pipeline (decode, resize,
  normalise) that a device runs on a raw image before the model.
- :func:`peak_rss_bytes`: the peak resident memory of a process that loads and runs a model.
- :func:`benchmark_model` and :func:`format_table`: the whole measured table, shared by
  lesson 08 and ``scripts/benchmark_deploy.py`` (``make bench``).
"""

from __future__ import annotations

import io
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from course_lib import data, models, thread_cap, use_threads
from course_lib.export import (  # noqa: F401  (re-exported: D.<name> as before the split)
    EXPORT_LOCK,
    INPUT_NAME,
    MODEL_INPUTS,
    OUTPUT_NAME,
    PRECISIONS,
    RUNTIMES,
    Artifact,
    CalibrationReader,
    build_artifacts,
    export_executorch,
    export_onnx,
    quantize_onnx,
    quantize_pt2e_xnnpack,
    shipped_tflite,
    strip_onnx_metadata,
)
from course_lib.hardware import (  # noqa: F401
    INT8_CPU_FLAGS,
    PI4_SCENARIOS,
    DeviceAssumptions,
    cpu_flags,
    cpu_model_name,
    estimate_latency_ms,
)
from course_lib.sizes import (  # noqa: F401
    SCHEMES,
    ParamBytes,
    layer_param_bytes,
    model_param_bytes,
    onnx_initializer_bytes,
)

__all__ = [
    "INT8_CPU_FLAGS",
    "MODEL_INPUTS",
    "PI4_SCENARIOS",
    "PRECISIONS",
    "RUNTIMES",
    "SCHEMES",
    "Artifact",
    "EXPORT_LOCK",
    "CalibrationReader",
    "DeployRow",
    "DeviceAssumptions",
    "LatencyStats",
    "ParamBytes",
    "benchmark_model",
    "build_artifacts",
    "cpu_flags",
    "cpu_model_name",
    "encode_png",
    "estimate_latency_ms",
    "export_executorch",
    "export_onnx",
    "format_table",
    "layer_param_bytes",
    "load_runner",
    "measure_artifacts",
    "measure_latency",
    "model_param_bytes",
    "onnx_initializer_bytes",
    "peak_rss_bytes",
    "percentile",
    "preprocess_png",
    "quantize_onnx",
    "quantize_pt2e_xnnpack",
    "runner_logits",
    "shipped_tflite",
    "strip_onnx_metadata",
]

THREADS = 2  # the course machine has 2 cores
DISPLAY_NAMES = {"tinycnn": "TinyCNN", "mobilenetv2": "MobileNetV2"}


# --------------------------------------------------------------------------- latency
def percentile(samples: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) by linear interpolation between order statistics.

    With the samples sorted ascending as x[0] ≤ … ≤ x[n-1], h = (n - 1)·q/100 and
    k = floor(h):  P_q = x[k] + (h - k)·(x[k+1] - x[k])   (x[k] when k = n - 1).
    This is numpy's default ("linear") method; q = 50 is the median. Float64 result.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64).reshape(-1))
    if x.size == 0:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if np.isnan(x).any():
        raise ValueError("the samples contain NaN")
    h = (x.size - 1) * q / 100.0
    k = math.floor(h)
    if k >= x.size - 1:
        return float(x[-1])
    return float(x[k] + (h - k) * (x[k + 1] - x[k]))


@dataclass(frozen=True)
class LatencyStats:
    """Timed calls in milliseconds (warm-up calls excluded) and their summary."""

    samples_ms: tuple[float, ...]
    warmup: int

    @property
    def median_ms(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p90_ms(self) -> float:
        return percentile(self.samples_ms, 90)

    @property
    def repeats(self) -> int:
        return len(self.samples_ms)


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 10,
    repeats: int = 50,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed one by one.

    Sample i = (clock() after call i - clock() before call i) · 1000, in ms. Warm-up
    calls are excluded because first calls pay one-off costs (memory allocation, weight
    packing, thread-pool start-up, cache misses). ``clock`` returns seconds; pass a fake
    clock to test the harness without wall time.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append((clock() - start) * 1000.0)
    return LatencyStats(tuple(samples), warmup)


# --------------------------------------------------------------------------- end to end
def encode_png(images: np.ndarray) -> list[bytes]:
    """Each uint8 H×W image of ``images`` (N×H×W) as PNG bytes, in memory (Pillow)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape N×H×W, got {images.dtype} {images.shape}")
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def preprocess_png(png: bytes, *, rgb32: bool = False) -> np.ndarray:
    """Decode → [0, 1] → (resize 28→32, 3 channels if ``rgb32``) → normalise: float32 1×C×H×W.

    x = (p/255 - MNIST_MEAN) / MNIST_STD. The resize is Pillow's bilinear on a float32
    ("F") image: for upsampling it interpolates at pixel centres and clamps at the border,
    as ``torch.nn.functional.interpolate(bilinear, align_corners=False)`` does, so the
    result equals :func:`course_lib.data.get_split` to float32 rounding (~1e-6).
    """
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    if image.mode != "L":
        raise ValueError(f"expected a grayscale PNG, got mode {image.mode!r}")
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if rgb32:
        x = np.asarray(Image.fromarray(x, mode="F").resize((32, 32), Image.Resampling.BILINEAR))
    x = (x - np.float32(data.MNIST_MEAN)) / np.float32(data.MNIST_STD)
    x = x[None, None]
    if rgb32:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- runners
class _OrtRunner:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # threads inside one operator
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.max_batch: int | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: x})[0]


class _ExecuTorchRunner:
    def __init__(self, path: Path, threads: int) -> None:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        # XNNPACK's thread pool is process-wide; the runtime sizes it to the core count.
        # (Experimental API of executorch 1.5: the only way to choose the count from Python.)
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.method = Runtime.get().load_program(Path(path)).load_method("forward")
        self.max_batch = 1  # programs are exported with a static batch of 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.method.execute([torch.from_numpy(x)])[0].numpy()


class _TorchRunner:
    def __init__(self, model: nn.Module, threads: int) -> None:
        use_threads(threads)
        self.model = model.eval()
        self.max_batch: int | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()


def load_runner(target: Artifact | nn.Module, *, threads: int = THREADS) -> Callable[[np.ndarray], np.ndarray]:
    """A callable float32 N×C×H×W numpy batch → logits for an artifact or a PyTorch model.

    ONNX Runtime: ``InferenceSession`` on ``CPUExecutionProvider`` with
    ``intra_op_num_threads=threads``. ExecuTorch: the Python runtime's ``forward`` method
    (batch 1 only). LiteRT: :class:`course_lib.litert.LiteRTRunner` with its default
    XNNPACK delegate (batch 1; int8 input and output quantized/dequantized around it). PyTorch: the module under ``torch.no_grad()`` with
    ``torch.set_num_threads(threads)``. ``runner.max_batch`` is the largest batch it takes
    (None: any).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    threads = thread_cap(threads)  # $COURSE_MAX_THREADS, when cores are shared
    if isinstance(target, nn.Module):
        return _TorchRunner(target, threads)
    if target.runtime == "onnxruntime":
        return _OrtRunner(target.path, threads)
    if target.runtime == "executorch":
        return _ExecuTorchRunner(target.path, threads)
    if target.runtime == "litert":
        from course_lib.litert import LiteRTRunner

        return LiteRTRunner(target.path, kernels_="xnnpack", threads=threads)
    raise ValueError(f"unknown runtime {target.runtime!r}")


def runner_logits(runner: Callable[[np.ndarray], np.ndarray], images: torch.Tensor | np.ndarray,
                  *, batch_size: int = 500) -> np.ndarray:
    """Logits of every image, in batches of ``min(batch_size, runner.max_batch)``."""
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = np.ascontiguousarray(x, dtype=np.float32)
    step = min(batch_size, getattr(runner, "max_batch", None) or batch_size)
    return np.concatenate([runner(np.ascontiguousarray(x[i : i + step])) for i in range(0, len(x), step)])


# --------------------------------------------------------------------------- the table
@dataclass
class DeployRow:
    """One line of the deployment table."""

    model: str
    runtime: str  # "pytorch", "executorch", "onnxruntime"
    precision: str
    file_bytes: int
    accuracy: float  # in the runtime, on the evaluated test images
    reference_accuracy: float | None  # its PyTorch twin (None: no PyTorch twin)
    agreement: float  # top-1 agreement with the float PyTorch model
    model_latency: LatencyStats
    e2e_latency: LatencyStats
    export_seconds: float | None = None
    eval_images: int = 0


def measure_artifacts(
    name: str,
    artifacts: Sequence[Artifact],
    *,
    model: nn.Module | None = None,
    repeats: int = 50,
    warmup: int = 10,
    threads: int = THREADS,
    eval_limit: int | None = None,
    e2e_images: int = 100,
    progress: bool = True,
) -> list[DeployRow]:
    """Measure the float PyTorch model and every artifact: one :class:`DeployRow` each.

    - accuracy: top-1 on the first ``eval_limit`` test images (all 1,000 by default),
      batched where the runtime allows; agreement: share of those images whose top-1
      equals the float PyTorch model's.
    - model latency: one normalised test image at batch 1, ``threads`` threads.
    - end to end: per call, one PNG (cycling through ``e2e_images`` test digits encoded
      once) is decoded, resized (MobileNetV2), normalised, run, and its argmax taken.
    """
    from tqdm.auto import tqdm

    chw, rgb32 = MODEL_INPUTS[name]
    model = model if model is not None else models.load_pretrained(name)
    x_test, y_test = data.get_split("test", rgb32=rgb32)
    if eval_limit is not None:
        if eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1, got {eval_limit}")
        x_test, y_test = x_test[:eval_limit], y_test[:eval_limit]
    labels = y_test.numpy()
    pngs = encode_png(data.raw_images("test")[0][:e2e_images])
    one_image = np.ascontiguousarray(x_test[:1].numpy())

    def row_for(runtime: str, precision: str, runner, file_bytes: int, reference: float | None,
                export_seconds: float | None, float_pred: np.ndarray | None) -> tuple[DeployRow, np.ndarray]:
        pred = runner_logits(runner, x_test).argmax(axis=1)
        float_pred = pred if float_pred is None else float_pred
        png_cycle = itertools.cycle(pngs)

        def end_to_end() -> int:
            return int(runner(preprocess_png(next(png_cycle), rgb32=rgb32)).argmax())

        return DeployRow(
            model=DISPLAY_NAMES[name], runtime=runtime, precision=precision, file_bytes=file_bytes,
            accuracy=float((pred == labels).mean()), reference_accuracy=reference,
            agreement=float((pred == float_pred).mean()),
            model_latency=measure_latency(lambda: runner(one_image), warmup=warmup, repeats=repeats),
            e2e_latency=measure_latency(end_to_end, warmup=warmup, repeats=repeats),
            export_seconds=export_seconds, eval_images=len(labels),
        ), pred

    def twin_accuracy(module: nn.Module | None) -> float | None:
        if module is None:
            return None
        with torch.no_grad():
            logits = torch.cat([module(b) for b in x_test.split(500)])
        return float((logits.argmax(1).numpy() == labels).mean())

    bar = tqdm(total=1 + len(artifacts), desc=f"measure {name}", disable=not progress, leave=False)
    checkpoint_bytes = os.path.getsize(models.checkpoint_path(name))
    torch_row, float_pred = row_for("pytorch", "fp32", load_runner(model, threads=threads),
                                    checkpoint_bytes, None, None, None)
    torch_row.reference_accuracy = torch_row.accuracy
    rows = [torch_row]
    bar.update()
    for art in artifacts:
        reference = twin_accuracy(art.reference)
        row, _ = row_for(art.runtime, art.precision, load_runner(art, threads=threads), art.file_bytes,
                         reference, art.export_seconds, float_pred)
        rows.append(row)
        bar.update()
    bar.close()
    return rows


def benchmark_model(
    name: str,
    out_dir: str | Path,
    *,
    runtimes: Iterable[str] = RUNTIMES,
    repeats: int = 50,
    warmup: int = 10,
    threads: int = THREADS,
    eval_limit: int | None = None,
    progress: bool = True,
) -> list[DeployRow]:
    """:func:`build_artifacts` then :func:`measure_artifacts` for model ``name``."""
    use_threads(threads)
    model = models.load_pretrained(name)
    artifacts = build_artifacts(name, out_dir, model=model, runtimes=runtimes, progress=progress)
    return measure_artifacts(name, artifacts, model=model, repeats=repeats, warmup=warmup,
                             threads=threads, eval_limit=eval_limit, progress=progress)


def format_table(rows: Sequence[DeployRow], *, timings: bool = True) -> str:
    """The table as aligned text. ``timings=False`` keeps only the deterministic columns
    (file size, size ratio, accuracies, agreement), for outputs that must not change."""
    if not rows:
        raise ValueError("no rows to format")
    fp32_bytes = {r.runtime: r.file_bytes for r in rows if r.precision == "fp32"}
    header = f"{'runtime':12s} {'prec':5s} {'file bytes':>11s} {'fp32/this':>9s} "
    header += f"{'acc':>6s} {'PyTorch':>7s} {'agree':>6s}"
    if timings:
        header += f" {'model ms p50/p90':>17s} {'e2e ms p50/p90':>15s} {'export s':>8s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = fp32_bytes.get(r.runtime, r.file_bytes) / r.file_bytes
        ref = f"{r.reference_accuracy:7.3f}" if r.reference_accuracy is not None else f"{'-':>7s}"
        line = (f"{r.runtime:12s} {r.precision:5s} {r.file_bytes:11,d} {ratio:8.2f}× "
                f"{r.accuracy:6.3f} {ref} {r.agreement:6.3f}")
        if timings:
            m, e = r.model_latency, r.e2e_latency
            known = r.export_seconds is not None and not math.isnan(r.export_seconds)
            export = f"{r.export_seconds:8.1f}" if known else f"{'-':>8s}"
            line += f" {m.median_ms:8.3f}/{m.p90_ms:<8.3f} {e.median_ms:7.3f}/{e.p90_ms:<7.3f} {export}"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- memory
_RSS_CHILD = r"""
import sys
import numpy as np
runtime, path, chw, runs = sys.argv[1], sys.argv[2], tuple(map(int, sys.argv[3].split(","))), int(sys.argv[4])
x = np.zeros((1, *chw), np.float32)
if runtime == "litert":
    from ai_edge_litert.interpreter import Interpreter
    if path:
        it = Interpreter(model_path=path, num_threads=1); it.allocate_tensors()
        d = it.get_input_details()[0]
        for _ in range(runs):
            it.set_tensor(d["index"], x.astype(d["dtype"])); it.invoke()
elif runtime == "onnxruntime":
    import onnxruntime as ort
    if path:
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            s.run(None, {s.get_inputs()[0].name: x})
elif runtime == "executorch":
    import torch
    from executorch.runtime import Runtime
    if path:
        m = Runtime.get().load_program(path).load_method("forward")
        for _ in range(runs):
            m.execute([torch.from_numpy(x)])
# VmHWM: this process image's peak resident set (ru_maxrss would carry the parent's over fork)
print([int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def peak_rss_bytes(runtime: str, path: str | Path | None, input_chw: Sequence[int], *, runs: int = 20) -> int:
    """Peak resident memory (bytes) of a fresh Python process that loads ``path`` and runs it.

    The child imports only the runtime (``ai_edge_litert``, ``onnxruntime`` or
    ``executorch.runtime``), loads the model, runs ``runs`` zero inputs at batch 1, and
    reports its own peak resident set (``VmHWM`` in ``/proc/self/status``, Linux). With ``path=None`` it only imports the runtime: the
    difference between the two is what the model itself costs in memory.
    """
    import subprocess
    import sys

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    args = [sys.executable, "-c", _RSS_CHILD, runtime, str(path) if path else "",
            ",".join(str(int(c)) for c in input_chw), str(runs)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"peak-RSS child for {runtime} {path} failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])
