"""The student's side of grading: runs inside the sandbox.

Started by :mod:`autograder.session` as ``python -E -s /course/worker.py``: one sandbox
per submission. It talks to the grader over its original stdin/stdout with
length-prefixed plain-data messages (:mod:`codec`); the student's own prints go to
stderr, so they cannot garble replies.

The process is a *zygote*: it limits its own memory and file sizes, imports torch,
IPython and the third-party modules the lesson needs (never ``course_lib``, never any
course source), and then forks one child per hidden test. Each child, before any
student code exists in it:

1. receives that test's copy of the ``course_lib`` sources, in which the disabled
   references were already replaced by the grader, and imports ``course_lib`` from it
   (from memory: there is no course_lib on the sandbox's disk, so re-reading or
   reloading it gives the disabled version too);
2. replaces the other disabled references (torch, numpy, ...) in memory;
3. runs the lesson's set-up cell and the submission's exercise cells in an IPython shell;
4. serves the grader's requests: call a student function, or run trusted grader code in
   the student's namespace. Only plain data goes back.

Neither process ever holds an expected value or a comparison: those stay in the grader.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import resource
import struct
import sys
import traceback
from typing import Any

HEADER = struct.Struct(">Q")
COURSE_ROOT = "/course"  # where the sandbox shows the worker and the data
MAX_MESSAGE = 1 << 30


def _read_exact(fd: int, size: int) -> bytes:
    # Unbuffered: a zygote must never read ahead into bytes meant for its child.
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read(fd: int) -> Any:
    (size,) = HEADER.unpack(_read_exact(fd, HEADER.size))
    if size > MAX_MESSAGE:
        raise ValueError("message too large")
    return codec.decode(_read_exact(fd, size))


def _write(fd: int, message: dict[str, Any]) -> None:
    try:
        body = codec.encode(message)
    except Exception as exc:  # the student's value is not plain data
        body = codec.encode({"ok": False, "kind": "codec", "error": type(exc).__name__, "message": str(exc)})
    data = memoryview(HEADER.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data):]


def _limits(memory_bytes: int, file_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _disabled_stub(path: str):
    def reference_disabled(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{path} is switched off while this exercise is graded: solve it with your own code")

    return reference_disabled


def _resolve_parent(path: str) -> tuple[Any, str]:
    """The object that holds the last attribute of a dotted path, and that attribute's name."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            obj = getattr(obj, name)
        return obj, parts[-1]
    raise ImportError(f"cannot import any module of {path!r}")


def _disable_in_memory(paths: list[str]) -> None:
    for path in paths:
        parent, attr = _resolve_parent(path)
        if not hasattr(parent, attr):
            raise AttributeError(f"{path} does not exist: a hidden test names it in disabled=")
        stub = _disabled_stub(path)
        setattr(parent, attr, stub)
        if path.startswith("torch.") and path.count(".") == 1:
            _disable_torch_aliases(attr, stub)


class _Shadow:
    """Stands in for a read-only namespace, answering some names with stubs."""

    def __init__(self, original: Any, stubs: dict[str, Any]) -> None:
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_stubs", stubs)

    def __getattr__(self, name: str) -> Any:
        stubs = object.__getattribute__(self, "_stubs")
        return stubs[name] if name in stubs else getattr(object.__getattribute__(self, "_original"), name)


def _disable_torch_aliases(name: str, stub: Any) -> None:
    """torch.<op> is also torch.ops.aten.<op>, torch._C._VariableFunctions.<op> and torch._VF.<op>."""
    torch = sys.modules["torch"]
    if hasattr(torch.ops.aten, name):
        setattr(torch.ops.aten, name, stub)
    functions = torch._C._VariableFunctions
    if isinstance(functions, _Shadow):
        object.__getattribute__(functions, "_stubs")[name] = stub
    elif hasattr(functions, name):
        shadow = _Shadow(functions, {name: stub})
        torch._C._VariableFunctions = shadow
        vf = sys.modules.get("torch._VF")
        if vf is not None and hasattr(vf, "vf"):
            vf.vf = shadow


def _error(kind: str, exc: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"ok": False, "kind": kind, "error": type(exc).__name__, "message": str(exc)[:2000],
            "traceback": "".join(tb)[-4000:]}


class _SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``course_lib`` from sources held in memory (the grader's disabled copy)."""

    def __init__(self, sources: dict[str, str]) -> None:
        self._sources = sources

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self._sources:
            return None
        package = any(key.startswith(name + ".") for key in self._sources)  # course_lib, course_lib.mcu
        origin = f"{COURSE_ROOT}/{name.replace('.', '/')}{'/__init__' if package else ''}.py"
        spec = importlib.machinery.ModuleSpec(name, self, origin=origin, is_package=package)
        spec.has_location = True
        if package:  # submodules come from memory too (this finder answers them by name)
            spec.submodule_search_locations = []
        return spec

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        source = self._sources[module.__spec__.name]
        module.__file__ = module.__spec__.origin
        exec(compile(source, module.__file__, "exec"), module.__dict__)

    def get_source(self, name: str) -> str:
        return self._sources[name]


def _child(requests: int, replies: int) -> None:
    """One hidden test: course_lib from the grader's copy, then the student's code."""
    _write(replies, {"ok": True, "forked": True})
    init = _read(requests)
    sys.meta_path.insert(0, _SourceFinder(dict(init["sources"])))
    del init["sources"]
    import course_lib

    _disable_in_memory(list(init["disabled_in_memory"]))
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    # Lessons may say `%matplotlib inline`; without a notebook front end it means nothing.
    shell.register_magic_function(lambda line: None, "line", "matplotlib")
    _write(replies, {"ok": True, "ready": True, "course_lib": course_lib.__file__})
    while True:
        request = _read(requests)
        op = request.get("op")
        if op == "close":
            return
        try:
            if op == "exec":
                result = shell.run_cell(request["source"], store_history=False, silent=True)
                exc = result.error_before_exec or result.error_in_exec
                reply = {"ok": True} if exc is None else _error("exec", exc)
            elif op == "call":
                fn = shell.user_ns.get(request["name"])
                if fn is None:
                    reply = {"ok": False, "kind": "missing", "error": "NameError",
                             "message": f"{request['name']} is not defined by your exercise cells"}
                else:
                    reply = {"ok": True, "value": fn(*request["args"], **request["kwargs"])}
            elif op == "run":
                namespace = dict(shell.user_ns)
                namespace.update(request["inputs"])
                exec(compile(request["code"], "<hidden test>", "exec"), namespace)
                if "result" not in namespace:
                    raise RuntimeError("the hidden test's code assigned no `result`")
                reply = {"ok": True, "value": namespace["result"]}
            else:
                reply = {"ok": False, "kind": "protocol", "error": "ValueError", "message": f"unknown op {op!r}"}
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, anything the student raised
            reply = _error(op or "protocol", exc)
        _write(replies, reply)


def main() -> None:
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # input() in student code reads nothing
    os.dup2(2, 1)        # prints go to the log, never into a reply

    config = _read(requests)
    _limits(config["memory_bytes"], config["file_bytes"])
    import numpy  # noqa: F401  (warm imports, shared by every test's child)
    import torch

    torch.set_num_threads(1)
    for name in config["preload"]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: S112 (a warm-up only: the child imports what it needs)
            continue
    import IPython.core.interactiveshell  # noqa: F401

    if any(name == "course_lib" or name.startswith("course_lib.") for name in sys.modules):
        raise RuntimeError("the zygote must not import course_lib")
    _write(replies, {"ok": True, "ready": True})
    while True:
        try:
            request = _read(requests)
        except EOFError:
            return
        if request.get("op") != "fork":
            _write(replies, {"ok": False, "kind": "protocol", "error": "ValueError", "message": "expected fork"})
            continue
        pid = os.fork()
        if pid == 0:
            try:
                _child(requests, replies)
            except EOFError:
                pass
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        _write(replies, {"ok": True, "child_exit": status})


if __name__ == "__main__":
    import codec  # the copy beside this file, inside the sandbox

    main()
