"""Hidden tests of lesson 09 (microcontroller), run in the grader's process.

The student's functions run in the sandbox. Exercise 2 is C: the sandbox compiles the
student's source with the course's driver (ziglang) and runs it on the emulated Cortex-M4
(unicorn); only the int8 results come back. Every expected value is computed here with the
grader's own ``course_lib``.
"""

from __future__ import annotations

import numpy as np

from autograder.hidden import HiddenTests
from course_lib import grading
from course_lib import kernels as K
from course_lib.mcu import planner

tests = HiddenTests("09_microcontroller")


def _random_lifetimes(rng: np.random.Generator, n: int, steps: int) -> tuple[list[int], list[int], list[int]]:
    first = rng.integers(0, steps, n)
    last = np.minimum(first + rng.integers(0, 4, n), steps - 1)
    sizes = rng.integers(1, 5000, n)
    sizes[rng.integers(0, n, n // 4)] = 1024  # equal sizes: ties go to the smaller index
    return sizes.tolist(), first.tolist(), last.tolist()


@tests.case("test-plan-arena", disabled=[
    "course_lib.mcu.planner.plan_greedy", "course_lib.mcu.planner.arena_size",
])
def plan_arena(student) -> None:
    rng = np.random.default_rng(9009)
    cases = [_random_lifetimes(rng, n, steps) for n, steps in ((6, 6), (12, 5), (25, 12), (40, 20), (60, 30))]
    cases.append(([784, 12544, 3136, 6272, 1568, 10], [0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 4]))  # a chain
    alignments = [16, 1, 8, 16, 4, 16]
    for (sizes, first, last), alignment in zip(cases, alignments, strict=True):
        lives = [planner.TensorLife(str(i), s, f, la) for i, (s, f, la) in enumerate(zip(sizes, first, last, strict=True))]
        want = planner.plan_greedy(lives, alignment)
        got = student.call("plan_arena", sizes, first, last, alignment)
        inputs = f"{len(sizes)} tensors, alignment {alignment}"
        if not isinstance(got, list | tuple) or len(got) != len(sizes):
            raise grading.ExerciseError(f"plan_arena for {inputs}: expected a list of {len(sizes)} int offsets, "
                                        f"got {type(got).__name__}")
        grading.check("plan_arena (hidden)", np.asarray(got, dtype=np.int64), np.asarray(want, dtype=np.int64),
                      inputs=inputs)


@tests.case("test-requantize-c", disabled=[
    "course_lib.kernels.requantize", "course_lib.kernels.multiply_by_quantized_multiplier",
    "course_lib.kernels.multiply_by_quantized_multiplier_single_rounding",
    "course_lib.kernels.saturating_rounding_doubling_high_mul", "course_lib.kernels.rounding_divide_by_pot",
], timeout=120)
def requantize_c(student) -> None:
    rng = np.random.default_rng(9010)
    n = 3000
    acc = np.concatenate([rng.integers(-60_000, 60_000, n // 2), rng.integers(-(2**31), 2**31, n // 2 - 6),
                          [-(2**31), 2**31 - 1, 0, -1, 1, 2**30]]).astype(np.int32)
    m0 = rng.integers(2**30, 2**31, n).astype(np.int32)
    m0[: n // 6] = 2**30  # M0 = 2^30: many exact ties for the divide
    shift = rng.integers(-31, 3, n).astype(np.int32)
    shift[n // 6: n // 3] = rng.integers(-3, 0, n // 6)
    # M0 = 2^30 with small shifts and accumulators: exact ties after the high-mul, where double
    # rounding (TFLite's default) and single rounding give different int8 results
    tie = slice(n // 3, n // 3 + 600)
    acc[tie] = rng.integers(-500, 500, 600)
    m0[tie] = 2**30
    shift[tie] = rng.integers(-3, 0, 600)
    m0[-6:] = [2**31 - 1, 2**30, 1518500250, 2**31 - 1, 2**30 + 7, 2**31 - 1]
    shift[-6:] = [0, -31, -1, 2, -2, -31]
    for zp, lo, hi in ((3, -128, 127), (-20, -20, 127), (0, -100, 90)):
        want = K.requantize(acc, m0, shift, zp, lo, hi)
        got = student.run(
            "from course_lib.mcu import harness\n"
            "result = harness.run_requantize_c(requantize_c(), acc, m0, shift, zp, lo, hi)\n",
            acc=acc, m0=m0, shift=shift, zp=zp, lo=lo, hi=hi)
        grading.check("requantize in C on the emulated Cortex-M4 (hidden)", np.asarray(got), want,
                      inputs=f"{n} accumulators, shifts in [-31, 2], Z_out={zp}, clamp [{lo}, {hi}]")


@tests.case("test-budget", disabled=["course_lib.mcu.planner.budget", "course_lib.mcu.planner.constant_bytes"])
def budget(student) -> None:
    rng = np.random.default_rng(9011)
    for i in range(12):
        layers = [(int(c), int(w)) for c, w in zip(rng.integers(1, 300, 6), rng.integers(10, 200_000, 6), strict=True)]
        code, arena, stack = (int(v) for v in rng.integers(1_000, 60_000, 3))
        want_flash = code + sum(w + 12 * c for c, w in layers)
        want_sram = arena + stack
        # around the limits: some parts fit exactly, some miss by one byte
        flash_part = want_flash + int(rng.integers(-1, 2)) * (i % 3)
        sram_part = want_sram + int(rng.integers(-1, 2)) * (i % 2)
        want = planner.Budget(want_flash, want_sram, want_flash <= flash_part and want_sram <= sram_part)
        got = student.call("mcu_budget", layers, code, arena, stack, flash_part, sram_part)
        inputs = f"{len(layers)} layers, code {code}, arena {arena}, stack {stack}, part {flash_part}/{sram_part}"
        if not isinstance(got, list | tuple) or len(got) != 3:
            raise grading.ExerciseError(f"mcu_budget for {inputs}: expected (flash, sram, fits), got {got!r}")
        grading.check("mcu_budget (hidden)", np.asarray(got, dtype=np.int64), np.asarray(want, dtype=np.int64),
                      inputs=inputs)
