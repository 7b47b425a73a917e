"""The linears and the embedding table of an artifact's graph, read for quantlab's PyTorch runtime
(:mod:`quantlab.runtime.torch_decoder`): each linear in whatever form the artifact stores it (MatMulNBits
bytes as they are, a float or DequantizeLinear MatMul, DynamicQuantizeMatMul), and the quantized ones'
placement on huge pages, where a plain graph's separate projections become one linear each."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantlab import kernels

# A layer's linears in either form the artifact may hold: fused (passes/fuse_matmul_nbits.py) or not.
ATTN_FORMS = {"qkv": ("qkv_proj",), "separate": ("q_proj", "k_proj", "v_proj")}
MLP_FORMS = {"gate_up": ("gate_up_proj",), "separate": ("gate_proj", "up_proj")}


def const_array(value: ir.Value) -> np.ndarray:
    producer = value.producer()
    if value.const_value is None and producer is not None and producer.op_type == "Reshape":
        return const_array(producer.inputs[0]).reshape(
            const_array(producer.inputs[1])
        )  # a tied head's view of the shared rows
    return np.asarray(value.const_value.numpy())


def _unpack_rows(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """(rows, bytes) uint8 -> (rows, cols) codes; 4-bit low nibble first."""
    if bits == 8:
        return packed[:, :cols]
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return codes[:, :cols]


def _dequantize_rows(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block: int
) -> np.ndarray:
    """Row-blocked dequantization: (rows, cols) codes, (rows, n_blocks) scales -> (rows, cols) fp32."""
    rows, cols = codes.shape
    n_blocks = scales.shape[1]
    zp = (
        np.full((rows, n_blocks), 1 << (bits - 1), np.float32)
        if zero_points is None
        else _unpack_rows(zero_points, bits, n_blocks).astype(np.float32)
    )
    expand = np.repeat(np.arange(n_blocks), block)[:cols]
    return ((codes.astype(np.float32) - zp[:, expand]) * scales[:, expand]).astype(np.float32)


class Linear:
    """y = x W (+ b) for one linear, in whatever form the artifact stores it."""

    def __init__(self, node: ir.Node, torch, threads: int = 0):
        self.torch = torch
        self.threads = threads  # for our kernels; 0: every core
        self.kind = node.op_type
        if node.op_type == "MatMulNBits":
            attrs = {k: a.value for k, a in node.attributes.items()}
            self.K, self.N, self.bits = attrs["K"], attrs["N"], attrs["bits"]
            self.block, self.level = attrs["block_size"], attrs.get("accuracy_level", 0)
            self.B = torch.from_numpy(const_array(node.inputs[1]).copy())
            self.scales = torch.from_numpy(const_array(node.inputs[2]).astype(np.float32).reshape(self.N, -1).copy())
            zp = node.inputs[3] if len(node.inputs) > 3 else None
            self.zp = torch.from_numpy(const_array(zp).copy()) if zp is not None else None
        else:
            self.W = torch.from_numpy(np.array(weight_of(node), dtype=np.float32))  # (K, N) fp32, an owned copy

    def __call__(self, x):
        if self.kind == "MatMulNBits":
            return kernels.matmul_nbits(
                x,
                self.B,
                self.scales,
                self.zp,
                K=self.K,
                N=self.N,
                bits=self.bits,
                block_size=self.block,
                accuracy_level=self.level,
                threads=self.threads or None,
            )
        return x @ self.W


def weight_of(node: ir.Node) -> np.ndarray:
    """The (K, N) float weight of a MatMul / DynamicQuantizeMatMul, dequantized when stored as integers."""
    if node.op_type == "DynamicQuantizeMatMul":
        return (const_array(node.inputs[1]).astype(np.float32) * const_array(node.inputs[2])[None, :]).astype(
            np.float32
        )
    w = node.inputs[1]
    producer = w.producer()
    if producer is None:
        return np.ascontiguousarray(const_array(w), dtype=np.float32)
    if producer.op_type == "Cast":  # fp16 storage
        return np.ascontiguousarray(const_array(producer.inputs[0]), dtype=np.float32)
    if producer.op_type == "Transpose":  # a tied float head: the embedding table (under its fp16 Cast)
        table = producer.inputs[0]
        cast = table.producer()
        return np.ascontiguousarray(const_array(cast.inputs[0] if cast is not None else table).T, dtype=np.float32)
    if producer.op_type == "DequantizeLinear":  # qdq format: (K, N) codes, blocked along K
        codes, scales, zps = (const_array(v) for v in producer.inputs)
        block = producer.attributes["block_size"].value
        expand = np.repeat(np.arange(scales.shape[0]), block)[: codes.shape[0]]
        return ((codes.astype(np.float32) - zps.astype(np.float32)[expand]) * scales[expand]).astype(np.float32)
    raise ValueError(f"{node.name}: cannot read a weight produced by {producer.op_type}")


def linear_name(node: ir.Node) -> str | None:
    for suffix in (".MatMulNBits", ".MatMul", ".DynamicQuantizeMatMul"):
        if node.name and node.name.endswith(suffix):
            return node.name.removesuffix(suffix)
    if node.name == "logits":
        return "lm_head"
    return None


def embedding_table(node: ir.Node, hidden: int) -> np.ndarray:
    """The (vocab, hidden) fp32 embedding table of a Gather or GatherBlockQuantized."""
    if node.op_type == "Gather":
        table = node.inputs[0]
        producer = table.producer()
        return np.array(const_array(producer.inputs[0] if producer is not None else table), dtype=np.float32)  # a copy
    attrs = {k: a.value for k, a in node.attributes.items()}
    bits, block = attrs.get("bits", 4), attrs["block_size"]
    data, scales = const_array(node.inputs[0]), const_array(node.inputs[2]).astype(np.float32)
    zp = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    return _dequantize_rows(_unpack_rows(data, bits, hidden), scales, zp, bits, block)


def fusable_groups(linears: dict[str, Linear], num_layers: int) -> list[tuple[str, ...]]:
    """Each layer's separate q/k/v and gate/up projections (the plain graph keeps them apart) that one
    MatMulNBits call can run: same K, bits, block size and accuracy, zero points in all or none."""
    groups = []
    for i in range(num_layers):
        for prefix, form in ((f"model.layers.{i}.self_attn", ATTN_FORMS), (f"model.layers.{i}.mlp", MLP_FORMS)):
            names = tuple(f"{prefix}.{n}" for n in form["separate"])
            lins = [linears.get(n) for n in names]
            if any(lin is None or lin.kind != "MatMulNBits" for lin in lins):
                continue
            if len({(lin.K, lin.bits, lin.block, lin.level, lin.zp is None) for lin in lins}) == 1:
                groups.append(names)
    return groups


def place_weights(linears: dict[str, Linear], groups: list[tuple[str, ...]], torch) -> dict[tuple[str, ...], dict]:
    """Moves the quantized linears' tensors into one buffer on huge pages, in graph order (the order a decode
    step reads them): see :func:`quantlab.kernels.pack_weights` for the measured gain.

    Each group of ``groups`` (:func:`fusable_groups`) is placed as one linear, its tensors concatenated along N
    (q, k, v; gate, up) and each projection's tensors views of those, so that the native layer runs it as one
    call, as it runs the fused graph's qkv_proj / gate_up_proj: seven calls a layer became four (one
    activation quantization of the input instead of three and two; the 192-row k and v projections no longer
    split 12 tiles over the threads on their own). Returns group -> {"B", "scales"[, "zp"]} of the placed
    concatenations."""
    fields = ("B", "scales", "zp")
    grouped = {name for names in groups for name in names}
    first_of = {names[0]: names for names in groups}
    units: list[tuple[str, ...]] = []  # in graph order: a group where its first projection is
    for name, lin in linears.items():
        if lin.kind == "MatMulNBits" and name not in grouped:
            units.append((name,))
        elif name in first_of:
            units.append(first_of[name])
    arrays, slots = [], []
    for names in units:
        lins = [linears[n] for n in names]
        for f in fields:
            if getattr(lins[0], f) is None:
                continue
            parts = [getattr(lin, f).numpy().reshape(lin.N, -1) for lin in lins]
            arrays.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
            slots.append((names, f))
    fused: dict[tuple[str, ...], dict] = {}
    for (names, f), array in zip(slots, kernels.pack_weights(arrays), strict=True):
        if len(names) > 1:
            fused.setdefault(names, {})[f] = torch.from_numpy(array)
        row = 0
        for n in names:  # each linear's own tensor: its rows of the placed array, in its own shape
            lin = linears[n]
            setattr(lin, f, torch.from_numpy(array[row : row + lin.N].reshape(getattr(lin, f).shape)))
            row += lin.N
    return fused
