"""The student notebooks in notebooks/: generated from solutions/, up to date, and safe to run.

An unsolved exercise must not break the rest of a lesson: executed as shipped (every
exercise still `raise NotImplementedError()`), a student notebook may fail only in its
exercise and test cells, and every graded test cell must fail there, so that no check
can pass on the stub. Exactly those cells carry the `raises-exception` tag, so that
JupyterLab's Run All carries on past them to the end of the lesson
(tests/test_browser.py clicks it).
"""

from __future__ import annotations

import re

import nbformat
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

from autograder import hidden

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


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory) -> list:
    """notebooks/ built afresh from solutions/ into a temporary folder (once: nbgrader is slow)."""
    return build.build(tmp_path_factory.mktemp("student-notebooks"), LESSONS)


def test_student_notebooks_are_up_to_date(fresh_build) -> None:
    stale = build.stale_notebooks(LESSONS, built=fresh_build)
    assert not stale, (
        f"notebooks/ is out of date with solutions/ for {stale}: run `make student-notebooks`"
    )


def test_generation_is_deterministic(fresh_build, tmp_path) -> None:
    first = fresh_build
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
        assert "grading.check" in cell.source, f"{gid}: no visible check"
        # The hidden tests run in the grader (autograder/hidden/), never in the notebook.
        assert "HIDDEN TESTS" not in cell.source and "reference_disabled" not in cell.source, gid
    cases = hidden.load(lesson).cases
    assert list(cases) == [grade_id(c) for c in tests], f"{lesson}: one hidden test per graded test cell"
    for case in cases.values():
        assert case.disabled, f"{case.grade_id}: a hidden test switches the library's own answer off"
    for cell in nb.cells:
        if not nbgrader(cell):
            assert "BEGIN SOLUTION" not in cell.source and "BEGIN HIDDEN" not in cell.source


@pytest.mark.parametrize("lesson", LESSONS)
def test_solution_stores_its_figures_as_pictures(lesson: str) -> None:
    """A figure shows as a picture, never as its text repr "<Figure size 750x340 with 1 Axes>".

    That text is what a learner (and the website) sees when a cell returns a matplotlib
    Figure before anything has switched on the inline backend (importing pyplot, or
    ``%matplotlib inline`` in the set-up cell).
    """
    nb = read(SOLUTIONS / f"{lesson}.ipynb")
    bare = [
        describe(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"
        for out in c.outputs
        if "image/png" not in out.get("data", {})
        and re.search(r"<(?:matplotlib\.figure\.)?Figure size \d+x\d+", str(out.get("data", {}).get("text/plain", "")))
    ]
    assert not bare, "figures stored as text, not as pictures:\n" + "\n".join(bare)


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


@pytest.mark.parametrize("lesson", LESSONS)
def test_student_notebook_tags_exactly_the_cells_that_may_fail(lesson: str) -> None:
    nb = read(NOTEBOOKS / f"{lesson}.ipynb")
    may_fail = [i for i, c in enumerate(nb.cells) if is_exercise_cell(c) or is_test_cell(c)]
    tagged = [i for i, c in enumerate(nb.cells) if build.MAY_FAIL_TAG in c.metadata.get("tags", [])]
    assert may_fail, "a lesson has exercise and test cells"
    assert tagged == may_fail, (
        f"cells tagged {build.MAY_FAIL_TAG!r}: {tagged}; exercise and test cells: {may_fail} "
        "(run `make student-notebooks`)"
    )
    assert all(nb.cells[i].cell_type == "code" for i in tagged)
    # The solution stays untagged: a failing cell there is a bug that nbval must report.
    solution = read(SOLUTIONS / f"{lesson}.ipynb")
    assert not [c for c in solution.cells if build.MAY_FAIL_TAG in c.metadata.get("tags", [])]


def test_tagging_marks_exercises_and_checks_only() -> None:
    v4 = nbformat.v4
    exercise = v4.new_code_cell("raise NotImplementedError()", metadata={
        "nbgrader": {"solution": True, "grade": False, "grade_id": "ex-a"}, "tags": ["keep"]})
    check = v4.new_code_cell("check()", metadata={
        "nbgrader": {"solution": False, "grade": True, "locked": True, "grade_id": "test-a"}})
    locked = v4.new_code_cell("x = 1", metadata={
        "nbgrader": {"solution": False, "grade": False, "locked": True, "grade_id": "setup"}})
    stray = v4.new_code_cell("y = 2", metadata={"tags": [build.MAY_FAIL_TAG]})
    prose = v4.new_markdown_cell("text", metadata={"nbgrader": {"solution": True, "grade": True}})
    nb = v4.new_notebook(cells=[exercise, check, locked, stray, prose])
    build.tag_cells_that_may_fail(nb)
    build.tag_cells_that_may_fail(nb)  # idempotent
    assert [c.metadata.get("tags") for c in nb.cells] == [
        ["keep", build.MAY_FAIL_TAG], [build.MAY_FAIL_TAG], None, None, None,
    ]


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
