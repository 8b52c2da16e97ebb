"""Hidden tests of lesson 03 (granularity), run in the grader's process (never in the student's).

Every expected value is computed here, with PyTorch's own kernels or the grader's copy of
``course_lib``; the student's functions are reached only through ``student.call`` and
``student.run``. The inputs differ from the notebook's visible checks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.ao.quantization.observer import PerChannelMinMaxObserver
from torch.nn.utils.fusion import fuse_conv_bn_eval

from autograder.hidden import CONV_BN, HiddenTests, conv_bn
from course_lib import grading, quant

tests = HiddenTests("03_granularity")

EPS = torch.finfo(torch.float32).eps

# Functions that would answer an exercise in one call. Only those of the exercise being
# graded are switched off in the student's process.
_QUANTIZE_REFERENCES = [
    "course_lib.quant.quantize", "course_lib.quant.fake_quantize",
    "course_lib.granularity.quantize_weight", "course_lib.granularity.fake_quantize_weight",
    "torch.quantize_per_tensor", "torch.quantize_per_channel",
    "torch.fake_quantize_per_tensor_affine", "torch.fake_quantize_per_channel_affine",
]


def _raises_value_error(student, call: str, **inputs) -> bool:
    """True when the student's code raises ValueError for ``call`` (evaluated in the sandbox)."""
    code = (
        "try:\n"
        f"    {call}\n"
        "except ValueError:\n"
        "    result = True\n"
        "else:\n"
        "    result = False\n"
    )
    return bool(student.run(code, **inputs))


# ----------------------------------------------------------------- exercise 1
def _observer_qparams(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    q_max = 2 ** (bits - 1) - 1
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                   quant_min=-q_max, quant_max=q_max)
    obs(w)
    return obs.calculate_qparams()


@tests.case("test-per-channel-qparams", disabled=[
    "course_lib.quant.qparams_from_tensor", "course_lib.quant.qparams_from_range",
    "course_lib.granularity.weight_qparams", "course_lib.granularity.quantize_weight",
    "torch.ao.quantization.observer.UniformQuantizationObserverBase._calculate_qparams",
])
def per_channel_qparams(student) -> None:
    g = torch.Generator().manual_seed(303)
    conv = torch.randn(12, 5, 3, 3, generator=g) * torch.logspace(0, -3, 12).reshape(-1, 1, 1, 1)
    conv[3] = 0.0                                   # an all-zero channel: its scale is eps, not 0
    conv[7] = -conv[7].abs()                        # a channel whose max |w| is a negative weight
    linear = torch.randn(7, 33, generator=g)
    for w, bits in [(conv, 8), (conv, 2), (linear, 4), (linear.reshape(7, 3, 11, 1), 3)]:
        want = _observer_qparams(w, bits)
        got = student.call("per_channel_symmetric_qparams", w, bits)
        grading.check("per_channel_symmetric_qparams (hidden)", got, want,
                      inputs=f"w of shape {tuple(w.shape)}, bits={bits}", rtol=1e-6)


# ----------------------------------------------------------------- exercise 2
def _torch_per_group(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Each group becomes a row of PyTorch's per-channel fake-quant kernel (x · (1/s), ties to even)."""
    q_max = 2 ** (bits - 1) - 1
    rows = w.reshape(-1, group_size)
    scale = torch.clamp(rows.abs().amax(dim=1) / q_max, min=EPS)
    zero_point = torch.zeros(rows.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(rows, scale, zero_point, 0, -q_max, q_max).reshape(w.shape)


def _near_rounding_ties(rows: int, cols: int, group_size: int, bits: int, seed: int) -> torch.Tensor:
    """Weights one float32 ulp from (k + 1/2)·s: there w·(1/s) and w/s often round differently."""
    g = torch.Generator().manual_seed(seed)
    q_max = 2 ** (bits - 1) - 1
    group_max = 0.5 + torch.rand(rows, cols // group_size, 1, generator=g)
    k = torch.randint(-q_max, q_max, (rows, cols // group_size, group_size), generator=g)
    w = (k + 0.5) * (group_max / q_max)
    step = torch.randint(-1, 2, w.shape, generator=g)
    w = torch.where(step > 0, torch.nextafter(w, torch.tensor(np.inf)),
                    torch.where(step < 0, torch.nextafter(w, torch.tensor(-np.inf)), w))
    w[..., 0] = group_max[..., 0]  # the first weight of each group sets its scale
    return w.reshape(rows, cols)


@tests.case("test-per-group", disabled=_QUANTIZE_REFERENCES)
def per_group(student) -> None:
    g = torch.Generator().manual_seed(304)
    spread = torch.randn(24, 96, generator=g) * torch.logspace(0, -2, 96)  # groups of very different ranges
    ties = _near_rounding_ties(10, 96, 24, 4, seed=3041)
    # The tie cases must tell x·(1/s) from x/s apart, or they would not test the contract.
    q_max, rows = 7, ties.reshape(-1, 24)
    s = torch.clamp(rows.abs().amax(dim=1, keepdim=True) / q_max, min=EPS)
    assert bool((torch.round(rows * (1.0 / s)) != torch.round(rows / s)).any())
    cases = [(spread, 4, 16), (spread, 3, 32), (spread, 8, 8), (ties, 4, 24),
             (_near_rounding_ties(6, 64, 64, 8, seed=3042), 8, 64)]
    for w, bits, group_size in cases:
        want = _torch_per_group(w, bits, group_size)
        got = student.call("fake_quantize_per_group", w, bits, group_size)
        grading.check("fake_quantize_per_group (hidden)", got, want,
                      inputs=f"w of shape {tuple(w.shape)}, bits={bits}, group_size={group_size}", atol=1e-7)
    if not _raises_value_error(student, "fake_quantize_per_group(w, 4, 16)", w=torch.ones(3, 40)):
        raise grading.ExerciseError("fake_quantize_per_group(torch.ones(3, 40), 4, 16) should raise ValueError")


# ----------------------------------------------------------------- exercise 3
def _numpy_sqnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x64, x_hat64 = x.double().numpy(), x_hat.double().numpy()
    return float(10 * np.log10(np.sum(x64 ** 2) / np.sum((x64 - x_hat64) ** 2)))


@tests.case("test-sqnr", disabled=["course_lib.granularity.sqnr_db", "course_lib.granularity.relative_mse"])
def sqnr(student) -> None:
    g = torch.Generator().manual_seed(305)
    x = torch.randn(1000, generator=g)
    w = torch.randn(16, 8, 3, 3, generator=g)
    offset = 1000.0 + torch.randn(100_000, generator=g)  # float32 sums of these lose digits
    cases = [
        (x, x + 0.01 * torch.randn(1000, generator=g)),
        (x, torch.zeros(1000)),                                         # all noise: 0 dB
        (w, torch.round(w * 4) / 4),
        (offset, offset + 1e-3 * torch.randn(100_000, generator=g)),
    ]
    for a, b in cases:
        grading.check("sqnr_db (hidden)", student.call("sqnr_db", a, b), _numpy_sqnr(a, b),
                      inputs=f"x of shape {tuple(a.shape)}", rtol=1e-9)
    grading.check("sqnr_db of an exact copy (hidden)", student.call("sqnr_db", w, w.clone()), float("inf"))
    if not _raises_value_error(student, "sqnr_db(x, x_hat)", x=torch.zeros(5), x_hat=torch.ones(5)):
        raise grading.ExerciseError("sqnr_db(torch.zeros(5), torch.ones(5)) should raise ValueError")


# ----------------------------------------------------------------- exercise 4
_FOLD_IN_SANDBOX = CONV_BN + """
w_folded, b_folded = fold_batchnorm(conv, bn)
result = (w_folded.detach(), b_folded.detach())
"""


def _fold_case(seed: int, c_in: int, c_out: int, k: int, groups: int, bias: bool, eps: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        w=torch.randn(c_out, c_in // groups, k, k, generator=g),
        b=torch.randn(c_out, generator=g) if bias else None,
        groups=groups, eps=eps,
        gamma=torch.randn(c_out, generator=g) * torch.logspace(0, -4, c_out),  # some channels nearly off
        beta=torch.randn(c_out, generator=g),
        mean=torch.randn(c_out, generator=g),
        var=torch.rand(c_out, generator=g) * 3 + 1e-3,
    )


def _torch_fold(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    conv, bn = conv_bn(**case)
    fused = fuse_conv_bn_eval(conv, bn)
    return fused.weight.detach(), fused.bias.detach()


@tests.case("test-fold-bn", disabled=[
    "course_lib.kernels.fold_batchnorm", "course_lib.granularity.fold_batchnorms",
    "torch.nn.utils.fusion.fuse_conv_bn_eval", "torch.nn.utils.fusion.fuse_conv_bn_weights",
    "torch.nn.utils.fuse_conv_bn_eval", "torch.nn.utils.fuse_conv_bn_weights",
])
def fold_bn(student) -> None:
    cases = [
        _fold_case(306, c_in=3, c_out=6, k=3, groups=1, bias=True, eps=1e-3),
        _fold_case(307, c_in=4, c_out=4, k=3, groups=4, bias=False, eps=1e-5),   # depthwise, no bias
        _fold_case(308, c_in=5, c_out=7, k=1, groups=1, bias=False, eps=0.1),    # eps must be bn.eps
    ]
    for case in cases:
        want = _torch_fold(case)
        got = student.run(_FOLD_IN_SANDBOX, **case)
        grading.check("fold_batchnorm (hidden)", got, want, atol=1e-6, rtol=1e-5,
                      inputs=f"conv weight {tuple(case['w'].shape)}, groups={case['groups']}, "
                             f"bias={case['b'] is not None}, bn.eps={case['eps']}")


# ----------------------------------------------------------------- exercise 5
@tests.case("test-pack-int4", disabled=[
    "course_lib.quant.pack_bits", "course_lib.quant.unpack_bits",
    "course_lib.granularity.pack_model_weights", "course_lib.granularity.unpack_model_weights",
    "course_lib.compress.encode_weights", "course_lib.compress.decode_weights",
    "torch.quantize_per_tensor", "torch.quantize_per_channel",  # torch.quint4x2 packs two codes a byte
    "torch._make_per_tensor_quantized_tensor", "torch._make_per_channel_quantized_tensor",
])
def pack_int4(student) -> None:
    g = torch.Generator().manual_seed(307)
    codes = [
        torch.randint(-8, 8, (5, 7), generator=g, dtype=torch.int8),     # 35 codes: odd, 2-D (row-major)
        torch.randint(-8, 8, (2, 3, 4), generator=g, dtype=torch.int64),  # another integer dtype
        torch.tensor([-8], dtype=torch.int8),                            # one code: one byte, 0x08
        torch.tensor([7, -1, -8, 0, 1, -7], dtype=torch.int32),
    ]
    for q in codes:
        want = quant.pack_bits(q, 4)
        grading.check("pack_int4 (hidden)", student.call("pack_int4", q), want,
                      inputs=f"q={q.flatten().tolist()}")
        back = quant.unpack_bits(want, 4, q.numel()).to(torch.int8)
        grading.check("unpack_int4 (hidden)", student.call("unpack_int4", want, q.numel()), back,
                      inputs=f"packed={want.tolist()}, numel={q.numel()}")
    every_byte = torch.arange(256, dtype=torch.uint8)  # every pair of nibbles; an odd count drops the last
    grading.check("unpack_int4 of every byte value (hidden)", student.call("unpack_int4", every_byte, 511),
                  quant.unpack_bits(every_byte, 4, 511).to(torch.int8),
                  inputs="packed=torch.arange(256, dtype=torch.uint8), numel=511")
    for bad in ([3, 8], [-9, 0]):
        if not _raises_value_error(student, "pack_int4(q)", q=torch.tensor(bad, dtype=torch.int16)):
            raise grading.ExerciseError(f"pack_int4(torch.tensor({bad})) should raise ValueError: "
                                        "a value outside [-8, 7] does not fit in 4 signed bits")
