"""Weight-only quantization of the graph's linears.

    MatMul(x, W) -> com.microsoft.MatMulNBits(x, B, scales, zero_points)          format "matmulnbits"
    MatMul(x, W) -> MatMul(x, DequantizeLinear(Wq, scale, zero_point, axis=0, block_size))   format "qdq"

Both carry the same integers and scales, so they compute the same product (a test holds them to
it); "qdq" uses standard ONNX ops only (opset 21 blocked quantization, uint4/uint8 storage), for
runtimes without onnxruntime's contrib ops.

A sparse MLP's experts are linears too (``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj``). In the
decomposed graph they are ordinary MatMuls and take the rewrites above; the router is never quantized.
In the op form (com.microsoft.MoE, which carries its experts' names, see quantlab.graph_builder.mlp_ops)::

    MoE(x, logits, fc1, -, fc2) -> com.microsoft.QMoE(x, logits, fc1 codes, scales, -, fc2 codes, scales,
                                                      -, -, -, -, fc1 zero points, fc2 zero points)

when every expert of the node has one scheme QMoE computes exactly (QMOE_SCHEMES). Tried on onnxruntime
1.32's CPU kernel against the product of the dequantized weights: 4-bit codes, symmetric or not, per
channel or in blocks of 16..256, agree within 1e-6 of the output's scale, and so do 8-bit codes per
channel; 8-bit codes in blocks are off by 1-3% of it wherever K is a multiple of the block (the MLAS QNBit
path; right only where it falls back to dequantize + SGEMM), and there are no 2-bit codes. Any other scheme
keeps the MoE op and feeds it ``DequantizeLinear`` of the codes (standard opset-21 blocked quantization:
the file holds the integers; the weights are dequantized in every run, which onnxruntime does not fold at
load), and experts with different schemes in one node, or some left in float, are stored as the float
values of their codes (exact, not smaller). tests/calib/test_moe_calibration.py holds every form to the
decomposed graph's MatMulNBits on the same codes.

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

from quantlab.graph_builder.mlp_ops import MOE_EXPERTS, MoeExperts
from quantlab.passes.graph_utils import OUT_IN_SOURCE, add_initializer, replace_node
from quantlab.quant.packed import pack_codes
from quantlab.quant.packing import matmul_nbits_attributes, pack_matmul_nbits
from quantlab.quant.rtn import QuantizedWeight, dequantize, rtn_quantize
from quantlab.quant.scheme import PER_CHANNEL, QuantScheme, parse_scheme

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


def moe_nodes(model: ir.Model) -> list[tuple[ir.Node, MoeExperts]]:
    """Every com.microsoft.MoE node the builder made, with the expert linears it holds."""
    return [
        (node, node.meta[MOE_EXPERTS])
        for node in model.graph
        if node.op_type == "MoE" and node.domain == "com.microsoft" and MOE_EXPERTS in node.meta
    ]


def moe_expert_linears(model: ir.Model) -> list[str]:
    """The names of the expert linears inside MoE nodes (gate, up, down of each expert), in graph order."""
    return [
        name
        for _, experts in moe_nodes(model)
        for gate_up, down in zip(experts.fc1, experts.fc2, strict=True)
        for name in (*gate_up, down)
    ]


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

    ``schemes`` maps linear names (``model.layers.3.self_attn.q_proj``, ``lm_head``, the experts of a MoE
    node: ``model.layers.0.mlp.experts.5.up_proj``) to their scheme; linears not in it stay as they are.
    ``precomputed`` holds calibrated integers for some of them. A MoE node whose experts have schemes
    becomes QMoE (or MoE over their dequantized codes): see the module docstring.
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
        for node, experts in moe_nodes(model):
            modified = self._quantize_experts(model.graph, node, experts) or modified
        return ir.passes.PassResult(model, modified)

    def _expert_codes(self, linear: str, experts: MoeExperts) -> Callable[[], QuantizedWeight]:
        if linear in self.precomputed:
            return _lookup(self.precomputed, linear)
        scheme = self.schemes[linear]
        return lambda: rtn_quantize(experts.load(linear), scheme.bits, scheme.group_size, scheme.symmetric)

    def _quantize_experts(self, graph: ir.Graph, node: ir.Node, experts: MoeExperts) -> bool:
        """MoE -> QMoE, or MoE over DequantizeLinear (or over dequantized floats): see the module docstring."""
        linears = [name for gate_up, down in zip(experts.fc1, experts.fc2, strict=True) for name in (*gate_up, down)]
        schemes = {self.schemes.get(name) for name in linears}
        if schemes == {None}:
            return False
        fc1_rows, hidden = _stacked_shape(node.inputs[2])[1:]
        for name in linears:
            scheme = self.schemes.get(name)
            if scheme is not None and not scheme.weight_only:
                raise ValueError(f"{name}: {scheme} is not a weight-only scheme")
            want = (hidden, fc1_rows // 2) if name.endswith("down_proj") else (fc1_rows // 2, hidden)
            shape = _precomputed_shape(self.precomputed, name) if name in self.precomputed else want
            if shape != want:
                raise ValueError(f"{name}: precomputed weight is {shape}, the MoE node needs {want}")
        if len(schemes) == 1 and _qmoe_runs(scheme := next(iter(schemes))):
            self._to_qmoe(graph, node, experts, scheme)
        elif len(schemes) == 1:
            logger.warning("%s: %s experts run as MoE over DequantizeLinear (QMoE cannot take it)", node.name, scheme)
            for slot, rows in ((2, experts.fc1), (4, experts.fc2)):
                node.replace_input_with(slot, self._dequantize_linear(graph, node, rows, experts, scheme, slot))
        else:
            logger.warning("%s: experts with mixed schemes are stored as the float values of their codes", node.name)
            for slot, rows in ((2, experts.fc1), (4, experts.fc2)):
                node.replace_input_with(slot, self._dequantized_floats(graph, node, rows, experts))
        return True

    def _stacked(self, rows, experts: MoeExperts) -> Callable[[], list[QuantizedWeight]]:
        """Per expert, the QuantizedWeight of its fc1 ((gate, up) rows interleaved) or fc2 slab."""

        def interleave(parts: list[QuantizedWeight]) -> QuantizedWeight:
            if len(parts) == 1:
                return parts[0]

            def rows_of(a, b):  # (F, X) x 2 -> (2F, X): row 2i from a, row 2i + 1 from b
                return np.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])

            gate, up = parts
            zero_points = None if gate.zero_points is None else rows_of(gate.zero_points, up.zero_points)
            return QuantizedWeight(
                rows_of(gate.q, up.q), rows_of(gate.scales, up.scales), zero_points, gate.bits, gate.group_size
            )

        names = [row if isinstance(row, tuple) else (row,) for row in rows]
        return lambda: [interleave([self._expert_codes(n, experts)() for n in slab]) for slab in names]

    def _to_qmoe(self, graph: ir.Graph, node: ir.Node, experts: MoeExperts, scheme: QuantScheme) -> None:
        fc1 = self._qmoe_inputs(graph, node, experts.fc1, experts, scheme, slot=2)
        fc2 = self._qmoe_inputs(graph, node, experts.fc2, experts, scheme, slot=4)
        inputs = [node.inputs[0], node.inputs[1], fc1[0], fc1[1], None, fc2[0], fc2[1]]
        if not scheme.symmetric:  # fc3's weights, scales and bias are absent
            inputs += [None, None, None, None, fc1[2], fc2[2]]
        attributes = list(node.attributes.values())
        attributes.append(ir.AttrInt64("expert_weight_bits", scheme.bits))
        if scheme.group_size != PER_CHANNEL:
            attributes.append(ir.AttrInt64("block_size", scheme.group_size))
        new = ir.Node("com.microsoft", "QMoE", inputs, attributes=attributes, name=node.name.replace(".MoE", ".QMoE"))
        replace_node(graph, node, new)

    def _qmoe_inputs(self, graph, node, rows, experts: MoeExperts, scheme: QuantScheme, slot: int) -> tuple:
        """QMoE's codes (E, N, K * bits / 8), scales (E, N) per channel or (E, N, groups), and zero points
        (E, N * bits / 8) per channel (packed along the rows) or (E, N, groups * bits / 8) (along each row's
        groups), for fc1 (slot 2) or fc2 (slot 4); codes and zero points packed low bits first."""
        once = OnePerLinear(self._stacked(rows, experts))
        uses = 2 if scheme.symmetric else 3
        n_experts, n, k = _stacked_shape(node.inputs[slot])
        per_channel = scheme.group_size == PER_CHANNEL
        groups = _groups(k, scheme)
        prefix = f"{node.name.removesuffix('.MoE')}.experts.fc{1 if slot == 2 else 2}"
        codes = _initializer(
            graph,
            f"{prefix}.qweight",
            ir.DataType.UINT8,
            (n_experts, n, -(-k * scheme.bits // 8)),
            lambda: np.stack([pack_codes(q.q, scheme.bits) for q in once.get(uses)]),
        )
        scales = _initializer(
            graph,
            f"{prefix}.scales",
            ir.DataType.FLOAT,
            (n_experts, n) if per_channel else (n_experts, n, groups),
            lambda: np.stack([q.scales[:, 0] if per_channel else q.scales for q in once.get(uses)]),
        )
        if scheme.symmetric:
            return codes, scales, None
        per_byte = 8 // scheme.bits
        zp_shape = (n_experts, -(-n // per_byte)) if per_channel else (n_experts, n, -(-groups // per_byte))

        def zero_points() -> np.ndarray:
            parts = [q.zero_points[:, 0][None] if per_channel else q.zero_points for q in once.get(uses)]
            return np.stack([pack_codes(z, scheme.bits) for z in parts]).reshape(zp_shape)

        return codes, scales, _initializer(graph, f"{prefix}.qzeros", ir.DataType.UINT8, zp_shape, zero_points)

    def _dequantize_linear(self, graph, node, rows, experts: MoeExperts, scheme: QuantScheme, slot: int) -> ir.Value:
        """DequantizeLinear(codes (E, N, K), scales (E, N, groups), zero points) along K: the float fc tensor."""
        n_experts, n, k = _stacked_shape(node.inputs[slot])
        group = k if scheme.group_size == PER_CHANNEL else scheme.group_size
        groups = -(-k // group)
        once = OnePerLinear(self._stacked(rows, experts))
        code_type = ir.DataType.UINT4 if scheme.bits <= 4 else ir.DataType.UINT8
        prefix = f"{node.name.removesuffix('.MoE')}.experts.fc{1 if slot == 2 else 2}"
        middle = 1 << (scheme.bits - 1)

        def zps() -> np.ndarray:
            parts = once.get(3)
            return np.stack(
                [np.full((n, groups), middle, np.uint8) if q.zero_points is None else q.zero_points for q in parts]
            )

        dq_inputs = [
            _initializer(
                graph, f"{prefix}.qweight", code_type, (n_experts, n, k), lambda: np.stack([q.q for q in once.get(3)])
            ),
            _initializer(
                graph,
                f"{prefix}.scales",
                ir.DataType.FLOAT,
                (n_experts, n, groups),
                lambda: np.stack([q.scales for q in once.get(3)]),
            ),
            _initializer(graph, f"{prefix}.qzeros", code_type, (n_experts, n, groups), zps),
        ]
        dq = ir.Node(
            "",
            "DequantizeLinear",
            dq_inputs,
            attributes=[ir.AttrInt64("axis", 2), ir.AttrInt64("block_size", group)],
            name=f"{prefix}.DequantizeLinear",
            num_outputs=1,
        )
        dq.outputs[0].name = f"{prefix}.weight_dq"
        graph.insert_before(node, dq)
        return dq.outputs[0]

    def _dequantized_floats(self, graph, node, rows, experts: MoeExperts) -> ir.Value:
        """The fc tensor (E, N, K) float32 holding each expert's dequantized codes (or float weight)."""
        shape = _stacked_shape(node.inputs[2 if rows is experts.fc1 else 4])
        prefix = f"{node.name.removesuffix('.MoE')}.experts.fc{1 if rows is experts.fc1 else 2}"

        def weight(name: str) -> np.ndarray:
            if name in self.precomputed or self.schemes.get(name) is not None:
                return dequantize(self._expert_codes(name, experts)())
            return np.asarray(experts.load(name), dtype=np.float32)

        def load() -> np.ndarray:
            slabs = []
            for row in rows:
                parts = [weight(n) for n in (row if isinstance(row, tuple) else (row,))]
                slabs.append(np.stack(parts, axis=1).reshape(-1, parts[0].shape[1]) if len(parts) == 2 else parts[0])
            return np.stack(slabs)

        return _initializer(graph, f"{prefix}.dequantized", ir.DataType.FLOAT, shape, load)

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


# The schemes onnxruntime 1.32's CPU QMoE computes exactly (see the module docstring): bits -> group sizes.
QMOE_SCHEMES = {4: (PER_CHANNEL, 16, 32, 64, 128, 256), 8: (PER_CHANNEL,)}
# A W8A8 (SmoothQuant) recipe's experts inside a com.microsoft.MoE node: QMoE reads their int8 codes as
# 8-bit weights per channel, symmetric (code + 128 around the implied zero point 128); its activations stay
# float, as it has no int8-activation mode. The decomposed graph runs them as DynamicQuantizeMatMul.
W8_PER_CHANNEL = parse_scheme("w8a16-pc-sym")


class Int8AsWeights(Mapping):
    """linear -> QuantizedWeight view of int8 per-channel codes (codes (N, K) int8, scales (N,)), made when
    asked for, for the experts of ``linears``."""

    def __init__(self, int8: Mapping[str, tuple[np.ndarray, np.ndarray]], linears):
        self.int8 = int8
        self.linears = {name: None for name in linears if name in int8}  # ordered, fast to look up

    def __getitem__(self, linear: str) -> QuantizedWeight:
        if linear not in self.linears:
            raise KeyError(linear)
        codes, scales = self.int8[linear]
        q = (codes.astype(np.int16) + 128).astype(np.uint8)
        return QuantizedWeight(q, np.asarray(scales, np.float32).reshape(-1, 1), None, 8, PER_CHANNEL)

    def __contains__(self, linear: object) -> bool:
        return linear in self.linears

    def __iter__(self):
        return iter(self.linears)

    def __len__(self) -> int:
        return len(self.linears)


def _qmoe_runs(scheme: QuantScheme | None) -> bool:
    return scheme is not None and scheme.group_size in QMOE_SCHEMES.get(scheme.bits, ())


def _stacked_shape(value: ir.Value) -> tuple[int, int, int]:
    """(experts, out, in) of an MoE fc input (through the fp16 weights' Cast, which keeps the shape)."""
    producer = value.producer()
    source = producer.inputs[0] if producer is not None and producer.op_type == "Cast" else value
    return tuple(source.shape)


def _groups(k: int, scheme: QuantScheme) -> int:
    return 1 if scheme.group_size == PER_CHANNEL else -(-k // scheme.group_size)


def _initializer(graph: ir.Graph, name: str, dtype: ir.DataType, shape, fn) -> ir.Value:
    def load() -> ir.Tensor:  # UINT4 needs its dtype spelled out; numpy holds the codes as uint8
        return ir.Tensor(fn(), dtype=dtype if dtype == ir.DataType.UINT4 else None, name=name)

    return add_initializer(graph, name, ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name))
