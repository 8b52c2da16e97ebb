"""course_lib.pt2e.FoldedXNNPACKQuantizer gives the graph XNNPACKQuantizer gives (lessons 05, 06, 08)."""

from __future__ import annotations

import copy

import pytest
import torch
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

from course_lib import data, models, pt2e


def _export(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    return torch.export.export(model, (example[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()


def _ptq(graph, quantizer, calib: torch.Tensor) -> torch.fx.GraphModule:
    prepared = prepare_pt2e(copy.deepcopy(graph), quantizer)
    with torch.no_grad():
        prepared(calib)
    return convert_pt2e(prepared)


def _signature(graph_module: torch.fx.GraphModule) -> list[tuple]:
    """Every call in the converted graph with its plain arguments (scales, zero points, ranges)."""
    plain = (int, float, bool, str, torch.dtype)
    return [(str(n.target), tuple(a for a in n.args if isinstance(a, plain)))
            for n in graph_module.graph.nodes if n.op == "call_function"]


def test_the_dropped_patterns_exist_in_xnnpack_quantizer() -> None:
    names = [p.name for p in XNNPACKQuantizer.SUPPORTED_PATTERNS]
    assert set(pt2e.CONV_BN_PATTERNS) <= set(names), names  # an upstream rename would show here
    kept = [p.name for p in pt2e.FoldedXNNPACKQuantizer.SUPPORTED_PATTERNS]
    assert kept == [n for n in names if n not in pt2e.CONV_BN_PATTERNS]


@pytest.mark.parametrize("name, rgb32, per_channel", [
    ("tinycnn", False, True), ("tinycnn", False, False), ("mobilenetv2", True, False)])
def test_ptq_graph_equals_xnnpack_quantizers(name: str, rgb32: bool, per_channel: bool) -> None:
    # The checkpoints still hold their BatchNorms: prepare_pt2e folds them before annotating.
    model = models.load_pretrained(name).eval()
    calib = data.get_split("calib", rgb32=rgb32)[0][:100]
    graph = _export(model, calib)
    config = pt2e.get_symmetric_quantization_config(is_per_channel=per_channel)
    stock = _ptq(graph, XNNPACKQuantizer().set_global(config), calib)
    folded = _ptq(graph, pt2e.FoldedXNNPACKQuantizer().set_global(config), calib)
    assert _signature(folded) == _signature(stock)
    assert sum("quantize_per" in s[0] for s in _signature(stock)) > 4  # a quantized graph, not a float one
    test = data.get_split("test", rgb32=rgb32)[0][:50]
    with torch.no_grad():
        assert torch.equal(folded(test), stock(test))


def _folded_tinycnn() -> nn.Module:
    m = copy.deepcopy(models.load_pretrained("tinycnn")).eval()
    m.conv1, m.bn1 = fuse_conv_bn_eval(m.conv1, m.bn1), nn.Identity()
    m.conv2, m.bn2 = fuse_conv_bn_eval(m.conv2, m.bn2), nn.Identity()
    return m


def test_qat_graph_of_a_folded_model_equals_xnnpack_quantizers() -> None:
    x, y = (t[:64] for t in data.get_split("train"))
    graph = _export(_folded_tinycnn(), x)
    config = pt2e.get_symmetric_quantization_config(is_per_channel=True, is_qat=True)
    outputs = []
    for quantizer in (XNNPACKQuantizer(), pt2e.FoldedXNNPACKQuantizer()):
        torch.manual_seed(0)
        prepared = prepare_qat_pt2e(copy.deepcopy(graph), quantizer.set_global(config))
        optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
        for _ in range(2):  # two training steps: same fake-quantizers, same gradients
            optimizer.zero_grad()
            nn.functional.cross_entropy(prepared(x), y).backward()
            optimizer.step()
        converted = convert_pt2e(prepared)
        with torch.no_grad():
            outputs.append((_signature(converted), converted(x)))
    assert outputs[0][0] == outputs[1][0]
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_batchnorm_left_in_the_graph_is_an_error() -> None:
    # QAT keeps BatchNorm in the graph (prepare_qat_pt2e does not fold it): this quantizer refuses.
    x = data.get_split("train")[0][:8]
    model = copy.deepcopy(models.load_pretrained("tinycnn")).train()
    graph = _export(model, x)
    config = pt2e.get_symmetric_quantization_config(is_per_channel=True, is_qat=True)
    with pytest.raises(ValueError, match=r"still holds 2 BatchNorm op\(s\).*fold BatchNorm"):
        prepare_qat_pt2e(graph, pt2e.FoldedXNNPACKQuantizer().set_global(config))
