"""Grade one submitted notebook: each hidden test in its own process, in one sandbox.

``grade_notebook`` is what ``scripts/grade.py`` (``make grade``) and
``python -m autograder.selftest`` call. The verdict is computed here, in the grader's
process, from plain data that the student's process sent back.
"""

from __future__ import annotations

import ast
import functools
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

import course_lib

from . import hidden, sandbox
from .session import GraderError, Program, Sandbox, Student, StudentError

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = REPO / "solutions"
course_lib.filter_quantization_warnings()  # the hidden tests build quantized tensors on purpose
course_lib.drop_torchao_import_notice()  # and import torchao (lessons 05 and 08)


@dataclass
class TestResult:
    grade_id: str
    max_points: float
    points: float = 0.0
    message: str = ""


@dataclass
class NotebookResult:
    tests: dict[str, TestResult] = field(default_factory=dict)
    cell_errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    timed_out: bool = False


def _meta(cell: nbformat.NotebookNode) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def lesson_layout(lesson: str) -> tuple[str, dict[str, float], list[str]]:
    """(set-up cell source, {test grade_id: points}, exercise grade_ids) of a solution notebook."""
    nb = nbformat.read(SOLUTIONS / f"{lesson}.ipynb", as_version=4)
    setup = next(c.source for c in nb.cells if c.cell_type == "code")
    points = {_meta(c)["grade_id"]: float(_meta(c)["points"]) for c in nb.cells
              if _meta(c).get("grade") and not _meta(c).get("solution")}
    exercises = [_meta(c)["grade_id"] for c in nb.cells if _meta(c).get("solution")]
    return setup, points, exercises


def exercise_cells(nb: nbformat.NotebookNode, exercise_ids: list[str]) -> list[tuple[str, str]]:
    """(grade_id, source) of the submission's exercise cells, in notebook order, once each."""
    wanted, seen, cells = set(exercise_ids), set(), []
    for cell in nb.cells:
        gid = _meta(cell).get("grade_id")
        if cell.get("cell_type") == "code" and gid in wanted and gid not in seen:
            seen.add(gid)
            cells.append((gid, cell.source))
    return cells


def _imports(source: str, package: str = "") -> set[str]:
    """Modules that ``source`` imports; ``package`` resolves its relative imports."""
    names = set()
    try:
        tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    except SyntaxError:
        return names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if not package:
                    continue
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.add(module)
            if module.split(".")[0] == "course_lib":  # `from course_lib.mcu import planner`
                names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def _course_module(name: str) -> tuple[Path, str] | None:
    """course_lib's source file of module ``name`` and the package its relative imports start from."""
    folder = sandbox.COURSE_LIB.joinpath(*name.split(".")[1:])
    if (folder / "__init__.py").is_file():
        return folder / "__init__.py", name
    if folder.with_suffix(".py").is_file():
        return folder.with_suffix(".py"), name.rsplit(".", 1)[0]
    return None


@functools.cache
def preload_modules(setup: str) -> tuple[str, ...]:
    """Third-party modules the set-up cell imports, directly or through course_lib."""
    return _preload_modules(setup)


# Imports inside functions are preloaded too, on purpose. Preloading only module-level imports
# was tried: lesson 06's set-up cell then failed in the sandbox, in the lazy import of
# torch._inductor that torch.use_deterministic_algorithms makes ("'function' object has no
# attribute 'default'"), a module first imported in a child after the test's stubs were in
# place. Importing everything in the zygote, before any stub exists, avoids that class of failure.
def _preload_modules(setup: str) -> tuple[str, ...]:
    seen, todo, outside = set(), sorted(_imports(setup)), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name == "course_lib" or name.startswith("course_lib."):
            found = _course_module(name)
            if found:
                todo += sorted(_imports(found[0].read_text(), package=found[1]) - seen)
        else:
            outside.add(name)
    return tuple(sorted(outside))


@functools.cache
def course_sources(disabled: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """A hidden test's course_lib sources (its ``disabled`` references off), built once per process."""
    return sandbox.course_sources(disabled)


def _quiet() -> None:
    """A grading process's start: the hidden checks' ✔ lines are for notebooks, not for this log."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)


def process_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` processes that grade notebooks side by side, one notebook at a time each.

    Processes, not threads. Grading is not thread-safe on CPython 3.11: its ast module
    keeps one recursion counter per interpreter, so a syntax tree built in one thread while
    another thread builds one can fail with "SystemError: AST constructor recursion depth
    mismatch". Grading builds trees all the time, much of it outside this package (np.load
    parses each .npy header with ast.literal_eval; importing torch and running
    torch.export parse source), and CI met the error with threads: one thread's parse of
    course_lib failed while the other was grading, and the whole batch errored. Each
    process has its own counter.
    Started with "spawn": the grader may hold threads (pytest-xdist's), which fork must not copy.
    """
    return ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_quiet)


# Exceptions of the hidden test's own code that no returned value can cause: a bug in the
# test (NameError), a missing module or file, a broken interpreter. They must not cost the
# student the test's points; the submission is reported as the grader's error instead.
# (TypeError, ValueError, AttributeError, ...: a value of the wrong kind, the student's.)
GRADER_FAULTS = (NameError, ImportError, OSError, SystemError, SyntaxError)


def grade_notebook(lesson: str, nb: nbformat.NotebookNode, *, workdir: Path, limits: sandbox.Limits | None = None,
                   use_sandbox: bool = True, notebook_s: float = 600.0) -> NotebookResult:
    """Run every hidden test of ``lesson`` against the exercise cells of ``nb``."""
    limits = limits or sandbox.Limits()
    tests = hidden.load(lesson)
    setup, points, exercise_ids = lesson_layout(lesson)
    missing = set(points) - set(tests.cases)
    extra = set(tests.cases) - set(points)
    if missing or extra:
        raise GraderError(f"{lesson}: hidden tests missing for {sorted(missing)}, "
                          f"for no graded cell: {sorted(extra)}")
    program = Program(setup=setup, context=tests.context, cells=exercise_cells(nb, exercise_ids))
    result = NotebookResult()
    start = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    root = sandbox.build_course_root(workdir / "course")
    box = Sandbox(root, limits, workdir / "worker.log", list(preload_modules(setup)), use_sandbox=use_sandbox)
    try:
        for grade_id, max_points in points.items():
            outcome = result.tests[grade_id] = TestResult(grade_id, max_points)
            if time.monotonic() - start > notebook_s:
                result.timed_out = True
                outcome.message = f"not run: the notebook's {notebook_s:g} s time limit was used up"
                continue
            case = tests.cases[grade_id]
            course, in_memory = course_sources(case.disabled)
            student = Student(box, program, course, in_memory,
                              call_s=None if case.timeout is None else max(case.timeout, limits.call_s))
            try:
                case.run(student)
            except GraderError:
                raise
            except StudentError as exc:
                outcome.message = str(exc)
            except AssertionError as exc:  # grading.check: the value is wrong
                outcome.message = str(exc)
            except GRADER_FAULTS as exc:  # the hidden test's own failure: no score, a human looks
                raise GraderError(f"{lesson}, hidden test {grade_id} failed in the grader: "
                                  f"{type(exc).__name__}: {exc}") from exc
            except Exception as exc:  # the returned value could not even be compared
                outcome.message = f"the returned value could not be checked: {type(exc).__name__}: {exc}"
            else:
                outcome.points = max_points
                outcome.message = "passed"
            finally:
                student.close()
                result.cell_errors.update(student.cell_errors)
    finally:
        box.kill()
    result.seconds = time.monotonic() - start
    return result
