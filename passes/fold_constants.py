"""Evaluate nodes whose inputs are all constants, once, at build time."""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

logger = logging.getLogger(__name__)

# Ops whose value depends on their inputs alone (no randomness, no sequence/optional types).
# Inputs above this size that other nodes also read are not folded: the result would be a second copy.
SHARED_BYTES = 1024
_SKIP_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


class FoldConstantsPass(ir.passes.InPlacePass):
    """Op(const, const, ...) -> const, for standard-domain nodes with small outputs.

    ``max_elements`` bounds both inputs and outputs, and a fold that would make the stored bytes grow
    (a Cast of fp16-stored weights to fp32) is left to the runtime. Folded values become
    initializers; nodes left without users go with RemoveDeadNodesPass.
    """

    def __init__(self, max_elements: int = 1 << 16):
        super().__init__()
        self.max_elements = max_elements

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or node.op_type in _SKIP_OPS or _has_subgraph(node):
                continue
            inputs = [v for v in node.inputs if v is not None]
            if not inputs or any(v.const_value is None for v in inputs):
                continue
            if any(v.const_value.size > self.max_elements for v in inputs):
                continue
            outputs = _evaluate(node, model.opset_imports.get("", 21))
            if outputs is None or any(o.size > self.max_elements for o in outputs):
                continue
            if sum(o.nbytes for o in outputs) > sum(v.const_value.nbytes for v in inputs):
                continue  # folding must not grow the model (a Cast of fp16-stored weights to fp32, say)
            if any(v.const_value.nbytes > SHARED_BYTES and any(u.node is not node for u in v.uses()) for v in inputs):
                continue  # an input another node still reads would be stored twice (a tied head's table)
            for value, array in zip(node.outputs, outputs, strict=True):
                folded = ir.Value(
                    name=f"{value.name}.folded",
                    shape=ir.Shape(array.shape),
                    type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                    const_value=ir.tensor(array, name=f"{value.name}.folded"),
                )
                graph.register_initializer(folded)
                is_output = value in graph.outputs
                value.replace_all_uses_with(folded, replace_graph_outputs=is_output)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


def _evaluate(node: ir.Node, opset: int) -> list[np.ndarray] | None:
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    attrs = {a.name: a.value for a in node.attributes.values()}
    proto_attrs = [ir.serde.serialize_attribute(ir.convenience.convert_attribute(k, v)) for k, v in attrs.items()]
    onnx_node = onnx.helper.make_node(node.op_type, names, outs)
    onnx_node.attribute.extend(proto_attrs)
    feeds = {n: v.const_value.numpy() for n, v in zip(names, node.inputs, strict=True) if v is not None}
    try:
        graph = onnx.helper.make_graph(
            [onnx_node],
            "fold",
            [
                onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                for n, a in feeds.items()
            ],
            [onnx.helper.make_empty_tensor_value_info(o) for o in outs],
        )
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        results = ReferenceEvaluator(proto).run(None, feeds)
    except Exception as e:  # an op the reference cannot run stays in the graph
        logger.debug("cannot fold %s: %s", node.name, e)
        return None
    arrays = [np.asarray(r) for r in results]
    if any(math.prod(a.shape) != a.size for a in arrays):
        return None
    return arrays


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
