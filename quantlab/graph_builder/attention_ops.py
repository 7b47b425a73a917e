"""Attention pieces of the decoder builder, as mixins of ``quantlab.graph_builder.decoder._Builder``: the KV
cache (append, static scales, the residual window's mask and mixed attention) and the fused
``com.microsoft.GroupQueryAttention`` path. They use the builder's helpers (``op``, ``const``,
``i64``, ``f32``, ``linear``, ``options``, ``spec``) through ``self``; split out so that the decoder
module reads as the model and these as the cache machinery.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantlab.graph_builder.kv_cache import (
    RESIDUAL_SUFFIX,
    SCALE_SUFFIX,
    dequantize_in_graph,
    dequantize_static_in_graph,
    quantize_in_graph,
    quantize_static_in_graph,
    static_scales,
)
from quantlab.graph_builder.kv_channel_keys import append_key_blocks_in_graph
from quantlab.graph_builder.rope import rope_inv_freq

# Masked attention scores are replaced by this instead of -inf so that a fully masked row (a padded
# query) gives a uniform softmax rather than NaN.
MASKED_SCORE = float(np.finfo(np.float32).min)
MS_DOMAIN = "com.microsoft"


class CacheOps:
    """Appending to the (possibly quantized) KV cache and attending over a residual window."""

    def static_scale(self, i: int, kind: str) -> ir.Value:
        """Layer i's static per-channel cache scale for ``key`` or ``value``: (1, kv_heads, 1, head_dim) f32."""
        ranges = self.options.key_channel_scales if kind == "key" else self.options.value_channel_scales
        table = static_scales(ranges[i], self.options.kv_cache)  # (kv_heads, head_dim)
        return self.const(table[None, :, None, :], f"model.layers.{i}.self_attn.{kind}_cache_scale")

    def append_to_cache(
        self, past: tuple, new: ir.Value, name: str, channel_scale: ir.Value | None = None
    ) -> tuple[list[ir.Value], ir.Value, ir.Value | None]:
        """Concat the new keys (or values) onto the cache -> (present tensors, f32 cache for attention,
        f32 recent tokens or None).

        ``past`` is (cache,) for fp32, (stored, scale[, residual]) for a quantized cache; ``name`` is
        present.{i}.key. With a residual window the recent tokens are the past residual + the new ones.
        """
        fmt = self.options.kv_cache
        if not fmt.quantized:
            present = self.op("Concat", [past[0], new], {"axis": 2}, name=name)
            return [present], present, None
        d = self.spec.head_dim
        if fmt.channel_keys and name.endswith(".key"):  # blocks + f32 tail: the tail is the recent keys
            presents, keys = append_key_blocks_in_graph(self, past, new, fmt, d, name)
            return presents, keys, None
        if fmt.static:  # channel_scale is the static cache scale; nothing but the integers in the state
            stored = quantize_static_in_graph(self, new, fmt, d, channel_scale, f"{name}.quantize")
            present = self.op("Concat", [past[0], stored], {"axis": 2}, name=name)
            return [present], dequantize_static_in_graph(self, present, fmt, d, channel_scale, f"{name}.deq"), None
        stored, scale = quantize_in_graph(self, new, fmt, d, f"{name}.quantize", channel_scale)
        present = self.op("Concat", [past[0], stored], {"axis": 2}, name=name)
        present_scale = self.op("Concat", [past[1], scale], {"axis": 2}, name=f"{name}{SCALE_SUFFIX}")
        deq = dequantize_in_graph(self, present, present_scale, fmt, d, f"{name}.dequantize", channel_scale)
        if not fmt.residual:
            return [present, present_scale], deq, None
        recent = self.op("Concat", [past[2], new], {"axis": 2}, name=f"{name}.recent")  # (b, kvh, r, d)
        present_residual = self.op(
            "Slice",
            [
                recent,
                self.i64([-fmt.residual], f"kv_neg_residual{fmt.residual}"),
                self.i64([2**62], "kv_end"),
                self.i64([2], "axes_2"),
            ],
            name=f"{name}{RESIDUAL_SUFFIX}",
        )
        return [present, present_scale, present_residual], deq, recent

    def recent_mask(self, input_ids: ir.Value, attention_mask: ir.Value, residual: int) -> ir.Value:
        """(seq, total) bool: key j is among the ``residual`` latest tokens of query i (j >= past + i - R + 1),
        the ones a residual-window cache attends in full precision."""
        total = self.op("Shape", [attention_mask], {"start": 1, "end": 2}, name="recent.total")
        seq = self.op("Shape", [input_ids], {"start": 1, "end": 2}, name="recent.seq")
        total_s = self.op("Squeeze", [total], name="recent.total_s")
        past_s = self.op("Squeeze", [self.op("Sub", [total, seq], name="recent.past")], name="recent.past_s")
        one = self.const(np.array(1, dtype=np.int64), "one_scalar")
        zero = self.const(np.array(0, dtype=np.int64), "zero_scalar")
        q_pos = self.op("Range", [past_s, total_s, one], name="recent.q_pos")  # (seq,)
        first = self.op(
            "Sub",
            [q_pos, self.const(np.array(residual - 1, dtype=np.int64), f"kv_residual_m1_{residual}")],
            name="recent.first",
        )
        k_pos = self.op("Range", [zero, total_s, one], name="recent.k_pos")  # (total,)
        first = self.op("Unsqueeze", [first, self.i64([1], "axes_1")], name="recent.first_col")  # (seq, 1)
        k_row = self.op("Unsqueeze", [k_pos, self.i64([0], "axes_0")], name="recent.k_row")  # (1, total)
        return self.op("GreaterOrEqual", [k_row, first], name="recent.mask")  # (seq, total)

    def mixed_attention(self, q, k_all, v_all, k_recent, v_recent, bias, p):
        """Attention where the recent keys/values come from the f32 residual and older ones from the
        dequantized cache. q (b, h, s, d); k_all/v_all (b, h, total, d); k_recent/v_recent (b, h, r, d),
        the last r of total; ``bias`` the layer's score bias (b, 1, s, total). Scores of recent keys are
        computed on the f32 copies, padded on the left to total and chosen by the recent mask; the
        probabilities split the same way over the two values."""
        scale = self.attention_scale()
        k_t = self.op("Transpose", [k_all], {"perm": [0, 1, 3, 2]}, name=f"{p}.k_t")
        scores = self.op("Mul", [self.op("MatMul", [q, k_t], name=f"{p}.qk"), scale], name=f"{p}.scaled")
        total = self.op("Shape", [scores], {"start": 3, "end": 4}, name=f"{p}.total")
        r = self.op("Shape", [v_recent], {"start": 2, "end": 3}, name=f"{p}.r")
        lead = self.op("Sub", [total, r], name=f"{p}.lead")  # (1,) older tokens, quantized only
        if k_recent is not None:  # (-channel-keys: k_all already holds the recent keys in f32)
            kr_t = self.op("Transpose", [k_recent], {"perm": [0, 1, 3, 2]}, name=f"{p}.kr_t")
            recent_scores = self.op("Mul", [self.op("MatMul", [q, kr_t], name=f"{p}.qkr"), scale], name=f"{p}.scaled_r")
            zeros3 = self.i64([0, 0, 0], "zeros3")
            pads = self.op("Concat", [zeros3, lead, self.i64([0, 0, 0, 0], "zeros4")], {"axis": 0}, name=f"{p}.pads")
            padded = self.op("Pad", [recent_scores, pads], name=f"{p}.scores_r_pad")  # (b, h, s, total)
            scores = self.op("Where", [self.recent, padded, scores], name=f"{p}.mixed")
        scores = self.softcap(scores, self.spec.attention_softcap, f"{p}.softcap")
        scores = self.op("Add", [scores, bias], name=f"{p}.masked")
        probs = self.op("Softmax", [scores], {"axis": -1}, name=f"{p}.probs")
        zero = self.f32(0.0, "kv_zero")
        older = self.op("Where", [self.recent, zero, probs], name=f"{p}.probs_old")
        ctx = self.op("MatMul", [older, v_all], name=f"{p}.ctx_old")
        end = self.i64([2**62], "kv_end")
        last = self.i64([-1], "axes_last")
        probs_r = self.op("Slice", [probs, lead, end, last], name=f"{p}.probs_r_all")  # (b, h, s, r)
        recent_r = self.op("Slice", [self.recent, lead, end, last], name=f"{p}.recent_r")  # (s, r)
        probs_r = self.op("Where", [recent_r, probs_r, zero], name=f"{p}.probs_r")
        return self.op("Add", [ctx, self.op("MatMul", [probs_r, v_recent], name=f"{p}.ctx_r")], name=f"{p}.ctx")


class FusedAttention:
    """Attention as onnxruntime's GroupQueryAttention, with the plain path's cache I/O."""

    def gqa_common_inputs(self, input_ids: ir.Value, attention_mask: ir.Value, allowed: ir.Value) -> tuple:
        """GroupQueryAttention's per-step inputs, shared by all layers: seqlens_k (batch,) int32 = total - 1
        for every row (the cache holds padding too: left padding stays in place, as in the plain path),
        total_sequence_length () int32, and attention_bias (batch, 1, seq, total) f32, 0 where the plain
        path's mask allows a key and MASKED_SCORE where it does not (the padding; causality is the op's)."""
        total = self.op("Shape", [attention_mask], {"start": 1, "end": 2}, name="gqa.total")  # (1,) int64
        batch = self.op("Shape", [input_ids], {"start": 0, "end": 1}, name="gqa.batch")  # (1,) int64
        last = self.op("Sub", [total, self.i64([1], "one1")], name="gqa.last")
        seqlens = self.op("Expand", [last, batch], name="gqa.seqlens_i64")  # (batch,)
        seqlens = self.op("Cast", [seqlens], {"to": ir.DataType.INT32}, name="gqa.seqlens_k")
        total_s = self.op("Squeeze", [total], name="gqa.total_s")
        total_s = self.op("Cast", [total_s], {"to": ir.DataType.INT32}, name="gqa.total_sequence_length")
        bias = self.op(
            "Where", [allowed, self.f32(0.0, "kv_zero"), self.f32(MASKED_SCORE, "masked_score")], name="gqa.bias"
        )
        return seqlens, total_s, bias

    def rotary(self, x: ir.Value, heads: int, name: str, theta: float | None = None) -> ir.Value:
        """RoPE as one com.microsoft.RotaryEmbedding over x (batch, seq, heads * head_dim), at the graph's
        position_ids, from cos/sin tables of every position the model was trained for; a partial rotary
        (rotary_dim < head_dim) is the op's rotary_embedding_dim."""
        s = self.spec
        theta = s.rope_theta if theta is None else theta
        caches = self._rotary_caches = self._rotary_caches or {}
        if theta not in caches:
            inv_freq = rope_inv_freq(s.rotary_dim, theta, s.rope_scaling if theta == s.rope_theta else None)
            r = "rotary" if theta == s.rope_theta else f"rotary_{theta:g}"
            # The (max_positions, rotary_dim / 2) tables are computed in the graph from the inverse
            # frequencies: onnxruntime folds them once at load, and the file does not carry 2 MiB of them.
            positions = self.op(
                "Range",
                [
                    self.f32(0.0, "zero_f"),
                    self.f32(float(s.max_position_embeddings), "max_positions_f"),
                    self.f32(1.0, "one_f"),
                ],
                name=f"{r}.positions",
            )  # (max_positions,)
            positions = self.op("Unsqueeze", [positions, self.i64([-1], "axes_last")], name=f"{r}.positions_col")
            freqs = self.const(inv_freq.astype(np.float32), f"{r}.inv_freq")
            angles = self.op("Mul", [positions, freqs], name=f"{r}.angles")
            caches[theta] = (
                self.op("Cos", [angles], name=f"{r}.cos_cache"),  # (max_positions, rotary_dim / 2)
                self.op("Sin", [angles], name=f"{r}.sin_cache"),
            )
        attrs = {"interleaved": int(s.rope_interleaved), "num_heads": heads}
        if s.rotary_dim < s.head_dim:
            attrs["rotary_embedding_dim"] = s.rotary_dim
        inputs = [x, self.position_ids, *caches[theta]]
        return self.tape.op("RotaryEmbedding", inputs, attrs, domain=MS_DOMAIN, name=name, output=ir.Value(name=name))

    def fused_attention(self, x, i, cos, sin, allowed, past_k, past_v):  # noqa: ARG002 (cos, sin: the plain path's)
        """Attention as one com.microsoft.GroupQueryAttention node, same cache I/O as :meth:`attention`.

        Projections and q/k norm stay in front of it, and RoPE is com.microsoft.RotaryEmbedding at the
        position_ids input rather than the op's own rotary (do_rotary=0): the rotation then uses the
        positions exactly as the plain path does (left padding, a bounded cache's original positions),
        which the op's rotary, deriving positions from seqlens_k, would not.
        """
        s = self.spec
        p = f"model.layers.{i}.self_attn"
        q = self.linear(x, f"{p}.q_proj", s.attention_bias)  # (batch, seq, heads * head_dim)
        k = self.linear(x, f"{p}.k_proj", s.attention_bias)  # (batch, seq, kv_heads * head_dim)
        v = self.linear(x, f"{p}.v_proj", s.attention_bias)
        if s.qk_norm:  # per head: (batch, seq, heads, head_dim), then back to (batch, seq, heads * head_dim)
            q = self.op(
                "Reshape", [q, self.i64([0, 0, s.num_heads, s.head_dim], f"shape_bs{s.num_heads}d")], name=f"{p}.q4"
            )
            k = self.op(
                "Reshape",
                [k, self.i64([0, 0, s.num_kv_heads, s.head_dim], f"shape_bs{s.num_kv_heads}d")],
                name=f"{p}.k4",
            )
            q = self.rms_norm(q, f"{p}.q_norm.weight", f"{p}.q_norm")
            k = self.rms_norm(k, f"{p}.k_norm.weight", f"{p}.k_norm")
            q = self.op("Reshape", [q, self.i64([0, 0, -1], "shape_bs_")], name=f"{p}.q_flat")
            k = self.op("Reshape", [k, self.i64([0, 0, -1], "shape_bs_")], name=f"{p}.k_flat")
        q = self.rotary(q, s.num_heads, f"{p}.q_rope", s.rope_theta_of(i))
        k = self.rotary(k, s.num_kv_heads, f"{p}.k_rope", s.rope_theta_of(i))
        seqlens, total, bias = self.gqa_inputs
        fmt = self.options.kv_cache
        attrs = {"num_heads": s.num_heads, "kv_num_heads": s.num_kv_heads}
        if s.attention_scale is not None:
            attrs["scale"] = s.attention_scale
        if s.attention_softcap:
            attrs["softcap"] = s.attention_softcap
        if s.window_of(i):  # the op's window counts the query's own key: keys i - window + 1 .. i
            attrs["local_window_size"] = s.window_of(i)
        inputs = [q, k, v, past_k[0], past_v[0], seqlens, total, None, None, None, bias]
        if fmt.quantized:  # static per-channel scales (BuildOptions refuses any other quantized cache)
            attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8 // fmt.per_byte)
            inputs += [None, self.static_scale(i, "key"), self.static_scale(i, "value")]
        ctx, present_k, present_v = self.tape.op_multi_out(
            "GroupQueryAttention",
            inputs,
            attrs,
            domain=MS_DOMAIN,
            name=f"{p}.GroupQueryAttention",
            outputs=[
                ir.Value(name=f"{p}.ctx_flat"),
                ir.Value(name=f"present.{i}.key"),
                ir.Value(name=f"present.{i}.value"),
            ],
        )
        return self.linear(ctx, f"{p}.o_proj"), [present_k], [present_v]
