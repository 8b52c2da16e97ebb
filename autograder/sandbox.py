"""Where the student's code runs: a bubblewrap sandbox around a private copy of the course.

The grader writes a *course root* into its own temporary folder (the worker, its
message codec, a mount point for the data and course_lib's C files, but no course_lib
Python: each test's child gets its own disabled copy of the sources over the pipe, see
worker.py) and starts
``python -E -s /course/worker.py`` in ``bwrap`` with: every namespace
unshared (no network, own PIDs, IPC, UTS, user), all capabilities dropped, a new
session (no terminal), killed with its parent; the system's ``/usr`` and the Python
installation read-only; ``/course`` read-only; an empty, size-limited ``/tmp``;
nothing of the repository, of ``solutions/``, of other submissions or of the
gradebook. The worker then limits its own memory and file sizes before any student
code runs. One sandbox serves one submission: nothing a submission leaves in /tmp
reaches another.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COURSE_LIB = REPO / "course_lib"
DATA = REPO / "data"
SANDBOX_ROOT = "/course"  # where the course root appears inside the sandbox
PACKAGE_DATA_SUFFIXES = (".c", ".h", ".ld")  # non-Python files of course_lib the sandbox gets


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces on this machine."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 8 << 30   # address space of the worker (torch alone maps ~3.3 GB)
    file_bytes: int = 64 << 20    # largest file the student's code may write (in /tmp)
    tmp_bytes: int = 256 << 20    # size of the sandbox's /tmp
    startup_s: float = 120.0      # imports and the lesson's set-up cell
    cell_s: float = 30.0          # one exercise cell
    call_s: float = 60.0          # one call of a student function (a test may allow more)


def _disable_source(source: str, qualname: str, path: str) -> str:
    """``source`` with the body of function (or every method of class) ``qualname`` replaced."""
    tree = ast.parse(source)
    node: ast.AST = tree
    for part in qualname.split("."):
        body = getattr(node, "body", [])
        found = [n for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                 and n.name == part]
        if not found:
            raise LookupError(f"{path}: no function or class {part!r} in course_lib")
        node = found[-1]
    functions = ([node] if not isinstance(node, ast.ClassDef)
                 else [n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)])
    if not functions:
        raise LookupError(f"{path}: class without methods cannot be disabled")
    lines = source.splitlines(keepends=True)
    # Replace from the bottom up so earlier line numbers stay valid.
    for fn in sorted(functions, key=lambda n: n.lineno, reverse=True):
        first = fn.body[0]
        keep_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str) and len(fn.body) > 1)
        start = (fn.body[1] if keep_doc else first).lineno - 1
        indent = " " * (fn.body[0].col_offset)
        stub = (f"{indent}raise RuntimeError({path!r} ' is switched off while this exercise is graded: "
                f"solve it with your own code')\n")
        if fn.body[0].lineno - 1 == fn.lineno - 1:  # one-line def: `def f(): return x`
            raise LookupError(f"{path}: one-line function bodies are not supported")
        lines[start:fn.end_lineno] = [stub]
    return "".join(lines)


def course_sources(disabled: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """The course_lib sources for one test, and the non-course_lib paths to disable in memory.

    ``{"course_lib": ..., "course_lib.quant": ..., ...}``, with the body of every
    ``course_lib.*`` function or class named in ``disabled`` replaced by a raise.
    """
    sources = {}
    for path in sorted(COURSE_LIB.rglob("*.py")):  # subpackages too (course_lib/mcu/)
        parts = ("course_lib", *path.relative_to(COURSE_LIB).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text(encoding="utf-8")
    in_memory = []
    for path in disabled:
        if not path.startswith("course_lib."):
            in_memory.append(path)
            continue
        parts = path.split(".")
        for cut in range(len(parts) - 1, 1, -1):
            module = ".".join(parts[:cut])
            if module in sources:
                sources[module] = _disable_source(sources[module], ".".join(parts[cut:]), path)
                break
        else:
            raise LookupError(f"{path}: no such course_lib module")
    return sources, in_memory


def build_course_root(root: Path) -> Path:
    """The sandbox's /course: the worker, its codec and the mount point of the data."""
    root.mkdir(parents=True)
    shutil.copy2(HERE / "worker.py", root / "worker.py")
    shutil.copy2(HERE / "codec.py", root / "codec.py")
    (root / "data").mkdir()  # the shipped data is bound here, read-only
    # course_lib's package data (lesson 09's C sources and linker script), never its Python:
    # modules read it beside their __file__, which inside the sandbox is under /course.
    for path in sorted(COURSE_LIB.rglob("*")):
        if path.is_file() and path.suffix in PACKAGE_DATA_SUFFIXES and "__pycache__" not in path.parts:
            target = root / "course_lib" / path.relative_to(COURSE_LIB)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return root


def _python_dirs() -> list[str]:
    """The Python installation the worker needs: the venv and the interpreter it points to."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    dirs.add(os.path.dirname(os.path.realpath(sys.executable)))
    return sorted(d for d in dirs if not d.startswith("/usr/"))


def bwrap_command(course_root: Path, limits: Limits) -> list[str]:
    """The command that starts the worker for ``course_root`` in the sandbox."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed: the grader runs student code only in a sandbox. "
            "Install it (Debian/Ubuntu: sudo apt-get install bubblewrap), or pass --no-sandbox "
            "to grade without isolation, only for code you trust.")
    cmd = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--ro-bind", "/usr", "/usr"]
    for link in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(link):
            cmd += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            cmd += ["--ro-bind", link, link]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
                "/etc/alternatives", "/etc/ssl/certs"):
        cmd += ["--ro-bind-try", etc, etc]
    # The private /tmp first: a Python installation that lives under /tmp (a checkout's
    # .venv there) is then bound on top of it instead of being hidden by it.
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"]
    for d in _python_dirs():
        cmd += ["--ro-bind", d, d]
    cmd += ["--ro-bind", str(course_root), SANDBOX_ROOT,
            "--ro-bind", str(DATA), f"{SANDBOX_ROOT}/data",
            "--chdir", "/tmp", "--clearenv",
            "--setenv", "HOME", "/tmp", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "MPLBACKEND", "Agg",
            "--setenv", "MPLCONFIGDIR", "/tmp",
            # one thread per sandbox (two run at once): also caps the lessons' cl.use_threads(2)
            "--setenv", "OMP_NUM_THREADS", "1", "--setenv", "COURSE_MAX_THREADS", "1",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--setenv", "PYTHONHASHSEED", "0",
            "--setenv", "USER", "student", "--setenv", "TQDM_DISABLE", "1",
            "--uid", "65534", "--gid", "65534",
            sys.executable, "-E", "-s", f"{SANDBOX_ROOT}/worker.py"]
    return cmd


def plain_command(course_root: Path) -> list[str]:
    """Without a sandbox (``--no-sandbox``): the same worker, no isolation."""
    return [sys.executable, "-E", "-s", str(course_root / "worker.py")]


def probe(limits: Limits | None = None) -> None:
    """Raise :class:`SandboxUnavailable` unless bwrap can start a process here."""
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as tmp:
        (Path(tmp) / "data").mkdir()
        cmd = bwrap_command(Path(tmp), limits)
        cmd = cmd[: cmd.index(sys.executable)] + ["/usr/bin/true"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxUnavailable(f"bubblewrap could not start: {exc}") from None
    if done.returncode != 0:
        raise SandboxUnavailable(
            "bubblewrap could not create its sandbox here (are unprivileged user namespaces "
            f"disabled?): {done.stderr.strip()[:500]}")
