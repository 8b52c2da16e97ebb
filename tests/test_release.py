"""`make release DEST=dir`: the student release holds no solution and no hidden test."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from notebook_utils import ROOT, SOLUTIONS, is_exercise_cell, lesson_ids, load_script, read

release = load_script("make_release")
SOLUTION_REGION = re.compile(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", re.S)


def _squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    dest = tmp_path_factory.mktemp("release") / "course"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_release.py"), str(dest)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    texts = {}
    for path in dest.rglob("*"):
        if path.is_file():
            try:
                texts[path.relative_to(dest).as_posix()] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                pass  # data files
    return dest, texts


def test_release_has_the_course_and_nothing_of_the_grader(released) -> None:
    dest, _ = released
    for lesson in lesson_ids():
        assert (dest / "notebooks" / f"{lesson}.ipynb").is_file()
    assert (dest / "course_lib" / "quant.py").is_file() and (dest / "data" / "mnist_5k.npz").is_file()
    assert (dest / ".jupyter" / "jupyter_server_config.py").is_file()  # `make lab` without nbgrader's instructor tools
    for absent in ("solutions", "autograder", "tests", "scripts", "nbgrader_config.py", ".ci"):
        assert not (dest / absent).exists(), f"{absent} must not be in the student release"


def test_no_solution_code_in_the_release(released) -> None:
    """No solution region of any lesson outside course_lib.

    course_lib is the course's library: later cells of a lesson use its version of an
    exercise, so it holds a working reference of each (the grader switches that off
    while it grades the exercise). It is shipped as it is in the repository.
    """
    dest, texts = released
    for path in (ROOT / "course_lib").glob("*.py"):
        assert texts[f"course_lib/{path.name}"] == path.read_text(encoding="utf-8"), path.name
    blob = _squash("\n".join(text for name, text in texts.items() if not name.startswith("course_lib/")))
    for lesson in lesson_ids():
        nb = read(SOLUTIONS / f"{lesson}.ipynb")
        for cell in nb.cells:
            if not is_exercise_cell(cell):
                continue
            for region in SOLUTION_REGION.findall(cell.source):
                assert _squash(region) not in blob, f"{lesson}: a solution region is in the release"
    assert "BEGIN SOLUTION" not in blob and "END SOLUTION" not in blob


def test_no_hidden_test_text_in_the_release(released) -> None:
    _, texts = released
    blob = "\n".join(texts.values())
    assert "BEGIN HIDDEN TESTS" not in blob and "@tests.case" not in blob
    for hidden in (ROOT / "autograder" / "hidden").glob("[0-9]*.py"):
        # Lines that exist only in the hidden tests: their cases and their checks.
        distinctive = [line.strip() for line in hidden.read_text().splitlines()
                       if "(hidden)" in line or line.strip().startswith("@tests.case")]
        assert distinctive, hidden.name
        for line in distinctive:
            assert line not in blob, f"{hidden.name}: {line!r} is in the release"


def test_release_makefile_keeps_only_the_learners_targets(released) -> None:
    dest, texts = released
    make = texts["Makefile"]
    for target in ("setup:", "lab:", "clean:"):
        assert re.search(rf"^{target}", make, re.M), target
    for target in ("test:", "grade:", "student-notebooks:", "release:", "bench:"):
        assert not re.search(rf"^{target}", make, re.M), target
    run = subprocess.run(["make", "-n", "-C", str(dest), "lab"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "jupyter lab" in run.stdout


def test_release_pyproject_installs_course_lib_without_test_settings(released) -> None:
    import tomllib

    _, texts = released
    config = tomllib.loads(texts["pyproject.toml"])
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["tool"]["setuptools"] == repo["tool"]["setuptools"]  # course_lib, its subpackages, its C files
    assert "course_lib" in config["tool"]["setuptools"]["packages"]
    assert "pytest" not in config["tool"]  # its settings name tests/, which the release has not


def test_release_readme_tells_how_to_start(released) -> None:
    _, texts = released
    readme = texts["README.md"]
    assert readme.startswith("# Quantization for Edge Devices")
    assert "make lab" in readme and "solutions/" not in readme and "make grade" not in readme


def test_release_refuses_an_existing_folder(tmp_path) -> None:
    with pytest.raises(FileExistsError):
        release.make_release(tmp_path)
