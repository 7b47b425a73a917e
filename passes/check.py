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


# onnxruntime contrib ops that onnxruntime registers in the default ONNX domain, where the ONNX checker,
# which knows only the standard ops there, would reject them. The checker sees them as com.microsoft
# ops (whose schemas it does not check); onnxruntime itself validates them when it loads the model.
ORT_DEFAULT_DOMAIN_CONTRIB_OPS = frozenset({"SimplifiedLayerNormalization"})


class CheckModelPass(ir.passes.InPlacePass):
    """Graph -> unchanged; raises if the ONNX checker (with full shape checking) rejects it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_ir.passes.common import _c_api_utils

        def check(proto: onnx.ModelProto) -> None:
            contrib = [n for n in proto.graph.node if n.domain == "" and n.op_type in ORT_DEFAULT_DOMAIN_CONTRIB_OPS]
            for node in contrib:
                node.domain = "com.microsoft"
            if contrib and not any(o.domain == "com.microsoft" for o in proto.opset_import):
                proto.opset_import.add(domain="com.microsoft", version=1)
            onnx.checker.check_model(proto, full_check=True)

        _c_api_utils.call_onnx_api(check, model)
        return ir.passes.PassResult(model, False)
