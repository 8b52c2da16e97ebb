"""Hidden tests of lesson 06 (quantization-aware training), run in the grader's process.

The autograd.Function, the frozen BatchNorm and the training step take or return objects
(a Function class, an ``nn.BatchNorm2d``, a model and an optimiser), so those tests send
plain tensors into the sandbox, build the objects there with trusted code
(``student.run``), call the student's code and bring back plain tensors: outputs,
gradients, statistics, the state after training. Every expected value is computed here,
in the grader, with torch's own kernels or the grader's copy of ``course_lib``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import course_lib as cl
import course_lib.data
import course_lib.models
import course_lib.qat
from autograder.hidden import HiddenTests
from course_lib import grading

tests = HiddenTests("06_qat")


# ------------------------------------------------------------------ exercise 1: MyFakeQuantSTE

STE_CODE = """
import torch
result = []
for case in cases:
    x = case["x"].clone().requires_grad_()
    y = MyFakeQuantSTE.apply(x, case["scale"], case["zero_point"], case["qmin"], case["qmax"])
    if not isinstance(y, torch.Tensor):
        result.append(("forward returned " + type(y).__name__, None))
        continue
    y.backward(case["upstream"])
    result.append((y.detach(), x.grad))
"""


def _ste_expected(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fake quantizer: value and the clipped straight-through gradient."""
    x = case["x"].clone().requires_grad_()
    y = torch.fake_quantize_per_tensor_affine(x, float(case["scale"]), int(case["zero_point"]),
                                              case["qmin"], case["qmax"])
    y.backward(case["upstream"])
    return y.detach(), x.grad


@tests.case("test-ste", disabled=[
    "torch.fake_quantize_per_tensor_affine", "torch.fake_quantize_per_channel_affine",
    "torch._fake_quantize_learnable_per_tensor_affine", "torch._fake_quantize_learnable_per_channel_affine",
    "course_lib.qat.fake_quantize_ste", "course_lib.qat.FakeQuantSTE", "course_lib.qat.LSQFakeQuant",
    "course_lib.quant.fake_quantize", "course_lib.quant.quantize",
])
def ste(student) -> None:
    gen = torch.Generator().manual_seed(61)
    cases = [
        # INT4, odd zero point, clips both tails
        dict(x=5 * torch.randn(3, 400, generator=gen), scale=0.11, zero_point=5, qmin=-8, qmax=7),
        # exact ties x·(1/s) = k + ½ with an odd zero point added after rounding
        dict(x=(torch.arange(-40, 40) + 0.5) * 0.5, scale=0.5, zero_point=3, qmin=-16, qmax=15),
        # UINT8 with a large zero point
        dict(x=torch.rand(500, generator=gen) * 4 - 1, scale=0.02, zero_point=60, qmin=0, qmax=255),
        # codes that round exactly onto qmin/qmax (gradient kept) or one past them (gradient 0)
        dict(x=torch.tensor([6.4, 6.5, 6.6, 7.5, 7.6, -7.4, -7.5, -7.6, -8.5, -8.6]) * 0.25,
             scale=0.25, zero_point=0, qmin=-8, qmax=7),
    ]
    for case in cases:
        case["upstream"] = torch.linspace(-1.5, 2.5, case["x"].numel()).reshape(case["x"].shape)
        case["scale"] = torch.tensor(case["scale"], dtype=torch.float32)
        case["zero_point"] = torch.tensor(case["zero_point"], dtype=torch.int64)
    expected = [_ste_expected(case) for case in cases]
    got = student.run(STE_CODE, cases=cases)
    for case, (value, grad), (exp_value, exp_grad) in zip(cases, got, expected, strict=True):
        inputs = (f"x {tuple(case['x'].shape)}, scale={float(case['scale']):g}, "
                  f"zero_point={int(case['zero_point'])}, codes {case['qmin']}..{case['qmax']}")
        if isinstance(value, str):
            raise grading.ExerciseError(f"MyFakeQuantSTE for {inputs}: {value}, not a tensor")
        grading.check("MyFakeQuantSTE (hidden): x̂", value, exp_value, inputs=inputs)
        if grad is None:
            raise grading.ExerciseError(f"MyFakeQuantSTE for {inputs}: backward gave x no gradient (None)")
        grading.check("MyFakeQuantSTE (hidden): ∂L/∂x", grad, exp_grad, inputs=inputs)


# ------------------------------------------------------------------ exercise 2: lsq_scale_grad


def _torch_lsq_grad(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """torch's LSQ gradient, one value per element (one 'channel' and one scale per value)."""
    n = x.numel()
    scales = scale.reshape(1).repeat(n).requires_grad_()
    zero_points = zero_point.reshape(1).repeat(n).float()
    y = torch._fake_quantize_learnable_per_channel_affine(x.reshape(n, 1), scales, zero_points, 0, qmin, qmax, 1.0)
    y.sum().backward()
    return scales.grad.reshape(x.shape)


@tests.case("test-lsq", disabled=[
    "course_lib.qat.lsq_scale_grad", "course_lib.qat.LSQFakeQuant", "course_lib.qat.LSQWeightFakeQuant",
    "torch._fake_quantize_learnable_per_tensor_affine", "torch._fake_quantize_learnable_per_channel_affine",
])
def lsq(student) -> None:
    gen = torch.Generator().manual_seed(62)
    cases = [
        dict(x=3 * torch.randn(4, 250, generator=gen), scale=torch.tensor(0.17), zero_point=torch.tensor(-4),
             qmin=-16, qmax=15),
        dict(x=(torch.arange(-30, 30) + 0.5) * 0.25, scale=torch.tensor(0.25), zero_point=torch.tensor(2),
             qmin=-8, qmax=7),
        dict(x=torch.rand(800, generator=gen) * 3, scale=torch.tensor(0.01), zero_point=torch.tensor(0),
             qmin=0, qmax=255),
        # an odd, negative zero point (torch's per-channel op mishandles it at ties; the
        # library follows the contract: z added after rounding)
        dict(x=torch.randn(2, 3, 50, generator=gen), scale=torch.tensor(0.45), zero_point=torch.tensor(-3),
             qmin=-4, qmax=3),
    ]
    for i, case in enumerate(cases):
        # Expectations: torch's learnable op where it follows the contract, the grader's library otherwise.
        exp = (_torch_lsq_grad(**case) if int(case["zero_point"]) % 2 == 0
               else cl.qat.lsq_scale_grad(**case))
        got = student.call("lsq_scale_grad", **case)
        inputs = (f"case {i + 1}: x {tuple(case['x'].shape)}, scale={float(case['scale']):g}, "
                  f"zero_point={int(case['zero_point'])}, codes {case['qmin']}..{case['qmax']}")
        grading.check("lsq_scale_grad (hidden)", got, exp, inputs=inputs, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------ exercise 3: frozen_batch_norm

FROZEN_BN_CODE = """
import torch
from torch import nn
bn = nn.BatchNorm2d(len(params["running_mean"]), eps=params["eps"])
with torch.no_grad():
    for name in ("running_mean", "running_var", "weight", "bias"):
        getattr(bn, name).copy_(params[name])
bn.train()  # a frozen BN must ignore the mode
x = x_in.clone().requires_grad_()
y = frozen_batch_norm(x, bn)
if not isinstance(y, torch.Tensor):
    result = {"error": "returned " + type(y).__name__ + ", not a tensor"}
else:
    stats = [bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)]
    (y * upstream).sum().backward()
    grads = [None if t.grad is None else t.grad for t in (x, bn.weight, bn.bias)]
    result = {"y": y.detach(), "stats": stats, "grads": grads}
"""


@tests.case("test-frozen-bn", disabled=[
    "course_lib.qat.frozen_batch_norm", "course_lib.qat.FreezableBatchNorm2d",
    "torch.nn.functional.batch_norm", "torch.batch_norm", "torch.native_batch_norm",
])
def frozen_bn(student) -> None:
    gen = torch.Generator().manual_seed(63)
    channels = 6
    params = {
        "running_mean": torch.randn(channels, generator=gen),
        "running_var": torch.rand(channels, generator=gen) * 3 + 0.05,
        "weight": torch.randn(channels, generator=gen),
        "bias": torch.randn(channels, generator=gen),
        "eps": 1e-3,  # not the default 1e-5: bn.eps must be read, not assumed
    }
    x_in = 2 * torch.randn(3, channels, 4, 5, generator=gen) + 0.5
    upstream = torch.randn(x_in.shape, generator=gen)

    # Expected, here: eval-mode BatchNorm (running statistics) and its gradients.
    bn = nn.BatchNorm2d(channels, eps=params["eps"])
    with torch.no_grad():
        for name in ("running_mean", "running_var", "weight", "bias"):
            getattr(bn, name).copy_(params[name])
    bn.eval()
    x = x_in.clone().requires_grad_()
    y = bn(x)
    (y * upstream).sum().backward()
    stats = [params["running_mean"], params["running_var"], 0]

    got = student.run(FROZEN_BN_CODE, params=params, x_in=x_in, upstream=upstream)
    inputs = f"x {tuple(x_in.shape)}, BN with {channels} channels in train mode, eps={params['eps']}"
    if "error" in got:
        raise grading.ExerciseError(f"frozen_batch_norm for {inputs}: {got['error']}")
    grading.check("frozen_batch_norm (hidden): output", got["y"], y.detach(), inputs=inputs, atol=1e-5, rtol=1e-5)
    grading.check("frozen_batch_norm (hidden): running statistics unchanged", got["stats"], stats, inputs=inputs)
    for what, g, exp in zip(("x", "γ (bn.weight)", "β (bn.bias)"), got["grads"], (x.grad, bn.weight.grad, bn.bias.grad),
                            strict=True):
        if g is None:
            raise grading.ExerciseError(f"frozen_batch_norm for {inputs}: no gradient reached {what}")
        grading.check(f"frozen_batch_norm (hidden): gradient of {what}", g, exp, inputs=inputs, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ exercise 4: qat_step

QAT_STEP_CODE = """
import torch
import course_lib as cl
import course_lib.models
import course_lib.qat
model = cl.qat.prepare_qat(cl.models.TinyCNN(channels=(4, 8)), w_bits, 8)
model.load_state_dict(state)
model.eval()  # eval on purpose: the step must switch to training mode itself
if optimizer_name == "sgd":
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
else:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
losses, types = [], []
for images, labels in batches:
    loss = qat_step(model, images, labels, optimizer)
    types.append(type(loss).__name__)
    losses.append(float(loss) if isinstance(loss, (int, float, torch.Tensor)) else float("nan"))
result = {"losses": losses, "types": types, "training": model.training,
          "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
"""


def _qat_step_setup(seed: int, w_bits: int) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = cl.qat.prepare_qat(cl.models.TinyCNN(channels=(4, 8)), w_bits, 8)
    images, labels = cl.data.get_split("calib")
    cl.qat.calibrate_observers(model, images[100:200])
    batches = [(images[200 + 24 * i: 224 + 24 * i], labels[200 + 24 * i: 224 + 24 * i]) for i in range(3)]
    return model, batches


def _reference_steps(model: nn.Module, batches, optimizer_name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = copy.deepcopy(model).eval()
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    losses = []
    for images, labels in batches:  # the contract, spelled out: train mode, zero, CE, backward, step
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@tests.case("test-qat-step", disabled=[
    "course_lib.qat.qat_step", "course_lib.qat.train_qat", "course_lib.training.train_epoch",
    "course_lib.training.fit",
])
def training_step(student) -> None:
    for seed, w_bits, optimizer_name in ((11, 4, "sgd"), (12, 2, "adam")):
        model, batches = _qat_step_setup(seed, w_bits)
        # One thread, as the lesson's set-up cell runs the student's code: fake quantization is
        # discontinuous, so a last-bit difference between thread counts could flip a weight's code.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            exp_losses, exp_state = _reference_steps(model, batches, optimizer_name)
        finally:
            torch.set_num_threads(threads)
        got = student.run(QAT_STEP_CODE, state=model.state_dict(), batches=batches, w_bits=w_bits,
                          optimizer_name=optimizer_name)
        inputs = f"a W{w_bits}A8 TinyCNN(4, 8), {optimizer_name}, three steps of 24 images"
        if not got["training"]:
            raise grading.ExerciseError(f"qat_step for {inputs}: the model is not in training mode after the step")
        if got["types"] and any(t != "float" for t in got["types"]):
            raise grading.ExerciseError(f"qat_step must return the loss as a Python float, got {got['types']}")
        grading.check("qat_step (hidden): losses", torch.tensor(got["losses"]), torch.tensor(exp_losses),
                      inputs=inputs, atol=1e-5)
        for name, exp in exp_state.items():
            grading.check(f"qat_step (hidden): {name} after three steps", got["state"].get(name), exp,
                          inputs=inputs, atol=1e-5, rtol=1e-5)
