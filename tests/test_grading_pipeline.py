"""`make grade`: real nbgrader autograde of lesson 01, one batch covering every case.

The batch (graded once, in one run of scripts/grade.py, to keep CI time down):

==========  =======================================================================  ==============
student     submission                                                               layout
==========  =======================================================================  ==============
alice       the solution notebook                                                    nbgrader
bob         the untouched student notebook                                           flat
carol       wrong quantize (divides by s) and its locked test edited to pass         nbgrader
dave        both locked tests of qparams and dequantize deleted; dequantize buggy    flat
eve         quantize only forwards to the library's reference                        nbgrader
frank       dequantize loops forever                                                 nbgrader
gina        a truncated, malformed .ipynb                                            flat
==========  =======================================================================  ==============

Expected points come from the solution notebook's nbgrader metadata, not from grade.py.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from notebook_utils import (
    NOTEBOOKS,
    ROOT,
    SCRIPTS,
    SOLUTIONS,
    cell_index,
    errors,
    graded_points,
    kernel_env,
    load_script,
    read,
)

LESSON = "01_affine_map"
TIMEOUT = 30  # seconds per cell: above the slowest cell of lesson 01 on a loaded 2-core machine
grade = load_script("grade")

WRONG_QUANTIZE = '''
def quantize(x, scale, zero_point, bits=8, *, signed=True, narrow_range=False):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if narrow_range:
        qmin += 1
    q = torch.round(x / scale) + zero_point  # divides instead of multiplying by 1/scale
    return torch.clamp(q, qmin, qmax).to(torch.int32)
'''
LIBRARY_QUANTIZE = '''
def quantize(x, scale, zero_point, bits=8, *, signed=True, narrow_range=False):
    return cl.quant.quantize(x, scale, zero_point, bits, signed=signed, narrow_range=narrow_range)
'''
OVERFLOWING_DEQUANTIZE = '''
def dequantize(q, scale, zero_point):
    return (q - zero_point).to(torch.float32) * scale  # int8 arithmetic wraps around
'''
LOOPING_DEQUANTIZE = '''
def dequantize(q, scale, zero_point):
    while True:
        pass
'''


def _with(nb: nbformat.NotebookNode, sources: dict[str, str] | None = None,
          delete: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    nb = copy.deepcopy(nb)
    for gid, source in (sources or {}).items():
        nb.cells[cell_index(nb, gid)].source = source.strip()
    for gid in delete:
        del nb.cells[cell_index(nb, gid)]
    return nb


def _write(root: Path, student: str, nb: nbformat.NotebookNode, *, flat: bool) -> Path:
    folder = root / student if flat else root / student / LESSON
    folder.mkdir(parents=True)
    path = folder / f"{LESSON}.ipynb"
    nbformat.write(nb, path)
    return path


def _snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def make_batch(root: Path) -> None:
    solution = read(SOLUTIONS / f"{LESSON}.ipynb")
    student = read(NOTEBOOKS / f"{LESSON}.ipynb")
    _write(root, "alice", solution, flat=False)
    _write(root, "bob", student, flat=True)
    _write(root, "carol", _with(solution, {"ex-quantize": WRONG_QUANTIZE,
                                           "test-quantize": 'print("all good")'}), flat=False)
    _write(root, "dave", _with(solution, {"ex-dequantize": OVERFLOWING_DEQUANTIZE},
                               delete=("test-qparams", "test-dequantize")), flat=True)
    _write(root, "eve", _with(solution, {"ex-quantize": LIBRARY_QUANTIZE}), flat=False)
    _write(root, "frank", _with(solution, {"ex-dequantize": LOOPING_DEQUANTIZE}), flat=False)
    text = (SOLUTIONS / f"{LESSON}.ipynb").read_text(encoding="utf-8")
    (root / "gina").mkdir()
    (root / "gina" / f"{LESSON}.ipynb").write_text(text[: len(text) // 2], encoding="utf-8")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Grade the whole batch once with `python scripts/grade.py`; keep what the tests need."""
    tmp = tmp_path_factory.mktemp("grading")
    submissions, out = tmp / "submitted", tmp / "out"
    make_batch(submissions)
    out.mkdir()
    existing = out / "gradebook.csv"
    existing.write_text("an earlier gradebook\n")
    before = _snapshot(submissions)
    solutions_before = _snapshot(SOLUTIONS)

    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "grade.py"), str(submissions), "--output", str(existing),
         "--timeout", str(TIMEOUT), "--keep", str(tmp / "course")],
        capture_output=True, text=True, cwd=ROOT, env=kernel_env(), timeout=1800,
    )
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout + run.stderr
    match = re.search(r"^gradebook: (.+)$", run.stdout, re.MULTILINE)
    assert match, run.stdout
    with open(match.group(1), newline="", encoding="utf-8") as f:
        rows = {row["student"]: row for row in csv.DictReader(f)}
    return {
        "rows": rows, "stdout": run.stdout, "csv": Path(match.group(1)), "existing": existing,
        "seconds": seconds, "course": tmp / "course",
        "unchanged": before == _snapshot(submissions),
        "solutions_unchanged": solutions_before == _snapshot(SOLUTIONS),
    }


FULL = graded_points(read(SOLUTIONS / f"{LESSON}.ipynb"))  # {"test-qparams": 3.0, ...}


def points(row: dict[str, str]) -> dict[str, float]:
    return {gid: float(row[gid]) for gid in FULL}


def full_except(*zeroed: str) -> dict[str, float]:
    """Full marks on every test cell except the named ones, which earn 0."""
    return {gid: 0.0 if gid in zeroed else pts for gid, pts in FULL.items()}


@pytest.mark.slow
def test_solution_earns_full_marks(batch) -> None:
    row = batch["rows"]["alice"]
    assert points(row) == FULL, batch["stdout"]
    assert float(row["total"]) == float(row["max"]) == sum(FULL.values())
    assert row["status"] == "ok"


@pytest.mark.slow
def test_untouched_student_notebook_earns_zero_everywhere(batch) -> None:
    row = batch["rows"]["bob"]  # flat layout: bob/01_affine_map.ipynb
    assert points(row) == dict.fromkeys(FULL, 0.0), batch["stdout"]
    assert row["status"] == "ok"


@pytest.mark.slow
def test_edited_locked_test_is_graded_with_the_original(batch) -> None:
    row = batch["rows"]["carol"]
    assert points(row) == full_except("test-quantize"), batch["stdout"]
    assert "test-quantize was edited" in row["status"]
    graded = read(batch["course"] / "autograded" / "carol" / LESSON / f"{LESSON}.ipynb")
    original = read(SOLUTIONS / f"{LESSON}.ipynb")
    gid = "test-quantize"
    assert graded.cells[cell_index(graded, gid)].source == original.cells[cell_index(original, gid)].source


@pytest.mark.slow
def test_deleted_locked_tests_are_put_back_and_run(batch) -> None:
    row = batch["rows"]["dave"]
    # test-qparams was deleted but qparams is right: the re-inserted test runs and passes;
    # test-dequantize was deleted and dequantize is wrong: the re-inserted test fails.
    assert points(row) == full_except("test-dequantize"), batch["stdout"]
    assert "test-qparams was deleted" in row["status"] and "test-dequantize was deleted" in row["status"]


@pytest.mark.slow
def test_forwarding_to_the_library_earns_nothing(batch) -> None:
    row = batch["rows"]["eve"]
    assert points(row) == full_except("test-quantize"), batch["stdout"]
    graded = read(batch["course"] / "autograded" / "eve" / LESSON / f"{LESSON}.ipynb")
    cell = graded.cells[cell_index(graded, "test-quantize")]
    assert [e.ename for e in errors(cell)] == ["ReferenceDisabledError"]
    assert any("✔ quantize: all" in out.get("text", "") for out in cell.outputs), (
        "the visible check should pass: only the hidden tests catch a forwarded reference"
    )


@pytest.mark.slow
def test_infinite_loop_is_stopped_by_the_timeout(batch) -> None:
    row = batch["rows"]["frank"]
    assert points(row) == full_except("test-dequantize"), batch["stdout"]
    assert "test-dequantize stopped after the" in row["status"]
    assert float(row["seconds"]) < 10 * TIMEOUT


@pytest.mark.slow
def test_malformed_notebook_is_reported_and_the_rest_graded(batch) -> None:
    row = batch["rows"]["gina"]
    assert row["status"].startswith("error: malformed notebook"), row
    assert row["total"] == "" and all(row[gid] == "" for gid in FULL)
    assert "gina" in batch["stdout"] and "malformed notebook" in batch["stdout"]
    assert set(batch["rows"]) == {"alice", "bob", "carol", "dave", "eve", "frank", "gina"}


@pytest.mark.slow
def test_nothing_submitted_or_in_the_repo_is_modified(batch) -> None:
    assert batch["unchanged"], "grading modified, moved or touched a submitted file"
    assert batch["solutions_unchanged"], "grading modified solutions/"
    for name in ("gradebook.db", "source", "release", "submitted", "autograded"):
        assert not (ROOT / name).exists(), f"nbgrader wrote {name} into the repository"


@pytest.mark.slow
def test_an_existing_gradebook_is_never_overwritten(batch) -> None:
    assert batch["existing"].read_text() == "an earlier gradebook\n"
    assert batch["csv"] != batch["existing"] and batch["csv"].parent == batch["existing"].parent
    assert "was not overwritten" in batch["stdout"]


@pytest.mark.slow
def test_report_grading_time(batch, record_property) -> None:
    seconds = {s: r["seconds"] for s, r in batch["rows"].items()}
    record_property("seconds_per_submission", seconds)
    record_property("batch_seconds", round(batch["seconds"], 1))
    graded = [float(v) for v in seconds.values() if v]
    assert len(graded) == 6
    print(f"\nbatch of 7 graded in {batch['seconds']:.1f} s; per submission: {seconds}")


# ---------------------------------------------------------------- fast unit tests


def test_unused_path_never_returns_an_existing_file(tmp_path) -> None:
    target = tmp_path / "gradebook.csv"
    assert grade.unused_path(target) == target
    target.write_text("x")
    other = grade.unused_path(target)
    assert other != target and not other.exists() and other.suffix == ".csv"
    other.write_text("y")
    assert grade.unused_path(target) not in (target, other)


def test_discover_accepts_both_layouts_and_reports_strays(tmp_path) -> None:
    nested = tmp_path / "ann" / LESSON / f"{LESSON}.ipynb"
    flat = tmp_path / "ben" / f"{LESSON}.ipynb"
    for path in (nested, flat, tmp_path / "cat" / "notes.ipynb", tmp_path / "dan" / "readme.txt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    found = {(s.student, s.assignment): s for s in grade.discover(tmp_path, [LESSON])}
    assert found[("ann", LESSON)].path == nested and not found[("ann", LESSON)].problem
    assert found[("ben", LESSON)].path == flat and not found[("ben", LESSON)].problem
    assert "not a lesson notebook" in found[("cat", "notes")].problem
    assert "no notebook found" in found[("dan", "")].problem


def test_check_notebook_explains_what_is_wrong(tmp_path) -> None:
    good = tmp_path / "good.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), good)
    assert grade.check_notebook(good) == ""
    truncated = tmp_path / "truncated.ipynb"
    truncated.write_text('{"cells": [')
    assert "not valid JSON" in grade.check_notebook(truncated)
    wrong_schema = tmp_path / "schema.ipynb"
    wrong_schema.write_text('{"cells": 3, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    assert grade.check_notebook(wrong_schema).startswith("malformed notebook")


def test_nbgrader_config_keeps_nbgrader_out_of_the_repo(tmp_path) -> None:
    build = load_script("build_student_notebooks")
    config = build.nbgrader_config(tmp_path)
    assert config.CourseDirectory.root == str(tmp_path)
    assert str(tmp_path) in config.CourseDirectory.db_url
    assert config.ClearSolutions.code_stub["python"] == "# YOUR CODE HERE\nraise NotImplementedError()"
    assert config.OverwriteCells.add_missing_cells is True
    # Loaded as-is (e.g. by the nbgrader CLI), the config points away from the repo too.
    from traitlets.config.loader import PyFileConfigLoader

    raw = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    assert not Path(raw.CourseDirectory.root).resolve().is_relative_to(ROOT)
