"""Timing like an edge engineer: interleaved runs, medians, and an interval for a speed ratio.

Two models timed one after the other see different machines: another process wakes up, the
CPU changes its clock, caches warm. Timing them **interleaved** (A, B, A, B, …, each
round in the same order) spreads that drift over both. A verdict "B is faster than A"
then needs an estimate of the noise: :func:`ratio_interval` resamples the rounds
(a paired bootstrap: round i's two samples stay together) and gives a percentile
interval for the ratio of the two medians. When the interval contains 1 the honest
verdict is "no measurable difference" (:func:`speed_verdict`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RatioInterval", "interleaved_latency", "ratio_interval", "speed_verdict"]


def interleaved_latency(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 10,
    rounds: int = 50,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time several callables interleaved: ``{name: [ms of round 0, round 1, …]}``.

    First every callable is called ``warmup`` times untimed (in the mapping's order, one
    callable's warm-up after the other's). Then ``rounds`` rounds: in each round every
    callable is called once, in the mapping's order, and timed on its own:
    sample = (clock() after the call − clock() before it) · 1000. ``clock`` returns seconds.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not fns:
        raise ValueError("nothing to time: fns is empty")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append((clock() - start) * 1000.0)
    return samples


@dataclass(frozen=True)
class RatioInterval:
    """median(a) / median(b) and its bootstrap percentile interval (level, e.g. 0.95)."""

    ratio: float
    low: float
    high: float
    level: float
    rounds: int


def ratio_interval(a_ms: Sequence[float], b_ms: Sequence[float], *, level: float = 0.95,
                   n_boot: int = 2000, seed: int = 0) -> RatioInterval:
    """Paired bootstrap interval of median(a)/median(b) over interleaved rounds.

    ``a_ms[i]`` and ``b_ms[i]`` come from the same round. Each of ``n_boot`` resamples draws
    ``len(a_ms)`` round indices with replacement (numpy ``default_rng(seed)``) and computes
    the ratio of the medians; the interval is the (1−level)/2 and (1+level)/2 percentiles.
    With a = float32 and b = int8 times, a ratio above 1 means int8 is faster.
    """
    a = np.asarray(a_ms, dtype=np.float64)
    b = np.asarray(b_ms, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"need two equally long 1-D samples of >= 2 rounds, got shapes {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if (a <= 0).any() or (b <= 0).any():
        raise ValueError("latencies must be positive")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return RatioInterval(float(np.median(a) / np.median(b)), float(low), float(high), level, int(a.size))


def speed_verdict(interval: RatioInterval, faster: str = "int8", slower: str = "float32") -> str:
    """Words for a ratio median(slower)/median(faster) with its interval."""
    span = f"{interval.ratio:.2f}× [{interval.low:.2f}, {interval.high:.2f}]"
    if interval.low > 1:
        return f"{faster} faster: {span}"
    if interval.high < 1:
        return f"{faster} slower: {span}"
    return f"no measurable difference: {span}"
