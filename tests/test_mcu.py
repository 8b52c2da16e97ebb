"""Lesson 09's microcontroller path: planner, C generator, cross-compiler, Cortex-M4 emulator, TFLM.

Everything runs for real: ziglang's clang compiles for ``thumb-freestanding-eabi``,
unicorn emulates a Cortex-M4, tflite-micro runs the shipped ``data/tinycnn_int8.tflite``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import course_lib as cl
import course_lib.data
import course_lib.models
from course_lib import kernels as K
from course_lib.mcu import codegen, emulator, harness, planner, tflm, toolchain
from course_lib.mcu import model as mcu_model

TFLITE = cl.DATA_DIR / "tinycnn_int8.tflite"


@pytest.fixture(scope="module")
def tiny() -> mcu_model.McuModel:
    return mcu_model.from_tflite(TFLITE)


@pytest.fixture(scope="module")
def test_images(tiny) -> tuple[np.ndarray, np.ndarray]:
    x, y = cl.data.get_split("test")
    return tiny.quantize_input(x.numpy()), y.numpy()


@pytest.fixture(scope="module")
def integer_tinycnn() -> K.IntegerTinyCNN:
    cl.filter_quantization_warnings()
    return K.IntegerTinyCNN.from_float(cl.models.load_pretrained("tinycnn"), cl.data.get_split("calib")[0])


# ----------------------------------------------------------------------------- compiling


def test_toolchain_treats_warnings_as_errors() -> None:
    assert "-Werror" in toolchain.CFLAGS and "-Wall" in toolchain.CFLAGS and "-Wextra" in toolchain.CFLAGS
    src = "#include <stdint.h>\nvoid app_main(void) { int32_t unused = 3; }\n"
    with pytest.raises(toolchain.CompileError, match="unused"):
        toolchain.compile_elf({"app.c": src})


@pytest.mark.parametrize("variant", codegen.KERNEL_VARIANTS)
def test_every_shipped_and_generated_c_file_compiles_with_warnings_as_errors(tiny, integer_tinycnn, variant) -> None:
    """startup.c, int8_kernels.h (every kernel used), link.ld, generated model.c of both models, the driver."""
    for model in (tiny, mcu_model.from_integer_tinycnn(integer_tinycnn)):
        elf = toolchain.compile_elf(codegen.program(model, kernels=variant))
        sizes = toolchain.elf_sizes(elf)
        assert sizes.rodata >= sum(layer.weight.size for layer in model.layers if hasattr(layer, "weight"))
        assert sizes.bss >= planner.arena_size(codegen.model_lifetimes(model),
                                               planner.plan_greedy(codegen.model_lifetimes(model)))
    # the exercise's driver, with a kernel built from the shipped header's functions
    kernel = ('#include "int8_kernels.h"\n'
              "int8_t requantize(int32_t acc, int32_t m, int32_t s, int32_t zp, int32_t lo, int32_t hi);\n"
              "int8_t requantize(int32_t acc, int32_t m, int32_t s, int32_t zp, int32_t lo, int32_t hi) {\n"
              "    quant_params_t q = {0, zp, lo, hi, &m, &s};\n"
              "    return requantize_one(acc, &q, 0);\n}\n")
    toolchain.compile_elf({"kernel.c": kernel, "app.c": harness.REQUANTIZE_DRIVER})


def test_a_depthwise_model_with_same_padding_compiles_and_matches_the_reference() -> None:
    """depthwise_conv2d_s8 with multiplier 2, stride 2 and TFLite's asymmetric SAME padding."""
    rng = np.random.default_rng(3)
    c, mult = 4, 2
    w = rng.integers(-127, 128, (1, 3, 3, c * mult)).astype(np.int8)
    layer = mcu_model.Conv2D("dw", w, rng.integers(-500, 500, c * mult).astype(np.int32),
                             np.full(c * mult, 1 << 30, np.int32), np.full(c * mult, -6, np.int32),
                             input_zero_point=-3, output_zero_point=4, act_min=-128, act_max=127,
                             stride=2, padding=(0, 0), depthwise=True, padding_extra=(1, 1))
    model = mcu_model.McuModel("dw", (8, 8, c), 1.0, -3, 1.0, 4, [layer])
    assert model.shapes()[-1] == (4, 4, c * mult)
    x = rng.integers(-128, 128, (5, 8, 8, c)).astype(np.int8)
    elf = toolchain.compile_elf(codegen.program(model))
    runner = emulator.ModelRunner(elf, x[0].size, int(np.prod(model.shapes()[-1])))
    np.testing.assert_array_equal(runner(x), model.reference(x).reshape(len(x), -1))


@pytest.mark.parametrize(("in_c", "out_c"), [(6, 5), (16, 3), (5, 7), (3, 4)])
def test_smlad_convolution_equals_the_reference_for_odd_channel_counts(in_c, out_c) -> None:
    """Leftover input channels (in_c % 4) and an odd last output channel take the scalar path."""
    rng = np.random.default_rng(in_c * 10 + out_c)
    layer = mcu_model.Conv2D("c", rng.integers(-127, 128, (out_c, 3, 3, in_c)).astype(np.int8),
                             rng.integers(-999, 999, out_c).astype(np.int32),
                             rng.integers(2**30, 2**31, out_c).astype(np.int32),
                             rng.integers(-12, -6, out_c).astype(np.int32), input_zero_point=-7,
                             output_zero_point=3, act_min=-128, act_max=127, stride=1, padding=(1, 1))
    model = mcu_model.McuModel("c", (6, 6, in_c), 1.0, -7, 1.0, 3, [layer])
    x = rng.integers(-128, 128, (4, 6, 6, in_c)).astype(np.int8)
    elf = toolchain.compile_elf(codegen.program(model, kernels="smlad"))
    runner = emulator.ModelRunner(elf, x[0].size, int(np.prod(model.shapes()[-1])))
    np.testing.assert_array_equal(runner(x), model.reference(x).reshape(len(x), -1))


def test_generated_code_and_elf_are_deterministic(tiny, tmp_path, monkeypatch) -> None:
    first = codegen.program(tiny, kernels="smlad")
    second = codegen.program(mcu_model.from_tflite(TFLITE), kernels="smlad")
    assert first == second
    monkeypatch.setenv("COURSE_MCU_CACHE", str(tmp_path / "a"))
    elf_a = toolchain.compile_elf(first)
    monkeypatch.setenv("COURSE_MCU_CACHE", str(tmp_path / "b"))
    elf_b = toolchain.compile_elf(second)
    assert elf_a == elf_b
    assert len(list((tmp_path / "a").glob("*.elf"))) == 1  # cached under its content hash


# ----------------------------------------------------------------------------- emulator


def test_block_counting_equals_a_per_instruction_hook() -> None:
    from unicorn import UC_HOOK_CODE

    src = ("#include <stdint.h>\nint8_t g_a[64], g_b[64];\nint32_t g_r;\n"
           "void app_main(void) { int32_t s = 0; for (int i = 0; i < 64; i++) s += g_a[i] * g_b[i]; g_r = s; }\n")
    cpu = emulator.CortexM4(toolchain.compile_elf({"app.c": src}))
    cpu.write("g_a", np.arange(64, dtype=np.int8))
    cpu.write("g_b", np.full(64, -2, np.int8))
    assert cpu.call("app_main").instructions == 0  # not counted: runs (and caches blocks) first
    counted = cpu.call("app_main", count=True).instructions  # must still count: the cache is flushed
    seen = []
    cpu.uc.hook_add(UC_HOOK_CODE, lambda uc, address, size, user: seen.append(size))
    cpu.uc.ctl_flush_tb()
    cpu.call("app_main")
    assert counted == len(seen) > 64
    assert int(cpu.read("g_r", np.int32)[0]) == -2 * sum(range(64))


def test_thumb_instruction_lengths() -> None:
    # movs r0, #1 (16-bit); mla r1, r2, r4, r1 (32-bit: 0xfb02 0x1104); bx lr (16-bit)
    assert emulator.thumb_instruction_count(bytes.fromhex("0120" "02fb0411" "7047")) == 3


def test_a_fault_is_reported_not_hidden() -> None:
    src = "#include <stdint.h>\nvoid app_main(void) { *(volatile uint32_t *)0x60000000u = 1; }\n"
    cpu = emulator.CortexM4(toolchain.compile_elf({"app.c": src}))
    with pytest.raises(emulator.EmulationError, match="faulted"):
        cpu.call("app_main")


# ----------------------------------------------------------------------------- bit-exactness


def test_requantize_in_c_matches_course_lib_on_the_emulated_cpu() -> None:
    """int8_kernels.h's requantization, run on the Cortex-M4, vs course_lib.kernels.requantize."""
    kernel = ('#include "int8_kernels.h"\n'
              "int8_t requantize(int32_t acc, int32_t m, int32_t s, int32_t zp, int32_t lo, int32_t hi);\n"
              "int8_t requantize(int32_t acc, int32_t m, int32_t s, int32_t zp, int32_t lo, int32_t hi) {\n"
              "    quant_params_t q = {0, zp, lo, hi, &m, &s};\n"
              "    return requantize_one(acc, &q, 0);\n}\n")
    rng = np.random.default_rng(1)
    acc = np.concatenate([rng.integers(-(2**31), 2**31, 3000), rng.integers(-3000, 3000, 3000),
                          [-(2**31), 2**31 - 1, 0]]).astype(np.int32)
    m0 = rng.integers(2**30, 2**31, acc.size).astype(np.int32)
    shift = rng.integers(-31, 4, acc.size).astype(np.int32)
    got = harness.run_requantize_c(kernel, acc, m0, shift, -5, -120, 110)
    np.testing.assert_array_equal(got, K.requantize(acc, m0, shift, -5, -120, 110))


def test_course_lib_reference_equals_tflm_on_every_logit(tiny, test_images) -> None:
    x_q, labels = test_images
    want = tflm.TflmRunner(TFLITE)(x_q)
    np.testing.assert_array_equal(tiny.reference(x_q), want)
    assert (want.argmax(1) == labels).mean() > 0.97


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "n"), [("plain", None), ("smlad", 200)])
def test_emulated_c_model_equals_tflm_bit_for_bit(tiny, test_images, variant, n) -> None:
    """The generated C on the emulated Cortex-M4 vs TFLite Micro, every logit: the whole test split
    (1,000 images, about 20 s) for the plain kernels, 200 images for the SMLAD ones."""
    x_q, _ = test_images
    n = n or len(x_q)
    runner = emulator.ModelRunner(toolchain.compile_elf(codegen.program(tiny, kernels=variant)), x_q[0].size, 10)
    got = runner(x_q[:n])
    want = tflm.TflmRunner(TFLITE)(x_q[:n])
    assert got.shape == want.shape == (n, 10)
    mismatched = np.flatnonzero((got != want).any(axis=1))
    assert mismatched.size == 0, f"{mismatched.size} of {n} images differ, first: {mismatched[:5]}"


def test_lesson04_integer_tinycnn_runs_unchanged_in_c(integer_tinycnn) -> None:
    x, _ = cl.data.get_split("test")
    model = mcu_model.from_integer_tinycnn(integer_tinycnn)
    want = integer_tinycnn(x[:40])
    x_q = model.quantize_input(x[:40].numpy())
    np.testing.assert_array_equal(model.reference(x_q), want)
    runner = emulator.ModelRunner(toolchain.compile_elf(codegen.program(model)), x_q[0].size, 10)
    np.testing.assert_array_equal(runner(x_q), want)


# ----------------------------------------------------------------------------- planner, TFLM arena


def test_greedy_plan_matches_tflm_head_and_the_lower_bound(tiny) -> None:
    lives = codegen.model_lifetimes(tiny)
    offsets = planner.plan_greedy(lives)
    planner.check_plan(lives, offsets)
    arena = planner.arena_size(lives, offsets)
    report = tflm.arena_report(TFLITE)
    assert arena == report["head"] == planner.live_bytes_lower_bound(lives)[0]
    assert report["total"] == report["head"] + report["tail"]
    assert report["head"] <= tflm.smallest_arena(TFLITE, 4096, 65536) <= report["total"]


def test_check_plan_rejects_overlapping_live_tensors() -> None:
    lives = [planner.TensorLife("a", 32, 0, 1), planner.TensorLife("b", 32, 1, 2)]
    with pytest.raises(ValueError, match="'a'.*'b'.*share bytes"):
        planner.check_plan(lives, [0, 16])
    planner.check_plan(lives, [0, 32])
    planner.check_plan([planner.TensorLife("a", 32, 0, 0), planner.TensorLife("b", 32, 1, 1)], [0, 0])


def test_fx_lifetimes_keep_residual_inputs_alive() -> None:
    model = cl.models.mobilenet_v2_small().eval()
    model.fuse_model(is_qat=False)
    lives = planner.fx_lifetimes(model, torch.zeros(1, 3, 32, 32))
    assert any(t.last - t.first > 1 for t in lives)  # a residual add reads a tensor several steps later
    offsets = planner.plan_greedy(lives)
    planner.check_plan(lives, offsets)
    assert planner.arena_size(lives, offsets) >= planner.live_bytes_lower_bound(lives)[0]


# ----------------------------------------------------------------------------- bad input


def test_unsupported_layer_is_named() -> None:
    with pytest.raises(mcu_model.UnsupportedLayerError, match=r"layer 1 \(AvgPool2d\) has no C kernel"):
        mcu_model.McuModel("m", (8, 8, 1), 1.0, 0, 1.0, 0, [mcu_model.MaxPool2D("p"), torch.nn.AvgPool2d(2)])


def test_unsupported_tflite_operator_is_named(tmp_path) -> None:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(TFLITE.read_bytes()), 0)
    ops = mcu_model.tflite_ops(TFLITE)
    index = ops.index("MAX_POOL_2D")
    code = model.operatorCodes[model.subgraphs[0].operators[index].opcodeIndex]
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.AVERAGE_POOL_2D
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path = tmp_path / "avgpool.tflite"
    path.write_bytes(bytes(builder.Output()))
    with pytest.raises(mcu_model.UnsupportedLayerError, match=f"operator {index} is AVERAGE_POOL_2D"):
        mcu_model.from_tflite(path)


def test_budget_error_names_the_layers_and_the_numbers(tiny) -> None:
    consts = codegen.model_constant_bytes(tiny)
    part = planner.Part("tiny part", 16 * 1024, 8 * 1024)
    with pytest.raises(planner.BudgetError) as info:
        codegen.generate_c(tiny, part=part)
    msg = str(info.value)
    biggest = max(consts, key=consts.get)
    assert f"{sum(consts.values()):,} bytes" in msg and "16,384" in msg and biggest in msg
    assert "SRAM: needs 15,680 bytes" in msg and "8,192" in msg
    codegen.generate_c(tiny, part=planner.Part("big", 1 << 20, 1 << 18))  # fits: no error


def test_budget_counts_constants_and_compares_with_the_part() -> None:
    part = planner.Part("p", 1000, 100)
    b = planner.budget([(2, 10), (3, 30)], code_bytes=500, arena_bytes=60, stack_bytes=40, part=part)
    assert b == (500 + 10 + 24 + 30 + 36, 100, True)
    assert planner.budget([(2, 10)], code_bytes=977, arena_bytes=60, stack_bytes=41, part=part).fits is False
