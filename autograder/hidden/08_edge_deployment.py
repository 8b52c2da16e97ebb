"""Hidden tests of lesson 08 (edge deployment), run in the grader's process.

The student's code runs in the sandbox; expected values are computed here with the
grader's own ``course_lib.export`` and ``course_lib.sizes`` (PT2E of the shipped TinyCNN, byte counts) or in
closed form (the fake clock's durations).
"""

from __future__ import annotations

import numpy as np
import torch

from autograder.hidden import HiddenTests
from course_lib import export, grading, sizes

tests = HiddenTests("08_edge_deployment")

# Runs in the sandbox: PT2E with the XNNPACK quantizer (course_lib.pt2e's) on the shipped TinyCNN, through the
# student's quantize_pt2e; only the converted graph's quantize parameters and its logits come back.
_PT2E = """
import torch as _torch
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config as _cfg
import course_lib.data as _data, course_lib.models as _models
from course_lib.pt2e import FoldedXNNPACKQuantizer as _Q  # XNNPACKQuantizer's graph, faster
_model = _models.load_pretrained("tinycnn")
_calib = _data.get_split("calib")[0][start:stop]
_m = quantize_pt2e(_model, _Q().set_global(_cfg(is_per_channel=True)), _calib, batch_size=batch_size)
_target = _torch.ops.quantized_decomposed.quantize_per_tensor.default
with _torch.no_grad():
    _logits = _m(_data.get_split("test")[0][test_start:test_start + 64])
_bad = []
for _n, _bs in bad:
    try:
        quantize_pt2e(_model, _Q().set_global(_cfg(is_per_channel=True)), _calib[:_n], batch_size=_bs)
        _bad.append(False)
    except ValueError:
        _bad.append(True)
result = {"qparams": [[float(n.args[1]), int(n.args[2])] for n in _m.graph.nodes if n.target == _target],
          "logits": _logits, "bad_inputs_raise": _bad}
"""


# torch.export is not thread-safe (dynamo's global state), and the grader may grade several
# submissions in threads of one process: expected values are computed under the library's
# process-wide export lock (this module is loaded afresh per submission; course_lib is not).
_PT2E_EXPECTED: dict[tuple[int, int, int, int], tuple[list, torch.Tensor]] = {}


def _pt2e_expected(start: int, stop: int, batch_size: int, test_start: int) -> tuple[list, torch.Tensor]:
    from course_lib import data, models

    key = (start, stop, batch_size, test_start)
    with export.EXPORT_LOCK:
        if key not in _PT2E_EXPECTED:
            calib = data.get_split("calib")[0][start:stop]
            want = export.quantize_pt2e_xnnpack(models.load_pretrained("tinycnn"), calib, batch_size=batch_size)
            target = torch.ops.quantized_decomposed.quantize_per_tensor.default
            want_q = [[float(n.args[1]), int(n.args[2])] for n in want.graph.nodes if n.target == target]
            with torch.no_grad():
                want_logits = want(data.get_split("test")[0][test_start:test_start + 64])
            _PT2E_EXPECTED[key] = (want_q, want_logits)
        return _PT2E_EXPECTED[key]


@tests.case("test-pt2e", disabled=["course_lib.export.quantize_pt2e_xnnpack", "course_lib.export.export_executorch"])
def pt2e(student) -> None:
    for start, stop, batch_size, test_start in [(120, 320, 64, 300), (7, 107, 100, 0)]:
        want_q, want_logits = _pt2e_expected(start, stop, batch_size, test_start)
        got = student.run(_PT2E, start=start, stop=stop, batch_size=batch_size, test_start=test_start,
                          bad=[(1, 10), (20, 0)])
        label = f"calibration images {start}..{stop - 1} in batches of {batch_size}"
        grading.check("quantize ops (scale, zero point) of the converted graph (hidden)", got["qparams"], want_q,
                      inputs=label, rtol=1e-6)
        grading.check("logits of the converted model on 64 test images (hidden)", got["logits"], want_logits,
                      inputs=label, atol=1e-5)
        grading.check("ValueError for 1 calibration image and for batch_size=0 (hidden)", got["bad_inputs_raise"],
                      [True, True])


# Runs in the sandbox: drain the student's reader, rewind it, and try the bad inputs.
_READER = """
import numpy as _np
_reader = CalibReader(images, input_name=name, batch_size=batch_size)
_items = []
for _ in range(1000):
    _item = _reader.get_next()
    if _item is None:
        break
    if not isinstance(_item, dict):
        raise TypeError(f"get_next() returned a {type(_item).__name__}, not a dict")
    _items.append({k: _np.asarray(v) for k, v in _item.items()})
_after_end = _reader.get_next() is None
_reader.rewind()
_again = _reader.get_next()
_bad = []
for _kwargs in bad:
    try:
        CalibReader(**_kwargs)
        _bad.append(False)
    except ValueError:
        _bad.append(True)
result = {"batches": _items, "after_end_is_none": _after_end,
          "after_rewind": None if _again is None else {k: _np.asarray(v) for k, v in _again.items()},
          "bad_inputs_raise": _bad}
"""


@tests.case("test-calib-reader", disabled=[
    "course_lib.export.CalibrationReader",
])
def calib_reader(student) -> None:
    gen = torch.Generator().manual_seed(818)
    cases = [(torch.randn(23, 3, 4, 4, generator=gen, dtype=torch.float64), 6, "input"),
             (torch.randn(9, 1, 5, 5, generator=gen).numpy(), 1, "x"),
             (torch.randn(40, 2, 3, 3, generator=gen).half().numpy(), 500, "images")]
    bad = [dict(images=np.zeros((0, 1, 2, 2), np.float32)),
           dict(images=np.zeros((3, 1, 2, 2), np.float32), batch_size=0),
           dict(images=np.zeros((4, 28, 28), np.float32))]
    for images, batch_size, name in cases:
        array = np.asarray(images, dtype=np.float32)
        want = [array[i:i + batch_size] for i in range(0, len(array), batch_size)]
        got = student.run(_READER, images=images, batch_size=batch_size, name=name, bad=bad)
        label = f"{len(array)} images of {array.shape[1:]}, batch_size={batch_size}, input_name={name!r}"
        batches = got["batches"]
        grading.check("number of batches before None (hidden)", len(batches), len(want), inputs=label)
        for i, (g, w) in enumerate(zip(batches, want, strict=True)):
            grading.check(f"batch {i + 1}: keys (hidden)", sorted(g), [name], inputs=label)
            grading.check(f"batch {i + 1}: dtype float32 (hidden)", str(g[name].dtype), "float32", inputs=label)
            grading.check(f"batch {i + 1} (hidden)", g[name], w, inputs=label)
        grading.check("get_next() after the end returns None (hidden)", got["after_end_is_none"], True)
        grading.check("first batch after rewind() (hidden)", got["after_rewind"][name], want[0], inputs=label)
        grading.check("ValueError for N = 0, batch_size = 0 and 3-D input (hidden)",
                      got["bad_inputs_raise"], [True, True, True])


# Runs in the sandbox: a fake clock that advances only while a function runs, and a log of
# which function ran when, so the test sees warm-up, interleaving and the clock actually used.
_INTERLEAVE = """
class _Clock:
    def __init__(self):
        self.now, self.log, self.reads = 50.0, [], 0
    def __call__(self):
        self.reads += 1
        return self.now
    def fn(self, name, durations):
        it = iter(durations)
        def run():
            self.log.append(name)
            self.now += next(it)
        return run
_clock = _Clock()
_fns = {name: _clock.fn(name, d) for name, d in durations.items()}
_got = time_interleaved(_fns, warmup=warmup, rounds=rounds, clock=_clock)
result = {"samples": {k: [float(t) for t in v] for k, v in _got.items()}, "log": "".join(_clock.log),
          "reads": _clock.reads}
"""


@tests.case("test-interleave", disabled=["course_lib.timing.interleaved_latency", "course_lib.deploy.measure_latency"])
def interleave(student) -> None:
    rng = np.random.default_rng(808)
    for names, warmup, rounds in [("xy", 0, 5), ("pqr", 3, 7), ("ab", 1, 1)]:
        timed = {n: [float(t) for t in rng.uniform(0.1, 30.0, rounds)] for n in names}
        # Warm-up calls take seconds: a timer that includes them is off by orders of magnitude.
        durations = {n: [3.0 + i for i in range(warmup)] + [t / 1000 for t in timed[n]] for n in names}
        got = student.run(_INTERLEAVE, durations=durations, warmup=warmup, rounds=rounds)
        label = f"{len(names)} functions, warmup={warmup}, rounds={rounds}"
        grading.check("keys of the result (hidden)", sorted(got["samples"]), sorted(names), inputs=label)
        for n in names:
            grading.check(f"samples of {n!r} in ms, warm-up excluded, in round order (hidden)", got["samples"][n],
                          timed[n], inputs=label, rtol=1e-9, atol=1e-9)
        want_log = "".join(n * warmup for n in names) + names * rounds
        grading.check("call order: each function's warm-ups, then one call of each per round (hidden)",
                      got["log"], want_log, inputs=label)
        if got["reads"] < 2 * rounds * len(names):
            raise grading.ExerciseError(
                f"time_interleaved read the clock passed in {got['reads']} times for {rounds * len(names)} timed "
                "calls: each call needs its own start and end reading of that clock (hidden)")
    raised = student.run("try:\n    time_interleaved({}, warmup=1, rounds=1)\n    result = False\n"
                         "except ValueError:\n    result = True\n")
    grading.check("time_interleaved({}) raises ValueError: nothing to time (hidden)", raised, True)


@tests.case("test-layer-bytes", disabled=[
    "course_lib.sizes.layer_param_bytes", "course_lib.sizes.model_param_bytes",
])
def layer_bytes(student) -> None:
    cases = [dict(weight_shape=(64, 1, 3, 3), bits=2, per_channel=True, scale_bytes=2, zero_point_bytes=1,
                  bias_bytes=4, has_bias=True),
             dict(weight_shape=(7, 3, 5, 5), bits=3, per_channel=False, scale_bytes=4, zero_point_bytes=4,
                  bias_bytes=0, has_bias=False),
             dict(weight_shape=(1000, 1280), bits=4, per_channel=True, scale_bytes=2, zero_point_bytes=0,
                  bias_bytes=2, has_bias=True),
             dict(weight_shape=(5, 3), bits=32, per_channel=True, scale_bytes=4, zero_point_bytes=1,
                  bias_bytes=4, has_bias=True),
             dict(weight_shape=(3, 3, 1, 1), bits=5, per_channel=True, scale_bytes=4, zero_point_bytes=0,
                  bias_bytes=12, has_bias=True)]
    for case in cases:
        kw = dict(case)
        want = sizes.layer_param_bytes(kw.pop("weight_shape"), kw.pop("bits"), **kw).total
        got = student.call("quantized_layer_bytes", **case)
        if isinstance(got, bool) or not isinstance(got, int | np.integer):
            raise grading.ExerciseError(f"quantized_layer_bytes must return an int, got {type(got).__name__} (hidden)")
        grading.check("quantized_layer_bytes (hidden)", int(got), int(want), inputs=case)
