"""`make grade`: one real batch with honest submissions and attacks on the grader.

The grade is decided outside the student's process (autograder/README.md). This batch
is graded once, by ``python scripts/grade.py`` in a subprocess, as course staff would.

Honest cases (lesson 01):

==========  ======================================================================
alice       the solution notebook (nbgrader's layout)
bob         the untouched student notebook (flat layout)
carol       wrong quantize (divides by s) and its locked test edited to pass
dave        both locked tests of qparams and dequantize deleted; dequantize buggy
eve         quantize only forwards to the library's reference
frank       dequantize loops forever
gina        a truncated, malformed .ipynb
zz-last     the solution again, graded after every attack
==========  ======================================================================

Attacks, each on lesson 01 (on ``quantize``) and lesson 04 (on
``saturating_rounding_doubling_high_mul``), each with a *wrong* honest fallback, so it
earns points only if the attack works:

- ``patch``: rebind the comparison helpers and the names the test cells use;
- ``peek``: read the expected values from the caller's frames, the notebook's globals,
  and solutions/ on disk;
- ``keep``: keep a copy of the library's reference (function, code object) before it is
  disabled, re-import it from disk, reach torch's kernel through other names;
- ``mute``: hide errors (IPython custom exception handler, ``sys.excepthook``) and leave
  with ``SystemExit`` / ``os._exit``;
- ``write``: write into course_lib, data, solutions/ and another student's folder;
- ``exhaust``: run forever and allocate far more memory than the machine has.

Each attack must score 0 on the attacked exercise and full marks on the others, the rest
of the batch must be graded as without it (``zz-last`` still earns full marks), and no
file outside the grader's temporary folders may change.
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
    graded_points,
    kernel_env,
    load_script,
    read,
)

TIMEOUT = 20  # seconds per exercise cell and per call: far above what an honest answer needs
grade = load_script("grade")

L01, L04 = "01_affine_map", "04_integer_inference"
TARGET = {L01: ("ex-quantize", "test-quantize", "quantize"),
          L04: ("ex-high-mul", "test-high-mul", "saturating_rounding_doubling_high_mul")}
SIGNATURE = {L01: "quantize(x, scale, zero_point, bits=8, *, signed=True, narrow_range=False)",
             L04: "saturating_rounding_doubling_high_mul(a, b)"}
WRONG = {L01: "return torch.zeros(x.shape, dtype=torch.int32)", L04: "return 0"}
# What the attack would call if it got hold of a working reference.
LIBRARY_CALL = {L01: "ref(x, scale, zero_point, bits, signed=signed, narrow_range=narrow_range)",
                L04: "ref(a, b)"}
LIBRARY = {L01: "cl.quant.quantize", L04: "cl.kernels.saturating_rounding_doubling_high_mul"}


def attack_source(lesson: str, kind: str) -> str:
    """The exercise cell of an attack on ``lesson``'s target exercise."""
    name = TARGET[lesson][2]
    sig, wrong, call, lib = SIGNATURE[lesson], WRONG[lesson], LIBRARY_CALL[lesson], LIBRARY[lesson]
    if kind == "patch":
        return f'''
import course_lib.grading as grading
import course_lib
grading.check = lambda *args, **kwargs: print("✔ matches")
grading.check_function = lambda *args, **kwargs: print("✔ all cases match")
grading._mismatch = lambda *args, **kwargs: None
course_lib.grading = grading
globals()["grading"] = grading

def {sig}:
    {wrong}
'''
    if kind == "peek":
        return f'''
import glob, json, sys
_SOLUTION_PATHS = [{str(SOLUTIONS / f"{lesson}.ipynb")!r}] + glob.glob("/*/solutions/{lesson}.ipynb") + glob.glob("/*/*/solutions/{lesson}.ipynb")

def _from_solutions():
    for path in _SOLUTION_PATHS:
        try:
            cells = json.load(open(path))["cells"]
        except OSError:
            continue
        for cell in cells:
            if cell.get("metadata", {{}}).get("nbgrader", {{}}).get("grade_id") == {TARGET[lesson][0]!r}:
                namespace = dict(globals())
                exec("".join(cell["source"]), namespace)
                return namespace[{name!r}]

def {sig}:
    frame = sys._getframe(1)
    while frame is not None:
        for key in ("want", "expected", "_expected", "exp", "_e"):
            if key in frame.f_locals:
                return frame.f_locals[key]
        frame = frame.f_back
    for key in ("want", "expected", "_expected"):
        if key in globals():
            return globals()[key]
    ref = _from_solutions()
    if ref is not None:
        return {call}
    {wrong}
'''
    if kind == "keep":
        return f'''
import importlib, types
import course_lib.kernels, course_lib.quant
_saved = {lib}
_code = {lib}.__code__
for _module in (course_lib.quant, course_lib.kernels):
    try:
        importlib.reload(_module)
    except Exception:
        pass
_candidates = [{lib}, _saved, types.FunctionType(_code, _saved.__globals__)]

def {sig}:
    for ref in _candidates:
        try:
            return {call}
        except Exception:
            pass
    if {lesson == L01!r}:
        for ref in (torch.quantize_per_tensor, torch.ops.aten.quantize_per_tensor,
                    torch._C._VariableFunctions.quantize_per_tensor):
            try:
                dtype = torch.qint8 if signed else torch.quint8
                return ref(x, float(scale), int(zero_point), dtype).int_repr().to(torch.int32)
            except Exception:
                pass
    {wrong}
'''
    if kind == "mute":
        return f'''
import os, sys
get_ipython().set_custom_exc((BaseException,), lambda *args, **kwargs: None)
sys.excepthook = lambda *args: None

_calls = [0]

def {sig}:
    _calls[0] += 1
    if _calls[0] == 1:
        raise SystemExit(0)
    os._exit(0)
'''
    if kind == "write":
        return f'''
import os, pathlib
_targets = [pathlib.Path({str(ROOT / "course_lib" / "grading.py")!r}),
            pathlib.Path({str(ROOT / "data" / "README.md")!r}),
            pathlib.Path({str(SOLUTIONS / f"{lesson}.ipynb")!r}),
            pathlib.Path(course_lib.__file__).parent / "grading.py",
            pathlib.Path(course_lib.__file__).parent.parent / "data" / "README.md"]
_targets += list(pathlib.Path("/").glob("*/*/submitted/*/*.ipynb"))
_wrote = []
for _path in _targets:
    try:
        _path.write_text("overwritten by a submission")
        _wrote.append(str(_path))
    except Exception:
        pass

def {sig}:
    {wrong}
'''
    if kind == "exhaust":
        return f'''
def {sig}:
    try:
        hog = [bytearray(1 << 30) for _ in range(64)]  # 64 GiB
    except MemoryError:
        pass
    while True:
        pass
'''
    raise ValueError(kind)


ATTACKS = ("patch", "peek", "keep", "mute", "write", "exhaust")

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


def _write(root: Path, student: str, lesson: str, nb: nbformat.NotebookNode, *, flat: bool = False) -> Path:
    folder = root / student if flat else root / student / lesson
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{lesson}.ipynb"
    nbformat.write(nb, path)
    return path


def _snapshot(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}:{p.stat().st_mode}"
        for folder in folders for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts
    }


def make_batch(root: Path) -> None:
    solution = read(SOLUTIONS / f"{L01}.ipynb")
    student = read(NOTEBOOKS / f"{L01}.ipynb")
    _write(root, "alice", L01, solution)
    _write(root, "bob", L01, student, flat=True)
    _write(root, "carol", L01, _with(solution, {"ex-quantize": WRONG_QUANTIZE, "test-quantize": 'print("all good")'}))
    _write(root, "dave", L01, _with(solution, {"ex-dequantize": OVERFLOWING_DEQUANTIZE},
                                    delete=("test-qparams", "test-dequantize")), flat=True)
    _write(root, "eve", L01, _with(solution, {"ex-quantize": LIBRARY_QUANTIZE}))
    _write(root, "frank", L01, _with(solution, {"ex-dequantize": LOOPING_DEQUANTIZE}))
    text = (SOLUTIONS / f"{L01}.ipynb").read_text(encoding="utf-8")
    (root / "gina").mkdir()
    (root / "gina" / f"{L01}.ipynb").write_text(text[: len(text) // 2], encoding="utf-8")
    for lesson in (L01, L04):
        sol = read(SOLUTIONS / f"{lesson}.ipynb")
        for kind in ATTACKS:
            _write(root, f"attack-{kind}", lesson, _with(sol, {TARGET[lesson][0]: attack_source(lesson, kind)}))
        _write(root, "zz-last", lesson, sol)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Grade the whole batch once with `python scripts/grade.py`; keep what the tests need."""
    tmp = tmp_path_factory.mktemp("grading")
    submissions, out = tmp / "submitted", tmp / "out"
    make_batch(submissions)
    out.mkdir()
    existing = out / "gradebook.csv"
    existing.write_text("an earlier gradebook\n")
    watched = [ROOT / d for d in ("course_lib", "data", "solutions", "notebooks", "autograder", "scripts")]
    before = _snapshot(submissions, *watched)

    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "grade.py"), str(submissions), "--output", str(existing),
         "--timeout", str(TIMEOUT), "--memory-gb", "6", "--keep", str(tmp / "course")],
        capture_output=True, text=True, cwd=ROOT, env=kernel_env(), timeout=1800,
    )
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout + run.stderr
    match = re.search(r"^gradebook: (.+)$", run.stdout, re.MULTILINE)
    assert match, run.stdout
    with open(match.group(1), newline="", encoding="utf-8") as f:
        rows = {(row["student"], row["assignment"]): row for row in csv.DictReader(f)}
    after = _snapshot(submissions, *watched)
    return {
        "rows": rows, "stdout": run.stdout, "csv": Path(match.group(1)), "existing": existing,
        "seconds": seconds, "course": tmp / "course",
        "changed": sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)),
    }


FULL = {lesson: graded_points(read(SOLUTIONS / f"{lesson}.ipynb")) for lesson in (L01, L04)}


def points(row: dict[str, str], lesson: str = L01) -> dict[str, float]:
    return {gid: float(row[gid]) for gid in FULL[lesson]}


def full_except(*zeroed: str, lesson: str = L01) -> dict[str, float]:
    """Full marks on every test cell except the named ones, which earn 0."""
    return {gid: 0.0 if gid in zeroed else pts for gid, pts in FULL[lesson].items()}


def row(batch, student: str, lesson: str = L01) -> dict[str, str]:
    return batch["rows"][student, lesson]


@pytest.mark.slow
def test_solution_earns_full_marks(batch) -> None:
    r = row(batch, "alice")
    assert points(r) == FULL[L01], batch["stdout"]
    assert float(r["total"]) == float(r["max"]) == sum(FULL[L01].values())
    assert r["status"] == "ok" and r["flags"] == ""


@pytest.mark.slow
def test_untouched_student_notebook_earns_zero_everywhere(batch) -> None:
    r = row(batch, "bob")  # flat layout: bob/01_affine_map.ipynb
    assert points(r) == dict.fromkeys(FULL[L01], 0.0), batch["stdout"]
    assert "NotImplementedError" in r["status"]


@pytest.mark.slow
def test_edited_locked_test_changes_nothing(batch) -> None:
    r = row(batch, "carol")
    assert points(r) == full_except("test-quantize"), batch["stdout"]
    assert "test-quantize was edited" in r["status"]
    graded = read(batch["course"] / "autograded" / "carol" / L01 / f"{L01}.ipynb")
    original = read(SOLUTIONS / f"{L01}.ipynb")
    gid = "test-quantize"
    assert graded.cells[cell_index(graded, gid)].source == original.cells[cell_index(original, gid)].source
    assert "0 of 3 points" in graded.cells[cell_index(graded, gid)].outputs[0]["text"]


@pytest.mark.slow
def test_deleted_locked_tests_still_grade(batch) -> None:
    r = row(batch, "dave")
    # qparams is right, dequantize is wrong: deleting their tests changes nothing.
    assert points(r) == full_except("test-dequantize"), batch["stdout"]
    assert "test-qparams was deleted" in r["status"] and "test-dequantize was deleted" in r["status"]


@pytest.mark.slow
def test_forwarding_to_the_library_earns_nothing(batch) -> None:
    r = row(batch, "eve")
    assert points(r) == full_except("test-quantize"), batch["stdout"]
    assert "switched off" in r["status"]


@pytest.mark.slow
def test_infinite_loop_is_stopped_by_the_timeout(batch) -> None:
    r = row(batch, "frank")
    assert points(r) == full_except("test-dequantize"), batch["stdout"]
    assert "time limit" in r["status"]
    assert float(r["seconds"]) < 10 * TIMEOUT


@pytest.mark.slow
def test_malformed_notebook_is_reported_and_the_rest_graded(batch) -> None:
    r = row(batch, "gina")
    assert r["status"].startswith("error: malformed notebook"), r
    assert r["total"] == "" and all(r[gid] == "" for gid in FULL[L01])
    assert "gina" in batch["stdout"] and "malformed notebook" in batch["stdout"]


@pytest.mark.slow
@pytest.mark.parametrize("lesson", [L01, L04])
@pytest.mark.parametrize("kind", ATTACKS)
def test_attack_earns_nothing_on_the_attacked_exercise(batch, lesson: str, kind: str) -> None:
    r = row(batch, f"attack-{kind}", lesson)
    test_id = TARGET[lesson][1]
    assert points(r, lesson) == full_except(test_id, lesson=lesson), (r["status"], batch["stdout"])
    assert r["flags"], f"attack-{kind} should be flagged for a human: {r}"


@pytest.mark.slow
@pytest.mark.parametrize("lesson", [L01, L04])
def test_attacks_do_not_change_how_later_submissions_are_graded(batch, lesson: str) -> None:
    r = row(batch, "zz-last", lesson)
    assert points(r, lesson) == FULL[lesson], r
    assert r["status"] == "ok" and r["flags"] == ""


@pytest.mark.slow
def test_no_file_outside_the_graders_temporary_folders_changes(batch) -> None:
    assert batch["changed"] == [], f"grading changed files: {batch['changed'][:10]}"
    for name in ("gradebook.db", "source", "release", "submitted", "autograded"):
        assert not (ROOT / name).exists(), f"nbgrader wrote {name} into the repository"


@pytest.mark.slow
def test_the_gradebook_database_holds_the_same_scores(batch) -> None:
    """`nbgrader export` and the formgrader read gradebook.db: it must agree with the CSV."""
    from nbgrader.api import Gradebook

    db = batch["course"] / "gradebook.db"
    with Gradebook(f"sqlite:///{db}", "quantization-for-edge-devices") as gb:
        for (student, lesson), r in batch["rows"].items():
            if r["total"] == "":
                continue
            submission = gb.find_submission(lesson, student)
            assert submission.score == pytest.approx(float(r["total"])), (student, lesson)
            assert not submission.needs_manual_grade


@pytest.mark.slow
def test_an_existing_gradebook_is_never_overwritten(batch) -> None:
    assert batch["existing"].read_text() == "an earlier gradebook\n"
    assert batch["csv"] != batch["existing"] and batch["csv"].parent == batch["existing"].parent
    assert "was not overwritten" in batch["stdout"]


@pytest.mark.slow
def test_report_grading_time(batch, record_property) -> None:
    seconds = {f"{s}/{a}": float(r["seconds"]) for (s, a), r in batch["rows"].items() if r["seconds"]}
    record_property("seconds_per_submission", seconds)
    record_property("batch_seconds", round(batch["seconds"], 1))
    print(f"\nbatch of {len(batch['rows'])} graded in {batch['seconds']:.1f} s; per submission: {seconds}")


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
    nested = tmp_path / "ann" / L01 / f"{L01}.ipynb"
    flat = tmp_path / "ben" / f"{L01}.ipynb"
    for path in (nested, flat, tmp_path / "cat" / "notes.ipynb", tmp_path / "dan" / "readme.txt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    found = {(s.student, s.assignment): s for s in grade.discover(tmp_path, [L01])}
    assert found[("ann", L01)].path == nested and not found[("ann", L01)].problem
    assert found[("ben", L01)].path == flat and not found[("ben", L01)].problem
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


def test_grading_refuses_to_run_without_a_sandbox(tmp_path, monkeypatch) -> None:
    (tmp_path / "ann").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    run = subprocess.run([sys.executable, str(SCRIPTS / "grade.py"), str(tmp_path), "--output",
                          str(tmp_path / "g.csv")], capture_output=True, text=True, cwd=ROOT,
                         env={**kernel_env(), "PATH": str(tmp_path)}, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "bubblewrap" in run.stderr and "--no-sandbox" in run.stderr
    assert not (tmp_path / "g.csv").exists()


def test_nbgrader_config_keeps_nbgrader_out_of_the_repo(tmp_path) -> None:
    build = load_script("build_student_notebooks")
    config = build.nbgrader_config(tmp_path)
    assert config.CourseDirectory.root == str(tmp_path)
    assert str(tmp_path) in config.CourseDirectory.db_url
    assert config.ClearSolutions.code_stub["python"] == "# YOUR CODE HERE\nraise NotImplementedError()"
    from traitlets.config.loader import PyFileConfigLoader

    raw = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    assert not Path(raw.CourseDirectory.root).resolve().is_relative_to(ROOT)


def test_submissions_are_graded_in_worker_processes_with_stdout_silenced(capfd) -> None:
    """Not threads: those share CPython 3.11's AST recursion counter (see grader.process_pool)."""
    import os

    from autograder import grader

    with grader.process_pool(2) as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(3)}
        pool.submit(print, "a hidden check's line").result()
    assert pids and os.getpid() not in pids
    assert "hidden check" not in capfd.readouterr().out
