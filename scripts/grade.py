"""Autograde a folder of submitted lesson notebooks with nbgrader and write a gradebook CSV.

    python scripts/grade.py SUBMISSIONS [--output grading/gradebook.csv] [--timeout 60]
    make grade SUBMISSIONS=path/to/submitted

SUBMISSIONS holds one sub-folder per student, in either layout::

    SUBMISSIONS/<student>/<assignment>/<assignment>.ipynb     (nbgrader's submitted/ layout)
    SUBMISSIONS/<student>/<assignment>.ipynb                  (a flat folder per student)

where <assignment> is a lesson id such as ``01_affine_map``. What happens:

1. The submissions are *copied* into a private nbgrader course directory in a
   temporary folder; the submitted files are only read, never moved or modified.
2. nbgrader ``generate_assignment`` runs on ``solutions/<assignment>.ipynb`` there,
   which records every test cell (with its hidden tests), its points and checksum in
   a fresh gradebook.db.
3. nbgrader ``autograde`` runs once per submission, each in a fresh kernel. Its
   OverwriteCells step puts back the original source of a locked test cell that a
   student edited, and re-inserts one that was deleted (``add_missing_cells`` in
   nbgrader_config.py), so every submission is graded against the original tests.
   Each cell gets ``--timeout`` seconds; a cell that runs longer (an infinite loop)
   is interrupted and the rest of the notebook still runs. The course directory is
   new for every run, so nothing needs ``--force`` and no earlier result is replaced.
4. The per-test-cell scores are read from the gradebook and written to a CSV:
   student, assignment, one column per graded test cell, total, max, seconds, status.
   A notebook that is not valid JSON/nbformat, or that nbgrader could not grade, is
   reported in the status column and on stdout; the rest of the batch is graded.

An existing CSV is never overwritten: the gradebook is then written next to it under
a new, timestamped name, and the script says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import nbformat
from nbgrader.api import Gradebook, MissingEntry
from nbgrader.converters import Autograde
from nbgrader.coursedir import CourseDirectory
from nbgrader.utils import capture_log
from traitlets.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_student_notebooks import (  # noqa: E402
    ROOT,
    SOLUTIONS,
    generate_assignments,
    lesson_ids,
    nbgrader_config,
)

DEFAULT_OUTPUT = ROOT / "grading" / "gradebook.csv"
DEFAULT_TIMEOUT = 60  # seconds per cell

__all__ = [
    "Submission",
    "Result",
    "discover",
    "check_notebook",
    "graded_cells",
    "grade",
    "unused_path",
    "write_csv",
    "main",
]


@dataclass
class Submission:
    """One submitted notebook, or a problem found while looking for one."""

    student: str
    assignment: str
    path: Path | None
    problem: str = ""  # non-empty: reported, not graded


@dataclass
class Result:
    student: str
    assignment: str
    points: dict[str, float | None] = field(default_factory=dict)  # grade_id -> score
    max_points: float | None = None
    seconds: float | None = None
    status: str = "ok"

    @property
    def total(self) -> float | None:
        if not self.points or any(v is None for v in self.points.values()):
            return None
        return sum(self.points.values())  # type: ignore[arg-type]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name != "__pycache__"


def discover(submissions: Path, lessons: Iterable[str]) -> list[Submission]:
    """Find ``<student>/<assignment>/<assignment>.ipynb`` and ``<student>/<assignment>.ipynb``.

    Anything unexpected (an unknown notebook, a student folder without one, the same
    lesson twice) comes back as a :class:`Submission` with a ``problem`` to report.
    """
    lessons = set(lessons)
    found: list[Submission] = []
    for student_dir in sorted(p for p in submissions.iterdir() if _visible(p)):
        if not student_dir.is_dir():
            continue  # a stray file beside the student folders
        student = student_dir.name
        candidates: list[tuple[str, Path]] = []
        for entry in sorted(p for p in student_dir.iterdir() if _visible(p)):
            if entry.is_file() and entry.suffix == ".ipynb":
                candidates.append((entry.stem, entry))
            elif entry.is_dir():
                for nb in sorted(p for p in entry.glob("*.ipynb") if _visible(p)):
                    if nb.stem != entry.name:
                        found.append(Submission(
                            student, entry.name, None,
                            f"skipped {nb.relative_to(submissions)}: expected "
                            f"{entry.name}/{entry.name}.ipynb (one notebook per lesson)"))
                        continue
                    candidates.append((entry.name, nb))
        if not candidates and not any(s.student == student for s in found):
            found.append(Submission(student, "", None, "error: no notebook found in the student folder"))
        seen: dict[str, Path] = {}
        for assignment, path in candidates:
            rel = path.relative_to(submissions)
            if assignment not in lessons:
                found.append(Submission(
                    student, assignment, None,
                    f"skipped {rel}: not a lesson notebook (lessons: {', '.join(sorted(lessons))})"))
            elif assignment in seen:
                found.append(Submission(
                    student, assignment, None,
                    f"two copies of {assignment}: graded {seen[assignment].relative_to(submissions)}, "
                    f"ignored {rel}"))
            else:
                seen[assignment] = path
        for assignment, path in seen.items():
            found.append(Submission(student, assignment, path))
    return found


def check_notebook(path: Path) -> str:
    """Empty string if ``path`` reads as a valid notebook, else what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return f"malformed notebook: not UTF-8 text ({exc.reason} at byte {exc.start})"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"malformed notebook: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    if not isinstance(data, dict) or "cells" not in data:
        return "malformed notebook: valid JSON, but not a notebook (no top-level \"cells\")"
    try:
        nbformat.validate(nbformat.reads(text, as_version=4))
    except nbformat.ValidationError as exc:
        return f"malformed notebook: not a valid nbformat 4 notebook ({exc.message})"
    except Exception as exc:  # nbformat chokes on the structure before it can validate it
        return f"malformed notebook: not a valid nbformat 4 notebook ({type(exc).__name__}: {exc})"
    return ""


def graded_cells(lesson: str) -> dict[str, float]:
    """grade_id -> points of every graded cell of a lesson, in notebook order."""
    nb = nbformat.read(SOLUTIONS / f"{lesson}.ipynb", as_version=4)
    cells = {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade"):
            cells[meta["grade_id"]] = float(meta["points"])
    return cells


def _test_sources(path: Path) -> dict[str, str]:
    """grade_id -> source of the locked test cells of a notebook."""
    nb = nbformat.read(path, as_version=4)
    return {
        cell.metadata["nbgrader"]["grade_id"]: cell.source
        for cell in nb.cells
        if cell.metadata.get("nbgrader", {}).get("grade") and not cell.metadata["nbgrader"].get("solution")
    }


def _test_cell_changes(submitted: Path, released: Path, solution: Path) -> list[str]:
    """Locked test cells a submission edited or deleted (nbgrader grades with the originals).

    A test cell equal to the student version (visible checks only) or to the
    solution version (with hidden tests) is unchanged.
    """
    student, original, got = _test_sources(released), _test_sources(solution), _test_sources(submitted)
    notes = []
    for grade_id, source in student.items():
        if grade_id not in got:
            notes.append(f"locked cell {grade_id} was deleted; graded with the original test")
        elif got[grade_id] not in (source, original.get(grade_id)):
            notes.append(f"locked cell {grade_id} was edited; graded with the original test")
    return notes


def _timeouts(autograded: Path, timeout: int) -> list[str]:
    """Cells of the executed notebook that nbgrader interrupted after ``timeout`` seconds."""
    if not autograded.is_file():
        return []
    nb = nbformat.read(autograded, as_version=4)
    hits = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and out.get("ename") == "CellTimeoutError":
                name = cell.metadata.get("nbgrader", {}).get("grade_id", f"cell {index}")
                hits.append(f"{name} stopped after the {timeout} s per-cell timeout")
    return hits


def _autograde(config: Config, sub: Submission, timeout: int) -> Result:
    result = Result(sub.student, sub.assignment)
    cells = graded_cells(sub.assignment)
    result.max_points = sum(cells.values())

    coursedir = CourseDirectory(config=config)
    coursedir.assignment_id = sub.assignment
    coursedir.student_id = sub.student
    converter = Autograde(coursedir=coursedir, config=config)
    converter.force = False  # a fresh course directory: nothing to replace, nothing lost
    start = time.perf_counter()
    outcome = capture_log(converter)
    result.seconds = time.perf_counter() - start

    log = outcome.get("log", "")
    if not outcome["success"]:
        last = [line for line in log.splitlines() if line.strip()][-6:]
        result.status = "error: nbgrader could not grade this notebook: " + " | ".join(last)
        return result

    with Gradebook(config.CourseDirectory.db_url, config.CourseDirectory.course_id) as gb:
        try:
            nb = gb.find_submission_notebook(sub.assignment, sub.assignment, sub.student)
        except MissingEntry:
            result.status = "error: nbgrader recorded no grades for this submission"
            return result
        scores = {g.name: g.score for g in nb.grades}
    result.points = {name: scores.get(name) for name in cells}

    root, name = Path(coursedir.root), f"{sub.assignment}.ipynb"
    notes = _test_cell_changes(
        root / "submitted" / sub.student / sub.assignment / name,
        root / "release" / sub.assignment / name,
        SOLUTIONS / name,
    ) + _timeouts(root / "autograded" / sub.student / sub.assignment / name, timeout)
    if any(v is None for v in result.points.values()):
        missing = [k for k, v in result.points.items() if v is None]
        notes.append(f"no automatic score for {', '.join(missing)} (needs manual grading)")
    result.status = "ok" + (": " + "; ".join(notes) if notes else "")
    return result


def _grade_in(workdir: Path, found: list[Submission], timeout: int, progress: bool) -> list[Result]:
    config = nbgrader_config(workdir)
    config.Execute.timeout = timeout
    results: list[Result] = []
    gradable = []
    for sub in found:
        if sub.problem:
            results.append(Result(sub.student, sub.assignment, status=sub.problem))
            continue
        assert sub.path is not None
        problem = check_notebook(sub.path)
        if problem:
            res = Result(sub.student, sub.assignment, status="error: " + problem)
            res.max_points = sum(graded_cells(sub.assignment).values())
            results.append(res)
            continue
        target = workdir / "submitted" / sub.student / sub.assignment / f"{sub.assignment}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sub.path, target)  # reads the original only; its bytes and mtime stay
        gradable.append(sub)

    if gradable:
        generate_assignments(workdir, sorted({s.assignment for s in gradable}), config=config)
    for i, sub in enumerate(gradable, 1):
        if progress:
            print(f"[{i}/{len(gradable)}] grading {sub.student}/{sub.assignment} ...", flush=True)
        results.append(_autograde(config, sub, timeout))
    return results


def grade(submissions: Path, *, timeout: int = DEFAULT_TIMEOUT, keep: Path | None = None,
          progress: bool = True) -> list[Result]:
    """Autograde every submission under ``submissions``; return one Result per row."""
    found = discover(submissions, lesson_ids())
    # The kernels nbgrader starts must import course_lib, installed or not.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    workdir = Path(tempfile.mkdtemp(prefix="nbgrader-grading-"))
    try:
        with warnings.catch_warnings():
            # nbgrader 0.9 trips these two harmless warnings while it builds a
            # submission's gradebook entries and when it re-inserts a deleted test
            # cell; they say nothing about the submission, so exactly they are hidden.
            warnings.filterwarnings("ignore", message=r"Object of type <Submitted\w+> not in session")
            warnings.filterwarnings("ignore", message=r"Cell is missing an id field")
            results = _grade_in(workdir, found, timeout, progress)
    finally:
        if keep is not None:
            shutil.copytree(workdir, keep)
        shutil.rmtree(workdir, ignore_errors=True)
    return sorted(results, key=lambda r: (r.student, r.assignment))


def unused_path(path: Path) -> Path:
    """``path`` if it does not exist yet, else a new timestamped name beside it."""
    if not path.exists():
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.stem}-{stamp}{path.suffix}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{stamp}-{n}{path.suffix}")
        n += 1
    return candidate


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def write_csv(results: list[Result], path: Path) -> Path:
    """Write the gradebook to ``path`` (or a new name beside it); return where it went."""
    columns: list[str] = []
    for lesson in sorted({r.assignment for r in results if r.assignment in lesson_ids()}):
        columns += [c for c in graded_cells(lesson) if c not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    target = unused_path(path)
    with target.open("x", newline="", encoding="utf-8") as f:  # "x": never overwrite
        writer = csv.writer(f)
        writer.writerow(["student", "assignment", *columns, "total", "max", "seconds", "status"])
        for r in results:
            writer.writerow([
                r.student, r.assignment,
                *(_fmt(r.points.get(c)) if c in r.points else "" for c in columns),
                _fmt(r.total), _fmt(r.max_points),
                "" if r.seconds is None else f"{r.seconds:.1f}", r.status,
            ])
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Autograde a folder of submissions (one sub-folder per student) with nbgrader.")
    parser.add_argument("submissions", type=Path, help="folder with one sub-folder per student")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="gradebook CSV (default: grading/gradebook.csv; never overwritten)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT,
                        help=f"seconds each cell may run before it is interrupted (default {DEFAULT_TIMEOUT})")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the nbgrader course directory (autograded notebooks, gradebook.db) here")
    args = parser.parse_args(argv)
    if not args.submissions.is_dir():
        parser.error(f"{args.submissions} is not a folder of student sub-folders")
    if args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep} exists already; choose a new folder")

    results = grade(args.submissions.resolve(), timeout=args.timeout, keep=args.keep)
    for r in results:
        score = f"{_fmt(r.total) or '-'}/{_fmt(r.max_points) or '-'}"
        secs = "" if r.seconds is None else f"{r.seconds:5.1f} s"
        print(f"{r.student:<16} {r.assignment:<28} {score:>9} {secs:>8}  {r.status}")
    target = write_csv(results, args.output)
    if target != args.output:
        print(f"{args.output} exists and was not overwritten; wrote a new file instead.")
    print(f"gradebook: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
