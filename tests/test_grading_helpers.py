"""The grading helpers: visible checks and switching references off for hidden tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import course_lib.quant
from course_lib import grading
from course_lib.grading import ExerciseError

X = torch.tensor([0.125, -0.375, 1.0, 3.1])
CASES = [
    {"x": X, "scale": 0.25, "zero_point": 0},
    {"x": X, "scale": 0.2, "zero_point": 3},
]


def reference(x, scale, zero_point):
    return course_lib.quant.quantize(x, scale, zero_point)


def correct(x, scale, zero_point):
    q = torch.round(x * torch.reciprocal(torch.tensor(scale, dtype=torch.float32))) + zero_point
    return q.clamp(-128, 127).to(torch.int32)


def divides(x, scale, zero_point):  # the tempting wrong rule: x / s instead of x * (1/s)
    q = torch.round(x / torch.tensor(scale, dtype=torch.float32)) + zero_point
    return q.clamp(-128, 127).to(torch.int32)


def stub(x, scale, zero_point):
    raise NotImplementedError()


# ------------------------------------------------------------ check_function


def test_check_function_passes_a_correct_function(capsys) -> None:
    grading.check_function(correct, reference, CASES, name="quantize")
    assert "✔ quantize: all 2 cases match (exact)" in capsys.readouterr().out


def test_check_function_fails_a_stub_saying_it_is_not_implemented() -> None:
    with pytest.raises(ExerciseError, match="quantize is not implemented yet") as info:
        grading.check_function(stub, reference, CASES, name="quantize")
    assert "NotImplementedError" in str(info.value)


def test_check_function_reports_the_failing_input_expected_and_received() -> None:
    # divides agrees on the first case (exact ties with s = 1/4) and fails on the second,
    # where 3.1 / 0.2 = 15.499999 rounds to 15 but PyTorch gives 16.
    with pytest.raises(ExerciseError) as info:
        grading.check_function(divides, reference, CASES, name="quantize")
    message = str(info.value)
    assert "scale=0.2" in message and "zero_point=3" in message
    assert "1 of 4 values differ; first at index (3,): expected 19, got 18" in message
    assert "tolerance: exact" in message


def test_check_function_reports_an_exception_with_its_input() -> None:
    def crashes(x, scale, zero_point):
        return x.reshape(3)

    with pytest.raises(ExerciseError, match=r"raised RuntimeError.*") as info:
        grading.check_function(crashes, reference, CASES[:1], name="quantize")
    assert "scale=0.25" in str(info.value)


def test_check_function_needs_cases() -> None:
    with pytest.raises(ValueError, match="at least one case"):
        grading.check_function(correct, reference, [])


# ------------------------------------------------------------ check


def test_check_explains_common_mistakes() -> None:
    expected = torch.tensor([1, 2, 3], dtype=torch.int32)
    with pytest.raises(ExerciseError, match="forget to `return`"):
        grading.check("q", None, expected)
    with pytest.raises(ExerciseError, match=r"shape \(2,\) differs from the expected \(3,\)"):
        grading.check("q", torch.tensor([1, 2], dtype=torch.int32), expected)
    with pytest.raises(ExerciseError, match="dtype torch.float32 differs"):
        grading.check("q", expected.float(), expected)
    with pytest.raises(ExerciseError, match="contains NaN"):
        grading.check("x", torch.tensor([float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ExerciseError, match="item 1:"):
        grading.check("qparams", (1.0, 2), (1.0, 3))


def test_check_shows_plain_numbers() -> None:
    # numpy 2 would print np.float32(0.5); the learner should read 0.5
    with pytest.raises(ExerciseError, match=r"expected 0\.5, got 0\.25\."):
        grading.check("x", torch.tensor([0.25]), torch.tensor([0.5]))


def test_check_tolerance(capsys) -> None:
    grading.check("x", torch.tensor([1.0005]), torch.tensor([1.0]), atol=1e-3)
    assert "atol=0.001" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="atol=0.0001"):
        grading.check("x", torch.tensor([1.0005]), torch.tensor([1.0]), atol=1e-4)


# ------------------------------------------------------------ exact answers


def test_integer_codes_of_another_dtype_are_reported() -> None:
    codes = torch.tensor([1, 2, 3], dtype=torch.int8)
    with pytest.raises(ExerciseError, match="dtype torch.int32 differs from the expected torch.int8"):
        grading.check("codes", codes.to(torch.int32), codes)
    with pytest.raises(ExerciseError, match="dtype int64 differs"):
        grading.check("codes", np.array([1, 2], np.int64), np.array([1, 2], np.int8))
    grading.check("codes", codes.clone(), codes)  # same dtype, same values: passes


def test_strings_compare_as_strings() -> None:
    grading.check("keys", ["x", "y"], ["x", "y"])
    with pytest.raises(ExerciseError, match="expected 'x', got 'input'"):
        grading.check("keys", ["input"], ["x"])


def test_exercise_error_renders_as_its_message_in_ipython() -> None:
    plain = ExerciseError("quantize for x=1: 1 of 3 values differ")
    assert plain._render_traceback_() == ["\x1b[0;31mExerciseError\x1b[0m: quantize for x=1: 1 of 3 values differ"]
    try:  # the learner's own exception: IPython must show the real traceback instead
        try:
            raise ZeroDivisionError("in the learner's code")
        except ZeroDivisionError as exc:
            raise ExerciseError("quantize(x=1) raised ZeroDivisionError") from exc
    except ExerciseError as chained:
        shown = "\n".join(chained._render_traceback_())
        assert "ZeroDivisionError: in the learner's code" in shown and "direct cause" in shown
