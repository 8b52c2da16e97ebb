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


def _stderr_of(code: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_torchao_import_notice_is_dropped_and_only_it() -> None:
    import course_lib

    # Without the filter, importing torchao logs the notice (so the check below can fail).
    assert course_lib.TORCHAO_IMPORT_NOTICE in _stderr_of(_IMPORT_TORCHAO)
    quiet = _stderr_of(
        "import logging, course_lib\n"
        "course_lib.drop_torchao_import_notice(); course_lib.drop_torchao_import_notice()\n"
        f"{_IMPORT_TORCHAO}\n"
        "logger = logging.getLogger('torch.utils._pytree')\n"
        "assert len(logger.filters) == 1, logger.filters\n"
        "logger.warning('another message of the same logger')\n"
    )
    assert course_lib.TORCHAO_IMPORT_NOTICE not in quiet
    assert "another message of the same logger" in quiet
