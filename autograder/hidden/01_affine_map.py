"""Hidden tests of lesson 01 (the affine map), run in the grader's process (never in the student's).

Every expected value is computed here, with PyTorch's own observer and quantized tensors;
the student's functions are reached only through ``student.call``. The inputs differ from
the notebook's visible checks and aim at the details a near-miss gets wrong: float32 vs
float64 arithmetic, ties (half to even, not away from zero), the float32 reciprocal vs a
division, the clamp of the zero point, the widening of the range to include 0, and dtypes.
"""

from __future__ import annotations

import torch
from torch.ao.quantization.observer import MinMaxObserver

from autograder.hidden import HiddenTests
from course_lib import grading

tests = HiddenTests("01_affine_map")


def _qrange(bits: int, signed: bool, narrow_range: bool) -> tuple[int, int]:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return qmin + int(narrow_range), qmax


# ----------------------------------------------------------------- exercise 1 · qparams_from_range
def _torch_qparams(min_val: float, max_val: float, bits: int = 8, *, signed: bool = True,
                   symmetric: bool = False, narrow_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's answer: a MinMaxObserver that has seen min_val and max_val."""
    qmin, qmax = _qrange(bits, signed, narrow_range)
    custom = {} if (bits == 8 and not narrow_range) else {"quant_min": qmin, "quant_max": qmax}
    observer = MinMaxObserver(
        dtype=torch.qint8 if signed else torch.quint8,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        **custom,
    )
    observer(torch.tensor([min_val, max_val]))
    scale, zero_point = observer.calculate_qparams()
    return scale.reshape(()), zero_point.reshape(()).to(torch.int64)


QPARAMS_CASES = [
    dict(min_val=-0.71, max_val=3.55),                                   # lo/s is a float32 tie: half to even
    dict(min_val=-2.46, max_val=5.74, bits=4, signed=False),             # a tie at 4 bits
    dict(min_val=-9.6, max_val=1.92, bits=6, signed=False),              # a tie at 6 bits
    dict(min_val=-1.02, max_val=9.18, bits=4),                           # float64 arithmetic gives another z
    dict(min_val=-0.15, max_val=1.71, bits=5),                           # float64 again, 5 bits
    dict(min_val=-4.27, max_val=4.27),                                   # float64: z = -1, not 0
    dict(min_val=-1e-3, max_val=2e-3, narrow_range=True),                # narrow range [-127, 127]
    dict(min_val=-4.0, max_val=3.0, bits=6, symmetric=True),             # symmetric: divisor 31.5, not 31
    dict(min_val=-6.1, max_val=6.0, signed=False, symmetric=True),       # UINT8 symmetric: z = 128
    dict(min_val=2.0, max_val=9.0, bits=3, symmetric=True, narrow_range=True),  # widened to [0, 9]
    dict(min_val=0.25, max_val=7.5, signed=False),                       # widened to include 0: z = qmin
    dict(min_val=-7.5, max_val=-0.25, bits=5),                           # all negative: z clamps to qmax
    dict(min_val=1.0, max_val=1.0),                                      # one point, widened to [0, 1]
    dict(min_val=0.0, max_val=0.0, bits=4, signed=False),                # nothing: s = eps
    dict(min_val=-127.5, max_val=0.1),
]


@tests.case("test-qparams", disabled=[
    "course_lib.quant.qparams_from_range", "course_lib.quant.qparams_from_tensor",
    "torch.ao.quantization.observer.UniformQuantizationObserverBase._calculate_qparams",
])
def qparams(student) -> None:
    for case in QPARAMS_CASES:
        want = _torch_qparams(**case)
        got = student.call("qparams_from_range", **case)
        grading.check("qparams_from_range (hidden)", got, want, inputs=case)


# ----------------------------------------------------------------- exercise 2 · quantize
def _torch_quantize(x: torch.Tensor, scale: float, zero_point: int, bits: int = 8, *,
                    signed: bool = True, narrow_range: bool = False) -> torch.Tensor:
    """PyTorch's codes (quantize_per_tensor to a wide enough type, then the clamp), as int32."""
    qmin, qmax = _qrange(bits, signed, narrow_range)
    dtype = torch.qint32 if bits != 8 else torch.qint8 if signed else torch.quint8
    q = torch.quantize_per_tensor(x, float(scale), int(zero_point), dtype).int_repr()
    return q.to(torch.int32).clamp(qmin, qmax)


def _near_ties(scale: float, k_lo: int, k_hi: int) -> torch.Tensor:
    """(k + 1/2)·s in float32 and its two float32 neighbours: where rounding rules disagree."""
    s = torch.tensor(scale)
    ties = (torch.arange(k_lo, k_hi, dtype=torch.float32) + 0.5) * s
    up, down = torch.nextafter(ties, torch.tensor(1e9)), torch.nextafter(ties, torch.tensor(-1e9))
    return torch.cat([ties, up, down])


@tests.case("test-quantize", disabled=[
    "course_lib.quant.quantize", "course_lib.quant.fake_quantize", "course_lib.kernels.quantize_tflite",
    "torch.quantize_per_tensor", "torch.quantize_per_channel",
    "torch.fake_quantize_per_tensor_affine", "torch.fake_quantize_per_channel_affine",
])
def quantize(student) -> None:
    y = 3 * torch.randn(4, 250, generator=torch.Generator().manual_seed(2))
    cases = [
        # near ties for s = 0.011: the reciprocal and half-to-even both matter (and the clamp)
        dict(x=_near_ties(0.011, -140, 140), scale=0.011, zero_point=5),
        dict(x=_near_ties(0.017, -20, 300).reshape(3, -1), scale=0.017, zero_point=-100),
        dict(x=y, scale=0.07, zero_point=100, signed=False),                       # UINT8
        dict(x=_near_ties(0.9, -12, 20), scale=0.9, zero_point=2, bits=4, signed=False),
        dict(x=_near_ties(0.3, -40, 40), scale=0.3, zero_point=0, bits=6, narrow_range=True),
        dict(x=torch.arange(-20, 21) * 0.05, scale=0.1, zero_point=-3),            # ties, odd zero point
        dict(x=_near_ties(0.05, -300, 300), scale=0.05, zero_point=-7),
    ]
    for case in cases:
        want = _torch_quantize(**case)
        args = dict(case, scale=torch.tensor(case["scale"]))
        if case is cases[1]:
            args["zero_point"] = torch.tensor(case["zero_point"])  # a 0-dim integer tensor works too
        got = student.call("quantize", **args)
        grading.check("quantize (hidden)", got, want,
                      inputs={k: v for k, v in case.items() if k != "x"})


# ----------------------------------------------------------------- exercise 3 · dequantize
def _torch_dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """PyTorch's answer: dequantize() of the quantized tensor that holds these codes."""
    return torch._make_per_tensor_quantized_tensor(q, float(scale), int(zero_point)).dequantize()


@tests.case("test-dequantize", disabled=[
    "course_lib.quant.dequantize", "course_lib.quant.fake_quantize",
    "torch.dequantize", "torch._make_per_tensor_quantized_tensor", "torch.quantize_per_tensor",
    "torch.fake_quantize_per_tensor_affine", "torch.Tensor.dequantize",
])
def dequantize(student) -> None:
    gen = torch.Generator().manual_seed(4)
    all_int8 = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    cases = [
        dict(q=all_int8, scale=0.071, zero_point=100),                 # 127 - 100, -128 - 100: int8 overflows
        dict(q=all_int8.reshape(16, 16), scale=0.0039, zero_point=-128),
        dict(q=torch.arange(0, 256, dtype=torch.int16).to(torch.uint8), scale=1.7, zero_point=255),
        dict(q=torch.randint(-2**20, 2**20, (500,), generator=gen, dtype=torch.int32), scale=1e-5, zero_point=-9),
    ]
    for case in cases:
        want = _torch_dequantize(**case)
        args = dict(case, scale=torch.tensor(case["scale"]))
        if case is cases[1]:
            args["zero_point"] = torch.tensor(case["zero_point"])
        got = student.call("dequantize", **args)
        grading.check("dequantize (hidden)", got, want, inputs={k: v for k, v in case.items() if k != "q"})
