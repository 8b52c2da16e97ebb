"""The student notebooks in notebooks/: generated from solutions/, up to date, and safe to run.

An unsolved exercise must not break the rest of a lesson: executed as shipped (every
exercise still `raise NotImplementedError()`), a student notebook may fail only in its
exercise and test cells, and every graded test cell must fail there, so that no check
can pass on the stub.
"""

from __future__ import annotations

import re

import pytest
from notebook_utils import (
    NOTEBOOKS,
    SOLUTIONS,
    describe,
    errors,
    execute,
    grade_id,
    is_exercise_cell,
    is_test_cell,
    lesson_ids,
    load_script,
    nbgrader,
    read,
)

LESSONS = lesson_ids()
STUB = re.compile(r"# YOUR CODE HERE\n\s*raise NotImplementedError\(\)")  # nbgrader's code_stub, indented
build = load_script("build_student_notebooks")


def test_there_are_lessons() -> None:
    assert LESSONS, f"no solution notebooks NN_slug.ipynb in {SOLUTIONS}"


def test_every_student_notebook_has_a_solution() -> None:
    students = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert students == LESSONS, (
        f"notebooks/ holds {students}, solutions/ {LESSONS}: run `make student-notebooks` "
        "(and delete student notebooks whose lesson is gone)"
    )


def test_student_notebooks_are_up_to_date() -> None:
    stale = build.stale_notebooks(LESSONS)
    assert not stale, (
        f"notebooks/ is out of date with solutions/ for {stale}: run `make student-notebooks`"
    )


def test_generation_is_deterministic(tmp_path) -> None:
    first = build.build(tmp_path / "a", LESSONS)
    second = build.build(tmp_path / "b", LESSONS)
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two builds"


@pytest.mark.parametrize("lesson", LESSONS)
def test_solution_follows_the_exercise_conventions(lesson: str) -> None:
    nb = read(SOLUTIONS / f"{lesson}.ipynb")
    ids = [grade_id(c) for c in nb.cells if nbgrader(c)]
    assert len(ids) == len(set(ids)), f"duplicate nbgrader grade_ids: {ids}"
    exercises = [c for c in nb.cells if is_exercise_cell(c)]
    tests = [c for c in nb.cells if is_test_cell(c)]
    assert exercises and tests, "a lesson has at least one exercise and one graded test cell"
    for cell in exercises:
        meta = nbgrader(cell)
        assert meta["grade_id"].startswith("ex-") and not meta.get("grade"), meta
        assert "### BEGIN SOLUTION" in cell.source and "### END SOLUTION" in cell.source, meta["grade_id"]
    for cell in tests:
        meta = nbgrader(cell)
        gid = meta["grade_id"]
        assert gid.startswith("test-") and meta.get("locked") and float(meta.get("points", 0)) > 0, meta
        visible, _, hidden = cell.source.partition("### BEGIN HIDDEN TESTS")
        assert "grading.check" in visible, f"{gid}: no visible check before the hidden tests"
        assert "### END HIDDEN TESTS" in hidden, f"{gid}: no hidden tests"
        assert "reference_disabled" in hidden, f"{gid}: hidden tests must switch the references off"
    for cell in nb.cells:
        if not nbgrader(cell):
            assert "BEGIN SOLUTION" not in cell.source and "BEGIN HIDDEN" not in cell.source


@pytest.mark.parametrize("lesson", LESSONS)
def test_student_notebook_hides_solutions_and_hidden_tests(lesson: str) -> None:
    nb = read(NOTEBOOKS / f"{lesson}.ipynb")
    for cell in nb.cells:
        assert "BEGIN SOLUTION" not in cell.source and "HIDDEN TESTS" not in cell.source
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs must be cleared"
            assert "execution" not in cell.metadata, "timing metadata of the solution run leaked"
        if is_exercise_cell(cell):
            assert STUB.search(cell.source), f"{grade_id(cell)} does not carry the nbgrader stub"
        if is_test_cell(cell):
            assert cell.metadata.get("editable") is False and cell.metadata.get("deletable") is False


@pytest.mark.slow
@pytest.mark.parametrize("lesson", LESSONS)
def test_unsolved_student_notebook_fails_only_in_exercises(lesson: str) -> None:
    nb = execute(read(NOTEBOOKS / f"{lesson}.ipynb"), cwd=NOTEBOOKS)
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]

    broken = [describe(i, c) for i, c in code if errors(c) and not (is_exercise_cell(c) or is_test_cell(c))]
    assert not broken, (
        "cells outside the exercises fail when the exercises are unsolved; later cells must "
        "use the course_lib version:\n" + "\n".join(broken)
    )
    passing = [grade_id(c) for _, c in code if is_test_cell(c) and not errors(c)]
    assert not passing, f"graded test cells pass on the unsolved stub: {passing}"
    # The learner sees a check's explanation, not a bare traceback from the stub.
    unhelpful = [
        describe(i, c) for i, c in code
        if is_test_cell(c) and any(e.ename != "ExerciseError" for e in errors(c))
    ]
    assert not unhelpful, "test cells should fail through course_lib.grading checks:\n" + "\n".join(unhelpful)
    for _, c in code:
        if is_test_cell(c):
            message = " ".join(e.evalue for e in errors(c))
            assert re.search(r"not implemented yet", message), message
