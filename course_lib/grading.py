"""Checks for the exercises: the learner's feedback, and the grader's comparisons.

A visible check tells the learner what went wrong: the input that failed, the
expected value, the value that came back and the tolerance. It passes only on
correct work; on an unsolved stub (``raise NotImplementedError()``) it fails with
a message that says so.

The grade is not decided here: the hidden tests (autograder/hidden/) run in the
grader's own process and use its own copy of :func:`check` to compare what the
learner's sandboxed code returned with values the grader computed itself.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "ExerciseError",
    "check",
    "check_function",
]

_MAX_SHOWN = 8  # values shown of a tensor in a message


class ExerciseError(AssertionError):
    """A visible check failed: the message says which input, what was expected and what came back."""

    def _render_traceback_(self) -> list[str]:
        """What IPython shows: the message alone, not a traceback through this module.

        The message already names the check, the input and both values. When the
        learner's own code raised (the error has a ``__cause__``), the traceback into
        that code is what helps, so it is shown in full.
        """
        if self.__cause__ is not None:
            return [chunk.rstrip("\n") for chunk in traceback.format_exception(self)]
        return ["\x1b[0;31mExerciseError\x1b[0m: " + str(self)]


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _short(value: Any) -> str:
    """A compact, readable rendering of a value for a feedback message."""
    if isinstance(value, torch.Tensor | np.ndarray):
        arr = _as_array(value)
        flat = arr.reshape(-1)
        shown = np.array2string(flat[:_MAX_SHOWN], precision=6, separator=", ")
        more = f" … ({flat.size} values)" if flat.size > _MAX_SHOWN else ""
        dtype = value.dtype
        return f"{shown}{more} shape={tuple(arr.shape)} dtype={dtype}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return repr(value)


def _describe_inputs(inputs: Mapping[str, Any] | str) -> str:
    if isinstance(inputs, str):
        return inputs
    return ", ".join(f"{k}={_short(v)}" for k, v in inputs.items())


def _mismatch(got: Any, expected: Any, atol: float, rtol: float) -> str | None:
    """Why ``got`` is not ``expected`` (None when they agree)."""
    if isinstance(expected, tuple | list):
        if not isinstance(got, tuple | list) or len(got) != len(expected):
            return f"expected a sequence of {len(expected)} values, got {_short(got)}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            why = _mismatch(g, e, atol, rtol)
            if why:
                return f"item {i}: {why}"
        return None
    if got is None:
        return "got None: did the function forget to `return` its result?"
    if isinstance(expected, str | bytes) or isinstance(got, str | bytes):
        return None if type(got) is type(expected) and got == expected else f"expected {expected!r}, got {got!r}"
    if isinstance(expected, torch.Tensor) and not isinstance(got, torch.Tensor):
        return f"expected a torch.Tensor, got {type(got).__name__}"
    g, e = _as_array(got), _as_array(expected)
    if g.shape != e.shape:
        return f"shape {g.shape} differs from the expected {e.shape}"
    if isinstance(expected, torch.Tensor) and expected.dtype != got.dtype:
        # Integer codes have a documented dtype: int32 where int8 was asked for is an error.
        if expected.is_floating_point() != got.is_floating_point() or not expected.is_floating_point():
            return f"dtype {got.dtype} differs from the expected {expected.dtype}"
    if isinstance(expected, np.ndarray) and np.issubdtype(expected.dtype, np.integer):
        if not isinstance(got, np.ndarray) or got.dtype != expected.dtype:
            return f"dtype {getattr(got, 'dtype', type(got).__name__)} differs from the expected {expected.dtype}"
    if g.size == 0:
        return None
    g64, e64 = g.astype(np.float64), e.astype(np.float64)
    if np.isnan(g64).any() and not np.isnan(e64).any():
        return "the result contains NaN"
    bad = ~np.isclose(g64, e64, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = np.argwhere(bad)[0]
        where = tuple(int(i) for i in idx)
        return (
            f"{int(bad.sum())} of {bad.size} values differ; first at index {where}: "
            f"expected {e[where].item()!r}, got {g[where].item()!r}"
        )
    return None


def _tolerance(atol: float, rtol: float) -> str:
    return "exact" if atol == 0 and rtol == 0 else f"atol={atol:g}, rtol={rtol:g}"


def check(
    name: str,
    got: Any,
    expected: Any,
    *,
    inputs: Mapping[str, Any] | str = "",
    atol: float = 0.0,
    rtol: float = 0.0,
) -> None:
    """Assert that ``got`` equals ``expected`` within ``atol + rtol·|expected|``.

    Prints a one-line confirmation on success; raises :class:`ExerciseError`
    naming the input, the expected and the received values otherwise.
    """
    why = _mismatch(got, expected, atol, rtol)
    if why:
        where = f" for {_describe_inputs(inputs)}" if inputs else ""
        raise ExerciseError(
            f"{name}{where}: {why}.\n  expected: {_short(expected)}\n  received: {_short(got)}"
            f"\n  tolerance: {_tolerance(atol, rtol)}"
        )
    print(f"✔ {name}: matches ({_tolerance(atol, rtol)})")


def check_function(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    cases: Iterable[Mapping[str, Any]],
    *,
    name: str | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    quiet: bool = False,
) -> None:
    """Call ``fn(**case)`` and ``reference(**case)`` for every case and compare.

    The first disagreeing case is reported with its inputs, the expected and the
    received values and the tolerance. A stub that still raises
    ``NotImplementedError`` fails with a message that says so.
    """
    name = name or getattr(fn, "__name__", "function")
    cases = list(cases)
    if not cases:
        raise ValueError("check_function needs at least one case")
    for case in cases:
        expected = reference(**case)
        try:
            got = fn(**case)
        except NotImplementedError:
            raise ExerciseError(
                f"{name} is not implemented yet: replace `raise NotImplementedError()` "
                "with your code, then run this check again."
            ) from None
        except Exception as exc:  # report the learner's error with the input that caused it
            raise ExerciseError(
                f"{name}({_describe_inputs(case)}) raised {type(exc).__name__}: {exc}"
            ) from exc
        why = _mismatch(got, expected, atol, rtol)
        if why:
            raise ExerciseError(
                f"{name} for {_describe_inputs(case)}: {why}.\n  expected: {_short(expected)}"
                f"\n  received: {_short(got)}\n  tolerance: {_tolerance(atol, rtol)}"
            )
    if not quiet:
        print(f"✔ {name}: all {len(cases)} cases match ({_tolerance(atol, rtol)})")
