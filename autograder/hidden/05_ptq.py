"""Hidden tests of lesson 05 (post-training quantization), run in the grader's process.

The student's functions run in the sandbox. Exercises that take modules, observers or
callables get them built there by trusted code (``student.run``) from plain tensors
sent from here; only numbers and tensors come back (codes, scales, ranges, images seen,
the model's mode after the call, hooks left behind). Every expected value is computed
here, with a closed form, torchao or the grader's own copy of ``course_lib``. The inputs
differ from the notebook's visible checks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchao.quantization.pt2e.observer import MinMaxObserver as TorchaoMinMaxObserver
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    quantize_affine,
)

import course_lib.data
import course_lib.models
import course_lib.observers
from autograder.hidden import CONV_BN, HiddenTests, conv_bn_state
from course_lib import grading

tests = HiddenTests("05_ptq")

EPS = torch.finfo(torch.float32).eps


def _raises(student, call: str, exception: str = "ValueError", **inputs) -> bool:
    """True when ``call`` (evaluated in the sandbox with the student's namespace) raises ``exception``."""
    code = f"try:\n    {call}\nexcept {exception}:\n    result = True\nelse:\n    result = False\n"
    return bool(student.run(code, **inputs))


# ----------------------------------------------------------------- exercise 1
_FOLD_IN_SANDBOX = CONV_BN + """
q, s, bias = fold_and_quantize_conv(conv, bn, bits)
result = {"codes": q.detach(), "scales": s.detach(), "bias": bias.detach(),
          "requires_grad": [bool(t.requires_grad) for t in (q, s, bias)]}
"""


def _expected_fold_quantize(conv: nn.Conv2d, bn: nn.BatchNorm2d, bits: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes from the contract's float32 fold (sqrt, divide, multiply), so exact equality is right;
    scales and codes from torchao's affine primitives (x · (1/s), ties to even); the bias from
    PyTorch's fusion (rsqrt: equal to float32 precision, compared with a tolerance)."""
    with torch.no_grad():
        w = conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
        bias = fuse_conv_bn_eval(conv, bn).bias.detach()
        q_max = 2 ** (bits - 1) - 1
        block = (1, *w.shape[1:])
        scale, zero_point = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, -q_max, q_max,
                                                  eps=EPS, scale_dtype=torch.float32)
        codes = quantize_affine(w, block, scale, zero_point, torch.int8, -q_max, q_max)
    return codes, scale.reshape(-1), bias


@tests.case("test-fold-quantize", disabled=[
    "course_lib.kernels.fold_batchnorm", "course_lib.granularity.fold_batchnorms",
    "course_lib.quant.qparams_from_tensor", "course_lib.quant.qparams_from_range", "course_lib.quant.quantize",
    "course_lib.granularity.weight_qparams", "course_lib.granularity.quantize_weight",
    "course_lib.ptq.quantize_weight_codes", "course_lib.ptq.quantize_integer_layer",
    "torch.nn.utils.fusion.fuse_conv_bn_eval", "torch.nn.utils.fusion.fuse_conv_bn_weights",
    "torch.nn.utils.fuse_conv_bn_eval", "torch.nn.utils.fuse_conv_bn_weights",
    "torch.quantize_per_channel", "torch.fake_quantize_per_channel_affine",
    "torch.ao.quantization.observer.UniformQuantizationObserverBase._calculate_qparams",
    "torchao.quantization.pt2e.observer.UniformQuantizationObserverBase._calculate_qparams",
    "torchao.quantization.quant_primitives.choose_qparams_affine",
    "torchao.quantization.quant_primitives.quantize_affine",
])
def fold_quantize(student) -> None:
    torch.manual_seed(505)
    layers = []
    for conv in [nn.Conv2d(3, 6, 3, bias=True), nn.Conv2d(5, 7, 1, bias=False),
                 nn.Conv2d(4, 4, 3, groups=4, bias=False)]:        # a depthwise conv
        n = conv.out_channels
        bn = nn.BatchNorm2d(n, eps=1e-3)
        bn.running_mean.copy_(torch.randn(n))
        bn.running_var.copy_(torch.rand(n) * 3 + 1e-3)
        with torch.no_grad():
            bn.weight.copy_(torch.randn(n) * torch.logspace(0, -2, n))  # channel ranges far apart
            bn.weight[1] = -bn.weight[1].abs()                          # a negative gamma flips a channel
            bn.bias.copy_(torch.randn(n))
        layers.append((conv.eval(), bn.eval()))
    with torch.no_grad():
        layers[1][1].weight[4] = 0.0  # a channel BatchNorm switched off: W' = 0, its scale is eps
    for (conv, bn), bits_list in zip(layers, [(8, 3), (8, 4), (2, 8)], strict=True):
        for bits in bits_list:
            codes, scales, bias = _expected_fold_quantize(conv, bn, bits)
            inputs = f"conv {tuple(conv.weight.shape)} groups={conv.groups}, bias={conv.bias is not None}, bits={bits}"
            got = student.run(_FOLD_IN_SANDBOX, bits=bits, **conv_bn_state(conv, bn))
            grading.check("fold_and_quantize_conv (hidden) codes", got["codes"], codes, inputs=inputs)
            grading.check("fold_and_quantize_conv (hidden) scales", got["scales"], scales,
                          inputs=inputs, atol=1e-12, rtol=1e-6)
            grading.check("fold_and_quantize_conv (hidden) folded bias", got["bias"], bias,
                          inputs=inputs, atol=1e-6, rtol=1e-5)
            grading.check("fold_and_quantize_conv (hidden) returns tensors without gradients",
                          got["requires_grad"], [False, False, False], inputs=inputs)


# ----------------------------------------------------------------- exercise 2
_OBSERVE_IN_SANDBOX = """
observer = MinMaxObserver()
returned = [observer.update(b) is observer for b in batches]
scale, zero_point = observer.qparams()
result = {"scale": scale, "zero_point": zero_point, "update returns self": all(returned)}
"""


def _torchao_qparams(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's MinMaxObserver for signed int8, per-tensor affine (PyTorch's scheme)."""
    obs = TorchaoMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine)
    for b in batches:
        obs(b)
    scale, zero_point = obs.calculate_qparams()
    return scale.reshape(()), zero_point.reshape(()).to(torch.int64)


@tests.case("test-observer", disabled=[
    "course_lib.observers.MinMaxObserver", "course_lib.observers.Observer.qparams",
    "course_lib.observers.minmax_range", "course_lib.quant.qparams_from_range",
    "course_lib.quant.qparams_from_tensor",
    "torch.ao.quantization.MinMaxObserver", "torch.ao.quantization.observer.MinMaxObserver",
    "torch.ao.quantization.observer.UniformQuantizationObserverBase._calculate_qparams",
    "torchao.quantization.pt2e.observer.UniformQuantizationObserverBase._calculate_qparams",
])
def observer(student) -> None:
    g = torch.Generator().manual_seed(506)
    cases = {
        "two batches with different ranges": [torch.randn(100, generator=g) * 3 + 1, torch.randn(50, generator=g) - 4],
        "a later batch widens only the top": [torch.rand(3, 40, generator=g) - 0.2, torch.rand(3, 40, generator=g) * 9],
        "tiny positive values (range widened down to 0)": [torch.rand(7, 7, generator=g) * 1e-3],
        "only large negative values (range widened up to 0)": [-50 - 10 * torch.rand(2, 9, generator=g)],
        "constant 0 (scale eps, zero point -128)": [torch.zeros(5)],
    }
    for label, batches in cases.items():
        scale, zero_point = _torchao_qparams(batches)
        got = student.run(_OBSERVE_IN_SANDBOX, batches=batches)
        grading.check("MinMaxObserver (hidden) scale", got["scale"], scale, inputs=label, rtol=1e-6)
        grading.check("MinMaxObserver (hidden) zero point", got["zero_point"], zero_point, inputs=label)
        grading.check("MinMaxObserver (hidden) update returns self", got["update returns self"], True, inputs=label)
    grading.check("MinMaxObserver().qparams() before any update raises ValueError (hidden)",
                  _raises(student, "MinMaxObserver().qparams()"), True)


# ----------------------------------------------------------------- exercise 3
_CALIBRATE_IN_SANDBOX = """
class _Recorder:  # a min-max observer that also notes whether it was fed tensors that track gradients
    def __init__(self):
        self.minmax = cl.observers.MinMaxObserver()
        self.with_grad = False
    def update(self, x):
        self.with_grad = self.with_grad or bool(x.requires_grad)
        self.minmax.update(x)
        return self

def _hooks_left(m):
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())

model = cl.models.load_pretrained("tinycnn").train(train_mode)
observers = {name: _Recorder() for name in points}
if pairs == "list":  # as a DataLoader yields them
    batches = ([x, y] for x, y in zip(images.split(batch_size), labels.split(batch_size)))
elif pairs == "tuple":
    batches = ((x, y) for x, y in zip(images.split(batch_size), labels.split(batch_size)))
else:
    batches = (x for x in images.split(batch_size))  # a generator: one pass only
seen = run_calibration(model, observers, batches)
result = {"images seen": seen, "ranges": {n: list(o.minmax.range()) for n, o in observers.items()},
          "gradients tracked": any(o.with_grad for o in observers.values()),
          "training": model.training, "hooks left": _hooks_left(model)}
"""

_CALIBRATE_ERRORS_IN_SANDBOX = """
def _hooks_left(m):
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())

def _failing_batches():  # the loader breaks after two batches
    yield images[:8]
    yield images[8:16]
    raise RuntimeError("the data loader failed")

model = cl.models.load_pretrained("tinycnn").eval()
result = {}
try:
    run_calibration(model, {"relu1": cl.observers.MinMaxObserver(), "layer9": cl.observers.MinMaxObserver()},
                    [images[:8]])
except ValueError:
    result["unknown name raises ValueError"] = True
else:
    result["unknown name raises ValueError"] = False
result["hooks left after the ValueError"] = _hooks_left(model)
try:
    run_calibration(model, {"input": cl.observers.MinMaxObserver(), "conv2": cl.observers.MinMaxObserver()},
                    _failing_batches())
except RuntimeError:
    pass
result["hooks left after the loader failed"] = _hooks_left(model)
"""


@tests.case("test-calibration-loop", disabled=["course_lib.observers.calibrate", "course_lib.ptq.calibrate"])
def calibration_loop(student) -> None:
    images, labels = course_lib.data.get_split("calib")
    images, labels = images[37:337], labels[37:337]
    model = course_lib.models.load_pretrained("tinycnn").eval()
    points = ["input", "conv1", "pool2", "fc"]
    observers = {n: course_lib.observers.MinMaxObserver() for n in points}
    course_lib.observers.calibrate(model, observers, images.split(64))
    want = {n: list(o.range()) for n, o in observers.items()}
    for train_mode, pairs, batch_size in [(True, "list", 64), (False, "", 100), (False, "tuple", 128)]:
        inputs = f"TinyCNN in {'train' if train_mode else 'eval'} mode, 300 images in batches of {batch_size}" + (
            f" as (images, labels) pairs in a {pairs}" if pairs else "")
        got = student.run(_CALIBRATE_IN_SANDBOX, images=images, labels=labels, points=points,
                          train_mode=train_mode, pairs=pairs, batch_size=batch_size)
        grading.check("run_calibration (hidden) images seen", got["images seen"], 300, inputs=inputs)
        grading.check("run_calibration (hidden) min-max ranges at input, conv1, pool2, fc",
                      [got["ranges"][n] for n in points], [want[n] for n in points], inputs=inputs, rtol=1e-6)
        grading.check("run_calibration (hidden) observers saw tensors without gradients",
                      got["gradients tracked"], False, inputs=inputs)
        grading.check("run_calibration (hidden) the model is back in its previous mode",
                      got["training"], train_mode, inputs=inputs)
        grading.check("run_calibration (hidden) hooks left on the model", got["hooks left"], 0, inputs=inputs)
    got = student.run(_CALIBRATE_ERRORS_IN_SANDBOX, images=images)
    for what, want_value in [("unknown name raises ValueError", True), ("hooks left after the ValueError", 0),
                             ("hooks left after the loader failed", 0)]:
        grading.check(f"run_calibration (hidden) {what}", got[what], want_value,
                      inputs="observers at 'relu1' and 'layer9'; then a loader that fails after two batches")


# ----------------------------------------------------------------- exercise 4
_EVALUATE_IN_SANDBOX = """
calls = []

def predict(x):  # a prediction rule in exact integer arithmetic: the grader knows every answer
    calls.append(len(x))
    classes = x.flatten(1).to(torch.int64).sum(dim=1) % 10
    return classes.numpy() if as_numpy else classes

acc = accuracy(predict, images, labels, batch_size=batch_size)
result = {"accuracy": acc, "is a float": isinstance(acc, float), "largest batch": max(calls, default=0),
          "images predicted": sum(calls)}
"""


@tests.case("test-evaluate", disabled=["course_lib.training.evaluate", "course_lib.ptq.evaluate"])
def evaluate(student) -> None:
    g = torch.Generator().manual_seed(507)
    images = torch.randint(0, 5, (333, 1, 28, 28), generator=g).float()
    predicted = images.flatten(1).to(torch.int64).sum(dim=1) % 10
    labels = torch.randint(0, 10, (333,), generator=g)
    labels[::2] = predicted[::2]  # about 55 % right
    for as_numpy, batch_size in [(False, 64), (True, 100), (False, 1000)]:
        want = int((predicted == labels).sum()) / len(labels)
        inputs = f"333 images, batch_size={batch_size}, predictions as {'numpy' if as_numpy else 'torch'}"
        got = student.run(_EVALUATE_IN_SANDBOX, images=images, labels=labels, as_numpy=as_numpy, batch_size=batch_size)
        grading.check("accuracy (hidden)", got["accuracy"], want, inputs=inputs, rtol=1e-12)
        grading.check("accuracy (hidden) returns a Python float", got["is a float"], True, inputs=inputs)
        grading.check("accuracy (hidden) every image predicted once", got["images predicted"], 333, inputs=inputs)
        grading.check("accuracy (hidden) largest batch passed to predict", got["largest batch"],
                      min(batch_size, 333), inputs=inputs)
    for label, call in [("0 images", "accuracy(lambda x: x[:, 0, 0, 0], images[:0], labels[:0])"),
                        ("7 images and 6 labels", "accuracy(lambda x: x[:, 0, 0, 0], images[:7], labels[:6])")]:
        grading.check(f"accuracy (hidden) with {label} raises ValueError",
                      _raises(student, call, images=images, labels=labels), True)
