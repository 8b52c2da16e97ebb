"""Helpers shared by the tests that execute or grade lesson notebooks.

`test_student_notebooks.py` executes the generated student notebooks and
`test_grading_pipeline.py` builds and grades submissions; both read nbgrader cell
metadata, run notebooks in a kernel that can import course_lib, and import the
scripts in scripts/ through the functions here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import nbformat
from nbclient import NotebookClient
from nbformat import NotebookNode

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
NOTEBOOKS = ROOT / "notebooks"
SCRIPTS = ROOT / "scripts"
CELL_TIMEOUT = 120  # seconds; a stub must fail fast, a cell that hangs must not hang CI


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (scripts/ is not a package)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))  # grade.py imports build_student_notebooks
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def lesson_ids() -> list[str]:
    """Lesson ids (``NN_slug``) of the solution notebooks."""
    return load_script("build_student_notebooks").lesson_ids()


def read(path: Path) -> NotebookNode:
    return nbformat.read(path, as_version=4)


def nbgrader(cell: NotebookNode) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_exercise_cell(cell: NotebookNode) -> bool:
    """A solution cell: the learner writes code here (``solution: true``)."""
    return bool(nbgrader(cell).get("solution"))


def is_test_cell(cell: NotebookNode) -> bool:
    """A graded test cell (``grade: true``, locked, carries points)."""
    meta = nbgrader(cell)
    return bool(meta.get("grade")) and not meta.get("solution")


def grade_id(cell: NotebookNode) -> str | None:
    return nbgrader(cell).get("grade_id")


def cell_index(nb: NotebookNode, gid: str) -> int:
    """Index of the cell whose nbgrader grade_id is ``gid``."""
    for i, cell in enumerate(nb.cells):
        if grade_id(cell) == gid:
            return i
    raise KeyError(f"no cell with grade_id {gid!r}")


def graded_points(nb: NotebookNode) -> dict[str, float]:
    """grade_id -> points of every graded test cell, in notebook order."""
    return {grade_id(c): float(nbgrader(c)["points"]) for c in nb.cells if is_test_cell(c)}


def kernel_env() -> dict[str, str]:
    """Environment for a kernel that imports this checkout's course_lib."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def execute(nb: NotebookNode, *, cwd: Path, timeout: int = CELL_TIMEOUT) -> NotebookNode:
    """Run every cell in a fresh python3 kernel, recording errors instead of stopping."""
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(cwd)}},
    )
    # nbclient hands env= on to the kernel manager that starts the kernel.
    client.execute(env=kernel_env())
    return nb


def errors(cell: NotebookNode) -> list[NotebookNode]:
    """Error outputs of an executed code cell."""
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def describe(index: int, cell: NotebookNode) -> str:
    """One line naming a cell, for assertion messages."""
    first = cell.source.strip().splitlines()[0] if cell.source.strip() else "<empty>"
    errs = "; ".join(f"{e.ename}: {e.evalue}"[:200] for e in errors(cell))
    return f"cell {index} ({grade_id(cell) or 'no grade_id'}) `{first[:60]}`: {errs}"
