"""Tests of course_lib.timing (lesson 08: interleaved timing and speed verdicts)."""

from __future__ import annotations

import numpy as np
import pytest

from course_lib import timing


class FakeClock:
    """Time moves only while a timed function runs, by that function's next duration (seconds)."""

    def __init__(self) -> None:
        self.now, self.log = 10.0, []

    def __call__(self) -> float:
        return self.now

    def fn(self, name: str, durations: list[float]):
        it = iter(durations)

        def run() -> None:
            self.log.append(name)
            self.now += next(it)

        return run


def test_interleaved_latency_excludes_warmup_and_alternates() -> None:
    clock = FakeClock()
    fns = {"a": clock.fn("a", [9.0, 9.0, 0.001, 0.004]), "b": clock.fn("b", [7.0, 7.0, 0.002, 0.003])}
    got = timing.interleaved_latency(fns, warmup=2, rounds=2, clock=clock)
    assert got == {"a": pytest.approx([1.0, 4.0]), "b": pytest.approx([2.0, 3.0])}
    assert "".join(clock.log) == "aabbabab"


@pytest.mark.parametrize("kwargs", [dict(warmup=-1), dict(rounds=0)])
def test_interleaved_latency_rejects_bad_counts(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        timing.interleaved_latency({"a": lambda: None}, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        timing.interleaved_latency({})


def test_ratio_interval_separates_a_real_difference_and_not_noise() -> None:
    rng = np.random.default_rng(1)
    slow = 2.0 + rng.exponential(0.1, 200)
    fast = 1.0 + rng.exponential(0.05, 200)
    iv = timing.ratio_interval(slow, fast)
    assert iv.ratio == pytest.approx(np.median(slow) / np.median(fast))
    assert 1.5 < iv.low <= iv.ratio <= iv.high < 2.5
    assert timing.speed_verdict(iv).startswith("int8 faster")
    same = timing.ratio_interval(1.0 + rng.exponential(0.1, 60), 1.0 + rng.exponential(0.1, 60))
    assert same.low < 1 < same.high
    assert timing.speed_verdict(same).startswith("no measurable difference")
    assert timing.speed_verdict(timing.ratio_interval(fast, slow)).startswith("int8 slower")


def test_ratio_interval_is_paired_over_rounds() -> None:
    # A drift shared by both samples of a round cancels in a paired bootstrap: the interval stays tight.
    drift = np.linspace(1.0, 3.0, 100)
    iv = timing.ratio_interval(2.0 * drift, drift)
    assert iv.ratio == pytest.approx(2.0)
    assert iv.high - iv.low < 0.2


@pytest.mark.parametrize("a, b", [([1.0], [1.0]), ([1.0, 2.0], [1.0]), ([1.0, -2.0], [1.0, 1.0])])
def test_ratio_interval_rejects_bad_samples(a: list, b: list) -> None:
    with pytest.raises(ValueError):
        timing.ratio_interval(a, b)
