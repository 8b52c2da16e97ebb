"""Regenerate the student notebooks in notebooks/ from the solutions in solutions/.

    python scripts/build_student_notebooks.py            # make student-notebooks
    python scripts/build_student_notebooks.py --check    # exit 1 if notebooks/ is stale
    python scripts/build_student_notebooks.py 01_affine_map

Each lesson ``solutions/NN_slug.ipynb`` is one nbgrader assignment with id ``NN_slug``.
The script lays out a throw-away nbgrader course directory in a temporary folder
(``source/NN_slug/NN_slug.ipynb``), runs nbgrader's own ``GenerateAssignment``
converter with the settings in ``nbgrader_config.py`` (solution regions become
``raise NotImplementedError()``, hidden tests are removed, test cells are locked,
outputs are cleared) and copies ``release/NN_slug/NN_slug.ipynb`` to
``notebooks/NN_slug.ipynb``. solutions/ is only read, and the gradebook.db nbgrader
creates lives and dies in the temporary folder.

Each exercise cell and each check (graded test cell) of the student notebook gets the
cell tag ``raises-exception``, and no other cell does. On an untouched notebook these
are the cells that fail (the stub raises ``NotImplementedError``, the check reports it);
with the tag, JupyterLab's Run All (and nbclient, nbconvert --execute, nbval) records the
error and carries on with the next cell instead of stopping the notebook there, so a
learner stuck on one exercise still runs the rest of the lesson. The lesson's own cells
use course_lib, never the learner's function, so they still run. nbgrader's validation
and autograding are unaffected: they execute every cell anyway (``allow_errors``) and
score a check by its error output, and the tag is not part of nbgrader's cell checksum.

The result depends only on the solution notebook, so running the script twice gives
the same bytes; ``tests/test_student_notebooks.py`` relies on that to detect a stale
notebooks/ folder.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import nbformat
from nbformat import NotebookNode
from nbgrader.converters import GenerateAssignment
from nbgrader.coursedir import CourseDirectory
from nbgrader.utils import capture_log
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
NOTEBOOKS = ROOT / "notebooks"
CONFIG_FILE = ROOT / "nbgrader_config.py"
LESSON_NAME = re.compile(r"^\d\d_[a-z0-9_]+$")
# JupyterLab, nbclient and nbval run on past a cell with this tag when it raises.
MAY_FAIL_TAG = "raises-exception"

# nbgrader's Gradebook runs the `alembic` command found on PATH; when this script is
# started as .venv/bin/python without an activated venv, that command is only found
# next to the interpreter.
_BIN = str(Path(sys.executable).parent)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

__all__ = [
    "ROOT",
    "SOLUTIONS",
    "NOTEBOOKS",
    "MAY_FAIL_TAG",
    "NbgraderError",
    "lesson_ids",
    "may_fail",
    "tag_cells_that_may_fail",
    "nbgrader_config",
    "generate_assignments",
    "build",
    "stale_notebooks",
]


class NbgraderError(RuntimeError):
    """nbgrader reported a failure; the message carries its log."""


def lesson_ids() -> list[str]:
    """Assignment ids (``NN_slug``) of every solution notebook, in lesson order."""
    return sorted(p.stem for p in SOLUTIONS.glob("*.ipynb") if LESSON_NAME.match(p.stem))


def may_fail(cell: NotebookNode) -> bool:
    """True for the code cells that fail on the stub: exercises and their checks.

    An exercise is an nbgrader solution cell; a check is a graded test cell
    (``grade: true``, not a solution). Both carry nbgrader metadata in every lesson.
    """
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return cell.cell_type == "code" and bool(meta.get("solution") or meta.get("grade"))


def tag_cells_that_may_fail(nb: NotebookNode) -> NotebookNode:
    """Tag exercise and check cells ``raises-exception`` (and take it off any other cell)."""
    for cell in nb.cells:
        tags = [t for t in cell.get("metadata", {}).get("tags", []) if t != MAY_FAIL_TAG]
        if may_fail(cell):
            tags.append(MAY_FAIL_TAG)
        if tags:
            cell.metadata["tags"] = tags
        else:
            cell.metadata.pop("tags", None)
    return nb


def nbgrader_config(course_root: Path) -> Config:
    """The course's nbgrader_config.py, pointed at a private course directory."""
    config = PyFileConfigLoader(CONFIG_FILE.name, path=str(CONFIG_FILE.parent)).load_config()
    config.CourseDirectory.root = str(course_root)
    # Spelled out so that no default can ever resolve to the repository.
    config.CourseDirectory.db_url = f"sqlite:///{course_root / 'gradebook.db'}"
    return config


def _run(converter: GenerateAssignment, what: str) -> None:
    result = capture_log(converter)
    if not result["success"]:
        raise NbgraderError(f"nbgrader {what} failed:\n{result.get('log', '')}{result.get('error', '')}")


def generate_assignments(
    course_root: Path, lessons: Iterable[str], *, config: Config | None = None
) -> dict[str, Path]:
    """Run nbgrader generate_assignment for each lesson inside ``course_root``.

    Copies ``solutions/<id>.ipynb`` to ``course_root/source/<id>/<id>.ipynb``, records
    the assignment in ``course_root/gradebook.db`` and returns the path of each
    released (student) notebook, ``course_root/release/<id>/<id>.ipynb``.
    """
    config = config or nbgrader_config(course_root)
    released: dict[str, Path] = {}
    for lesson in lessons:
        solution = SOLUTIONS / f"{lesson}.ipynb"
        if not solution.is_file():
            raise FileNotFoundError(f"no solution notebook for lesson {lesson!r}: {solution.name}")
        source_dir = course_root / "source" / lesson
        source_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(solution, source_dir / solution.name)

        coursedir = CourseDirectory(config=config)
        coursedir.assignment_id = lesson
        converter = GenerateAssignment(coursedir=coursedir, config=config)
        converter.force = True  # the release folder is ours and temporary
        _run(converter, f"generate_assignment {lesson}")
        released[lesson] = course_root / "release" / lesson / solution.name
    return released


def build(dest: Path = NOTEBOOKS, lessons: Iterable[str] | None = None) -> list[Path]:
    """Write the student version of each lesson to ``dest/<id>.ipynb``; return the paths."""
    lessons = list(lessons) if lessons is not None else lesson_ids()
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="nbgrader-release-") as tmp:
        for released in generate_assignments(Path(tmp), lessons).values():
            target = dest / released.name
            nb = tag_cells_that_may_fail(nbformat.read(released, as_version=4))
            # A new file, not a copy: the student notebook must stay writable for the learner.
            # nbformat.write gives the same layout nbgrader's writer does (indent 1, sorted keys).
            nbformat.write(nb, target)
            written.append(target)
    return written


def stale_notebooks(lessons: Iterable[str] | None = None, *, built: Iterable[Path] | None = None) -> list[str]:
    """Lessons whose notebooks/<id>.ipynb differs from a fresh build (or is missing).

    ``built``: the files of a fresh :func:`build` already made (the tests reuse one);
    without it, this builds into a temporary folder.
    """
    if built is not None:
        return [path.stem for path in built
                if not (NOTEBOOKS / path.name).is_file() or (NOTEBOOKS / path.name).read_bytes() != path.read_bytes()]
    lessons = list(lessons) if lessons is not None else lesson_ids()
    with tempfile.TemporaryDirectory(prefix="student-notebooks-") as tmp:
        return stale_notebooks(built=build(Path(tmp), lessons))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lessons", nargs="*", help="lesson ids such as 01_affine_map (default: all)")
    parser.add_argument("--check", action="store_true", help="only report stale notebooks, write nothing")
    args = parser.parse_args(argv)
    lessons = args.lessons or lesson_ids()
    unknown = [lesson for lesson in lessons if not (SOLUTIONS / f"{lesson}.ipynb").is_file()]
    if unknown:
        parser.error(f"no solution notebook for {unknown}; known lessons: {lesson_ids()}")
    if args.check:
        stale = stale_notebooks(lessons)
        for lesson in stale:
            print(f"notebooks/{lesson}.ipynb is out of date: run `make student-notebooks`")
        if not stale:
            print(f"notebooks/ is up to date ({len(lessons)} lesson{'' if len(lessons) == 1 else 's'})")
        return 1 if stale else 0
    for path in build(NOTEBOOKS, lessons):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
