"""Shared pytest set-up: course_lib importable everywhere, notebook run times reported."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_BUDGET_S = 90.0  # COURSE_PLAN.md: every solution notebook runs in <= 90 s

# The tests, and the kernels nbval starts for the solution notebooks, import this
# checkout's course_lib even when it is not pip-installed (`make setup` installs it).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if str(ROOT) not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *_paths])


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors, restored afterwards.

    torch runs an OpenMP parallel region even for 30 values; on a busy 2-core machine
    each call then waits ~30 ms for a second thread (3 µs alone). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report each executed notebook's run time (the sum of its nbval items); flag slow ones.

    The terminal reporter sees the set-up, call and tear-down report of every item, so
    this works for notebooks outside tests/ too (a sub-directory conftest does not get
    the run-time hooks of items elsewhere). It reports; it never fails the run.
    """
    seconds: dict[str, float] = defaultdict(float)
    for reports in terminalreporter.stats.values():
        for report in reports:
            nodeid = getattr(report, "nodeid", "")
            path = nodeid.split("::", 1)[0]
            if path.endswith(".ipynb") and isinstance(report, pytest.TestReport):
                seconds[path] += report.duration
    if not seconds:
        return
    terminalreporter.section("notebook execution time")
    for path, total in sorted(seconds.items()):
        over = total > NOTEBOOK_BUDGET_S
        flag = f"  over the {NOTEBOOK_BUDGET_S:.0f} s budget" if over else ""
        terminalreporter.write_line(f"{total:7.1f} s  {path}{flag}", red=over, bold=over)
    terminalreporter.write_line(f"{sum(seconds.values()):7.1f} s  all {len(seconds)} notebooks")
