"""Cross-compiling C for a Cortex-M4 with the ``ziglang`` package (clang + lld from PyPI).

``compile_elf(sources)`` runs::

    python -m ziglang cc -target thumb-freestanding-eabi -mcpu=cortex_m4 -O2 -Wall -Wextra -Werror
        -nostdlib -ffreestanding -fno-builtin -ffunction-sections -fdata-sections -g0 ...
        -Wl,--gc-sections -Wl,--entry=reset_handler -T link.ld startup.c <yours>

``thumb-freestanding-eabi``: Thumb-2 code, no operating system, no C library (our
``startup.c`` brings the vector table, ``memset`` and ``memcpy``). ``-fno-builtin``
stops clang from turning our own ``memset`` loop into a call to ``memset``.
``--gc-sections`` keeps only what the vector table reaches, so flash holds only code and
constants that run; ``link.ld`` must ``KEEP`` the vector table or lld drops everything.

The result is cached under a content hash (sources, flags, compiler version), so
compiling the same program twice costs nothing: the output is deterministic.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from elftools.elf.elffile import ELFFile

__all__ = [
    "C_DIR",
    "CFLAGS",
    "CompileError",
    "ElfSizes",
    "cache_dir",
    "compile_elf",
    "elf_sizes",
    "library_sources",
]

C_DIR = Path(__file__).resolve().parent / "c"
TARGET = ["-target", "thumb-freestanding-eabi", "-mcpu=cortex_m4"]
CFLAGS = [
    "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror",
    "-nostdlib", "-ffreestanding", "-fno-builtin", "-ffunction-sections", "-fdata-sections",
    "-g0", "-fno-unwind-tables", "-fno-asynchronous-unwind-tables",
]
LDFLAGS = ["-Wl,--gc-sections", "-Wl,--entry=reset_handler"]
LIBRARY_FILES = ("startup.c", "int8_kernels.h", "link.ld")


class CompileError(RuntimeError):
    """The cross-compiler rejected a program; the message holds its diagnostics."""


def library_sources() -> dict[str, str]:
    """The course's own C files (start-up, kernels, header, linker script): name → text."""
    return {name: (C_DIR / name).read_text(encoding="utf-8") for name in LIBRARY_FILES}


def cache_dir() -> Path:
    """Where compiled ELF files are kept: ``$COURSE_MCU_CACHE`` or ``~/.cache/course_lib/mcu``."""
    env = os.environ.get("COURSE_MCU_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "course_lib" / "mcu"


def _zig_version() -> str:
    try:
        return metadata.version("ziglang")
    except metadata.PackageNotFoundError:  # pragma: no cover - the course pins ziglang
        raise CompileError("the ziglang package is not installed: pip install ziglang") from None


def compile_elf(sources: dict[str, str], *, extra_flags: list[str] | tuple[str, ...] = (),
                with_library: bool = True, timeout: float = 120.0) -> bytes:
    """Compile and link C ``sources`` (file name → text) for a Cortex-M4; returns the ELF bytes.

    With ``with_library`` the course's ``startup.c``, ``int8_kernels.h`` and ``link.ld``
    are added (the program must then define ``void app_main(void)``). Every warning is
    an error. Raises :class:`CompileError` with the compiler's diagnostics.
    """
    files = dict(library_sources()) if with_library else {}
    for name, text in sources.items():
        if "/" in name or not name.endswith((".c", ".h", ".ld")):
            raise ValueError(f"source names must be plain .c/.h/.ld file names, got {name!r}")
        files[name] = text
    if "link.ld" not in files:
        raise ValueError("no linker script: pass link.ld or use with_library=True")
    flags = [*TARGET, *CFLAGS, *extra_flags, *LDFLAGS]
    key = hashlib.sha256(repr((sorted(files.items()), flags, _zig_version())).encode()).hexdigest()
    cached = cache_dir() / f"{key}.elf"
    if cached.is_file():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="mcu-build-") as tmp:
        work = Path(tmp)
        for name, text in files.items():
            (work / name).write_text(text, encoding="utf-8")
        c_files = sorted(name for name in files if name.endswith(".c"))
        env = dict(os.environ)
        # zig keeps its own caches; inside a sandbox only /tmp may be writable.
        env.setdefault("ZIG_GLOBAL_CACHE_DIR", str(work / "zig-global-cache"))
        env.setdefault("ZIG_LOCAL_CACHE_DIR", str(work / "zig-local-cache"))
        cmd = [sys.executable, "-m", "ziglang", "cc", *flags, "-I", ".", "-T", "link.ld",
               "-o", "program.elf", *c_files]
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise CompileError(f"cross-compilation failed (exit {done.returncode}):\n{done.stderr.strip()}")
        elf = (work / "program.elf").read_bytes()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(elf)
        os.replace(partial, cached)
    except OSError:  # a read-only home (a sandbox) only loses the cache
        pass
    return elf


@dataclass(frozen=True)
class ElfSizes:
    """Bytes of a linked program, from its section headers.

    flash = .text (code, vector table) + .rodata (weights, multipliers) + .data's initial
    values; static RAM = .data + .bss (the arena, input/output buffers). The stack comes
    on top of static RAM.
    """

    text: int
    rodata: int
    data: int
    bss: int

    @property
    def flash(self) -> int:
        return self.text + self.rodata + self.data

    @property
    def static_ram(self) -> int:
        return self.data + self.bss


def elf_sizes(elf: bytes) -> ElfSizes:
    """Section sizes of ``elf`` (allocated sections only), read with pyelftools."""
    import io

    sizes = {"text": 0, "rodata": 0, "data": 0, "bss": 0}
    for section in ELFFile(io.BytesIO(elf)).iter_sections():
        flags = section["sh_flags"]
        if not flags & 0x2:  # SHF_ALLOC: debug info and symbol tables never reach the device
            continue
        name = section.name
        if section["sh_type"] == "SHT_NOBITS":
            sizes["bss"] += section["sh_size"]
        elif flags & 0x4:  # SHF_EXECINSTR
            sizes["text"] += section["sh_size"]
        elif flags & 0x1:  # SHF_WRITE
            sizes["data"] += section["sh_size"]
        else:  # .rodata, .ARM.exidx, ...
            sizes["rodata" if name.startswith(".rodata") or not name.startswith(".ARM") else "text"] += section["sh_size"]
    return ElfSizes(**sizes)
