"""course_lib: the helper library of the course *Quantization for Edge Devices*.

Each module is short enough to read beside the lesson that uses it:

- ``quant``      the affine map: qparams, quantize, dequantize, fake-quantize, bit packing
- ``observers``  range setting (calibration): min-max, percentile, MSE, KL
- ``kernels``    integer-only reference kernels (TFLite-style requantization)
- ``qat``        fake quantization with a straight-through estimator, LSQ
- ``data``       the shipped MNIST subset and its fixed split
- ``models``     TinyCNN and a reduced-width MobileNetV2, shipped checkpoints
- ``grading``    visible checks and hidden-test helpers for the exercises
"""

from __future__ import annotations

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
