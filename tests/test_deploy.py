"""Tests of course_lib.deploy, its siblings export, hardware and sizes (deployed formats),
and scripts/benchmark_deploy.py (lesson 08)."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import course_lib
from course_lib import data, deploy, export, hardware, models, sizes

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- latency harness
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=40),
    st.floats(0, 100, allow_nan=False),
)
def test_percentile_matches_numpy_linear(samples: list[float], q: float) -> None:
    assert deploy.percentile(samples, q) == pytest.approx(np.percentile(samples, q), rel=1e-12, abs=1e-12)


def test_percentile_hand_computed() -> None:
    # sorted 1..10: h = 9·0.9 = 8.1 → x[8] + 0.1·(x[9] - x[8]) = 9.1; median (4.5) → 5.5
    samples = [7, 3, 10, 1, 9, 2, 8, 4, 6, 5]
    assert deploy.percentile(samples, 90) == pytest.approx(9.1)
    assert deploy.percentile(samples, 50) == pytest.approx(5.5)
    assert deploy.percentile(samples, 0) == 1 and deploy.percentile(samples, 100) == 10
    assert deploy.percentile([4.0], 90) == 4.0


@pytest.mark.parametrize("samples, q", [([], 50), ([1.0, 2.0], -1), ([1.0], 100.5), ([1.0, float("nan")], 50)])
def test_percentile_rejects_bad_input(samples: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        deploy.percentile(samples, q)


class FakeClock:
    """A clock that only moves when the function under test 'runs'."""

    def __init__(self, durations_s: list[float]) -> None:
        self.now = 100.0
        self.durations = iter(durations_s)
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def run(self) -> None:
        self.calls += 1
        self.now += next(self.durations)


def test_measure_latency_excludes_warmup_on_a_fake_clock() -> None:
    # Three warm-up calls that take 5 s each, then 1, 2, …, 10 ms in a shuffled order.
    timed_ms = [4, 9, 1, 10, 2, 7, 3, 8, 5, 6]
    clock = FakeClock([5.0, 5.0, 5.0] + [t / 1000 for t in timed_ms])
    stats = deploy.measure_latency(clock.run, warmup=3, repeats=10, clock=clock)
    assert clock.calls == 13
    assert stats.warmup == 3 and stats.repeats == 10
    np.testing.assert_allclose(stats.samples_ms, timed_ms, rtol=0, atol=1e-9)  # call order kept
    assert stats.median_ms == pytest.approx(5.5)
    assert stats.p90_ms == pytest.approx(9.1)


@pytest.mark.parametrize("kwargs", [dict(warmup=-1), dict(repeats=0)])
def test_measure_latency_rejects_bad_counts(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        deploy.measure_latency(lambda: None, **kwargs)


# --------------------------------------------------------------------------- size accounting
def test_layer_param_bytes_hand_computed() -> None:
    # conv 32×16×3×3 at int8, per channel, float32 scales, int8 zero points, int32 bias:
    # 4,608 weights + 32·4 scales + 32·1 zero points + 32·4 bias = 4,896 bytes
    b = sizes.layer_param_bytes((32, 16, 3, 3), 8, per_channel=True, scale_bytes=4, zero_point_bytes=1, bias_bytes=4)
    assert (b.weights, b.scales, b.zero_points, b.biases, b.total) == (4608, 128, 32, 128, 4896)
    # 15 int4 weights pack into ceil(60 / 8) = 8 bytes; per tensor: one scale, one zero point
    b = sizes.layer_param_bytes((3, 5), 4, per_channel=False, scale_bytes=2, zero_point_bytes=1, has_bias=False)
    assert (b.weights, b.scales, b.zero_points, b.biases) == (8, 2, 1, 0)
    # float32: no scales or zero points, whatever is asked
    b = sizes.layer_param_bytes((10, 1568), 32, scale_bytes=4, zero_point_bytes=1)
    assert (b.weights, b.scales, b.zero_points, b.biases) == (62720, 0, 0, 40)


@pytest.mark.parametrize(
    "shape, kwargs",
    [((10,), {}), ((0, 3), {}), ((4, 4), dict(weight_bits=0)), ((4, 4), dict(weight_bits=33)),
     ((4, 4), dict(scale_bytes=-1))],
)
def test_layer_param_bytes_rejects_bad_input(shape: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        sizes.layer_param_bytes(shape, **kwargs)


def test_model_param_bytes_tinycnn_hand_computed() -> None:
    model = models.TinyCNN().eval()
    # conv1 16·1·3·3 = 144, conv2 32·16·3·3 = 4,608, fc 10·1,568 = 15,680 weights; 58 biases
    fp32 = sizes.model_param_bytes(model, "fp32")
    assert (fp32.weights, fp32.biases, fp32.total) == (4 * 20432, 4 * 58, 4 * 20490)
    int8 = sizes.model_param_bytes(model, "xnnpack-int8")
    assert (int8.weights, int8.scales, int8.zero_points, int8.biases) == (20432, 4 * 58, 0, 4 * 58)
    with pytest.raises(ValueError):
        sizes.model_param_bytes(model, "int3-magic")


def test_model_param_bytes_folds_batchnorm_into_a_bias() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8)).eval()
    assert sizes.model_param_bytes(model, "fp32").biases == 8 * 4
    assert sizes.model_param_bytes(model, "fp32", fold_bn=False).biases == 0


# --------------------------------------------------------------------------- calibration reader
def test_calibration_reader_yields_every_image_once_in_order() -> None:
    images = torch.arange(7 * 2 * 2, dtype=torch.float64).reshape(7, 1, 2, 2)
    reader = export.CalibrationReader(images, input_name="inp", batch_size=3)
    assert len(reader) == 3
    batches = []
    while (item := reader.get_next()) is not None:
        assert list(item) == ["inp"]
        batches.append(item["inp"])
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images.numpy().astype(np.float32))
    assert reader.get_next() is None  # stays exhausted
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["inp"], batches[0])


def test_calibration_reader_from_split_uses_the_calib_split() -> None:
    reader = export.CalibrationReader.from_split("calib", rgb32=True, batch_size=500)
    batch = reader.get_next()["x"]
    np.testing.assert_array_equal(batch, data.get_split("calib", rgb32=True)[0].numpy())
    assert reader.get_next() is None


@pytest.mark.parametrize("images, batch_size", [(np.zeros((0, 1, 2, 2)), 1), (np.zeros((3, 4)), 1), (np.zeros((3, 1, 2, 2)), 0)])
def test_calibration_reader_rejects_bad_input(images: np.ndarray, batch_size: int) -> None:
    with pytest.raises(ValueError):
        export.CalibrationReader(images, batch_size=batch_size)


# --------------------------------------------------------------------------- end-to-end pipeline
@pytest.mark.parametrize("rgb32", [False, True])
def test_png_pipeline_matches_get_split(rgb32: bool) -> None:
    raw, _ = data.raw_images("test")
    expected, _ = data.get_split("test", rgb32=rgb32)
    pngs = deploy.encode_png(raw[:25])
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    got = np.concatenate([deploy.preprocess_png(p, rgb32=rgb32) for p in pngs])
    assert got.dtype == np.float32 and got.shape == tuple(expected[:25].shape)
    np.testing.assert_allclose(got, expected[:25].numpy(), rtol=0, atol=1e-5)


def test_encode_png_rejects_non_uint8() -> None:
    with pytest.raises(ValueError):
        deploy.encode_png(np.zeros((2, 28, 28), dtype=np.float32))


# --------------------------------------------------------------------------- cpu, budget, table
def test_cpu_flags_reads_a_cpuinfo_file(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 fma avx512_vnni\n")
    flags = hardware.cpu_flags(("avx2", "avx_vnni", "avx512_vnni"), cpuinfo=info)
    assert flags == {"avx2": True, "avx_vnni": False, "avx512_vnni": True}
    assert hardware.cpu_model_name(info) == "Test CPU 9000"
    assert hardware.cpu_flags(("avx2",), cpuinfo=tmp_path / "absent") == {"avx2": False}


def test_estimate_latency_ms_hand_computed() -> None:
    # 300 M MACs at 4 cores · 1.5 GHz · 16 MACs/cycle · 25 % = 24 GMAC/s → 12.5 ms
    device = hardware.DeviceAssumptions("test", cores=4, clock_ghz=1.5, macs_per_cycle=16, efficiency=0.25)
    assert device.macs_per_second == pytest.approx(24e9)
    assert hardware.estimate_latency_ms(300e6, device) == pytest.approx(12.5)
    with pytest.raises(ValueError):
        hardware.estimate_latency_ms(-1, device)
    with pytest.raises(ValueError):
        hardware.estimate_latency_ms(1, hardware.DeviceAssumptions("off", 1, 1.0, 1.0, 0.0))


def _row(runtime: str, precision: str, file_bytes: int, ms: float) -> deploy.DeployRow:
    stats = deploy.LatencyStats((ms, 2 * ms), warmup=0)
    return deploy.DeployRow("M", runtime, precision, file_bytes, 0.9871, 0.98, 0.995, stats, stats, 1.5, 10)


def test_format_table_columns_and_ratio() -> None:
    rows = [_row("onnxruntime", "fp32", 4000, 1.0), _row("onnxruntime", "int8", 1000, 3.0)]
    full = deploy.format_table(rows)
    assert "model ms p50/p90" in full and "4.00×" in full and "0.987" in full
    short = deploy.format_table(rows, timings=False)
    assert "ms" not in short and "4,000" in short and "4.00×" in short
    assert len(short.splitlines()) == 4
    with pytest.raises(ValueError):
        deploy.format_table([])


def test_torchao_kernel_preference_log_is_filtered_and_nothing_else() -> None:
    logger = logging.getLogger("torch.utils._pytree")
    msg = "%s is an Enum subclass and ... Calling register_constant() on Enum subclasses is deprecated"
    kernel = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, ("<enum 'KernelPreference'>",), None)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, ("<enum 'Other'>",), None)
    assert not logger.filter(kernel)
    assert logger.filter(other)


# --------------------------------------------------------------------------- real runtimes (slow)
@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, deploy.Artifact]:
    course_lib.use_threads(2)  # one thread under `make test`'s workers (COURSE_MAX_THREADS)
    out = tmp_path_factory.mktemp("deploy")
    arts = deploy.build_artifacts("tinycnn", out, progress=False)
    return {f"{a.runtime}-{a.precision}": a for a in arts}


@pytest.mark.slow
def test_pte_runs_in_executorch_and_agrees_with_convert_pt2e(tiny_artifacts: dict) -> None:
    art = tiny_artifacts["executorch-int8"]
    assert art.path.suffix == ".pte" and art.path.read_bytes()[4:8] == b"ET12"  # flatbuffer identifier
    x, _ = data.get_split("test")
    x = x[:200]
    got = deploy.runner_logits(deploy.load_runner(art), x)
    with torch.no_grad():
        ref = art.reference(x).numpy()
    # The converted graph ends in quantize → dequantize of the logits: the two may
    # differ by rounding to a neighbouring output code, never more than one step.
    last_dq = [n for n in art.reference.graph.nodes if "dequantize_per_tensor" in str(n.target)][-1]
    out_scale = float(last_dq.args[1])
    assert np.abs(got - ref).max() <= out_scale * 1.001
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    # the float program computes the float model
    float_art = tiny_artifacts["executorch-fp32"]
    with torch.no_grad():
        expected = float_art.reference(x).numpy()
    np.testing.assert_allclose(deploy.runner_logits(deploy.load_runner(float_art), x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_onnx_qdq_model_accuracy_within_one_point_of_float(tiny_artifacts: dict) -> None:
    x, y = data.get_split("test")
    x, y = x[:500], y[:500].numpy()
    f_art, q_art = tiny_artifacts["onnxruntime-fp32"], tiny_artifacts["onnxruntime-int8"]
    f_logits = deploy.runner_logits(deploy.load_runner(f_art), x)
    q_logits = deploy.runner_logits(deploy.load_runner(q_art), x)
    with torch.no_grad():
        np.testing.assert_allclose(f_logits, models.load_pretrained("tinycnn")(x).numpy(), atol=1e-4, rtol=1e-4)
    acc_f, acc_q = (f_logits.argmax(1) == y).mean(), (q_logits.argmax(1) == y).mean()
    assert acc_f > 0.95
    assert abs(acc_q - acc_f) <= 0.01
    # it is really quantized: QDQ nodes, int8 weights
    import onnx

    ops = {n.op_type for n in onnx.load(str(q_art.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # The exporter's per-node debug metadata (stack traces with absolute paths) is stripped
    # from the exported float file; the int8 file, quantized from it, carries none either.
    assert f_art.metadata_bytes_removed > 0
    for art in (f_art, q_art):
        graph = onnx.load(str(art.path)).graph
        assert not [n.name for n in graph.node if n.metadata_props], art.path.name
        raw = art.path.read_bytes()
        assert b"pkg.torch.onnx.stack_trace" not in raw and str(ROOT).encode() not in raw, art.path.name


@pytest.mark.slow
def test_onnx_qdq_initializers_match_the_size_accounting(tiny_artifacts: dict) -> None:
    """The ONNX QDQ scheme of model_param_bytes counts exactly the per-layer tensors in the file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tiny_artifacts["onnxruntime-int8"].path))
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    # per-layer tensors: weights, biases and their per-channel qparams (activation
    # qparams are scalars; int64 tensors are shape constants of the graph)
    per_layer = sum(a.nbytes for a in arrays if a.ndim >= 1 and a.dtype != np.int64)
    expected = sizes.model_param_bytes(models.load_pretrained("tinycnn"), "onnx-qdq-int8")
    assert per_layer == expected.total
    assert sizes.onnx_initializer_bytes(tiny_artifacts["onnxruntime-int8"].path)["int8"] >= expected.weights


def benchmark_script():
    """scripts/benchmark_deploy.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark_deploy", ROOT / "scripts" / "benchmark_deploy.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.slow
def test_benchmark_script_prints_the_table(tiny_artifacts: dict, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    # The script's own run, in-process, with the export it asks for served by the module's
    # fixture (the same build_artifacts call, already made once: exporting is the slow part).
    exports = []

    def build_artifacts(name, out_dir, *, model=None, runtimes=deploy.RUNTIMES, progress=True):
        exports.append((name, tuple(runtimes)))
        return list(tiny_artifacts.values())

    monkeypatch.setattr(deploy, "build_artifacts", build_artifacts)
    args = ["--models", "tinycnn", "--repeats", "3", "--warmup", "1", "--eval-limit", "100", "--no-progress"]
    assert benchmark_script().main(args) == 0
    out = capsys.readouterr().out
    assert exports == [("tinycnn", deploy.RUNTIMES)]
    assert "TinyCNN (accuracy on 100 test images" in out  # --eval-limit reached the evaluation
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("pytorch", *deploy.RUNTIMES)) and len(line.split()) > 9]  # the table's rows
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        [("pytorch", "fp32")] + [(rt, p) for rt in deploy.RUNTIMES for p in ("fp32", "int8")])
    for row in rows:  # model and end-to-end latency: p50 <= p90, both measured
        for cell in (row[-3], row[-2]):
            p50, p90 = map(float, cell.split("/"))
            assert 0 < p50 <= p90, row
    # memory: each runtime's baseline process, then one fresh process per model file; the
    # file sizes are the artefacts' own, and loading and running a model costs memory
    baseline = {m[1]: float(m[2]) for m in re.finditer(r"^  (\w+) +baseline: +([\d.]+) MiB$", out, re.M)}
    assert sorted(baseline) == sorted(deploy.RUNTIMES), out
    for art in tiny_artifacts.values():
        m = re.search(rf"^  {art.runtime} +{art.precision}: file +([\d,]+) B, peak RSS +([\d.]+) MiB", out, re.M)
        assert m, f"no memory line for {art.runtime} {art.precision}"
        assert int(m[1].replace(",", "")) == art.path.stat().st_size
        assert float(m[2]) > baseline[art.runtime] > 0, (art.runtime, art.precision, m[0])
    # the CPU line reports this machine's flags
    flags = hardware.cpu_flags()
    assert "INT8-relevant flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) in out
    # MobileNetV2-1.0 at 224×224: about 300 M multiply-adds (Sandler et al., 2018, Table 4)
    line = next(line for line in out.splitlines() if line.strip().startswith("MobileNetV2-1.0 224"))
    macs = int(line.split()[2].replace(",", ""))
    assert 290e6 < macs < 310e6


@pytest.mark.parametrize("option, value", [("--repeats", "0"), ("--threads", "0"), ("--warmup", "-1"),
                                           ("--eval-limit", "0"), ("--models", "resnet50")])
def test_benchmark_script_rejects_bad_options(option: str, value: str, capsys: pytest.CaptureFixture) -> None:
    script = benchmark_script()  # in-process: argparse exits before anything is exported
    assert script.parse_args([option, "1"] if value != "resnet50" else []).models == list(deploy.MODEL_INPUTS)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([option, value])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_deploy_keeps_the_names_of_its_sibling_modules() -> None:
    # lesson 08 and `make bench` say D.<name>: after the split each name is its home's object
    for module in (export, hardware, sizes):
        for name in module.__all__:
            if hasattr(deploy, name):
                assert getattr(deploy, name) is getattr(module, name), f"deploy.{name} is not {module.__name__}.{name}"
    assert {"export_executorch", "cpu_flags", "model_param_bytes"} <= set(deploy.__all__)
