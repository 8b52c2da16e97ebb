"""TensorFlow Lite for Microcontrollers (the ``tflite-micro`` package) and LiteRT, from Python.

``tflite-micro`` wraps TFLM's C++ interpreter and its reference kernels (the code that
runs on a microcontroller, compiled here for x86-64). It has no getter for the arena it
used: ``print_allocations()`` writes lines such as
``[RecordingMicroAllocator] Arena allocation total 18368 bytes`` to the process's
standard error (file descriptor 2, below Python's ``sys.stderr``), so
:func:`arena_report` captures that descriptor and parses them. :func:`smallest_arena`
finds, by bisection, the smallest arena with which the interpreter still allocates and runs.

LiteRT (``ai-edge-litert``) is the desktop/mobile runtime; with
``OpResolverType.BUILTIN_REF`` it runs its reference kernels (no XNNPACK delegate).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["TflmRunner", "arena_report", "capture_fd2", "litert_outputs", "smallest_arena"]

_LINE = re.compile(r"Arena allocation (total|head|tail) (\d+) bytes")


@contextlib.contextmanager
def capture_fd2() -> Iterator[list[str]]:
    """Collect what C/C++ code writes to file descriptor 2 inside the block (a list filled on exit)."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def _interpreter(model: bytes, arena_size: int):
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(model, arena_size=arena_size)


class TflmRunner:
    """A ``.tflite`` in TFLite Micro's interpreter: int8 inputs (any layout with the right size) → int8 outputs."""

    def __init__(self, path: str | Path, arena_size: int = 64 * 1024) -> None:
        self.model = Path(path).read_bytes()
        with capture_fd2():
            self.interpreter = _interpreter(self.model, arena_size)
        details = self.interpreter.get_input_details(0)
        self.input_shape = tuple(int(v) for v in details["shape"])

    def run_one(self, x_q: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x_q, dtype=np.int8)
        if x.size != int(np.prod(self.input_shape)):
            raise ValueError(f"the model takes {int(np.prod(self.input_shape))} int8 values, got {x.size}")
        self.interpreter.set_input(x.reshape(self.input_shape), 0)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_output(0)).reshape(-1).copy()

    def __call__(self, x_q: np.ndarray) -> np.ndarray:
        """A batch of N images → (N, outputs) int8, one ``invoke()`` each (TFLM runs batch 1)."""
        return np.stack([self.run_one(x) for x in x_q])


def arena_report(path: str | Path, arena_size: int = 64 * 1024) -> dict[str, int]:
    """TFLM's own account of its arena after one inference: ``{"total", "head", "tail"}`` in bytes.

    ``head`` holds the activation tensors (planned by TFLM's greedy planner), ``tail`` the
    persistent data (tensor structs, quantization parameters, node structs, scratch).
    """
    runner = TflmRunner(path, arena_size)
    runner.run_one(np.zeros(int(np.prod(runner.input_shape)), np.int8))
    with capture_fd2() as lines:
        runner.interpreter.print_allocations()
    found = {m.group(1): int(m.group(2)) for line in lines for m in [_LINE.search(line)] if m}
    if "total" not in found:
        raise RuntimeError("print_allocations() wrote no 'Arena allocation total' line:\n" + "\n".join(lines[:10]))
    return found


def smallest_arena(path: str | Path, lo: int = 1024, hi: int = 256 * 1024) -> int:
    """The smallest ``arena_size`` (bytes) with which TFLM allocates and runs the model (bisection)."""
    model = Path(path).read_bytes()

    def works(size: int) -> bool:
        try:
            with capture_fd2():  # TFLM prints "Failed to resize buffer ..." for every miss
                interp = _interpreter(model, size)
                shape = tuple(int(v) for v in interp.get_input_details(0)["shape"])
                interp.set_input(np.zeros(shape, np.int8), 0)
                interp.invoke()
        except RuntimeError:
            return False
        return True

    if not works(hi):
        raise RuntimeError(f"{Path(path).name} does not run even with a {hi:,}-byte arena")
    while lo < hi:
        mid = (lo + hi) // 2
        if works(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def litert_outputs(path: str | Path, x_q: np.ndarray, *, reference_kernels: bool = True) -> np.ndarray:
    """LiteRT's int8 outputs for a batch (one image per ``invoke``); ``BUILTIN_REF`` kernels by default."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
    with capture_fd2():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        interp = Interpreter(model_path=str(path), experimental_op_resolver_type=resolver, num_threads=1)
        interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    results = []
    for x in x_q:
        interp.set_tensor(inp["index"], np.ascontiguousarray(x, dtype=np.int8).reshape(inp["shape"]))
        interp.invoke()
        results.append(interp.get_tensor(out["index"]).reshape(-1).copy())
    return np.stack(results)
