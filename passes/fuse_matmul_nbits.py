"""Fuse weight-only linears that read the same input into one.

    MatMulNBits(x, Bq), MatMulNBits(x, Bk), MatMulNBits(x, Bv)
        -> Split(MatMulNBits(x, [Bq; Bk; Bv]), [Nq, Nk, Nv], axis=-1)

q/k/v projections and the MLP's gate/up read the same normalized hidden state. In decode (one token)
each MatMulNBits is a small matrix-vector product whose cost is largely fixed (activation
quantization, thread-pool dispatch): one node over the concatenated rows pays it once, as
onnxruntime-genai's builder does with its packed q/k/v and gate/up.

MatMulNBits' operands are row-major in N: B (N, k_blocks, blob), scales (N, k_blocks) and packed zero
points (N, ceil(k_blocks * bits / 8)) (or flat N * ...). Concatenating along N is exactly stacking the
rows, so the fused node computes bit for bit the same outputs. The concatenated initializers are lazy:
nothing is materialized until the emitter writes them.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from quantlab.passes.graph_utils import add_initializer

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# attributes that must agree for two MatMulNBits to share one node (N is the one that adds up)
SAME_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _signature(node: ir.Node) -> tuple | None:
    """What must match for fusion, or None when ``node`` cannot take part (non-constant weights,
    g_idx, a bias)."""
    if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
        return None
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    _, b, scales, zp, g_idx, bias = inputs[:6]
    if g_idx is not None or bias is not None:
        return None
    for v in (b, scales, zp):
        if v is not None and v.const_value is None:
            return None
    zp_kind = None if zp is None else (zp.const_value.dtype, len(zp.const_value.shape))
    return (
        tuple(_attr(node, a, 0) for a in SAME_ATTRIBUTES),
        scales.const_value.dtype,
        len(scales.const_value.shape),
        zp_kind,
    )


def _stacked(graph: ir.Graph, name: str, parts: list[ir.Value]) -> ir.Value:
    """A lazy initializer: the parts' tensors concatenated along axis 0 (rows = output channels)."""
    tensors = [p.const_value for p in parts]
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])

    def load() -> ir.Tensor:
        return ir.Tensor(np.concatenate([np.asarray(t.numpy()) for t in tensors], axis=0), name=name)

    return add_initializer(graph, name, ir.LazyTensor(load, dtype=tensors[0].dtype, shape=ir.Shape(shape), name=name))


def _fused_name(nodes: list[ir.Node]) -> str:
    """``...self_attn.q_proj`` + ``k_proj`` + ``v_proj`` -> ``...self_attn.qkv_proj``; ``...mlp.gate_proj`` +
    ``up_proj`` -> ``...mlp.gate_up_proj`` (the names onnxruntime-genai's builder and vLLM use)."""
    linears = [n.name.removesuffix(".MatMulNBits") for n in nodes]
    prefixes = {name.rsplit(".", 1)[0] for name in linears}
    leaves = [name.rsplit(".", 1)[-1].removesuffix("_proj") for name in linears]
    if len(prefixes) == 1 and all(leaves):
        joined = "".join(leaves) if all(len(leaf) == 1 for leaf in leaves) else "_".join(leaves)
        return f"{prefixes.pop()}.{joined}_proj"
    return "fused." + "+".join(linears)


class FuseParallelMatMulNBitsPass(ir.passes.InPlacePass):
    """MatMulNBits(x, B1), ..., MatMulNBits(x, Bn) -> Split(MatMulNBits(x, [B1; ...; Bn]), axis=-1)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = {}
        for node in graph:
            sig = _signature(node)
            if sig is not None:
                groups.setdefault((id(node.inputs[0]), sig), []).append(node)
        modified = False
        for nodes in groups.values():
            if len(nodes) > 1:
                self._fuse(graph, nodes)
                modified = True
        return ir.passes.PassResult(model, modified)

    def _fuse(self, graph: ir.Graph, nodes: list[ir.Node]) -> None:
        name = _fused_name(nodes)
        sizes = [int(_attr(n, "N")) for n in nodes]
        b = _stacked(graph, f"{name}.qweight", [n.inputs[1] for n in nodes])
        scales = _stacked(graph, f"{name}.scales", [n.inputs[2] for n in nodes])
        inputs = [nodes[0].inputs[0], b, scales]
        if len(nodes[0].inputs) > 3 and nodes[0].inputs[3] is not None:
            inputs.append(_stacked(graph, f"{name}.zero_points", [n.inputs[3] for n in nodes]))
        attributes = {a: _attr(nodes[0], a) for a in SAME_ATTRIBUTES} | {"N": sum(sizes)}
        fused = ir.Node(
            MS_DOMAIN,
            "MatMulNBits",
            inputs,
            attributes=[ir.AttrInt64(k, int(v)) for k, v in attributes.items()],
            outputs=[ir.Value(name=f"{name}.MatMulNBits")],
            name=f"{name}.MatMulNBits",
        )
        split_sizes = add_initializer(graph, f"{name}.split", ir.tensor(np.array(sizes, dtype=np.int64)))
        split = ir.Node(
            "",
            "Split",
            [fused.outputs[0], split_sizes],
            attributes=[ir.AttrInt64("axis", -1)],
            num_outputs=len(nodes),
            name=f"{name}.Split",
        )
        first = min(nodes, key=lambda n: list(graph).index(n))
        weights = [v for n in nodes for v in n.inputs[1:] if v is not None]
        graph.insert_before(first, [fused, split])
        for node, out in zip(nodes, split.outputs, strict=True):
            old = node.outputs[0]
            out.shape, out.type = old.shape, old.type
            old.replace_all_uses_with(out, replace_graph_outputs=old in graph.outputs)
            old_name = old.name
            graph.remove(node, safe=True)
            old.name = None
            out.name = old_name
        for v in weights:  # the per-linear initializers are unused now
            if v.name in graph.initializers and not v.uses():
                del graph.initializers[v.name]
        logger.debug("fused %d MatMulNBits into %s (N = %s)", len(nodes), name, sizes)
