"""Shared pytest set-up: course_lib importable everywhere, a one-thread fixture.

The per-notebook time budget is checked by tests/notebook_budget.py, a plugin that
pyproject.toml loads for every run (``-p notebook_budget``), so it holds however the
notebooks are selected (``pytest solutions/05_ptq.ipynb`` does not load this conftest).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The tests, and the kernels nbval starts for the solution notebooks, import this
# checkout's course_lib even when it is not pip-installed (`make setup` installs it).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if str(ROOT) not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *_paths])

# `make test` runs the suite in two pytest-xdist workers on a 2-core machine. Each worker,
# and every notebook kernel or grading sandbox it starts (they inherit the environment),
# then computes on one thread (COURSE_MAX_THREADS caps the lessons' `cl.use_threads(2)`):
# two workers with two threads each oversubscribe the cores, and the threads' spin-waiting
# made lessons several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["COURSE_MAX_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


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
