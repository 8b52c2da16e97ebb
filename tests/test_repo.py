"""Repository hygiene: lint, lean git tree, no machine paths in what is committed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib import ROOT

MAX_BYTES_OUTSIDE_DATA = 5 * 1024 * 1024
pytest_plugins = ("pytester",)


def tracked_files() -> list[Path]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode()
    return [ROOT / p for p in out.split("\0") if p]


def lint_command() -> list[str]:
    """The ruff command of the Makefile's ``lint`` recipe, with the virtualenv's ruff."""
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "the Makefile has no lint target"
    lines = [line.strip() for line in recipe[1].splitlines() if "ruff" in line]
    assert len(lines) == 1, f"expected one ruff line in the lint recipe, got {lines}"
    words = lines[0].split()
    assert words[0] == "$(BIN)/ruff", lines[0]
    return [str(Path(sys.executable).with_name("ruff")), *words[1:]]


def test_make_lint_is_clean() -> None:
    """The same command as `make lint`; its scope is pyproject.toml's [tool.ruff]."""
    result = subprocess.run(lint_command(), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_covers_the_library_scripts_tests_and_solutions() -> None:
    files = subprocess.run([*lint_command(), "--show-files"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    linted = {Path(line.strip()).resolve().relative_to(ROOT).parts[0]
              for line in files.splitlines() if line.strip().startswith(str(ROOT))}
    assert {"course_lib", "scripts", "tests", "solutions"} <= linted, linted
    assert "notebooks" not in linted  # generated


def test_no_large_files_outside_data() -> None:
    big = [
        str(p.relative_to(ROOT)) for p in tracked_files()
        if p.exists() and p.stat().st_size > MAX_BYTES_OUTSIDE_DATA
        and p.relative_to(ROOT).parts[0] != "data"
    ]
    assert not big, f"files over 5 MB outside data/: {big}"


def test_no_generated_or_environment_files_tracked() -> None:
    bad = re.compile(r"(^|/)(\.venv|__pycache__|\.ipynb_checkpoints|\.pytest_cache|gradebook\.db)(/|$)|\.(pte|onnx|pyc)$")
    tracked = [str(p.relative_to(ROOT)) for p in tracked_files()]
    assert not [t for t in tracked if bad.search(t)]


def test_no_machine_paths_in_tracked_files() -> None:
    patterns = {str(ROOT), str(Path.home()) + "/", "site-packages/"}  # this checkout, this home
    offenders = []
    for path in tracked_files():
        if not path.exists() or path.suffix in {".npz", ".pt", ".png", ".gz"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found = sorted(p for p in patterns if p in text)
        if found and path.name != "test_repo.py":
            offenders.append(f"{path.relative_to(ROOT)}: {found}")
    assert not offenders, "machine paths in committed files:\n" + "\n".join(offenders)


# --------------------------------------------------------------- the notebook time budget
FAKE_NOTEBOOKS = '''
import time
import pytest


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".ipynb":
        return FakeNotebook.from_parent(parent, path=file_path)


class FakeNotebook(pytest.File):
    """A "notebook" whose cells sleep for the seconds written in the file, one line a cell."""

    def collect(self):
        for i, line in enumerate(self.path.read_text().split()):
            yield FakeCell.from_parent(self, name=f"Cell {i}", seconds=float(line))


class FakeCell(pytest.Item):
    def __init__(self, *, seconds, **kwargs):
        super().__init__(**kwargs)
        self.seconds = seconds

    def runtest(self):
        time.sleep(self.seconds)
'''


@pytest.mark.parametrize("budget, status", [("0.5", 1), ("30", 0)])
def test_a_notebook_over_the_time_budget_fails_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, budget: str, status: int
) -> None:
    pytester.makeconftest(FAKE_NOTEBOOKS)
    (pytester.path / "slow.ipynb").write_text("0.3\n0.3\n")  # 0.6 s in two cells
    (pytester.path / "quick.ipynb").write_text("0.01\n")
    monkeypatch.setenv("COURSE_NOTEBOOK_BUDGET_S", budget)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "notebook_budget")
    assert result.ret == status, result.stdout.str()
    out = result.stdout.str()
    assert "notebook execution time" in out and "quick.ipynb" in out
    if status:
        assert "FAILED slow.ipynb: ran" in out and "1 notebook over budget" in out
        assert "FAILED quick.ipynb" not in out
    else:
        assert "over budget" not in out and "OVER" not in out
