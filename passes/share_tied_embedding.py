"""One tensor for a tied head and the token embedding.

    Gather(E, ids) ... MatMulNBits(x, B, scales, zp)
        -> GatherBlockQuantized(R, ids, scales, zp) [-> Slice] ... MatMulNBits(x, Reshape(R, B's shape), scales, zp)
    Gather(E, ids) ... MatMul(x, Eᵀ)
        -> Gather(E, ids) ... MatMul(x, Transpose(E))

The builder gives a tied head its own transposed copy of the table, so every linear is
``MatMul(x, W)`` and the weight passes treat the head like any other; this pass, run after them,
takes the copy away again. Quantized, the head's packed codes, scales and zero points become the
embedding's too: onnxruntime's GatherBlockQuantized reads uint8 data with MatMulNBits' conventions
(codes low nibble first, zero points packed the same way along a row's blocks, 2^(bits-1) when
absent), only as rows ``R`` of ``(vocab, n_blocks * blob)`` where MatMulNBits takes ``(vocab,
n_blocks, blob)``. The same bytes in the same order, so the initializer is stored once, as rows, and
the head reads a Reshape of it. That way round because onnxruntime folds a Reshape of an initializer
into a new one at load: folded for the head, the copy is what MatMulNBits prepacks and then frees;
folded for the lookup, it stayed beside the head's (+30 MB resident for SmolLM2's 8-bit head).
Rows are padded to whole blocks, so when the hidden size is not a multiple of the block a Slice
drops the padding from the gathered rows. In float the head multiplies by ``Transpose(E)``, which
onnxruntime folds at load: decoding runs the same MatMul as before (``Gemm(transB=1)`` decoded as fast
but prefilled slower in a head-only test).

Measured on SmolLM2-135M-Instruct (2 cores shared with other work, so absolute times are inflated;
decode steps of the two artifacts interleaved in one process, median of 88 each, same greedy tokens):
fp32 TPOT 245 -> 240 ms, file 653.6 -> 540.3 MB; w4a16-g32-asym TPOT 137.8 -> 137.8 ms, file 133.6 ->
103.1 MB, peak RSS after a 32-token prefill and 8 steps 276 -> 276 MB.

The rule when the recipe gives the two different schemes: the shared tensor has the head's scheme
(the head is read in full every token and decides the logits; the embedding reads one row). A
float head keeps the table in float: smaller than a float head beside a quantized table, and exact.
A head in the ``qdq`` format (DequantizeLinear of ``(hidden, vocab)`` codes) has no row layout a
gather can read, so it is left unshared (``modified`` False, logged).

Precondition, the caller's to vouch for: the head is tied (``ModelSpec.tie_word_embeddings``),
i.e. the head's weight is the embedding table transposed. The head is the node producing the
``logits`` output.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from quantlab.passes.graph_utils import add_constant, add_initializer, gather_block_quantized, replace_node
from quantlab.passes.quantize_embedding import EMBEDDING, source_initializer
from quantlab.quant.scheme import QuantScheme

logger = logging.getLogger(__name__)

LOGITS = "logits"
RULE = "the shared tensor has the head's scheme (recipe lm_head); the recipe's embedding scheme does not apply"


class ShareTiedEmbeddingPass(ir.passes.InPlacePass):
    """Gather(E) + head(x, copy of Eᵀ) -> one tensor read by both (GatherBlockQuantized + MatMulNBits, or
    Gather + MatMul(x, Transpose(E)))."""

    def __init__(self, head_scheme: QuantScheme | None = None, requested_embedding: QuantScheme | None = None):
        super().__init__()
        self.head_scheme = head_scheme  # what QuantizeWeightsPass gave the head; checked against the graph
        self.requested_embedding = requested_embedding  # for the manifest only: the scheme that gives way

    def config(self) -> dict:
        return {
            "scheme": str(self.head_scheme) if self.head_scheme else "float",
            "embedding_requested": str(self.requested_embedding) if self.requested_embedding else "none",
            "rule": RULE,
        }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        gather = _embedding_gather(graph)
        head = next((v.producer() for v in graph.outputs if v.name == LOGITS), None)
        if gather is None or head is None:
            return ir.passes.PassResult(model, False)
        table = source_initializer(gather.inputs[0])
        vocab, hidden = table.shape
        if head.op_type == "MatMulNBits" and head.domain == "com.microsoft":
            self._share_quantized(graph, gather, head, vocab, hidden)
            _remove_unused(graph, table)
            return ir.passes.PassResult(model, True)
        copy = (
            source_initializer(head.inputs[1]) if head.op_type == "MatMul" and head.domain in ("", "ai.onnx") else None
        )
        if copy is None:
            logger.info("tied head left unshared: %s has no row layout the embedding can gather", head.op_type)
            return ir.passes.PassResult(model, False)
        if tuple(copy.shape) != (hidden, vocab):
            raise ValueError(f"head weight {copy.name} is {tuple(copy.shape)}, a tied head is {(hidden, vocab)}")
        _share_float(graph, gather, head)
        _remove_unused(graph, copy)
        return ir.passes.PassResult(model, True)

    def _share_quantized(self, graph: ir.Graph, gather: ir.Node, head: ir.Node, vocab: int, hidden: int) -> None:
        attrs = {a.name: a.value for a in head.attributes.values()}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        if (k, n) != (hidden, vocab):
            raise ValueError(f"head MatMulNBits is K={k} N={n}, a tied head is K={hidden} N={vocab}")
        if self.head_scheme is not None and self.head_scheme.bits != bits:
            raise ValueError(f"head MatMulNBits has {bits} bits, its scheme {self.head_scheme} says otherwise")
        blocks, scales = head.inputs[1], head.inputs[2]
        zero_points = head.inputs[3] if len(head.inputs) > 3 else None
        n_blocks, blob = blocks.shape[1], blocks.shape[2]  # MatMulNBits' (vocab, n_blocks, blob)
        # Stored as the lookup's rows (vocab, n_blocks * blob), the same bytes in the same order; the head
        # reads a Reshape of them, which onnxruntime folds into the weight MatMulNBits prepacks (and
        # frees), where folding a Reshape for the lookup would keep a second table in memory.
        rows = _as_rows(graph, blocks, (vocab, n_blocks * blob))
        shape = add_constant(graph, f"{rows.name}.blocks_shape", np.array([vocab, n_blocks, blob], dtype=np.int64))
        reshape = ir.Node("", "Reshape", [rows, shape], name=f"{rows.name}.as_blocks")
        reshape.outputs[0].name = f"{rows.name}.blocks"
        graph.insert_before(head, reshape)
        head.replace_input_with(1, reshape.outputs[0])
        lookup = gather_block_quantized(rows, gather.inputs[1], scales, zero_points, block=block, bits=bits)
        if n_blocks * block == hidden:
            replace_node(graph, gather, lookup)
            return
        lookup.outputs[0].name = "model.embed_tokens.padded"  # (batch, seq, n_blocks * block)
        starts, ends, axes = (
            add_constant(graph, f"model.embed_tokens.slice_{key}", np.array([value], dtype=np.int64))
            for key, value in (("starts", 0), ("ends", hidden), ("axes", -1))
        )
        graph.insert_before(gather, lookup)
        trim = ir.Node("", "Slice", [lookup.outputs[0], starts, ends, axes], name="model.embed_tokens.Slice")
        replace_node(graph, gather, trim)  # (batch, seq, hidden)


def _as_rows(graph: ir.Graph, blocks: ir.Value, shape: tuple[int, int]) -> ir.Value:
    """Replace the (vocab, n_blocks, blob) initializer ``blocks`` with the same bytes as ``shape``, same name."""
    source = blocks.const_value
    name = blocks.name

    def load() -> ir.Tensor:
        return ir.Tensor(np.asarray(source.numpy()).reshape(shape), name=name)

    del graph.initializers[name]
    blocks.name = f"{name}.replaced"
    return add_initializer(graph, name, ir.LazyTensor(load, dtype=ir.DataType.UINT8, shape=ir.Shape(shape), name=name))


def _share_float(graph: ir.Graph, gather: ir.Node, head: ir.Node) -> None:
    """MatMul(x, Eᵀ copy) -> MatMul(x, Transpose(E)), E being what the lookup gathers from (fp32 or its Cast)."""
    transpose = ir.Node("", "Transpose", [gather.inputs[0]], [ir.AttrInt64s("perm", [1, 0])], name="lm_head.Transpose")
    transpose.outputs[0].name = "lm_head.weight_shared"  # (hidden, vocab), folded by onnxruntime at load
    graph.insert_before(head, transpose)
    head.replace_input_with(1, transpose.outputs[0])


def _embedding_gather(graph: ir.Graph) -> ir.Node | None:
    for node in graph:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx"):
            table = source_initializer(node.inputs[0])
            if table is not None and table.name == EMBEDDING:
                return node
    return None


def _remove_unused(graph: ir.Graph, *values: ir.Value) -> None:
    """Drop initializers nothing reads any more, with the Cast of fp16 storage that read them."""
    for value in values:
        for use in list(value.uses()):
            node = use.node
            if node.op_type == "Cast" and not node.outputs[0].uses() and node.outputs[0] not in graph.outputs:
                graph.remove(node, safe=True)
        if not value.uses() and value.name in graph.initializers:
            del graph.initializers[value.name]
