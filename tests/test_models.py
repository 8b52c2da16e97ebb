"""Models, shipped checkpoints, cost counters and the training loops."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import DATA_DIR, ROOT, data, models, training


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((DATA_DIR / "checkpoints.json").read_text())


# ---- architectures ----------------------------------------------------------------------


def test_tinycnn_layers_and_shapes():
    model = models.TinyCNN()
    for name in ("conv1", "bn1", "relu1", "pool1", "conv2", "bn2", "relu2", "pool2", "fc"):
        assert hasattr(model, name), name
    assert model.conv1.kernel_size == (3, 3) and model.conv1.padding == (1, 1)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    rgb = models.TinyCNN(in_channels=3, image_size=32, num_classes=4, channels=(8, 12))
    assert rgb(torch.zeros(5, 3, 32, 32)).shape == (5, 4)
    assert rgb.fc.in_features == 12 * 8 * 8
    with pytest.raises(ValueError, match="channels"):
        models.TinyCNN(channels=(16,))
    with pytest.raises(ValueError, match="image_size"):
        models.TinyCNN(image_size=30)


def test_tinycnn_counts_by_hand():
    model = models.TinyCNN()
    # conv1 16·1·9 + 16, bn1 2·16, conv2 32·16·9 + 32, bn2 2·32, fc 10·(32·7·7) + 10
    params = (16 * 9 + 16) + 32 + (32 * 16 * 9 + 32) + 64 + (10 * 32 * 7 * 7 + 10)
    assert models.count_params(model) == params == 20586
    # conv1 28·28·16·1·9, conv2 14·14·32·16·9, fc 10·1568
    macs = 28 * 28 * 16 * 9 + 14 * 14 * 32 * 16 * 9 + 10 * 1568
    assert models.count_macs(model, (1, 1, 28, 28)) == macs
    # float32 parameters and BN running mean/var, plus one int64 num_batches_tracked per BN
    assert models.model_size_bytes(model) == 4 * (params + 2 * (16 + 32)) + 2 * 8


def test_count_macs_on_a_small_conv_net():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 10·10·8·3·9  = 21,600
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),  # 5·5·8·(8/4)·9 = 3,600
        nn.Conv2d(8, 6, 1),  # 5·5·6·8 = 1,200
        nn.Flatten(),
        nn.Linear(150, 7),  # 150·7 = 1,050
    )
    expected = 21_600 + 3_600 + 1_200 + 1_050
    assert models.count_macs(net, (1, 3, 10, 10)) == expected
    assert models.count_macs(net, (3, 10, 10)) == expected  # (C, H, W) means one image
    assert models.count_macs(net, (4, 3, 10, 10)) == expected  # per example
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed
    with pytest.raises(ValueError, match="input_shape"):
        models.count_macs(net, (0, 3, 10, 10))


def test_count_macs_depthwise():
    dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # 4·4·16·1·9
    assert models.count_macs(dw, (1, 16, 4, 4)) == 4 * 4 * 16 * 9


def test_mobilenet_v2_small_shape_and_blocks():
    model = models.mobilenet_v2_small().eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert model.features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (2, 2)
    assert type(model).__name__ == "QuantizableMobileNetV2"
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())  # ReLU fuses, ReLU6 does not
    assert models.count_params(model) < 1_000_000


# ---- shipped checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["tinycnn", "mobilenetv2"])
def test_checkpoint_files_are_small_float32(name, metrics):
    path = DATA_DIR / f"{name}.pt"
    assert path.stat().st_size < 5_000_000
    assert metrics[name]["size_bytes"] == path.stat().st_size
    state = torch.load(path, weights_only=True)
    assert {t.dtype for t in state.values()} <= {torch.float32, torch.int64}


@pytest.mark.parametrize("name, rgb32", [("tinycnn", False), ("mobilenetv2", True)])
def test_load_pretrained_reproduces_the_metrics_file(name, rgb32, metrics):
    model = models.load_pretrained(name)
    assert not model.training
    entry = metrics[name]
    assert training.evaluate(model, "test", rgb32=rgb32) == entry["test_accuracy"]
    assert training.evaluate(model, "calib", rgb32=rgb32) == entry["calib_accuracy"]
    assert models.count_params(model) == entry["params"]
    assert models.count_macs(model, entry["input_shape"]) == entry["macs"]
    assert entry["test_accuracy"] >= (0.97 if name == "tinycnn" else 0.95)


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        models.load_pretrained("resnet50")
    with pytest.raises(FileNotFoundError, match="make checkpoints"):
        models.load_pretrained("tinycnn", path=tmp_path / "absent.pt")
    # Wrong architecture: every key differs.
    with pytest.raises(RuntimeError) as err:
        models.load_pretrained("mobilenetv2", path=DATA_DIR / "tinycnn.pt")
    assert "missing keys" in str(err.value) and "unexpected keys" in str(err.value)
    assert "conv1.weight" in str(err.value) and "features.0.0.weight" in str(err.value)
    # Same keys, other widths: the message names the shapes.
    narrow = tmp_path / "narrow.pt"
    torch.save(models.TinyCNN(channels=(8, 32)).state_dict(), narrow)
    with pytest.raises(RuntimeError, match=r"conv1.weight: model \(16, 1, 3, 3\) vs checkpoint \(8, 1, 3, 3\)"):
        models.load_pretrained("tinycnn", path=narrow)


def test_mobilenet_fuses_without_changing_outputs():
    model = models.load_pretrained("mobilenetv2")
    x, _ = data.get_split("calib", rgb32=True)
    x = x[:64]
    with torch.no_grad():
        before = model(x)
        fused = copy.deepcopy(model)
        fused.fuse_model(is_qat=False)
        after = fused(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)


def test_tinycnn_fuses_without_changing_outputs():
    from torch.ao.quantization import fuse_modules

    model = models.load_pretrained("tinycnn")
    x, _ = data.get_split("calib")
    fused = fuse_modules(copy.deepcopy(model), [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"]])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_mobilenet_exports_with_torch_export():
    model = models.load_pretrained("mobilenetv2")
    x = data.get_split("calib", rgb32=True)[0][:4]
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), atol=1e-5, rtol=0)


# ---- training loops --------------------------------------------------------------------


class _Constant(nn.Module):
    """Always predicts class 3 (a learnable parameter keeps it a normal module)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(F.one_hot(torch.tensor(3), 10).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), 10)


def test_evaluate_counts_correct_predictions():
    # The test split has 100 images of each digit: a constant prediction is right 10 % of the time.
    model = _Constant().train()
    assert training.evaluate(model, "test") == 0.1
    assert model.training  # mode restored
    x, y = data.get_split("calib")
    assert training.evaluate(model, (x, y)) == 0.1
    assert training.evaluate(model, data.make_loader("calib", batch_size=64)) == 0.1
    assert training.evaluate(model, (x[:4], torch.tensor([3, 3, 1, 3]))) == 0.75
    with pytest.raises(ValueError, match="split name"):
        training.evaluate(model, 42)


def test_train_epoch_returns_the_mean_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = data.get_split("calib")
    expected = F.cross_entropy(model(x), y).item()
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: the loss is that of fixed weights
    loader = data.make_loader("calib", batch_size=96)  # batches of unequal size (…, 20)
    got = training.train_epoch(model, loader, frozen, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_random_affine_identity_and_fill():
    g = torch.Generator().manual_seed(0)
    x, _ = data.get_split("calib")
    x = x[:8]
    same = training.random_affine(x, g, degrees=0, translate=0, scale=(1.0, 1.0))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    moved = training.random_affine(x, g)
    assert moved.shape == x.shape and not torch.allclose(moved, x)
    # Shifted by more than the image size in every direction, only background remains.
    gone = training.random_affine(x, g, degrees=0, translate=1.5, scale=(0.5, 0.5))
    corners = gone[:, :, :2, :2]
    torch.testing.assert_close(corners, torch.full_like(corners, training.BACKGROUND), atol=1e-5, rtol=0)


def test_fit_is_deterministic():
    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = models.TinyCNN()
        training.fit(model, epochs=1, lr=1e-2, seed=0, limit=128, batch_size=32, progress=False)
        return model.state_dict()

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = run(), run()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    assert not torch.equal(a["fc.weight"], models.TinyCNN().fc.weight)  # it did train


@pytest.mark.slow
def test_training_script_is_deterministic(tmp_path):
    spec = importlib.util.spec_from_file_location("train_checkpoints", ROOT / "scripts" / "train_checkpoints.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    runs = []
    for run in ("a", "b"):
        out = tmp_path / run
        args = ["--only", "tinycnn", "--epochs", "1", "--limit", "256", "--out-dir", str(out), "--no-progress"]
        assert script.main(args) == 0
        runs.append(out)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    a = torch.load(runs[0] / "tinycnn.pt", weights_only=True)
    b = torch.load(runs[1] / "tinycnn.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(script.SEED)
    initial = models.TinyCNN().state_dict()  # the weights the script started from
    assert not torch.equal(a["conv1.weight"], initial["conv1.weight"])  # it did train
    entry = json.loads((runs[0] / "checkpoints.json").read_text())["tinycnn"]
    assert entry["epochs"] == 1 and entry["train_images"] == 256 and entry["size_bytes"] > 0


def test_load_pretrained_leaves_the_random_stream_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    models.load_pretrained("tinycnn")
    assert torch.equal(torch.rand(3), expected)
