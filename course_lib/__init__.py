"""course_lib: the helper library of the course *Quantization for Edge Devices*.

Each module is short enough to read beside the lesson that uses it:

- ``quant``      the affine map: qparams, quantize, dequantize, fake-quantize, bit packing
- ``observers``  range setting (calibration): min-max, percentile, MSE, KL
- ``kernels``    integer-only reference kernels (TFLite-style requantization)
- ``qat``        fake quantization with a straight-through estimator, LSQ
- ``pt2e``       ExecuTorch's XNNPACK quantizer for BN-folded graphs: the same PT2E graph, faster (lessons 05, 06, 08)
- ``data``       the shipped MNIST subset and its fixed split
- ``models``     TinyCNN and a reduced-width MobileNetV2, shipped checkpoints
- ``sizes``      byte accounting: packed codes, scales, zero points, biases, files (lessons 03, 07, 08)
- ``compact``    structured pruning made real: TinyCNN rebuilt with fewer channels (lessons 07, 08)
- ``export``     export and quantize per runtime: ExecuTorch (PT2E, XNNPACK), ONNX Runtime (QDQ) (lesson 08)
- ``deploy``     runners, latency, peak memory, the deployment table (lesson 08)
- ``hardware``   the CPU's int8 instructions; a Raspberry Pi budget from stated assumptions (lesson 08)
- ``litert``     run the shipped ``.tflite`` files; read their int8 layers as lesson 04's kernels
- ``timing``     interleaved timing and a bootstrap interval for a speed ratio
- ``grading``    visible checks and hidden-test helpers for the exercises
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"

# The two warnings torch >= 2.13 raises for what this course teaches on purpose.
# They are matched by message, so every other warning stays visible.
QUANTIZED_TENSOR_WARNING = r".*quantized tensor creation functions.*"
TORCH_AO_DEPRECATION = r"torch\.ao\.quantization is deprecated"


def filter_quantization_warnings() -> None:
    """Hide torch's quantized-tensor and ``torch.ao.quantization`` deprecation warnings.

    Lessons call this once at the top: the course explains the deprecation in
    prose, and the repeated warnings would otherwise flood the learner's screen.
    No other warning is affected.
    """
    warnings.filterwarnings("ignore", message=QUANTIZED_TENSOR_WARNING, category=UserWarning)
    warnings.filterwarnings("ignore", message=TORCH_AO_DEPRECATION, category=DeprecationWarning)


# torchao logs one line through torch's logger when it is imported ("<enum 'KernelPreference'>
# is an Enum subclass ... register_constant() ... deprecated"): a note for torchao's developers.
TORCHAO_IMPORT_NOTICE = "KernelPreference"


class _DropTorchaoImportNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHAO_IMPORT_NOTICE not in record.getMessage()


def drop_torchao_import_notice() -> None:
    """Keep torchao's import-time log line about ``KernelPreference`` off the learner's screen.

    Call it before torchao (or ExecuTorch, which imports it) is first imported. Only that
    record of the ``torch.utils._pytree`` logger is dropped; every other message of that
    logger, and every warning, stays visible. Calling it twice adds one filter.
    """
    logger = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _DropTorchaoImportNotice) for f in logger.filters):
        logger.addFilter(_DropTorchaoImportNotice())


MAX_THREADS_VARIABLE = "COURSE_MAX_THREADS"


def thread_cap(threads: int) -> int:
    """``threads``, or fewer when ``$COURSE_MAX_THREADS`` caps it (see :func:`use_threads`)."""
    cap = os.environ.get(MAX_THREADS_VARIABLE, "").strip()
    if not cap:
        return threads
    if not cap.isdigit() or int(cap) < 1:
        raise ValueError(f"{MAX_THREADS_VARIABLE}={cap!r}: expected a whole number of threads, at least 1")
    return min(threads, int(cap))


def use_threads(threads: int) -> int:
    """``torch.set_num_threads(threads)``, capped by ``$COURSE_MAX_THREADS`` when it is set.

    Lessons ask for the two cores of the course's reference laptop. Where several lessons
    or graders share the cores (the test suite runs two at once; the grader runs two
    sandboxes), the cap keeps each to one thread: threads that outnumber the free cores
    spin-wait for each other and made lessons several times slower. Returns the number
    of threads set.
    """
    import torch

    threads = thread_cap(threads)
    torch.set_num_threads(threads)
    return threads
