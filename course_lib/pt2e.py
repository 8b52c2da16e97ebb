"""ExecuTorch's ``XNNPACKQuantizer`` for graphs whose BatchNorms are already folded (lessons 05, 06, 08).

``XNNPACKQuantizer.annotate`` tries every pattern it knows on every call. For its four
conv + BatchNorm (+ ReLU) patterns, meant for QAT where BatchNorm is still in the graph,
it first traces 12 small pattern graphs with ``torch.export``: seconds of work on every
``prepare_pt2e`` call, whether or not the graph holds a BatchNorm. In post-training
quantization those patterns can never match: torchao's ``prepare_pt2e`` folds BatchNorm
into the convolutions (``_fuse_conv_bn_``) before the quantizer annotates. Nor can they in
QAT of a model folded before export (lesson 06).

:class:`FoldedXNNPACKQuantizer` is ``XNNPACKQuantizer`` without those four patterns: on a
graph without BatchNorm it makes the same annotations, so ``convert_pt2e`` gives the same
graph (``tests/test_pt2e.py`` checks this for PTQ and QAT), several times faster. A
BatchNorm still in the graph when it annotates is an error, never a silently float layer.
"""

from __future__ import annotations

import torch
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)

__all__ = ["BATCH_NORM_OPS", "CONV_BN_PATTERNS", "FoldedXNNPACKQuantizer", "get_symmetric_quantization_config"]

CONV_BN_PATTERNS = ("conv_bn_relu", "conv_bn", "conv_transpose_bn_relu", "conv_transpose_bn")
BATCH_NORM_OPS = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    torch.ops.aten.cudnn_batch_norm.default,
    torch.ops.aten.miopen_batch_norm.default,
}


class FoldedXNNPACKQuantizer(XNNPACKQuantizer):
    """``XNNPACKQuantizer`` minus its conv + BatchNorm patterns; configure it the same way
    (``set_global(get_symmetric_quantization_config(...))``).

    Raises ValueError when the graph it annotates still holds a BatchNorm: fold it first
    (``prepare_pt2e`` does for PTQ; for QAT, fold before ``torch.export`` or use
    ``XNNPACKQuantizer``).
    """

    SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if p.name not in CONV_BN_PATTERNS]

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        left = [n.name for n in model.graph.nodes if n.op == "call_function" and n.target in BATCH_NORM_OPS]
        if left:
            raise ValueError(
                f"FoldedXNNPACKQuantizer: the graph still holds {len(left)} BatchNorm op(s) "
                f"({', '.join(left[:3])}{', …' if len(left) > 3 else ''}); fold BatchNorm into the "
                "convolutions before export, or use XNNPACKQuantizer, whose conv + BatchNorm patterns handle it"
            )
        return super().annotate(model)
