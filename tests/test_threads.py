"""course_lib.use_threads: the lessons' thread request, capped where cores are shared."""

from __future__ import annotations

import pytest
import torch

import course_lib as cl


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cap, asked, expected", [(None, 2, 2), ("1", 2, 1), ("4", 2, 2), (" 1 ", 3, 1)])
def test_use_threads_honours_the_cap(monkeypatch, restore_threads, cap, asked, expected) -> None:
    if cap is None:
        monkeypatch.delenv(cl.MAX_THREADS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(cl.MAX_THREADS_VARIABLE, cap)
    assert cl.thread_cap(asked) == expected
    assert cl.use_threads(asked) == expected
    assert torch.get_num_threads() == expected


@pytest.mark.parametrize("cap", ["0", "two", "-1", "1.5"])
def test_a_bad_cap_is_a_clear_error(monkeypatch, restore_threads, cap) -> None:
    monkeypatch.setenv(cl.MAX_THREADS_VARIABLE, cap)
    with pytest.raises(ValueError, match="COURSE_MAX_THREADS"):
        cl.use_threads(2)


def test_lessons_ask_for_threads_through_the_cap() -> None:
    """A lesson that set torch's threads directly to more than one would escape the cap."""
    from notebook_utils import SOLUTIONS

    direct = [p.name for p in sorted(SOLUTIONS.glob("*.ipynb"))
              if "torch.set_num_threads(2)" in p.read_text(encoding="utf-8")]
    assert not direct, f"use cl.use_threads(n) in {direct}"


# ------------------------------------------------------------------ torchao's import notice
_IMPORT_TORCHAO = "import torchao.quantization"


def test_torchao_import_notice_is_dropped_and_only_it() -> None:
    import subprocess
    import sys

    import course_lib

    # One fresh process (importing torchao takes seconds): the filter is installed (twice),
    # and every record it drops is also printed to stdout, so the test sees that torchao
    # really logged the notice (the check below could fail) and that nothing else was dropped.
    done = subprocess.run([sys.executable, "-c", (
        "import logging, course_lib\n"
        "course_lib.drop_torchao_import_notice(); course_lib.drop_torchao_import_notice()\n"
        "logger = logging.getLogger('torch.utils._pytree')\n"
        "assert len(logger.filters) == 1, logger.filters\n"
        "drop = logger.filters[0]\n"
        "keep = drop.filter\n"
        "def spy(record):\n"
        "    kept = keep(record)\n"
        "    if not kept:\n"
        "        print('DROPPED', record.getMessage(), flush=True)\n"
        "    return kept\n"
        "drop.filter = spy\n"
        f"{_IMPORT_TORCHAO}\n"
        "logger.warning('another message of the same logger')\n"
    )], capture_output=True, text=True, check=True)
    dropped = [line for line in done.stdout.splitlines() if line.startswith("DROPPED ")]
    assert len(dropped) == 1 and course_lib.TORCHAO_IMPORT_NOTICE in dropped[0], done.stdout
    assert course_lib.TORCHAO_IMPORT_NOTICE not in done.stderr
    assert "another message of the same logger" in done.stderr
