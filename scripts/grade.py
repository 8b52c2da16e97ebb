"""Grade a folder of submitted lesson notebooks and write a gradebook CSV.

    python scripts/grade.py SUBMISSIONS [--output grading/gradebook.csv] [--timeout 60]
    make grade SUBMISSIONS=path/to/submitted

SUBMISSIONS holds one sub-folder per student, in either layout::

    SUBMISSIONS/<student>/<assignment>/<assignment>.ipynb     (nbgrader's submitted/ layout)
    SUBMISSIONS/<student>/<assignment>.ipynb                  (a flat folder per student)

where <assignment> is a lesson id such as ``01_affine_map``. What happens:

1. The submissions are *copied* into a private nbgrader course directory in a
   temporary folder; the submitted files are only read, never moved or modified.
2. nbgrader ``generate_assignment`` runs on ``solutions/<assignment>.ipynb`` there and
   records every graded test cell and its points in a fresh gradebook.db.
3. Each submission is graded by ``autograder`` (see autograder/README.md): for every
   graded test cell, a fresh bubblewrap sandbox runs the lesson's set-up cell and the
   submission's exercise cells, with the library's own version of that exercise
   switched off before any student code runs; the hidden test runs *here*, calls the
   student's functions with plain data and compares what comes back with values it
   computed itself. Nothing in the student's process decides a score, and nothing the
   student's code writes can reach the repository, other submissions or the gradebook.
   Each exercise cell and each call gets ``--timeout`` seconds, a submission
   ``--notebook-timeout`` seconds; the worker's memory is limited.
4. The scores go into nbgrader's gradebook (so ``nbgrader export`` and the formgrader
   show them, with a feedback notebook per submission in ``autograded/``) and into a
   CSV: student, assignment, one column per graded test cell, total, max, seconds,
   status, and *flags*: code that looks like an attempt on the grader (frames,
   ``__code__``, ``sys.modules``, IPython hooks, file writes, …), for a human to read.
   Flags never change a score. A malformed notebook is reported in the status column
   and the rest of the batch is graded.

Without bubblewrap the script refuses to run, unless ``--no-sandbox`` says explicitly
to run student code unisolated (only for code you trust, e.g. your own tests).

An existing CSV is never overwritten: the gradebook is then written next to it under
a new, timestamped name, and the script says so.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
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
from nbgrader.api import Gradebook
from traitlets.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from build_student_notebooks import (  # noqa: E402
    ROOT,
    SOLUTIONS,
    generate_assignments,
    lesson_ids,
    nbgrader_config,
)

from autograder.flags import notebook_flags  # noqa: E402
from autograder.grader import NotebookResult, grade_notebook, process_pool  # noqa: E402
from autograder.sandbox import Limits, SandboxUnavailable, probe  # noqa: E402
from autograder.session import GraderError  # noqa: E402

DEFAULT_OUTPUT = ROOT / "grading" / "gradebook.csv"
DEFAULT_TIMEOUT = 60  # seconds per exercise cell and per call of a student function
DEFAULT_NOTEBOOK_S = 600  # seconds for all hidden tests of one submission

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
    flags: list[str] = field(default_factory=list)  # code worth a human look; never scored

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


def _released(workdir: Path, assignment: str) -> Path:
    return workdir / "release" / assignment / f"{assignment}.ipynb"


def _record(config: Config, sub: Submission, result: Result, outcome: NotebookResult) -> None:
    """Put the grader's scores into nbgrader's gradebook, so `nbgrader export` and the
    formgrader show the numbers of the CSV."""
    with Gradebook(config.CourseDirectory.db_url, config.CourseDirectory.course_id) as gb:
        gb.update_or_create_student(sub.student)
        gb.add_submission(sub.assignment, sub.student)
        for grade_id, test in outcome.tests.items():
            grade = gb.find_grade(grade_id, sub.assignment, sub.assignment, sub.student)
            grade.auto_score = test.points
            grade.needs_manual_grade = False
        gb.db.commit()


def _feedback_notebook(submitted: nbformat.NotebookNode, assignment: str,
                       outcome: NotebookResult) -> nbformat.NotebookNode:
    """The submission with each test cell's original source and the grader's verdict as its output."""
    nb = nbformat.from_dict(json.loads(json.dumps(submitted)))
    originals = _test_sources(SOLUTIONS / f"{assignment}.ipynb")
    for cell in nb.cells:
        gid = (cell.get("metadata", {}).get("nbgrader", {}) or {}).get("grade_id")
        if gid in outcome.tests and cell.get("cell_type") == "code":
            test = outcome.tests[gid]
            cell.source = originals.get(gid, cell.source)
            mark = "✔" if test.points == test.max_points else "✘"
            text = f"{mark} hidden tests: {test.points:g} of {test.max_points:g} points. {test.message}\n"
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    return nb


def _grade_one(workdir: Path, sub: Submission, limits: Limits, use_sandbox: bool, notebook_s: float,
               progress: bool) -> tuple[Result, NotebookResult | None]:
    """Grade one submission, in a process of :func:`autograder.grader.process_pool`."""
    if progress:
        print(f"grading {sub.student}/{sub.assignment} ...", file=sys.__stdout__, flush=True)
    result = Result(sub.student, sub.assignment)
    cells = graded_cells(sub.assignment)
    result.max_points = sum(cells.values())
    assert sub.path is not None
    submitted = nbformat.read(sub.path, as_version=4)
    released = nbformat.read(_released(workdir, sub.assignment), as_version=4)
    result.flags = notebook_flags(submitted, released)
    start = time.perf_counter()
    try:
        outcome = grade_notebook(sub.assignment, submitted, workdir=workdir / "work" / sub.student / sub.assignment,
                                 limits=limits, use_sandbox=use_sandbox, notebook_s=notebook_s)
    except GraderError as exc:
        result.seconds = time.perf_counter() - start
        result.status = f"error: the grader failed on this lesson (not the student's fault): {_one_line(str(exc), 600)}"
        return result, None
    result.seconds = time.perf_counter() - start
    result.points = {gid: outcome.tests[gid].points if gid in outcome.tests else None for gid in cells}
    autograded = workdir / "autograded" / sub.student / sub.assignment / f"{sub.assignment}.ipynb"
    autograded.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(_feedback_notebook(submitted, sub.assignment, outcome), autograded)

    notes = _test_cell_changes(sub.path, _released(workdir, sub.assignment), SOLUTIONS / f"{sub.assignment}.ipynb")
    notes += [f"{gid}: {t.message}" for gid, t in outcome.tests.items() if t.points < t.max_points]
    notes += [f"exercise cell {gid}: {err}" for gid, err in outcome.cell_errors.items()]
    if outcome.timed_out:
        notes.append(f"stopped after the notebook's {notebook_s:g} s limit")
    result.status = "ok" + (": " + "; ".join(_one_line(n) for n in notes) if notes else "")
    return result, outcome


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _grade_in(workdir: Path, found: list[Submission], limits: Limits, use_sandbox: bool,
              notebook_s: float, jobs: int, progress: bool) -> list[Result]:
    config = nbgrader_config(workdir)
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
        gradable.append(Submission(sub.student, sub.assignment, target))

    if gradable:
        generate_assignments(workdir, sorted({s.assignment for s in gradable}), config=config)
    # Submissions side by side, each in its own sandbox, graded in a worker process; the
    # gradebook is written from this process only.
    graded = []
    if gradable:
        with process_pool(min(jobs, len(gradable))) as pool:
            graded = list(pool.map(functools.partial(_grade_one, workdir, limits=limits, use_sandbox=use_sandbox,
                                                     notebook_s=notebook_s, progress=progress), gradable))
    for sub, (result, outcome) in zip(gradable, graded, strict=True):
        if outcome is not None:
            _record(config, sub, result, outcome)
        results.append(result)
    return results


def grade(submissions: Path, *, timeout: int = DEFAULT_TIMEOUT, keep: Path | None = None,
          progress: bool = True, use_sandbox: bool = True, notebook_s: float = DEFAULT_NOTEBOOK_S,
          memory_bytes: int | None = None, jobs: int = 2) -> list[Result]:
    """Grade every submission under ``submissions``; return one Result per row.

    Raises :class:`SandboxUnavailable` when ``use_sandbox`` and bubblewrap cannot run here.
    Submissions are graded in ``jobs`` worker processes started with ``spawn``: a script
    that calls this function needs the ``if __name__ == "__main__":`` guard.
    """
    limits = Limits(cell_s=timeout, call_s=timeout,
                    **({"memory_bytes": memory_bytes} if memory_bytes else {}))
    if use_sandbox:
        probe(limits)
    found = discover(submissions, lesson_ids())
    workdir = Path(tempfile.mkdtemp(prefix="course-grading-"))
    try:
        with warnings.catch_warnings():
            # nbgrader 0.9 trips this harmless warning while it builds gradebook entries.
            warnings.filterwarnings("ignore", message=r"Object of type <Submitted\w+> not in session")
            results = _grade_in(workdir, found, limits, use_sandbox, notebook_s, jobs, progress)
    finally:
        if keep is not None:
            shutil.copytree(workdir, keep, ignore=shutil.ignore_patterns("sandbox"))
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
        writer.writerow(["student", "assignment", *columns, "total", "max", "seconds", "status", "flags"])
        for r in results:
            writer.writerow([
                r.student, r.assignment,
                *(_fmt(r.points.get(c)) if c in r.points else "" for c in columns),
                _fmt(r.total), _fmt(r.max_points),
                "" if r.seconds is None else f"{r.seconds:.1f}", r.status, "; ".join(r.flags),
            ])
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Grade a folder of submissions (one sub-folder per student) in a sandbox.")
    parser.add_argument("submissions", type=Path, help="folder with one sub-folder per student")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="gradebook CSV (default: grading/gradebook.csv; never overwritten)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT,
                        help=f"seconds for each exercise cell and each call of a student function "
                             f"(default {DEFAULT_TIMEOUT})")
    parser.add_argument("--notebook-timeout", type=int, default=DEFAULT_NOTEBOOK_S,
                        help=f"seconds for all hidden tests of one submission (default {DEFAULT_NOTEBOOK_S})")
    parser.add_argument("--jobs", type=int, default=2,
                        help="submissions graded side by side, each in its own sandbox (default 2)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="address-space limit of a student's process in GiB (default 8)")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run student code WITHOUT isolation (only for code you trust)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the nbgrader course directory (autograded notebooks, gradebook.db) here")
    args = parser.parse_args(argv)
    if not args.submissions.is_dir():
        parser.error(f"{args.submissions} is not a folder of student sub-folders")
    if args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep} exists already; choose a new folder")

    try:
        results = grade(args.submissions.resolve(), timeout=args.timeout, keep=args.keep,
                        use_sandbox=not args.no_sandbox, notebook_s=args.notebook_timeout, jobs=args.jobs,
                        memory_bytes=int(args.memory_gb * 2**30) if args.memory_gb else None)
    except SandboxUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        score = f"{_fmt(r.total) or '-'}/{_fmt(r.max_points) or '-'}"
        secs = "" if r.seconds is None else f"{r.seconds:5.1f} s"
        flags = f"  [flags: {'; '.join(r.flags)}]" if r.flags else ""
        print(f"{r.student:<16} {r.assignment:<28} {score:>9} {secs:>8}  {r.status}{flags}")
    target = write_csv(results, args.output)
    if target != args.output:
        print(f"{args.output} exists and was not overwritten; wrote a new file instead.")
    print(f"gradebook: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
