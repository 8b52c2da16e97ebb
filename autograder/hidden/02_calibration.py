"""Hidden tests of lesson 02 (calibration), run in the grader's process (never in the student's).

Every expected value is computed here with the grader's copy of ``course_lib.observers``
(checked against numpy and NVIDIA's pytorch-quantization in tests/test_observers.py); the
student's functions are reached only through ``student.call``. The inputs differ from the
notebook's visible checks and aim at what a near-miss gets wrong: grid ends that are not
[lo, hi], interpolated percentiles, all-negative data, the candidate grid of the MSE search,
and the clipped counts and empty bins of the KL divergence.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from autograder.hidden import HiddenTests
from course_lib import grading
from course_lib import observers as OB

tests = HiddenTests("02_calibration")


def _laplace(n: int, loc: float, seed: int) -> torch.Tensor:
    # A difference of two exponentials is Laplace(0, 1); seeded through a generator.
    gen = torch.Generator().manual_seed(seed)
    e = torch.empty(2, n).exponential_(generator=gen)
    return e[0] - e[1] + loc


def _shown(case: dict, *skip: str) -> dict:
    return {k: v for k, v in case.items() if k not in skip}


# ----------------------------------------------------------------- exercise 1 · error_split
@tests.case("test-error-split", disabled=[
    "course_lib.observers.quantization_error", "course_lib.observers.mse_curve",
    "course_lib.observers._error_parts",
])
def error_split(student) -> None:
    x = torch.randn(3_000, generator=torch.Generator().manual_seed(11)) ** 3
    cases = [
        dict(x=x, lo=-1.5, hi=0.5, bits=5),
        dict(x=x, lo=-0.2, hi=4.0, bits=2),      # the grid is [0, 4.2]: (-0.2, 0) is clipped, (4, 4.2] is not
        dict(x=x, lo=0.5, hi=2.0, bits=3),       # widened to [0, 2]: [0, 0.5) is not clipped
        dict(x=x.abs().reshape(30, 100), lo=0.0, hi=1.0, bits=7),
        dict(x=x, lo=-40.0, hi=40.0, bits=4),    # nothing clipped
    ]
    for case in cases:
        err = OB.quantization_error(**case)
        got = student.call("error_split", **case)
        grading.check("error_split (hidden)", got, (err.rounding, err.clipping), rtol=1e-5, atol=1e-12,
                      inputs=_shown(case, "x"))


# ----------------------------------------------------------------- exercise 2 · percentile_range
@tests.case("test-percentile", disabled=[
    "course_lib.observers.percentile_range", "course_lib.observers.percentile_range_from_histogram",
])
def percentile(student) -> None:
    x = torch.randn(7, 999, generator=torch.Generator().manual_seed(12)) * 3 + 1
    few = torch.tensor([0.3, -2.0, 5.0, 1.0, -0.5, 2.5, 9.0, -7.0, 0.0, 4.0, 3.5])
    cases = [
        dict(x=x, percentile=97.5),
        dict(x=x, percentile=100.0),                          # the min-max range
        dict(x=few, percentile=93.0),                         # 11 values: the percentiles interpolate
        dict(x=few, percentile=80.0, symmetric=True),
        dict(x=x, percentile=90.0, symmetric=True),
        dict(x=-x.abs(), percentile=99.0, symmetric=True),    # all negative: hi stays max x
        dict(x=-x.abs() - 1.0, percentile=99.9),
    ]
    for case in cases:
        want = OB.percentile_range(**case)
        got = student.call("percentile_range", **case)
        grading.check("percentile_range (hidden)", got, want, rtol=1e-9, inputs=_shown(case, "x"))


# ----------------------------------------------------------------- exercise 3 · mse_range
@tests.case("test-mse", disabled=[
    "course_lib.observers.mse_range", "course_lib.observers.mse_curve", "course_lib.observers._error_parts",
    "course_lib.observers.quantization_error", "course_lib.observers.mse_range_from_histogram",
    "course_lib.observers.mse_curve_from_histogram",
])
def mse(student) -> None:
    x = _laplace(2_000, 0.3, seed=13)
    cases = [
        dict(x=x, bits=2, n_grid=30),
        dict(x=x, bits=6, n_grid=25),
        dict(x=torch.relu(x - 1.0), bits=5, n_grid=20),       # lo stays 0: the range is not [-t, t]
        dict(x=-x.abs() - 0.5, bits=4, n_grid=40),            # all negative: t runs up to max|x| = -min x
        dict(x=torch.cat([x, torch.tensor([30.0])]), bits=3, n_grid=64),  # one far outlier
    ]
    for case in cases:
        want = OB.mse_range(**case)
        got = student.call("mse_range", **case)
        grading.check("mse_range (hidden)", got, want, rtol=1e-6, inputs=_shown(case, "x"))


# ----------------------------------------------------------------- exercise 4 · kl_divergence
@tests.case("test-kl", disabled=[
    "course_lib.observers.kl_divergence", "course_lib.observers.kl_divergence_curve",
    "course_lib.observers.kl_threshold", "course_lib.observers.kl_range",
    "course_lib.observers.kl_range_from_histogram",
])
def kl(student) -> None:
    rng = np.random.default_rng(14)
    h1 = np.bincount(rng.integers(0, 300, 20_000) // 3 + rng.integers(0, 5, 20_000), minlength=120).astype(float)
    h2 = h1.copy()
    h2[::7] = 0                                   # every 7th bin empty
    cases = [
        dict(abs_counts=h1, i=97, levels=8),      # chunks of 12 and 13 bins
        dict(abs_counts=h2, i=120, levels=16),    # nothing clipped; empty bins inside chunks
        dict(abs_counts=h2, i=51, levels=16),     # clipped counts; empty bins
        dict(abs_counts=h2, i=50, levels=50),     # bin 49 is empty but values lie beyond: inf
        dict(abs_counts=h2, i=57, levels=8),      # the same with bin 56, in a chunk with other bins
        dict(abs_counts=h1, i=20, levels=64),     # more levels than bins: only the clipping counts
        dict(abs_counts=h1, i=1, levels=4),       # one bin: P = Q, divergence 0
    ]
    for case in cases:
        want = OB.kl_divergence(**case)
        got = student.call("kl_divergence", **case)
        if math.isinf(want):
            grading.check("kl_divergence (hidden)", got, want, inputs=_shown(case, "abs_counts"))
        else:
            grading.check("kl_divergence (hidden)", got, want, rtol=1e-9, atol=1e-12,
                          inputs=_shown(case, "abs_counts"))
