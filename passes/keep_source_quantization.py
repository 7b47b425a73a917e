"""Keep a checkpoint's own quantization: emit a GGUF's integer codes without rounding them again.

    MatMul(x, W) -> MatMulNBits(x, B, scales)                                              no min (Q4_0, Q8_0, Q6_K...)
    MatMul(x, W) -> Add(MatMulNBits(x, B, scales), MatMul(block_sums(x), offsets^T))       with a min (Q4_1, Q4_K...)
    Gather(E, ids) -> com.microsoft.GatherBlockQuantized(Eq, ids, scales)                  the token embedding

    block_sums(x) = ReduceSum(Reshape(x, (batch, seq, K / block, block)), -1)     # (batch, seq, K / block)

The codes, scales and offsets come from ``quantlab.quant.gguf_blocks`` (``w = scale * (code - 2^(bits-1))
+ offset`` per block), so the emitted weight equals the GGUF's own dequantization up to fp32 rounding.
The offset product costs ``K / block`` multiply-adds per output, 1/32 of the MatMul. Linears that read
one input (q/k/v, gate/up) become one MatMulNBits over their stacked rows, one offset product and a
Split, so a decode step pays each node's fixed cost once. The offset is not folded into a float zero
point: onnxruntime 1.32 runs float zero points by dequantizing B and calling SGEMM, 50-150x slower
for one token (and refuses them for 8 bits); benchmarks/bench_source_layouts.py measures both.

Storage: where scales and mins are the file's own fp16 values (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) they are
stored fp16 and Cast to fp32 in the graph, which onnxruntime folds when it loads the model, so the
linears cost the GGUF's own bits per weight; the K-quants' scales are stored fp32. A tied model's
embedding is left to ShareTiedEmbeddingPass, which runs next and reads the head's MatMulNBits codes
(the embedding's own, here) as the table; an untied one becomes a GatherBlockQuantized with fp32 scales.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from quantlab.passes.graph_utils import add_initializer, gather_block_quantized, replace_node
from quantlab.passes.quantize_embedding import EMBEDDING, pack_rows, source_initializer
from quantlab.passes.quantize_weights import OnePerLinear, quantizable_linears
from quantlab.quant.gguf_blocks import KeptLayout, SourceBlocks, SourceQuantization, stack_rows
from quantlab.quant.packed import pack_codes

logger = logging.getLogger(__name__)

EMBEDDING_LINEAR = EMBEDDING.removesuffix(".weight")


class KeepSourceQuantizationPass(ir.passes.InPlacePass):
    """MatMul(x, W) -> MatMulNBits(x, B, scales) [+ block_sums(x) @ offsets^T] with the checkpoint's codes;
    Gather(E, ids) -> GatherBlockQuantized. Linears and tables not in ``plan.kept`` stay as they are."""

    def __init__(self, plan: SourceQuantization, *, accuracy_level: int = 4):
        super().__init__()
        self.plan = plan
        self.accuracy_level = accuracy_level

    def config(self) -> dict:
        types: dict[str, int] = {}
        for layout in self.plan.kept.values():
            types[layout.ggml_type] = types.get(layout.ggml_type, 0) + 1
        return {
            "accuracy_level": self.accuracy_level,
            "kept": dict(sorted(types.items())),
            "not_kept": len(self.plan.not_kept),
        }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        block_sums: dict[tuple[int, int], ir.Value] = {}  # (id of the input, block) -> its block sums
        linears = quantizable_linears(model)
        missing = [name for name in self.plan.kept if name != EMBEDDING_LINEAR and name not in linears]
        if missing:  # precondition: the manifest must not claim codes the graph does not hold
            raise ValueError(
                f"{len(missing)} linears to keep are not MatMul(x, W) of a weight initializer (e.g. {missing[0]}); "
                "fp16 weight storage puts a Cast there: keep the source with fp32 storage"
            )
        groups: dict[tuple, list[tuple[str, ir.Node]]] = {}  # (id of the input, layout) -> its linears
        for linear, node in linears.items():
            if linear in self.plan.kept:
                groups.setdefault((id(node.inputs[0]), self.plan.kept[linear]), []).append((linear, node))
        for (_, layout), group in groups.items():
            self._linears(graph, group, layout, block_sums)
            modified = True
        if EMBEDDING_LINEAR in self.plan.kept and not self.plan.tied:  # tied: shared from the head, next pass
            modified |= self._embedding(graph, self.plan.kept[EMBEDDING_LINEAR])
        if modified:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified)

    def _linears(self, graph, group: list[tuple[str, ir.Node]], layout: KeptLayout, block_sums: dict) -> None:
        """One MatMulNBits (and one offset product) for the linears of ``group``, which read one input
        (q/k/v, gate/up), split back into their outputs: stacking rows is exact, and one node pays the
        fixed cost of a decode step's small products once."""
        names = [linear for linear, _ in group]
        nodes = [node for _, node in group]
        k = nodes[0].inputs[1].shape[0]
        sizes = [node.inputs[1].shape[1] for node in nodes]  # weights stored (in, out) for MatMul(x, W)
        n = sum(sizes)
        linear = names[0] if len(names) == 1 else _group_name(names)
        block, bits = layout.block_size, layout.bits
        n_blocks = k // block
        uses = 3 if layout.has_mins else 2

        def load() -> SourceBlocks:
            parts = [self.plan.load(name) for name in names]
            for name, part, size in zip(names, parts, sizes, strict=True):
                if part.shape != (size, k):
                    raise ValueError(f"{name}: source blocks are {part.shape}, the graph needs {(size, k)}")
            return stack_rows(parts)

        once = OnePerLinear(load)

        def get() -> SourceBlocks:
            return once.get(uses)

        codes = _lazy(
            graph,
            f"{linear}.qweight",
            ir.DataType.UINT8,
            (n, n_blocks, block * bits // 8),
            lambda: pack_codes(get().codes, bits).reshape(n, n_blocks, -1),
        )
        # nodes over initializers only (onnxruntime folds them at load) go at the top of the graph, where
        # any node may read them: ShareTiedEmbeddingPass hands the head's scales to the embedding
        weight_nodes: list[ir.Node] = []
        scales, offsets_t = _scales_and_offsets(graph, linear, layout, (n, n_blocks), get, weight_nodes)
        new_nodes: list[ir.Node] = []
        x = nodes[0].inputs[0]
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": self.accuracy_level}
        y = _op(new_nodes, "MatMulNBits", [x, codes, scales], f"{linear}.MatMulNBits", domain="com.microsoft", **attrs)
        if offsets_t is not None:
            key = (id(x), block)
            if key not in block_sums:
                shape = _const(
                    graph, f"source.block_shape_{n_blocks}x{block}", np.array([0, 0, n_blocks, block], np.int64)
                )
                axes = _const(graph, "source.axes_last", np.array([-1], np.int64))
                split = _op(new_nodes, "Reshape", [x, shape], f"{linear}.blocks")  # (batch, seq, K / block, block)
                block_sums[key] = _op(new_nodes, "ReduceSum", [split, axes], f"{linear}.block_sums", keepdims=0)
            correction = _op(new_nodes, "MatMul", [block_sums[key], offsets_t], f"{linear}.offset_product")
            final = ir.Node("", "Add", [y, correction], name=f"{linear}.Add", num_outputs=1)
        else:
            final = new_nodes.pop()  # the MatMulNBits itself takes the MatMul's place
        if weight_nodes:
            graph.insert_before(next(iter(graph)), weight_nodes)
        graph.insert_before(nodes[0], new_nodes)
        if len(nodes) == 1:
            replace_node(graph, nodes[0], final)
        else:
            _split_back(graph, nodes, final, linear, sizes)

    def _embedding(self, graph, layout: KeptLayout) -> bool:
        gather = next((node for node in graph if _is_embedding_gather(node)), None)
        if gather is None:
            return False
        vocab, hidden = source_initializer(gather.inputs[0]).shape
        bits, block = layout.bits, layout.block_size
        once = OnePerLinear(lambda: self.plan.load(EMBEDDING_LINEAR))
        data = _lazy(
            graph,
            "model.embed_tokens.data",
            ir.DataType.UINT8,
            (vocab, hidden * bits // 8),  # rows of codes, low nibble first for 4 bits
            lambda: pack_rows(once.get(2).codes, bits),
        )
        scales = _lazy(
            graph, "model.embed_tokens.scales", ir.DataType.FLOAT, (vocab, hidden // block), lambda: once.get(2).scales
        )
        new = gather_block_quantized(data, gather.inputs[1], scales, None, block=block, bits=bits)
        replace_node(graph, gather, new)
        return True


def _scales_and_offsets(graph, linear: str, layout: KeptLayout, shape, get, weight_nodes: list) -> tuple:
    """MatMulNBits' fp32 scales (N, n_blocks) and the offsets (n_blocks, N), or None without a min.

    Exact in fp16 (the file's own d and m): stored fp16 and widened by nodes appended to
    ``weight_nodes``, offsets computed from them with the fp32 operations of SourceBlocks.offsets
    (so the same bits); otherwise stored fp32 as decoded."""
    n, n_blocks = shape
    if not layout.fp16_exact:
        scales = _lazy(graph, f"{linear}.scales", ir.DataType.FLOAT, shape, lambda: get().scales)
        if not layout.has_mins:
            return scales, None
        offsets_t = _lazy(
            graph,
            f"{linear}.offsets_t",
            ir.DataType.FLOAT,
            (n_blocks, n),
            lambda: np.ascontiguousarray(get().offsets.T),
        )
        return scales, offsets_t
    scales16 = _lazy(
        graph, f"{linear}.scales_fp16", ir.DataType.FLOAT16, shape, lambda: get().scales.astype(np.float16)
    )
    scales = _op(weight_nodes, "Cast", [scales16], f"{linear}.scales", to=ir.DataType.FLOAT)
    if not layout.has_mins:
        return scales, None
    mins16 = _lazy(graph, f"{linear}.mins_fp16", ir.DataType.FLOAT16, shape, lambda: get().mins.astype(np.float16))
    mins = _op(weight_nodes, "Cast", [mins16], f"{linear}.mins", to=ir.DataType.FLOAT)
    shift = _const(graph, f"source.min_shift_{layout.min_shift}", np.float32(layout.min_shift))
    shifted = _op(weight_nodes, "Mul", [scales, shift], f"{linear}.shifted_scales")
    offsets = _op(weight_nodes, "Add", [mins, shifted], f"{linear}.offsets")
    return scales, _op(weight_nodes, "Transpose", [offsets], f"{linear}.offsets_t", perm=[1, 0])


def _split_back(graph: ir.Graph, nodes: list[ir.Node], final: ir.Node, linear: str, sizes: list[int]) -> None:
    """``final`` computes the stacked outputs of ``nodes`` (..., sum of sizes): a Split hands each its own."""
    graph.insert_before(nodes[0], final)
    final.outputs[0].name = final.outputs[0].name or f"{linear}.out"
    split_sizes = _const(graph, f"{linear}.split", np.array(sizes, np.int64))
    split = ir.Node("", "Split", [final.outputs[0], split_sizes], [ir.AttrInt64("axis", -1)], num_outputs=len(nodes))
    split.name = f"{linear}.Split"
    graph.insert_before(nodes[0], split)
    for node, out in zip(nodes, split.outputs, strict=True):
        old = node.outputs[0]
        out.shape, out.type, name = old.shape, old.type, old.name
        old.replace_all_uses_with(out, replace_graph_outputs=old in graph.outputs)
        graph.remove(node, safe=True)
        old.name = None
        out.name = name


def _group_name(linears: list[str]) -> str:
    """``...self_attn.q_proj`` + ``k_proj`` + ``v_proj`` -> ``...self_attn.qkv_proj``; ``...mlp.gate_proj`` +
    ``up_proj`` -> ``...mlp.gate_up_proj`` (FuseParallelMatMulNBitsPass's names)."""
    prefixes = {name.rsplit(".", 1)[0] for name in linears}
    leaves = [name.rsplit(".", 1)[-1].removesuffix("_proj") for name in linears]
    if len(prefixes) == 1:
        joined = "".join(leaves) if all(len(leaf) == 1 for leaf in leaves) else "_".join(leaves)
        return f"{prefixes.pop()}.{joined}_proj"
    return "fused." + "+".join(linears)


def _is_embedding_gather(node: ir.Node) -> bool:
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
        return False
    table = source_initializer(node.inputs[0])
    return table is not None and table.name == EMBEDDING


def _lazy(graph: ir.Graph, name: str, dtype: ir.DataType, shape, fn) -> ir.Value:
    def load() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(fn()), name=name)

    return add_initializer(graph, name, ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name))


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    return add_initializer(graph, name, ir.tensor(array, name=name))


def _op(nodes: list[ir.Node], op_type: str, inputs, name: str, *, domain: str = "", **attributes) -> ir.Value:
    """Append ``op_type(inputs)`` to ``nodes``; its single output is named ``name``."""
    attrs = [ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, int(v)) for k, v in attributes.items()]
    node = ir.Node(domain, op_type, inputs, attributes=attrs, name=name, num_outputs=1)
    node.outputs[0].name = name
    nodes.append(node)
    return node.outputs[0]
