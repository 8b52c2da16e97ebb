"""Run one C function written by the learner on the emulated Cortex-M4 (lesson 09, exercise 2).

:func:`run_requantize_c` compiles the learner's ``requantize`` together with a small
driver (``app.c`` below) that loops over input arrays in SRAM, and returns what the
emulated CPU computed. The driver and the start-up code are the course's; only the
kernel is the learner's, compiled with every warning as an error.
"""

from __future__ import annotations

import numpy as np

from course_lib.mcu import emulator, toolchain

__all__ = ["REQUANTIZE_DRIVER", "REQUANTIZE_MAX", "run_requantize_c"]

REQUANTIZE_MAX = 4096  # values per emulator run
REQUANTIZE_DRIVER = f"""/* Driver: calls the learner's requantize() on every value of g_acc. */
#include <stdint.h>

int8_t requantize(int32_t acc, int32_t multiplier, int32_t shift, int32_t output_zero_point,
                  int32_t act_min, int32_t act_max);

#define N_MAX {REQUANTIZE_MAX}
int32_t g_acc[N_MAX], g_multiplier[N_MAX], g_shift[N_MAX];
int32_t g_params[4];  /* n, output_zero_point, act_min, act_max */
int8_t g_out[N_MAX];

void app_main(void) {{
    for (int32_t i = 0; i < g_params[0]; i++) {{
        g_out[i] = requantize(g_acc[i], g_multiplier[i], g_shift[i], g_params[1], g_params[2], g_params[3]);
    }}
}}
"""


def run_requantize_c(c_source: str, acc, multiplier, shift, output_zero_point: int,
                     act_min: int = -128, act_max: int = 127) -> np.ndarray:
    """The learner's C ``requantize`` on the emulated Cortex-M4: int8 array, one value per ``acc``.

    ``multiplier`` and ``shift`` broadcast against ``acc`` (per-value, as per-channel
    layers have them). Raises :class:`~course_lib.mcu.toolchain.CompileError` with the
    compiler's message if the source does not compile without warnings.
    """
    if not isinstance(c_source, str):
        raise TypeError(f"the C source must be a str, got {type(c_source).__name__}")
    acc = np.asarray(acc, dtype=np.int64).reshape(-1)
    m0 = np.broadcast_to(np.asarray(multiplier, dtype=np.int64), acc.shape)
    sh = np.broadcast_to(np.asarray(shift, dtype=np.int64), acc.shape)
    for name, arr in (("acc", acc), ("multiplier", m0), ("shift", sh)):
        if arr.size and (arr.min() < -(2**31) or arr.max() > 2**31 - 1):
            raise ValueError(f"{name} must fit int32, got values in [{arr.min()}, {arr.max()}]")
    elf = toolchain.compile_elf({"kernel.c": c_source, "app.c": REQUANTIZE_DRIVER})
    cpu = emulator.CortexM4(elf)
    out = np.empty(acc.size, dtype=np.int8)
    for start in range(0, acc.size, REQUANTIZE_MAX):
        stop = min(start + REQUANTIZE_MAX, acc.size)
        cpu.write("g_acc", acc[start:stop].astype(np.int32))
        cpu.write("g_multiplier", m0[start:stop].astype(np.int32))
        cpu.write("g_shift", sh[start:stop].astype(np.int32))
        cpu.write("g_params", np.array([stop - start, output_zero_point, act_min, act_max], dtype=np.int32))
        cpu.call("app_main")
        out[start:stop] = cpu.read("g_out", np.int8, stop - start)
    return out
