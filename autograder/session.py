"""The grader's handle on the student's code: ``student.call(...)`` and ``student.run(...)``.

A :class:`Sandbox` is one submission's bubblewrap sandbox, running the worker's zygote
(worker.py). A :class:`Student` is one hidden test's view of it: on first use it forks
a child from the zygote, gives it that test's ``course_lib`` sources (references
already disabled), the lesson's set-up cell, the test's context and the submission's
exercise cells, and then forwards calls. Every request has a deadline; when one is
missed, or the child dies, the whole sandbox is killed and the next test starts a new
one. Whatever the student's code does, the grader sees only plain data or one of the
errors below.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import codec, sandbox
from .worker import HEADER, MAX_MESSAGE


class GraderError(RuntimeError):
    """The course's own code failed (set-up cell, hidden test set-up): not the student's fault."""


class StudentError(AssertionError):
    """The student's code raised, or returned something that is not plain data."""


class StudentTimeout(StudentError):
    """The student's code ran past its time limit; the sandbox was killed."""


class StudentCrashed(StudentError):
    """The student's process died (os._exit, memory limit, signal) while running its code."""


@dataclass
class Program:
    """What a test's child runs before it serves calls."""

    setup: str                                   # the lesson's set-up cell (trusted)
    context: str = ""                            # the hidden tests' extra trusted code
    cells: list[tuple[str, str]] = field(default_factory=list)  # (grade_id, source) of the student
    skip: set[str] = field(default_factory=set)  # exercise cells that timed out before
    preload: list[str] = field(default_factory=list)  # third-party modules the zygote imports


class Sandbox:
    """One submission's sandboxed zygote; restarted after a timeout or a crash."""

    def __init__(self, course_root: Path, limits: sandbox.Limits, log: Path, preload: list[str],
                 use_sandbox: bool = True) -> None:
        self.course_root, self.limits, self.log_path = course_root, limits, log
        self._preload, self._use_sandbox = preload, use_sandbox
        self._proc: subprocess.Popen[bytes] | None = None

    def fork(self) -> None:
        """Start a child for one test (starting the zygote first if needed)."""
        if self._proc is None:
            self._start()
        self.send({"op": "fork"})
        self.receive(self.limits.startup_s, "starting a test's process", expect="forked")

    def _start(self) -> None:
        cmd = (sandbox.bwrap_command(self.course_root, self.limits) if self._use_sandbox
               else sandbox.plain_command(self.course_root))
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                          start_new_session=True)
        self.send({"memory_bytes": self.limits.memory_bytes, "file_bytes": self.limits.file_bytes,
                   "preload": self._preload})
        try:
            self.receive(self.limits.startup_s, "starting the grader's worker", expect="ready")
        except StudentError as exc:
            raise GraderError(f"the worker did not start: {exc}\n{self.log_tail()}") from None

    def end_child(self) -> None:
        """Let the current child exit and the zygote take the next fork."""
        if self._proc is None:
            return
        self.send({"op": "close"})
        try:
            self.receive(10.0, "closing a test's process", expect="child_exit")
        except StudentError:
            self.kill()

    def send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        body = codec.encode(message)
        try:
            self._proc.stdin.write(HEADER.pack(len(body)) + body)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: receive() reports it

    def _read_exact(self, size: int, deadline: float, what: str) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        chunks, remaining = [], size
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise StudentTimeout(f"{what} did not finish within its time limit")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                self.kill()
                raise StudentCrashed(f"the student's process ended during {what}{self.log_tail(short=True)}")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def receive(self, timeout: float, what: str, expect: str | None = None) -> dict[str, Any]:
        """The next reply; a child that died (the zygote reports it) counts as a crash."""
        deadline = time.monotonic() + timeout
        (size,) = HEADER.unpack(self._read_exact(HEADER.size, deadline, what))
        if size > MAX_MESSAGE:
            self.kill()
            raise StudentError(f"{what}: the reply is larger than {MAX_MESSAGE} bytes")
        try:
            reply = codec.decode(self._read_exact(size, deadline, what))
        except codec.CodecError as exc:
            self.kill()
            raise StudentError(f"{what}: malformed reply ({exc})") from None
        if not isinstance(reply, dict):
            self.kill()
            raise StudentError(f"{what}: malformed reply")
        if "child_exit" in reply and expect != "child_exit":
            self.kill()  # start clean: the zygote may have more to say
            raise StudentCrashed(f"the student's process ended during {what} "
                                 f"(status {reply['child_exit']}){self.log_tail(short=True)}")
        if expect is not None and expect not in reply and reply.get("ok"):
            self.kill()
            raise StudentError(f"{what}: unexpected reply")
        return reply

    def log_tail(self, short: bool = False) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if line.strip()][-(2 if short else 15):]
        return ("; " if short else "\n") + " | ".join(lines) if lines else ""

    def kill(self) -> None:
        """Kill the zygote, its children and everything they started."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._proc = None

    @property
    def alive(self) -> bool:
        return self._proc is not None


class Student:
    """One hidden test's calls into a submission's code, in a child of the sandbox's zygote."""

    def __init__(self, box: Sandbox, program: Program, sources: dict[str, str], in_memory: list[str], *,
                 call_s: float | None = None) -> None:
        self._box = box
        self._program = program
        self._sources = sources
        self._in_memory = in_memory
        self._call_s = call_s or box.limits.call_s
        self._open = False
        self.cell_errors: dict[str, str] = {}

    # ------------------------------------------------------------ the hidden tests' API
    def call(self, name: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """The student's ``name(*args, **kwargs)``, evaluated in the sandbox."""
        return self._request({"op": "call", "name": name, "args": list(args), "kwargs": kwargs},
                             timeout or self._call_s, what=f"{name}(...)")

    def run(self, code: str, *, timeout: float | None = None, **inputs: Any) -> Any:
        """Run trusted grader ``code`` with the student's namespace; return its ``result``."""
        return self._request({"op": "run", "code": code, "inputs": inputs},
                             timeout or self._call_s, what="the hidden test's code")

    # ------------------------------------------------------------ the child's life
    def _start(self) -> None:
        box, limits = self._box, self._box.limits
        box.fork()
        self._open = True
        box.send({"sources": self._sources, "disabled_in_memory": self._in_memory})
        reply = box.receive(limits.startup_s, "importing course_lib")
        if not reply.get("ok"):
            raise GraderError(f"course_lib did not import in the sandbox: {reply.get('message')}\n"
                              f"{reply.get('traceback', '')}")
        self._exec_trusted(self._program.setup, "the lesson's set-up cell")
        if self._program.context:
            self._exec_trusted(self._program.context, "the hidden tests' context")
        for grade_id, source in self._program.cells:
            if grade_id in self._program.skip:
                continue
            box.send({"op": "exec", "source": source})
            try:
                reply = box.receive(limits.cell_s, f"exercise cell {grade_id}")
            except StudentTimeout:
                # Remember it: the next child (and the next test) runs without this cell.
                self._program.skip.add(grade_id)
                self.cell_errors[grade_id] = f"did not finish within {limits.cell_s:g} s"
                self._open = False
                self._start()
                return
            except StudentCrashed as exc:
                self._program.skip.add(grade_id)
                self.cell_errors[grade_id] = str(exc)
                self._open = False
                self._start()
                return
            if not reply.get("ok"):
                self.cell_errors[grade_id] = f"{reply.get('error')}: {reply.get('message')}"

    def _exec_trusted(self, source: str, what: str) -> None:
        self._box.send({"op": "exec", "source": source})
        reply = self._box.receive(self._box.limits.startup_s, what)
        if not reply.get("ok"):
            raise GraderError(f"{what} failed in the sandbox: {reply.get('error')}: "
                              f"{reply.get('message')}\n{reply.get('traceback', '')}")

    def _request(self, message: dict[str, Any], timeout: float, what: str) -> Any:
        if not (self._open and self._box.alive):
            self._start()
        self._box.send(message)
        try:
            reply = self._box.receive(timeout, what)
        except StudentError:
            self._open = False
            raise
        if reply.get("ok"):
            return reply.get("value")
        kind, error, text = reply.get("kind"), reply.get("error"), reply.get("message", "")
        if kind == "codec":
            raise StudentError(f"{what} returned something that is not plain data: {text}")
        if error == "NotImplementedError":
            raise StudentError(f"{what}: not implemented yet (NotImplementedError)")
        raise StudentError(f"{what} raised {error}: {text}")

    def close(self) -> None:
        """End this test's child (the sandbox's zygote stays for the next test)."""
        if self._open and self._box.alive:
            self._box.end_child()
        self._open = False
