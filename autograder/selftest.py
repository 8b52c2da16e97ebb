"""Check a lesson's hidden tests: the solution earns full marks, the untouched stub 0.

    python -m autograder.selftest 01_affine_map [02_calibration ...] [--no-sandbox]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nbformat

from . import grader


def student_version(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The exercise cells as a learner receives them (nbgrader's stub)."""
    import copy
    import re

    out = copy.deepcopy(nb)
    pattern = re.compile(r"^([ \t]*)### BEGIN SOLUTION.*?### END SOLUTION[^\n]*", re.S | re.M)
    for cell in out.cells:
        if cell.get("metadata", {}).get("nbgrader", {}).get("solution"):
            cell.source = pattern.sub(lambda m: f"{m.group(1)}# YOUR CODE HERE\n{m.group(1)}raise NotImplementedError()",
                                      cell.source)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("lessons", nargs="+")
    parser.add_argument("--no-sandbox", action="store_true")
    args = parser.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory(prefix="selftest-") as tmp, grader.process_pool(2) as pool:
        for lesson in args.lessons:
            solution = nbformat.read(grader.SOLUTIONS / f"{lesson}.ipynb", as_version=4)
            runs = (("solution", solution, True), ("untouched stub", student_version(solution), False))
            futures = [pool.submit(grader.grade_notebook, lesson, nb,
                                   workdir=Path(tmp) / lesson / label.replace(" ", "_"),
                                   use_sandbox=not args.no_sandbox) for label, nb, _ in runs]
            outcomes = [f.result() for f in futures]
            for (label, _, want_full), res in zip(runs, outcomes, strict=True):
                got = sum(t.points for t in res.tests.values())
                total = sum(t.max_points for t in res.tests.values())
                good = got == total if want_full else got == 0
                ok &= good
                print(f"{'ok  ' if good else 'FAIL'} {lesson} {label}: {got:g}/{total:g} in {res.seconds:.1f} s")
                for t in res.tests.values():
                    print(f"       {t.grade_id}: {t.points:g}/{t.max_points:g}  {t.message[:300]}")
                for gid, err in res.cell_errors.items():
                    print(f"       cell {gid}: {err[:300]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
