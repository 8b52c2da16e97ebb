"""pytest plugin: every executed solution notebook runs within the time budget.

CONTRIBUTING.md: a lesson runs top to bottom in <= 90 s on 2 CPU cores. At the end of the
session the run time of each notebook executed by nbval (the sum of its cells' set-up,
call and tear-down) is listed in a "notebook execution time" section; a notebook over the
budget is named in red, counted in the last line ("1 notebook over budget") and makes the
run fail (exit status 1) even when every cell passed.

pyproject.toml loads it for every run (``addopts = -p notebook_budget``), whichever files
are selected. ``COURSE_NOTEBOOK_BUDGET_S`` overrides the budget (e.g. a slow CI runner).
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest

NOTEBOOK_BUDGET_S = 90.0


def notebook_seconds(stats: dict) -> dict[str, float]:
    """Run time of each executed notebook: the sum of its nbval items' set-up, call and tear-down.

    ``stats`` is the terminal reporter's record of every report of the session.
    """
    seconds: dict[str, float] = defaultdict(float)
    for reports in stats.values():
        for report in reports:
            path = getattr(report, "nodeid", "").split("::", 1)[0]
            if path.endswith(".ipynb") and isinstance(report, pytest.TestReport):
                seconds[path] += report.duration
    return dict(seconds)


def notebook_budget_s() -> float:
    """The per-notebook budget; ``COURSE_NOTEBOOK_BUDGET_S`` overrides it (e.g. a slow CI runner)."""
    return float(os.environ.get("COURSE_NOTEBOOK_BUDGET_S", NOTEBOOK_BUDGET_S))


def _over_budget(session: pytest.Session) -> dict[str, float]:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return {}
    budget = notebook_budget_s()
    return {p: s for p, s in notebook_seconds(reporter.stats).items() if s > budget}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A notebook over the budget fails the run (exit status 1), even if every cell passed."""
    if _over_budget(session) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report each executed notebook's run time and name those over the budget."""
    seconds = notebook_seconds(terminalreporter.stats)
    if not seconds:
        return
    budget = notebook_budget_s()
    terminalreporter.section("notebook execution time")
    for path, total in sorted(seconds.items()):
        over = total > budget
        flag = f"  OVER the {budget:.0f} s budget" if over else ""
        terminalreporter.write_line(f"{total:7.1f} s  {path}{flag}", red=over, bold=over)
    terminalreporter.write_line(f"{sum(seconds.values()):7.1f} s  all {len(seconds)} notebooks")
    for path, total in sorted(seconds.items()):
        if total > budget:
            # counted in the last line too: "12 passed, 1 notebook over budget in ..."
            terminalreporter.stats.setdefault("notebook over budget", []).append(
                SimpleNamespace(nodeid=path, duration=total, when="call"))  # read by --durations too
            terminalreporter.write_line(
                f"FAILED {path}: ran {total:.1f} s, over the {budget:.0f} s per-notebook budget "
                "(CONTRIBUTING.md); the run fails", red=True, bold=True)
