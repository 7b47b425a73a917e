"""Fuse RMSNorm, and the residual Add in front of it, into onnxruntime's normalization kernels.

    Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Mul(x, x), [-1]), eps)))), w)
        -> SimplifiedLayerNormalization(x, w, epsilon=eps)
    SimplifiedLayerNormalization(Add(a, b), w)
        -> SkipSimplifiedLayerNormalization(a, b, w)   (its 4th output, a + b, feeds the residual stream)

The builder writes RMSNorm as seven plain ops (it must run on any ONNX runtime); on onnxruntime each is
a kernel launch and a pass over the hidden state. The fused kernels read x once. Both live in
onnxruntime's contrib registry: SimplifiedLayerNormalization in the default domain (as onnxruntime
registers it), SkipSimplifiedLayerNormalization in com.microsoft. The arithmetic is the same up to fp32
summation order (onnxruntime accumulates the mean square in float: stash_type 1).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"


def _only_user(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy())


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a binary node, given one of them."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def match_rms_norm(reduce: ir.Node) -> tuple[ir.Value, ir.Value, float, ir.Node, list[ir.Node]] | None:
    """(x, weight, eps, last node, all nodes) of the builder's RMSNorm around ``reduce``, or None."""
    if reduce.op_type != "ReduceMean" or reduce.domain not in ("", "ai.onnx"):
        return None
    axes = _const(reduce.inputs[1]) if len(reduce.inputs) > 1 else None
    keepdims = reduce.attributes.get("keepdims")
    if axes is None or axes.tolist() != [-1] or (keepdims is not None and keepdims.value != 1):
        return None
    square = reduce.inputs[0].producer()
    if square is None or square.op_type != "Mul" or square.inputs[0] is not square.inputs[1]:
        return None
    x = square.inputs[0]
    add = _only_user(reduce.outputs[0])
    if add is None or add.op_type != "Add":
        return None
    eps = _const(_other(add, reduce.outputs[0]))
    if eps is None or eps.size != 1:
        return None
    sqrt = _only_user(add.outputs[0])
    recip = _only_user(sqrt.outputs[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
    scale = _only_user(recip.outputs[0]) if recip is not None and recip.op_type == "Reciprocal" else None
    if scale is None or scale.op_type != "Mul" or _other(scale, recip.outputs[0]) is not x:
        return None
    out = _only_user(scale.outputs[0])
    if out is None or out.op_type != "Mul":
        return None
    weight = _other(out, scale.outputs[0])
    w = _const(weight)
    if w is None or w.ndim != 1:
        return None
    return x, weight, float(eps.reshape(())), out, [square, reduce, add, sqrt, recip, scale, out]


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    new.shape, new.type = old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=old.is_graph_output())
    name, old.name = old.name, None
    new.name = name


class FuseRmsNormPass(ir.passes.InPlacePass):
    """RMSNorm's seven ops -> SimplifiedLayerNormalization; Add in front -> SkipSimplifiedLayerNormalization."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for reduce in [n for n in graph if n.op_type == "ReduceMean"]:
            found = match_rms_norm(reduce)
            if found is None:
                continue
            x, weight, eps, last, nodes = found
            residual = x.producer()
            skip = (
                residual is not None
                and residual.op_type == "Add"
                and residual.domain in ("", "ai.onnx")
                # two activations (the residual stream and a block's output), not a bias
                and all(v is not None and v.const_value is None for v in residual.inputs)
                and len(residual.outputs[0].uses()) >= 1
            )
            attrs = [ir.AttrFloat32("epsilon", eps)]
            if skip:
                fused = ir.Node(
                    MS_DOMAIN,
                    "SkipSimplifiedLayerNormalization",
                    [residual.inputs[0], residual.inputs[1], weight],
                    attributes=attrs,
                    num_outputs=4,
                    name=f"{last.name}.SkipSimplifiedLayerNorm",
                )
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            else:
                fused = ir.Node(
                    "",
                    "SimplifiedLayerNormalization",
                    [x, weight],
                    attributes=[*attrs, ir.AttrInt64("axis", -1), ir.AttrInt64("stash_type", 1)],
                    name=f"{last.name}.SimplifiedLayerNorm",
                )
            graph.insert_before(nodes[0] if not skip else residual, fused)
            _take_over(graph, last.outputs[0], fused.outputs[0])
            if skip:
                # the residual stream continues from the fused node's a + b
                _take_over(graph, residual.outputs[0], fused.outputs[3])
            for node in reversed(nodes):
                graph.remove(node, safe=True)
            if skip:
                graph.remove(residual, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
