"""The grader's parts: the plain-data codec, references disabled on disk, the sandbox, flags.

The end-to-end behaviour (real lesson notebooks, attacks, scores in the gradebook) is in
test_grading_pipeline.py and test_grading_all_lessons.py.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
from notebook_utils import ROOT, SOLUTIONS, is_exercise_cell, lesson_ids, read

from autograder import codec, flags, sandbox
from autograder.session import (
    Program,
    Sandbox,
    Student,
    StudentCrashed,
    StudentError,
    StudentTimeout,
)

# ------------------------------------------------------------------ codec


@pytest.mark.parametrize("value", [
    None, True, 0, -(2**70), 1.5, "text", b"\x00\xff", [1, "a", None], (1, (2.0, "b")),
    {"a": 1, "$b": [2]}, {"nested": {"x": (1,)}},
])
def test_codec_round_trips_plain_data(value) -> None:
    assert codec.decode(codec.encode(value)) == value


def test_codec_keeps_dtypes_shapes_and_special_floats() -> None:
    value = {
        "int8": torch.tensor([[-128, 127]], dtype=torch.int8), "bf16": torch.ones(2, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "np": np.arange(6, dtype=np.uint16).reshape(2, 3),
        "npscalar": np.int64(-3), "floats": [math.inf, -math.inf], "size": torch.Size([4, 5]), "dtype": torch.int32,
    }
    back = codec.decode(codec.encode(value))
    for key in ("int8", "bf16", "empty", "scalar"):
        assert back[key].dtype == value[key].dtype and back[key].shape == value[key].shape
        assert torch.equal(back[key], value[key])
    assert back["np"].dtype == np.uint16 and np.array_equal(back["np"], value["np"])
    assert back["npscalar"] == -3 and back["npscalar"].dtype == np.int64
    assert back["floats"] == [math.inf, -math.inf] and math.isnan(codec.decode(codec.encode(math.nan)))
    assert back["size"] == (4, 5) and back["dtype"] is torch.int32


def test_codec_sends_values_not_graphs() -> None:
    x = torch.ones(3, requires_grad=True) * 2
    back = codec.decode(codec.encode(x))
    assert not back.requires_grad and back.grad_fn is None


@pytest.mark.parametrize("value", [
    object(), lambda: 1, torch.nn.Linear(2, 2), {1: "int key"}, np.array(["a"]),
    torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), [set()],
])
def test_codec_rejects_anything_else(value) -> None:
    with pytest.raises(codec.CodecError):
        codec.encode(value)


@pytest.mark.parametrize("raw", [
    b"not json", b'{"$pickle": "gASV"}', b'{"$ndarray": {"dtype": "object", "shape": [1], "data": ""}}',
    b'{"$ndarray": {"dtype": "int8", "shape": [3], "data": "AA=="}}', b'{"a": 1, "b": 2}',
    b'{"$tensor": {"dtype": "int8", "shape": [1], "data": "AA==", "torch_dtype": "qint8"}}',
])
def test_codec_refuses_malformed_or_unknown_messages(raw: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(raw)


# ------------------------------------------------------------------ disabling references on disk

MODULE = textwrap.dedent('''
    def target(x):
        """Docstring stays."""
        y = x + 1
        return y


    def other(x):
        return target(x) * 2


    class Reader:
        def __init__(self):
            self.n = 0

        def get(self):
            return self.n
''')


def test_disable_source_replaces_only_the_named_function() -> None:
    out = sandbox._disable_source(MODULE, "target", "course_lib.m.target")
    namespace: dict = {}
    exec(out, namespace)
    with pytest.raises(RuntimeError, match="course_lib.m.target is switched off"):
        namespace["target"](1)
    assert namespace["target"].__doc__ == "Docstring stays."
    assert namespace["Reader"]().get() == 0  # untouched


def test_disable_source_switches_off_every_method_of_a_class() -> None:
    namespace: dict = {}
    exec(sandbox._disable_source(MODULE, "Reader", "course_lib.m.Reader"), namespace)
    with pytest.raises(RuntimeError, match="switched off"):
        namespace["Reader"]()
    assert namespace["other"](1) == 4


def test_disable_source_names_what_it_cannot_find() -> None:
    with pytest.raises(LookupError, match="missing"):
        sandbox._disable_source(MODULE, "missing", "course_lib.m.missing")


def test_course_sources_are_disabled_copies() -> None:
    sources, in_memory = sandbox.course_sources(["course_lib.quant.quantize", "torch.quantize_per_tensor"])
    assert in_memory == ["torch.quantize_per_tensor"]
    assert set(sources) >= {"course_lib", "course_lib.quant", "course_lib.kernels"}
    assert "course_lib.quant.quantize' ' is switched off" in sources["course_lib.quant"]
    assert (ROOT / "course_lib" / "quant.py").read_text() != sources["course_lib.quant"]
    assert (ROOT / "course_lib" / "kernels.py").read_text() == sources["course_lib.kernels"]
    with pytest.raises(LookupError):
        sandbox.course_sources(["course_lib.quant.no_such_function"])


# ------------------------------------------------------------------ the sandbox

PROBE = '''
import os, socket, pathlib
facts = {"uid": os.getuid(), "cwd": os.getcwd(), "course_lib": course_lib.__file__}
facts["repository_entries"] = sorted(os.listdir(REPO)) if os.path.isdir(REPO) else []
facts["sees_solutions"] = pathlib.Path(REPO, "solutions").exists()
try:
    pathlib.Path(course_lib.__file__).write_text("x")
    facts["course_lib_writable"] = True
except OSError:
    facts["course_lib_writable"] = False
try:
    pathlib.Path("/tmp/scratch.txt").write_text("ok")
    facts["tmp_writable"] = True
except OSError:
    facts["tmp_writable"] = False
try:
    socket.create_connection(("127.0.0.1", 22), timeout=2)
    facts["network"] = "connected"
except OSError as exc:
    facts["network"] = type(exc).__name__
try:
    torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    facts["disabled_works"] = True
except RuntimeError as exc:
    facts["disabled_works"] = str(exc)
result = facts
'''


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sandbox")
    sandbox.probe()
    sources, in_memory = sandbox.course_sources(["torch.quantize_per_tensor"])
    program = Program(setup="import torch\nimport course_lib\nimport course_lib.quant",
                      cells=[("ex-a", "def double(x):\n    return 2 * x"),
                             ("ex-b", "raise ValueError('a broken cell')"),
                             ("ex-c", "while True:\n    pass"),
                             ("ex-d", "def loop():\n    while True:\n        pass\n"
                                      "def leave():\n    import os\n    os._exit(3)\n"
                                      "def hog():\n    return bytearray(8 << 30)\n"
                                      "def opaque():\n    return object()")])
    limits = sandbox.Limits(memory_bytes=6 << 30, cell_s=5, call_s=5)
    box = Sandbox(sandbox.build_course_root(tmp / "course"), limits, tmp / "worker.log", ["torch"])
    yield Student(box, program, sources, in_memory)
    box.kill()


@pytest.mark.slow
def test_sandbox_isolates_the_students_code(student) -> None:
    facts = student.run(PROBE, REPO=str(ROOT))
    assert facts["uid"] == 65534 and facts["cwd"] == "/tmp"
    assert facts["course_lib"].startswith(sandbox.SANDBOX_ROOT + "/")
    # Only the Python environment may show through (when .venv lives in the checkout).
    assert set(facts["repository_entries"]) <= {".venv"} and facts["sees_solutions"] is False
    assert facts["course_lib_writable"] is False and facts["tmp_writable"] is True
    assert facts["network"] != "connected"
    assert "switched off" in facts["disabled_works"]


@pytest.mark.slow
def test_student_calls_and_errors(student) -> None:
    assert torch.equal(student.call("double", torch.arange(3)), torch.tensor([0, 2, 4]))
    assert "ex-b" in student.cell_errors and "a broken cell" in student.cell_errors["ex-b"]
    assert "ex-c" in student.cell_errors  # the endless cell was skipped, the rest still ran
    with pytest.raises(StudentError, match="not defined"):
        student.call("missing")
    with pytest.raises(StudentError, match="not plain data"):
        student.call("opaque")
    with pytest.raises(StudentError, match="MemoryError"):
        student.call("hog")
    with pytest.raises(StudentTimeout):
        student.call("loop")
    assert student.call("double", 4) == 8  # a new worker after the timeout
    with pytest.raises(StudentCrashed):
        student.call("leave")


# ------------------------------------------------------------------ flags


@pytest.mark.parametrize(("source", "label"), [
    ("import course_lib.grading as g\ng.check = print", "grading module"),
    ("f = sys._getframe(1).f_locals", "frame inspection"),
    ("get_ipython().set_custom_exc((Exception,), h)", "IPython hooks"),
    ("os._exit(0)", "exits"),
    ("del sys.modules['course_lib']", "module table"),
    ("open('/tmp/x', 'w').write('y')", "file writes"),
    ("quantize.__code__ = other.__code__", "code objects"),
    ("torch.ops.aten.quantize_per_tensor", "torch internals"),
])
def test_flags_name_what_they_saw(source: str, label: str) -> None:
    assert label in flags.code_flags(source)


@pytest.mark.parametrize("lesson", lesson_ids())
def test_the_courses_own_solutions_raise_no_flags(lesson: str) -> None:
    for cell in read(SOLUTIONS / f"{lesson}.ipynb").cells:
        if is_exercise_cell(cell):
            assert flags.code_flags(cell.source) == [], (lesson, cell.metadata["nbgrader"]["grade_id"])


# ------------------------------------------------------------------ verdicts


@pytest.mark.parametrize(("error", "grader_fault"), [
    (NameError("name 'expected' is not defined"), True),
    (ModuleNotFoundError("No module named 'onnx'"), True),
    (SystemError("AST constructor recursion depth mismatch"), True),
    (FileNotFoundError("data/mnist_test.npz"), True),
    (TypeError("'NoneType' object is not subscriptable"), False),
    (AttributeError("'list' object has no attribute 'shape'"), False),
])
def test_a_failing_hidden_test_is_the_graders_fault_or_the_students(monkeypatch, tmp_path, error,
                                                                    grader_fault) -> None:
    """A bug of the hidden test never silently costs the student points; a wrong value does."""
    from autograder import grader, hidden
    from autograder.session import GraderError

    lesson = "01_affine_map"
    _, points, _ = grader.lesson_layout(lesson)
    tests = hidden.HiddenTests(lesson)

    def fails(student) -> None:
        raise error

    for grade_id in points:
        tests.case(grade_id)(fails)
    monkeypatch.setattr(grader.hidden, "load", lambda _: tests)
    nb = read(SOLUTIONS / f"{lesson}.ipynb")
    if grader_fault:
        with pytest.raises(GraderError, match=f"failed in the grader: {type(error).__name__}"):
            grader.grade_notebook(lesson, nb, workdir=tmp_path, use_sandbox=False)
    else:
        result = grader.grade_notebook(lesson, nb, workdir=tmp_path, use_sandbox=False)
        assert all(t.points == 0 and "could not be checked" in t.message for t in result.tests.values())
