"""Grading every lesson: the solution earns full marks, the untouched student notebook zero.

`test_grading_pipeline.py` covers the hard cases (attacks, edited and deleted test cells,
a forwarded reference, an infinite loop, a malformed file). This file grades one batch
with two students for all lessons through scripts/grade.py (sandboxed workers, hidden
tests in the grader, scores into nbgrader's gradebook), so every lesson's hidden tests
are known to pass on its own solution and to give nothing to every generated student
notebook. Expected points come from the solution notebooks' nbgrader metadata.
"""

from __future__ import annotations

import shutil
import time

import pytest
from notebook_utils import NOTEBOOKS, SOLUTIONS, graded_points, lesson_ids, load_script, read

LESSONS = lesson_ids()
TIMEOUT = 300  # seconds per exercise cell and call: far above any honest answer, so only a hang trips it
grade = load_script("grade")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("all-lessons") / "submitted"
    for lesson in LESSONS:
        solved = root / "solved" / lesson  # nbgrader's layout
        solved.mkdir(parents=True)
        shutil.copyfile(SOLUTIONS / f"{lesson}.ipynb", solved / f"{lesson}.ipynb")
        untouched = root / "untouched"  # the flat layout
        untouched.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(NOTEBOOKS / f"{lesson}.ipynb", untouched / f"{lesson}.ipynb")
    start = time.perf_counter()
    graded = grade.grade(root, timeout=TIMEOUT, progress=False)
    seconds = time.perf_counter() - start
    rows = {(r.student, r.assignment): r for r in graded}
    print(f"\n{len(graded)} submissions graded in {seconds:.0f} s: "
          + ", ".join(f"{s}/{a} {r.total}/{r.max_points} in {r.seconds:.0f} s" for (s, a), r in sorted(rows.items())))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("lesson", LESSONS)
def test_solution_earns_full_marks(results, lesson: str) -> None:
    expected = graded_points(read(SOLUTIONS / f"{lesson}.ipynb"))
    row = results["solved", lesson]
    assert row.status == "ok", row.status
    assert row.points == expected, f"{lesson}: {row.points} (expected {expected})"
    assert row.total == row.max_points == sum(expected.values())


@pytest.mark.slow
@pytest.mark.parametrize("lesson", LESSONS)
def test_untouched_student_notebook_earns_zero(results, lesson: str) -> None:
    expected = graded_points(read(SOLUTIONS / f"{lesson}.ipynb"))
    row = results["untouched", lesson]
    assert row.status.startswith("ok"), row.status
    assert row.points == dict.fromkeys(expected, 0.0), f"{lesson}: {row.points}"
    assert row.max_points == sum(expected.values())
