"""Small graph edits the passes share."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Tensor metadata key set by the builder on a weight stored transposed (in, out) for MatMul: a
# callable returning its (out, in) float32 source, which quantizers read instead of transposing.
OUT_IN_SOURCE = "quantlab.out_in_source"


def replace_node(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put ``new`` where ``old`` was: its (single) output takes over old's uses, name, shape and type."""
    out = old.outputs[0]
    name = out.name
    new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
    graph.insert_before(old, new)
    out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=out in graph.outputs)
    graph.remove(old, safe=True)
    out.name = None
    new.outputs[0].name = name


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register ``tensor`` (eager or lazy) as an initializer named ``name``."""
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def add_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return add_initializer(graph, name, ir.tensor(array, name=name))


def gather_block_quantized(
    data: ir.Value, ids: ir.Value, scales: ir.Value, zero_points: ir.Value | None, *, block: int, bits: int
) -> ir.Node:
    """The token embedding as onnxruntime's GatherBlockQuantized: rows of ``data`` (vocab, packed codes)
    gathered by ``ids``, dequantized per block of ``block`` along the hidden axis."""
    inputs = [data, ids, scales] + ([zero_points] if zero_points is not None else [])
    return ir.Node(
        "com.microsoft",
        "GatherBlockQuantized",
        inputs,
        attributes=[
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
            ir.AttrInt64("block_size", block),
            ir.AttrInt64("bits", bits),
        ],
        name="model.embed_tokens.GatherBlockQuantized",
        num_outputs=1,
    )
