"""Shape inference and the ONNX checker, run over the graph without serializing the weights."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass


class InferShapesPass(ir.passes.InPlacePass):
    """Graph -> the same graph with every inferable value shape and type filled in.

    onnx's inference runs on the graph with the weights left out (only their shapes travel), so it
    costs the same for a 100 GB model as for a tiny one. Inference is lenient here; CheckModelPass
    is the strict gate. ``modified`` is True when some value gained or changed a shape or type.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _typed_values(model)
        ShapeInferencePass(check_type=True, strict_mode=True, data_prop=True)(model)
        modified = _typed_values(model) != before
        return ir.passes.PassResult(model, modified)


def _typed_values(model: ir.Model) -> dict[str, tuple]:
    out = {}
    for node in model.graph:
        for v in node.outputs:
            out[v.name] = (str(v.type), str(v.shape))
    return out


class CheckModelPass(ir.passes.InPlacePass):
    """Graph -> unchanged; raises if the ONNX checker (with full shape checking) rejects it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_ir.passes.common import _c_api_utils

        def check(proto: onnx.ModelProto) -> None:
            onnx.checker.check_model(proto, full_check=True)

        _c_api_utils.call_onnx_api(check, model)
        return ir.passes.PassResult(model, False)
