"""The decoder of an artifact folder run in PyTorch, with quantlab's own int4/int8 kernels.

`quantlab generate --backend torch` and `quantlab bench` use it beside onnxruntime: the same
artifact (the same packed MatMulNBits bytes, read from model.onnx.data without repacking), the same
interface as :class:`quantlab.runtime.generate.OrtDecoder`, but every quantized linear is
``torch.ops.quantlab.matmul_nbits`` (csrc/, AVX2/NEON C++ or CUDA).

The graph is read for its weights and for which op each linear became (MatMul, MatMulNBits,
DequantizeLinear -> MatMul, DynamicQuantizeMatMul); the computation follows the artifact's model
spec (manifest.json), the same maths as quantlab/graph_builder/decoder.py.

Threads: ``threads`` go to our kernels (their own persistent pool, one call per linear) and torch's
intra-op pool is set to one thread. Two pools on the same cores fight: OpenMP's workers spin after
each small torch op while ours wait to be scheduled, and on 2 cores that made SmolLM2-135M w4 decode
~1.7x slower (43 ms -> 25 ms per token when torch keeps one thread). What torch still computes
(norms, RoPE, attention over the cache) is small next to the linears at decode time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from quantlab.graph_builder.rope import rope_inv_freq
from quantlab.io.spec import ModelSpec


def _np(value: ir.Value) -> np.ndarray:
    producer = value.producer()
    if value.const_value is None and producer is not None and producer.op_type == "Reshape":
        return _np(producer.inputs[0]).reshape(_np(producer.inputs[1]))  # a tied head's view of the shared rows
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


class _Linear:
    """y = x W (+ b) for one linear, in whatever form the artifact stores it."""

    def __init__(self, node: ir.Node, torch, threads: int = 0):
        self.torch = torch
        self.threads = threads  # for our kernels; 0: every core
        self.kind = node.op_type
        if node.op_type == "MatMulNBits":
            import quantlab.kernels.torch_ops  # noqa: F401  (registers torch.ops.quantlab.matmul_nbits)

            attrs = {k: a.value for k, a in node.attributes.items()}
            self.K, self.N, self.bits = attrs["K"], attrs["N"], attrs["bits"]
            self.block, self.level = attrs["block_size"], attrs.get("accuracy_level", 0)
            self.B = torch.from_numpy(_np(node.inputs[1]).copy())
            self.scales = torch.from_numpy(_np(node.inputs[2]).astype(np.float32).reshape(self.N, -1).copy())
            zp = node.inputs[3] if len(node.inputs) > 3 else None
            self.zp = torch.from_numpy(_np(zp).copy()) if zp is not None else None
        else:
            self.W = torch.from_numpy(np.array(_weight_of(node), dtype=np.float32))  # (K, N) fp32, an owned copy

    def __call__(self, x):
        if self.kind == "MatMulNBits":
            return self.torch.ops.quantlab.matmul_nbits(
                x,
                self.B,
                self.scales,
                self.zp,
                K=self.K,
                N=self.N,
                bits=self.bits,
                block_size=self.block,
                accuracy_level=self.level,
                threads=self.threads,
            )
        return x @ self.W


def _weight_of(node: ir.Node) -> np.ndarray:
    """The (K, N) float weight of a MatMul / DynamicQuantizeMatMul, dequantized when stored as integers."""
    if node.op_type == "DynamicQuantizeMatMul":
        return (_np(node.inputs[1]).astype(np.float32) * _np(node.inputs[2])[None, :]).astype(np.float32)
    w = node.inputs[1]
    producer = w.producer()
    if producer is None:
        return np.ascontiguousarray(_np(w), dtype=np.float32)
    if producer.op_type == "Cast":  # fp16 storage
        return np.ascontiguousarray(_np(producer.inputs[0]), dtype=np.float32)
    if producer.op_type == "Transpose":  # a tied float head: the embedding table (under its fp16 Cast)
        table = producer.inputs[0]
        cast = table.producer()
        return np.ascontiguousarray(_np(cast.inputs[0] if cast is not None else table).T, dtype=np.float32)
    if producer.op_type == "DequantizeLinear":  # qdq format: (K, N) codes, blocked along K
        codes, scales, zps = (_np(v) for v in producer.inputs)
        block = producer.attributes["block_size"].value
        expand = np.repeat(np.arange(scales.shape[0]), block)[: codes.shape[0]]
        return ((codes.astype(np.float32) - zps.astype(np.float32)[expand]) * scales[expand]).astype(np.float32)
    raise ValueError(f"{node.name}: cannot read a weight produced by {producer.op_type}")


class TorchDecoder:
    """An artifact's decoder in PyTorch: ``forward(ids, cache) -> (logits, cache)`` like OrtDecoder."""

    def __init__(self, artifact_dir: str | os.PathLike, *, threads: int | None = None):
        import torch

        self.torch = torch
        torch.set_num_threads(1)  # the kernels take the threads (module docstring)
        kernel_threads = threads or 0
        self.dir = Path(artifact_dir)
        manifest = json.loads((self.dir / "manifest.json").read_text(encoding="utf-8"))
        self.spec = s = ModelSpec.from_dict(manifest["spec"])
        model = ir.load(self.dir / "model.onnx")
        self.linears: dict[str, _Linear] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        for node in model.graph:
            if node.op_type in ("MatMul", "MatMulNBits", "DynamicQuantizeMatMul"):
                name = _linear_name(node)
                if name is not None:
                    self.linears[name] = _Linear(node, torch, kernel_threads)
            elif node.op_type in ("Gather", "GatherBlockQuantized") and node.name.startswith("model.embed_tokens"):
                self.embed = torch.from_numpy(_weight_of_gather(node, s.hidden_size))
        for name, value in model.graph.initializers.items():
            if (name.endswith("norm.weight") or name.endswith(".bias")) and value.const_value is not None:
                self.vectors[name] = torch.from_numpy(np.asarray(value.const_value.numpy(), np.float32).copy())
        self.inv_freq = torch.from_numpy(rope_inv_freq(s.head_dim, s.rope_theta, s.rope_scaling))
        self.num_layers, self.kv_heads, self.head_dim = s.num_layers, s.num_kv_heads, s.head_dim
        self.past_key_names = [f"past_key_values.{i}.key" for i in range(s.num_layers)]
        self.past_value_names = [f"past_key_values.{i}.value" for i in range(s.num_layers)]

    def empty_cache(self, batch: int = 1) -> dict:
        shape = (batch, self.kv_heads, 0, self.head_dim)  # (batch, kv_heads, seq, head_dim)
        return {n: self.torch.zeros(shape) for n in self.past_key_names + self.past_value_names}

    def _norm(self, x, name):
        var = (x * x).mean(-1, keepdim=True)
        return x * self.torch.rsqrt(var + self.spec.rms_norm_eps) * self.vectors[name]

    def _rope(self, x, cos, sin):
        d = self.spec.head_dim
        if self.spec.rope_interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        if self.spec.rope_interleaved:
            return self.torch.stack([r1, r2], dim=-1).flatten(-2)
        return self.torch.cat([r1, r2], dim=-1)

    def _attention(self, h, i, cos, sin, allowed, past_k, past_v):
        s, torch = self.spec, self.torch
        p = f"model.layers.{i}.self_attn"
        b, t, _ = h.shape

        def proj(name, heads):
            y = self.linears[f"{p}.{name}"](h)
            if f"{p}.{name}.bias" in self.vectors:
                y = y + self.vectors[f"{p}.{name}.bias"]
            return y.view(b, t, heads, s.head_dim).transpose(1, 2)  # (batch, heads, seq, head_dim)

        if f"{p}.qkv_proj" in self.linears:  # one fused linear (passes/fuse_matmul_nbits.py): one call, then views
            sizes = [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim]
            parts = self.linears[f"{p}.qkv_proj"](h).split(sizes, dim=-1)
            q, k, v = (
                y.reshape(b, t, heads, s.head_dim).transpose(1, 2)
                for y, heads in zip(parts, (s.num_heads, s.num_kv_heads, s.num_kv_heads), strict=True)
            )
        else:
            q, k, v = proj("q_proj", s.num_heads), proj("k_proj", s.num_kv_heads), proj("v_proj", s.num_kv_heads)
        if s.qk_norm:
            q, k = self._norm(q, f"{p}.q_norm.weight"), self._norm(k, f"{p}.k_norm.weight")
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        # grouped-query attention without repeating the cache per query head (enable_gqa); ``allowed`` is an
        # additive mask (0 or float32 min) so that a padding row, which sees no key, stays finite
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        ctx = ctx.transpose(1, 2).reshape(b, t, -1)
        return self.linears[f"{p}.o_proj"](ctx), k, v

    def forward(self, input_ids, cache, *, attention_mask=None, position_ids=None):
        torch, s = self.torch, self.spec
        with torch.inference_mode():
            ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
            batch, seq = ids.shape
            past = next(iter(cache.values())).shape[2] if cache else 0
            total = past + seq
            mask = (
                torch.ones(batch, total, dtype=torch.bool)
                if attention_mask is None
                else torch.as_tensor(np.asarray(attention_mask)).bool()
            )
            pos = (
                torch.arange(past, total).expand(batch, seq)
                if position_ids is None
                else torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
            )
            freqs = pos[..., None].float() * self.inv_freq  # (batch, seq, head_dim / 2)
            cos, sin = torch.cos(freqs)[:, None], torch.sin(freqs)[:, None]
            causal = torch.arange(total)[None, :] <= torch.arange(past, total)[:, None]  # (seq, total)
            allowed = causal[None, None] & mask[:, None, None, :]  # (batch, 1, seq, total)
            allowed = torch.zeros(allowed.shape).masked_fill(~allowed, float(np.finfo(np.float32).min))
            x = self.embed[ids]
            new_cache = {}
            for i in range(s.num_layers):
                h = self._norm(x, f"model.layers.{i}.input_layernorm.weight")
                attn, k, v = self._attention(
                    h, i, cos, sin, allowed, cache[self.past_key_names[i]], cache[self.past_value_names[i]]
                )
                x = x + attn
                h = self._norm(x, f"model.layers.{i}.post_attention_layernorm.weight")
                mlp = f"model.layers.{i}.mlp"
                if f"{mlp}.gate_up_proj" in self.linears:
                    gate, up = self.linears[f"{mlp}.gate_up_proj"](h).chunk(2, dim=-1)
                else:
                    gate, up = self.linears[f"{mlp}.gate_proj"](h), self.linears[f"{mlp}.up_proj"](h)
                act = torch.nn.functional.silu(gate) * up
                x = x + self.linears[f"{mlp}.down_proj"](act)
                new_cache[self.past_key_names[i]], new_cache[self.past_value_names[i]] = k, v
            logits = self.linears["lm_head"](self._norm(x, "model.norm.weight"))
        return logits.numpy(), new_cache


def _linear_name(node: ir.Node) -> str | None:
    for suffix in (".MatMulNBits", ".MatMul", ".DynamicQuantizeMatMul"):
        if node.name and node.name.endswith(suffix):
            return node.name.removesuffix(suffix)
    if node.name == "logits":
        return "lm_head"
    return None


def _weight_of_gather(node: ir.Node, hidden: int) -> np.ndarray:
    """The (vocab, hidden) fp32 embedding table of a Gather or GatherBlockQuantized."""
    if node.op_type == "Gather":
        table = node.inputs[0]
        producer = table.producer()
        return np.array(_np(producer.inputs[0] if producer is not None else table), dtype=np.float32)  # a copy
    attrs = {k: a.value for k, a in node.attributes.items()}
    bits, block = attrs.get("bits", 4), attrs["block_size"]
    data, scales = _np(node.inputs[0]), _np(node.inputs[2]).astype(np.float32)
    zp = _np(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    return _dequantize_rows(_unpack_rows(data, bits, hidden), scales, zp, bits, block)
