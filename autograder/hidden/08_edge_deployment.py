"""Hidden tests of lesson 08 (edge deployment), run in the grader's process.

The student's code runs in the sandbox; expected values are computed here with the
grader's own ``course_lib.deploy`` or in closed form.
"""

from __future__ import annotations

import numpy as np
import torch

from autograder.hidden import HiddenTests
from course_lib import deploy as D
from course_lib import grading

tests = HiddenTests("08_edge_deployment")

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
    "course_lib.deploy.CalibrationReader",
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


# Runs in the sandbox: a fake clock that advances only while fn() runs, so the test
# sees exactly which calls were timed, in which order, and whether warm-up was excluded.
_LATENCY = """
class _Clock:
    def __init__(self, durations):
        self.now, self.durations, self.calls, self.reads = 50.0, list(durations), 0, 0
    def __call__(self):
        self.reads += 1
        return self.now
    def run(self):
        self.now += self.durations[self.calls]
        self.calls += 1
_clock = _Clock(durations)
_median, _p90, _samples = time_calls(_clock.run, warmup=warmup, repeats=repeats, clock=_clock)
result = {"median": float(_median), "p90": float(_p90), "samples": [float(s) for s in _samples],
          "calls": _clock.calls, "clock_reads": _clock.reads}
"""


@tests.case("test-latency", disabled=["course_lib.deploy.measure_latency"])
def latency(student) -> None:
    rng = np.random.default_rng(808)
    cases = [(0, list(rng.uniform(0.1, 30.0, 7))), (2, [2.5]), (6, list(rng.exponential(3.0, 41))),
             (1, [1.0, 1.0, 9.0, 1.0])]
    for warmup, timed_ms in cases:
        # Warm-up calls take seconds: a timer that includes them is off by orders of magnitude.
        durations = [4.0 + i for i in range(warmup)] + [t / 1000 for t in timed_ms]
        got = student.run(_LATENCY, durations=durations, warmup=warmup, repeats=len(timed_ms))
        label = f"warmup={warmup}, {len(timed_ms)} timed calls"
        grading.check("fn() calls: warm-up + timed (hidden)", got["calls"], warmup + len(timed_ms), inputs=label)
        grading.check("samples in call order, in ms, warm-up excluded (hidden)", got["samples"],
                      [float(t) for t in timed_ms], inputs=label, rtol=1e-9, atol=1e-9)
        grading.check("median and p90, linear interpolation (hidden)", [got["median"], got["p90"]],
                      [float(np.percentile(timed_ms, 50)), float(np.percentile(timed_ms, 90))],
                      inputs=label, rtol=1e-9, atol=1e-9)
        if got["clock_reads"] < 2 * len(timed_ms):
            raise grading.ExerciseError(
                f"time_calls read the clock {got['clock_reads']} times for {len(timed_ms)} timed calls: "
                "each call needs its own start and end reading of the clock that is passed in (hidden)")


@tests.case("test-layer-bytes", disabled=[
    "course_lib.deploy.layer_param_bytes", "course_lib.deploy.model_param_bytes",
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
        want = D.layer_param_bytes(kw.pop("weight_shape"), kw.pop("bits"), **kw).total
        got = student.call("quantized_layer_bytes", **case)
        if isinstance(got, bool) or not isinstance(got, int | np.integer):
            raise grading.ExerciseError(f"quantized_layer_bytes must return an int, got {type(got).__name__} (hidden)")
        grading.check("quantized_layer_bytes (hidden)", int(got), int(want), inputs=case)
