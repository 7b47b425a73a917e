"""W8A8: int8 weights per output channel, activations quantized to int8 at run time.

    MatMul(x, W) -> com.microsoft.DynamicQuantizeMatMul(x, Wq, w_scale, w_zero_point)

onnxruntime quantizes ``x`` per tensor (uint8, asymmetric) on every call and multiplies in integers;
SmoothQuant (arXiv 2211.10438) has already moved the activation outliers into the weights, which is
what makes a per-tensor activation scale workable. The integers come from calibration as values.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from quantlab.passes.graph_utils import add_constant, replace_node
from quantlab.passes.quantize_weights import quantizable_linears


class QuantizeDynamicInt8Pass(ir.passes.InPlacePass):
    """MatMul(x, W) -> DynamicQuantizeMatMul(x, Wq (K, N) int8, scale (N,), zero_point (N,) = 0).

    ``weights`` maps linear names to (codes int8 (N, K), scales float32 (N,)) in torch layout.
    """

    def __init__(self, weights: Mapping[str, tuple[np.ndarray, np.ndarray]]):
        super().__init__()
        self.weights = dict(weights)

    def config(self) -> dict:
        return {"linears": len(self.weights), "weights": "int8 per output channel", "activations": "int8 dynamic"}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for linear, node in quantizable_linears(model).items():
            if linear not in self.weights:
                continue
            codes, scales = self.weights[linear]
            k, n = node.inputs[1].shape
            if codes.shape != (n, k) or scales.shape != (n,):
                raise ValueError(f"{linear}: int8 weight {codes.shape} / scales {scales.shape} do not fit {(n, k)}")
            q = add_constant(graph, f"{linear}.qweight", np.ascontiguousarray(codes.T))  # (K, N) int8
            s = add_constant(graph, f"{linear}.scales", np.ascontiguousarray(scales, dtype=np.float32))
            zp = add_constant(graph, f"{linear}.qzeros", np.zeros(n, dtype=np.int8))
            new = ir.Node(
                "com.microsoft",
                "DynamicQuantizeMatMul",
                [node.inputs[0], q, s, zp],
                name=f"{linear}.DynamicQuantizeMatMul",
                num_outputs=1,
            )
            replace_node(graph, node, new)
            modified = True
        if modified:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified)
