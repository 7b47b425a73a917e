"""Weight-only quantization of the graph's linears.

    MatMul(x, W) -> com.microsoft.MatMulNBits(x, B, scales, zero_points)          format "matmulnbits"
    MatMul(x, W) -> MatMul(x, DequantizeLinear(Wq, scale, zero_point, axis=0, block_size))   format "qdq"

Both carry the same integers and scales, so they compute the same product (a test holds them to
it); "qdq" uses standard ONNX ops only (opset 21 blocked quantization, uint4/uint8 storage), for
runtimes without onnxruntime's contrib ops.

The integers come either from ``precomputed`` (GPTQ, AWQ: calibrated before the pass, passed in as
values) or from round-to-nearest over the weight the graph already holds. Either way each packed
tensor is an ``onnx_ir.LazyTensor``: quantization runs when the emitter writes it, one linear at a
time, so peak memory stays about one weight.
"""

from __future__ import annotations

import collections
import logging
from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from quantlab.passes.graph_utils import OUT_IN_SOURCE, add_initializer, replace_node
from quantlab.quant.packing import matmul_nbits_attributes, pack_matmul_nbits
from quantlab.quant.rtn import QuantizedWeight, rtn_quantize
from quantlab.quant.scheme import PER_CHANNEL, QuantScheme

logger = logging.getLogger(__name__)

FORMATS = ("matmulnbits", "qdq")


def linear_name_of(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return weight_name.removesuffix(".weight")


def quantizable_linears(model: ir.Model) -> dict[str, ir.Node]:
    """Linear name -> its MatMul node, for every MatMul whose right operand is a weight initializer."""
    found = {}
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[1]
        if w is not None and w.is_initializer() and w.name.endswith(".weight") and w.const_value is not None:
            found[linear_name_of(w.name)] = node
    return found


class OnePerLinear:
    """Quantize a linear once even though three lazy tensors (B, scales, zero points) need it."""

    def __init__(self, fn: Callable[[], QuantizedWeight]):
        self.fn = fn
        self.packed: tuple | None = None
        self.uses = 0

    def get(self, expected_uses: int):
        if self.packed is None:
            self.packed = self.fn()
        result = self.packed
        self.uses += 1
        if self.uses >= expected_uses:  # every tensor of this linear written: free it
            self.packed = None
            self.uses = 0
        return result


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """MatMul(x, W) -> MatMulNBits(x, B, scales, zp) (or DequantizeLinear -> MatMul), per linear scheme.

    ``schemes`` maps linear names (``model.layers.3.self_attn.q_proj``, ``lm_head``) to their scheme;
    linears not in it stay as they are. ``precomputed`` holds calibrated integers for some of them.
    """

    def __init__(
        self,
        schemes: Mapping[str, QuantScheme],
        *,
        precomputed: Mapping[str, QuantizedWeight] | None = None,
        format: str = "matmulnbits",
        accuracy_level: int = 4,
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.schemes = dict(schemes)
        self.precomputed = precomputed if precomputed is not None else {}  # looked up, never copied
        self.format = format
        self.accuracy_level = accuracy_level

    def config(self) -> dict:
        """For the manifest: which scheme how many linears got, and how many were calibrated."""
        return {
            "format": self.format,
            "accuracy_level": self.accuracy_level,
            "schemes": dict(sorted(Counter(str(s) for s in self.schemes.values()).items())),
            "precomputed": len(self.precomputed),
        }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for linear, node in quantizable_linears(model).items():
            scheme = self.schemes.get(linear)
            if scheme is None:
                continue
            if not scheme.weight_only:
                raise ValueError(f"{linear}: {scheme} is not a weight-only scheme")
            w_value = node.inputs[1]
            k, n = w_value.shape  # stored (in, out) for MatMul(x, W)
            if linear in self.precomputed:
                shape = _precomputed_shape(self.precomputed, linear)
                if shape != (n, k):
                    raise ValueError(f"{linear}: precomputed weight is {shape}, graph needs {(n, k)}")
                source = _lookup(self.precomputed, linear)
            else:
                source = _rtn_of(w_value.const_value, scheme)
            if self.format == "matmulnbits":
                self._to_matmul_nbits(model, node, linear, scheme, source, k, n)
            else:
                self._to_qdq(model, node, linear, scheme, source, k, n)
            modified = True
        if modified and self.format == "matmulnbits":
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified)

    def _to_matmul_nbits(self, model, node, linear, scheme, source, k, n) -> None:
        probe = QuantizedWeight(
            np.zeros((1, k), np.uint8),
            np.zeros((1, _groups(k, scheme)), np.float32),
            None,
            scheme.bits,
            scheme.group_size,
        )
        attrs = matmul_nbits_attributes(probe)
        attrs["N"] = n
        block = attrs["block_size"]
        n_blocks = -(-k // block)
        blob = block * scheme.bits // 8
        once = OnePerLinear(lambda: pack_matmul_nbits(source()))
        uses = 2 if scheme.symmetric else 3
        graph = model.graph
        b = _initializer(graph, f"{linear}.qweight", ir.DataType.UINT8, (n, n_blocks, blob), lambda: once.get(uses)[0])
        scales = _initializer(graph, f"{linear}.scales", ir.DataType.FLOAT, (n, n_blocks), lambda: once.get(uses)[1])
        inputs = [node.inputs[0], b, scales]
        if not scheme.symmetric:
            zp_bytes = -(-n_blocks * scheme.bits // 8)
            inputs.append(
                _initializer(graph, f"{linear}.qzeros", ir.DataType.UINT8, (n, zp_bytes), lambda: once.get(uses)[2])
            )
        new = ir.Node(
            "com.microsoft",
            "MatMulNBits",
            inputs,
            attributes=[
                ir.AttrInt64(key, value) for key, value in {**attrs, "accuracy_level": self.accuracy_level}.items()
            ],
            name=f"{linear}.MatMulNBits",
            num_outputs=1,
        )
        replace_node(graph, node, new)

    def _to_qdq(self, model, node, linear, scheme, source, k, n) -> None:
        group = k if scheme.group_size == PER_CHANNEL else scheme.group_size
        n_groups = -(-k // group)
        once = OnePerLinear(source)
        uses = 2 if scheme.symmetric else 3
        code_type = ir.DataType.UINT4 if scheme.bits == 4 else ir.DataType.UINT8
        graph = model.graph
        # (K, N) codes and (n_groups, N) scales: blocked along axis 0, the input dimension of MatMul(x, W)
        codes = _initializer(
            graph, f"{linear}.qweight", code_type, (k, n), lambda: np.ascontiguousarray(once.get(uses).q.T)
        )
        scales = _initializer(
            graph,
            f"{linear}.scales",
            ir.DataType.FLOAT,
            (n_groups, n),
            lambda: np.ascontiguousarray(once.get(uses).scales.T),
        )
        zp_fn = (
            (lambda: np.ascontiguousarray(once.get(uses).zero_points.T))
            if not scheme.symmetric
            else (lambda: np.full((n_groups, n), 1 << (scheme.bits - 1), dtype=np.uint8))
        )
        zps = _initializer(graph, f"{linear}.qzeros", code_type, (n_groups, n), zp_fn)
        dq = ir.Node(
            "",
            "DequantizeLinear",
            [codes, scales, zps],
            attributes=[ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", group)],
            name=f"{linear}.DequantizeLinear",
            num_outputs=1,
        )
        dq.outputs[0].name = f"{linear}.weight_dq"
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])


def _lookup(precomputed: Mapping[str, QuantizedWeight], linear: str) -> Callable[[], QuantizedWeight]:
    """The precomputed integers, fetched when the writer asks: calibrated codes are held bit-packed and
    unpack to a byte per code, so fetching them all up front held 1 GB more for a 1B model."""
    return lambda: precomputed[linear]


def _precomputed_shape(precomputed: Mapping[str, QuantizedWeight], linear: str) -> tuple[int, int]:
    """(N, K) of a precomputed weight without unpacking it (PackedWeights knows it from the packed codes)."""
    maps = precomputed.maps if isinstance(precomputed, collections.ChainMap) else [precomputed]
    for m in maps:
        if linear in m:
            return tuple(m.shape(linear)) if hasattr(m, "shape") and callable(m.shape) else tuple(m[linear].shape)
    raise KeyError(linear)


# Rows quantized at a time: RTN is row-independent, and its float temporaries for a whole
# vocabulary-sized head (128256 x 2048) would be several GB.
RTN_CHUNK_ELEMENTS = 1 << 24


def _rtn_of(tensor: ir.TensorProtocol, scheme: QuantScheme) -> Callable[[], QuantizedWeight]:
    """Round-to-nearest of a graph weight stored (in, out), computed when first asked for."""

    def quantize() -> QuantizedWeight:
        # (out, in), as the maths expects: the builder's source when it left one (no transposed
        # copy beside the original: 1 GB for a 128k-vocabulary head), else a view of the graph tensor.
        source = getattr(tensor, "meta", {}).get(OUT_IN_SOURCE)
        weight = np.asarray(source() if source else np.asarray(tensor.numpy(), dtype=np.float32).T, dtype=np.float32)
        rows = max(1, RTN_CHUNK_ELEMENTS // weight.shape[1])
        parts = [
            rtn_quantize(np.ascontiguousarray(weight[r : r + rows]), scheme.bits, scheme.group_size, scheme.symmetric)
            for r in range(0, weight.shape[0], rows)
        ]
        if len(parts) == 1:
            return parts[0]
        zero_points = None if scheme.symmetric else np.concatenate([p.zero_points for p in parts])
        return QuantizedWeight(
            np.concatenate([p.q for p in parts]),
            np.concatenate([p.scales for p in parts]),
            zero_points,
            scheme.bits,
            scheme.group_size,
        )

    return quantize


def _groups(k: int, scheme: QuantScheme) -> int:
    return 1 if scheme.group_size == PER_CHANNEL else -(-k // scheme.group_size)


def _initializer(graph: ir.Graph, name: str, dtype: ir.DataType, shape, fn) -> ir.Value:
    def load() -> ir.Tensor:  # UINT4 needs its dtype spelled out; numpy holds the codes as uint8
        return ir.Tensor(fn(), dtype=dtype if dtype == ir.DataType.UINT4 else None, name=name)

    return add_initializer(graph, name, ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name))
