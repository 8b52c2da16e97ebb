"""The hardware a latency is measured on, and a budget for hardware that is not here (lesson 08).

- :func:`cpu_flags` / :func:`cpu_model_name`: which x86 int8 instructions this CPU has
  (AVX2, VNNI, AMX) and its name, read from ``/proc/cpuinfo``: a latency means nothing
  without them.
- :class:`DeviceAssumptions` / :func:`estimate_latency_ms` / :data:`PI4_SCENARIOS`: a
  compute-bound latency budget from a MAC count and stated device numbers (a Raspberry
  Pi 4's Cortex-A72), every number an assumption with its source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "INT8_CPU_FLAGS",
    "PI4_SCENARIOS",
    "DeviceAssumptions",
    "cpu_flags",
    "cpu_model_name",
    "estimate_latency_ms",
]


# --------------------------------------------------------------------------- the CPU
INT8_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(names: Sequence[str] = INT8_CPU_FLAGS, cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, bool]:
    """Which of the x86 instruction-set ``names`` this CPU reports in ``/proc/cpuinfo``.

    INT8 speed on x86 hinges on these: AVX2 multiplies int8 pairs with ``vpmaddubsw``
    (u8×s8 → saturating s16) then ``vpmaddwd``; AVX512-VNNI / AVX-VNNI fuse that into one
    ``vpdpbusd`` (u8×s8 → s32 accumulate). Returns all False where the file is absent
    (not Linux, or not x86).
    """
    path = Path(cpuinfo)
    if not path.exists():
        return dict.fromkeys(names, False)
    flags: set[str] = set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {n: n in flags for n in names}


def cpu_model_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    path = Path(cpuinfo)
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown CPU"


# --------------------------------------------------------------------------- the budget
@dataclass(frozen=True)
class DeviceAssumptions:
    """A device described by the numbers a latency budget needs. All are assumptions.

    sustained MACs/s = cores · clock_ghz·1e9 · macs_per_cycle · efficiency, where
    ``macs_per_cycle`` is the peak per core for the data type and ``efficiency`` the
    share of that peak a real network sustains (memory traffic, small and depthwise
    layers, quantize/requantize work, threads waiting).
    """

    label: str
    cores: int
    clock_ghz: float
    macs_per_cycle: float
    efficiency: float

    @property
    def macs_per_second(self) -> float:
        return self.cores * self.clock_ghz * 1e9 * self.macs_per_cycle * self.efficiency


def estimate_latency_ms(macs: int | float, device: DeviceAssumptions) -> float:
    """Compute-bound latency estimate: 1000 · macs / device.macs_per_second (ms)."""
    if macs < 0:
        raise ValueError(f"macs must be >= 0, got {macs}")
    if device.macs_per_second <= 0:
        raise ValueError("the device must sustain a positive MAC rate")
    return 1000.0 * macs / device.macs_per_second


# Raspberry Pi 4: 4× Cortex-A72 at 1.5 GHz, 128-bit NEON, ARMv8.0-A (no SDOT dot-product
# instruction: that arrived with ARMv8.2). Peak rates per core: int8 about 8 MACs/cycle (Arm's
# Cortex-A72 Software Optimization Guide puts every ASIMD integer multiply on the one F0
# pipe; SMLAL widens 8 int8 lanes to 16 bits); fp32 8 MACs/cycle (4-lane FMA on two pipes).
# The 25 % efficiency of a tuned runtime over a whole MobileNet is an assumption, not a
# measurement of a Pi. A naive implementation's rate is measured, not assumed (lesson 08
# times TFLite's reference kernels).
PI4_SCENARIOS = (
    DeviceAssumptions("tuned int8, 4 threads", 4, 1.5, 8.0, 0.25),
    DeviceAssumptions("tuned int8, 1 thread", 1, 1.5, 8.0, 0.25),
    DeviceAssumptions("tuned fp32, 4 threads", 4, 1.5, 8.0, 0.25),
)
