"""Write the student release of the course: what a class hands out, and nothing more.

    python scripts/make_release.py DEST        # make release DEST=dir

DEST (a new folder) gets the generated student notebooks, course_lib, the shipped data,
the set-up files (requirements.txt, environment.yml, pyproject.toml, postBuild, the
Makefile's set-up and lab targets) and a README made from the main README's sections
marked for the release. It gets nothing of solutions/, of the hidden tests
(autograder/), of the tests or of the instructor scripts. The open repository keeps
solutions/ for self-paced learners; a class that is graded gets this folder instead.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["requirements.txt", "environment.yml", "postBuild", "LICENSE"]
FOLDERS = ["notebooks", "course_lib", "data", ".jupyter"]  # .jupyter: `make lab`'s settings
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "full", "*.egg-info")
MAKE_TARGETS = {"setup", "python-check", "$(STAMP)", "lab", "clean"}
RELEASE_START, RELEASE_END = "<!-- release:start -->", "<!-- release:end -->"
TARGET_LINE = re.compile(r"^([^\s#=:][^=:]*?)\s*:(?!=)")


def release_makefile(text: str) -> str:
    """The Makefile with only the learner's targets (set-up, lab, clean)."""
    kept = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        targets = [m.group(1) for line in lines if (m := TARGET_LINE.match(line)) and not line.startswith(".PHONY")]
        phony = [line for line in lines if line.startswith(".PHONY")]
        if phony:
            names = [n for n in phony[0].split(":", 1)[1].split() if n in MAKE_TARGETS]
            block = "\n".join(f".PHONY: {' '.join(names)}" if line.startswith(".PHONY") else line for line in lines)
        elif targets and not all(t in MAKE_TARGETS for t in targets):
            continue
        kept.append(block)
    return "\n\n".join(kept).rstrip("\n") + "\n"


def release_pyproject(text: str) -> str:
    """pyproject.toml without the test-suite settings (the release has no tests/)."""
    return re.sub(r"\n\[tool\.pytest\.ini_options\]\n.*?(?=\n\[|\Z)", "\n", text, flags=re.S)


def release_readme(text: str) -> str:
    """The README sections between release markers, under the course's title."""
    title = text.splitlines()[0]
    parts = re.findall(re.escape(RELEASE_START) + r"\n(.*?)" + re.escape(RELEASE_END), text, re.S)
    if not parts:
        raise ValueError(f"README.md has no {RELEASE_START} … {RELEASE_END} sections")
    intro = ("This is the student release of the course: the lesson notebooks with their exercises, "
             "the course library and the data. Open the notebooks in `notebooks/` and solve the "
             "exercises; the visible checks under each one tell you whether you got it right.\n\n")
    return f"{title}\n\n{intro}" + "\n".join(p.strip() + "\n" for p in parts)


def make_release(dest: Path) -> list[Path]:
    """Write the release into the new folder ``dest``; return the files written."""
    if dest.exists():
        raise FileExistsError(f"{dest} exists already: choose a new folder")
    dest.mkdir(parents=True)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, dest / folder, ignore=IGNORE)
    for name in FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    (dest / "Makefile").write_text(release_makefile((ROOT / "Makefile").read_text()))
    (dest / "pyproject.toml").write_text(release_pyproject((ROOT / "pyproject.toml").read_text()))
    (dest / "README.md").write_text(release_readme((ROOT / "README.md").read_text()))
    return sorted(p for p in dest.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the student release of the course.")
    parser.add_argument("dest", type=Path, help="a new folder")
    args = parser.parse_args(argv)
    try:
        files = make_release(args.dest)
    except FileExistsError as exc:
        parser.error(str(exc))
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files ({size / 1e6:.1f} MB) to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
