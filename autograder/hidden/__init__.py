"""Hidden tests, one module per lesson (``hidden/<lesson_id>.py``), run in the grader.

A module defines ``tests = HiddenTests("<lesson_id>")`` and one ``@tests.case`` per
graded test cell of the lesson; see autograder/README.md.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Trusted code for ``student.run``: an eval-mode Conv2d and BatchNorm2d rebuilt from the
# plain tensors of :func:`conv_bn_state` (modules cannot cross the sandbox boundary).
CONV_BN = """
import torch
from torch import nn
conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[2], groups=groups, bias=b is not None)
bn = nn.BatchNorm2d(w.shape[0], eps=eps)
with torch.no_grad():
    conv.weight.copy_(w)
    if b is not None:
        conv.bias.copy_(b)
    bn.weight.copy_(gamma)
    bn.bias.copy_(beta)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
conv.eval()
bn.eval()
"""


def conv_bn_state(conv: Any, bn: Any) -> dict[str, Any]:
    """The plain tensors that :data:`CONV_BN` rebuilds ``conv`` and ``bn`` from."""
    return dict(w=conv.weight.detach().clone(), b=None if conv.bias is None else conv.bias.detach().clone(),
                groups=conv.groups, eps=bn.eps, gamma=bn.weight.detach().clone(), beta=bn.bias.detach().clone(),
                mean=bn.running_mean.clone(), var=bn.running_var.clone())


def conv_bn(**state: Any) -> tuple[Any, Any]:
    """The grader's own (conv, bn) from the same state, by the same code the sandbox runs."""
    namespace = dict(state)
    exec(CONV_BN, namespace)
    return namespace["conv"], namespace["bn"]


@dataclass(frozen=True)
class Case:
    grade_id: str
    run: Callable[[Any], None]
    disabled: tuple[str, ...] = ()
    timeout: float | None = None  # seconds per call, if the default is not enough


@dataclass
class HiddenTests:
    lesson: str
    context: str = ""
    cases: dict[str, Case] = field(default_factory=dict)

    def case(self, grade_id: str, *, disabled: Iterable[str] = (), timeout: float | None = None
             ) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
        """Register the hidden test of the test cell ``grade_id``."""
        def register(fn: Callable[[Any], None]) -> Callable[[Any], None]:
            if grade_id in self.cases:
                raise ValueError(f"{self.lesson}: two hidden tests for {grade_id}")
            self.cases[grade_id] = Case(grade_id, fn, tuple(disabled), timeout)
            return fn
        return register


def load(lesson: str) -> HiddenTests:
    """The hidden tests of ``lesson`` (a fresh module object every call)."""
    path = HERE / f"{lesson}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no hidden tests for lesson {lesson}: {path.name} is missing")
    spec = importlib.util.spec_from_file_location(f"autograder.hidden.lesson_{lesson}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = getattr(module, "tests", None)
    if not isinstance(tests, HiddenTests) or tests.lesson != lesson:
        raise ValueError(f"{path.name} must define tests = HiddenTests({lesson!r})")
    return tests
