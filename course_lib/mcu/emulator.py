"""Run a Cortex-M4 program in the ``unicorn`` CPU emulator and count what it executes.

:class:`CortexM4` maps flash (0x08000000) and SRAM (0x20000000) as ``link.ld`` declares
them, loads an ELF's segments, and calls C functions by name: arguments go in r0–r3 (the
Arm calling convention, AAPCS), the return address is ``mcu_halt`` (from ``startup.c``),
where emulation stops. Unicorn is set to ``UC_MODE_THUMB | UC_MODE_MCLASS`` with the CPU
model ``UC_CPU_ARM_CORTEX_M4``, so a Cortex-M4's instruction set (Thumb-2 and the DSP
extension: SMLAD, SXTB16, ...) is what runs; an instruction the M4 lacks faults.

Counting: with ``count=True`` a basic-block hook adds each executed block's instruction
count (a Thumb-2 instruction is 2 or 4 bytes; the first half-word tells which). That is
a count of executed instructions, not of cycles: a cycle estimate would need each
instruction's timing from the Cortex-M4 Technical Reference Manual (loads 2 cycles,
taken branches 2–4, SMLAD 1, ...), the part's flash wait states and caches, and bus
contention, none of which an emulator of the instruction set models.

Unicorn translates code into blocks and caches them; a hook added after code has run
sees nothing until that cache is flushed (``ctl_flush_tb``), which :meth:`CortexM4.call`
does whenever it adds or removes its hook.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from elftools.elf.elffile import ELFFile
from unicorn import UC_ARCH_ARM, UC_HOOK_BLOCK, UC_MODE_MCLASS, UC_MODE_THUMB, Uc, UcError
from unicorn.arm_const import (
    UC_ARM_REG_LR,
    UC_ARM_REG_PC,
    UC_ARM_REG_R0,
    UC_ARM_REG_R1,
    UC_ARM_REG_R2,
    UC_ARM_REG_R3,
    UC_ARM_REG_SP,
    UC_CPU_ARM_CORTEX_M4,
)

__all__ = ["FLASH_BASE", "RAM_BASE", "CortexM4", "EmulationError", "ModelRunner", "RunStats",
           "thumb_instruction_count"]

FLASH_BASE, FLASH_SIZE = 0x0800_0000, 1024 * 1024
RAM_BASE, RAM_SIZE = 0x2000_0000, 256 * 1024
STACK_FILL = 0xA5  # painted below the stack pointer to measure the stack's high-water mark


class EmulationError(RuntimeError):
    """The emulated program faulted, ran too long or a symbol is missing."""


def thumb_instruction_count(code: bytes) -> int:
    """Instructions in a run of Thumb-2 code: a half-word starting 0b11101/0b11110/0b11111 opens a 32-bit one."""
    count, i = 0, 0
    while i + 1 < len(code):
        top5 = code[i + 1] >> 3  # little-endian: bits 15..11 of the half-word
        i += 4 if top5 in (0b11101, 0b11110, 0b11111) else 2
        count += 1
    return count


@dataclass(frozen=True)
class RunStats:
    """One call: executed instructions (0 unless counted) and the stack bytes it used."""

    instructions: int
    stack_bytes: int


class CortexM4:
    """An emulated Cortex-M4 with one program (an ELF from :func:`~course_lib.mcu.toolchain.compile_elf`) loaded."""

    def __init__(self, elf: bytes, *, stack_bytes: int = 8 * 1024) -> None:
        self.elf = elf
        self.uc = Uc(UC_ARCH_ARM, UC_MODE_THUMB | UC_MODE_MCLASS)
        self.uc.ctl_set_cpu_model(UC_CPU_ARM_CORTEX_M4)
        self.uc.mem_map(FLASH_BASE, FLASH_SIZE)
        self.uc.mem_map(RAM_BASE, RAM_SIZE)
        self.symbols: dict[str, tuple[int, int]] = {}
        reader = ELFFile(io.BytesIO(elf))
        for segment in reader.iter_segments():
            if segment["p_type"] != "PT_LOAD":
                continue
            data = segment.data()
            # .data is loaded at its run address directly (what reset_handler's copy does).
            self.uc.mem_write(segment["p_vaddr"], data)
            extra = segment["p_memsz"] - segment["p_filesz"]
            if extra > 0:
                self.uc.mem_write(segment["p_vaddr"] + len(data), b"\0" * extra)
        symtab = reader.get_section_by_name(".symtab")
        for sym in symtab.iter_symbols():
            kind = sym["st_info"]["type"]
            if sym.name and kind in ("STT_FUNC", "STT_OBJECT"):
                value = int(sym["st_value"]) & ~1 if kind == "STT_FUNC" else int(sym["st_value"])  # Thumb bit
                self.symbols[sym.name] = (value, int(sym["st_size"]))
        self.stack_top = RAM_BASE + RAM_SIZE
        self.stack_limit = self.stack_top - stack_bytes
        self._block_sizes: dict[tuple[int, int], int] = {}
        self._counted = 0

    # ------------------------------------------------------------------ memory
    def address(self, name: str) -> int:
        if name not in self.symbols:
            known = ", ".join(sorted(self.symbols)[:20])
            raise EmulationError(f"no symbol {name!r} in the program (it has: {known}, ...)")
        return self.symbols[name][0]

    def write(self, name: str, values: np.ndarray) -> None:
        """Copy ``values`` (any numpy array, C order) into the global variable ``name``."""
        raw = np.ascontiguousarray(values).tobytes()
        size = self.symbols.get(name, (0, 0))[1]
        if len(raw) > size:
            raise EmulationError(f"{name} holds {size} bytes, cannot write {len(raw)}")
        self.uc.mem_write(self.address(name), raw)

    def read(self, name: str, dtype: np.dtype | type, count: int | None = None) -> np.ndarray:
        """The global variable ``name`` as a numpy array of ``dtype``."""
        size = self.symbols.get(name, (0, 0))[1]
        dt = np.dtype(dtype)
        n = size // dt.itemsize if count is None else count
        return np.frombuffer(bytes(self.uc.mem_read(self.address(name), n * dt.itemsize)), dtype=dt).copy()

    # ------------------------------------------------------------------ calls
    def _on_block(self, uc: Uc, address: int, size: int, _user: object) -> None:
        key = (address, size)
        n = self._block_sizes.get(key)
        if n is None:
            n = thumb_instruction_count(bytes(uc.mem_read(address, size)))
            self._block_sizes[key] = n
        self._counted += n

    def call(self, name: str, *args: int, count: bool = False, timeout_s: float = 60.0) -> RunStats:
        """Call the C function ``name(args...)`` (up to four int arguments); returns a :class:`RunStats`."""
        if len(args) > 4:
            raise ValueError("at most four register arguments (r0-r3)")
        uc = self.uc
        for reg, value in zip((UC_ARM_REG_R0, UC_ARM_REG_R1, UC_ARM_REG_R2, UC_ARM_REG_R3), args, strict=False):
            uc.reg_write(reg, int(value) & 0xFFFFFFFF)
        halt = self.address("mcu_halt")
        uc.mem_write(self.stack_limit, bytes([STACK_FILL]) * (self.stack_top - self.stack_limit))
        uc.reg_write(UC_ARM_REG_SP, self.stack_top)
        uc.reg_write(UC_ARM_REG_LR, halt | 1)
        hook = None
        self._counted = 0
        if count:
            hook = uc.hook_add(UC_HOOK_BLOCK, self._on_block)
            uc.ctl_flush_tb()  # blocks translated before the hook existed would not call it
        try:
            uc.emu_start(self.address(name) | 1, halt, timeout=int(timeout_s * 1e6))
        except UcError as exc:
            pc = uc.reg_read(UC_ARM_REG_PC)
            raise EmulationError(f"{name} faulted in the emulated Cortex-M4: {exc} (pc=0x{pc:08x})") from None
        finally:
            if hook is not None:
                uc.hook_del(hook)
                uc.ctl_flush_tb()
        pc = uc.reg_read(UC_ARM_REG_PC)
        if pc & ~1 != halt & ~1:
            raise EmulationError(f"{name} did not return within {timeout_s} s (stopped at pc=0x{pc:08x})")
        used = bytes(uc.mem_read(self.stack_limit, self.stack_top - self.stack_limit))
        untouched = len(used) - len(used.lstrip(bytes([STACK_FILL])))
        return RunStats(self._counted, self.stack_top - self.stack_limit - untouched)


class ModelRunner:
    """A generated model (``codegen.program``) on the emulated Cortex-M4: int8 images in, int8 outputs out."""

    def __init__(self, elf: bytes, input_bytes: int, output_bytes: int) -> None:
        self.cpu = CortexM4(elf)
        self.input_bytes, self.output_bytes = input_bytes, output_bytes
        self.input_address = int(self.cpu.read("model_input", np.uint32, 1)[0])
        self.output_address = int(self.cpu.read("model_output", np.uint32, 1)[0])

    def run_one(self, x_q: np.ndarray, *, count: bool = False) -> tuple[np.ndarray, RunStats]:
        """One image (int8, H×W×C) → (int8 outputs, :class:`RunStats` of ``model_invoke``)."""
        raw = np.ascontiguousarray(x_q, dtype=np.int8).tobytes()
        if len(raw) != self.input_bytes:
            raise ValueError(f"the model takes {self.input_bytes} int8 values, got {len(raw)}")
        self.cpu.uc.mem_write(self.input_address, raw)
        stats = self.cpu.call("model_invoke", count=count)
        out = np.frombuffer(bytes(self.cpu.uc.mem_read(self.output_address, self.output_bytes)), dtype=np.int8)
        return out.copy(), stats

    def __call__(self, x_q: np.ndarray) -> np.ndarray:
        """A batch (N, H, W, C) int8 → (N, outputs) int8, uncounted (fast)."""
        return np.stack([self.run_one(x)[0] for x in x_q])
