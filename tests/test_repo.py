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


def tracked_files() -> list[Path]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode()
    return [ROOT / p for p in out.split("\0") if p]


def test_ruff_is_clean() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run(
        [str(ruff), "check", "course_lib", "scripts", "tests"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
    patterns = {str(ROOT), str(Path.home()) + "/", "/work/main", "/root/", "site-packages/"}
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
