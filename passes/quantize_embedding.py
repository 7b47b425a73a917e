"""Quantize the token embedding table.

    Gather(E, ids) -> com.microsoft.GatherBlockQuantized(Eq, ids, scales, zero_points)

Decoding reads one row of the table per token, so this is about size, not speed: a vocabulary of
128k x 2048 is a gigabyte in fp32 and a quarter of that in 8 bits. Rows are quantized in blocks
along the hidden dimension with round-to-nearest, the same integers MatMulNBits would hold.

Layout (onnxruntime's GatherBlockQuantized, gather_axis 0, quantize_axis 1): data uint8
(vocab, hidden * bits / 8), codes packed low nibble first for 4 bits, with no padding at the end
of a row; scales (vocab, ceil(hidden / block)); zero points (vocab, ceil(n_blocks * bits / 8))
packed the same way, absent for symmetric (implicit 2^(bits-1)).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from quantlab.passes.graph_utils import add_initializer, gather_block_quantized, replace_node
from quantlab.passes.quantize_weights import OnePerLinear
from quantlab.quant.rtn import QuantizedWeight, rtn_quantize
from quantlab.quant.scheme import PER_CHANNEL, QuantScheme

logger = logging.getLogger(__name__)

EMBEDDING = "model.embed_tokens.weight"
# Rows quantized at a time, to bound the float temporaries for a large vocabulary.
CHUNK_ELEMENTS = 1 << 24


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) codes -> (rows, cols * bits / 8) uint8; 4-bit: byte j = c[2j] | c[2j+1] << 4."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.uint8)], axis=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def quantize_rows(table: np.ndarray, scheme: QuantScheme) -> QuantizedWeight:
    rows = max(1, CHUNK_ELEMENTS // table.shape[1])
    parts = [
        rtn_quantize(np.ascontiguousarray(table[r : r + rows]), scheme.bits, scheme.group_size, scheme.symmetric)
        for r in range(0, table.shape[0], rows)
    ]
    zp = None if scheme.symmetric else np.concatenate([p.zero_points for p in parts])
    return QuantizedWeight(
        np.concatenate([p.q for p in parts]),
        np.concatenate([p.scales for p in parts]),
        zp,
        scheme.bits,
        scheme.group_size,
    )


class QuantizeEmbeddingPass(ir.passes.InPlacePass):
    """Gather(E, ids) -> GatherBlockQuantized(Eq, ids, scales, zp) for the token embedding table."""

    def __init__(self, scheme: QuantScheme):
        super().__init__()
        if not scheme.weight_only or scheme.bits not in (4, 8):
            raise ValueError(f"embedding scheme must be 4- or 8-bit weight-only, got {scheme}")
        self.scheme = scheme

    def config(self) -> dict:
        return {"scheme": str(self.scheme)}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for node in graph:
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            table = source_initializer(node.inputs[0])
            if table is None or table.name != EMBEDDING:
                continue
            if len(node.inputs[0].uses()) > 1:  # a tied head reads it too: a quantized copy would be a second table
                logger.info("%s is shared with the head: left in float, as the head is", EMBEDDING)
                return ir.passes.PassResult(model, False)
            vocab, hidden = table.shape
            self._replace(graph, node, table, vocab, hidden)
            model.opset_imports.setdefault("com.microsoft", 1)
            return ir.passes.PassResult(model, True)
        return ir.passes.PassResult(model, False)

    def _replace(self, graph: ir.Graph, node: ir.Node, table: ir.Value, vocab: int, hidden: int) -> None:
        s = self.scheme
        block = hidden if s.group_size == PER_CHANNEL else s.group_size
        if block < 16 or block & (block - 1):
            raise ValueError(f"GatherBlockQuantized needs a power-of-two block >= 16, got {block}")
        n_blocks = -(-hidden // block)
        source = table.const_value
        once = OnePerLinear(lambda: quantize_rows(np.asarray(source.numpy(), dtype=np.float32), s))
        uses = 2 if s.symmetric else 3
        packers = {
            "data": lambda w: pack_rows(w.q, s.bits),
            "scales": lambda w: np.ascontiguousarray(w.scales),
            "zero_points": lambda w: pack_rows(w.zero_points, s.bits),
        }

        def lazy(key: str, dtype: ir.DataType, shape) -> ir.Value:
            name = f"model.embed_tokens.{key}"

            def load() -> ir.Tensor:
                return ir.Tensor(packers[key](once.get(uses)), name=name)

            return add_initializer(graph, name, ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name))

        data = lazy("data", ir.DataType.UINT8, (vocab, -(-hidden * s.bits // 8)))
        scales = lazy("scales", ir.DataType.FLOAT, (vocab, n_blocks))
        zero_points = (
            None if s.symmetric else lazy("zero_points", ir.DataType.UINT8, (vocab, -(-n_blocks * s.bits // 8)))
        )
        new = gather_block_quantized(data, node.inputs[1], scales, zero_points, block=block, bits=s.bits)
        replace_node(graph, node, new)


def source_initializer(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind a Gather's data: itself, or under the Cast of fp16 weight storage."""
    if value is None:
        return None
    if value.is_initializer() and value.const_value is not None:
        return value
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast":
        inner = producer.inputs[0]
        if inner is not None and inner.is_initializer() and inner.const_value is not None:
            return inner
    return None
