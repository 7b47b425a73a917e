"""Build a decoder-only transformer with a KV cache as a plain-ONNX ``onnx_ir.Model``.

One builder serves every family in scope (Llama, Mistral, Qwen2, Qwen3, SmolLM, Qwen3-MoE, Mixtral,
Nemotron, Gemma 3): what differs between them is data on the :class:`~quantlab.io.spec.ModelSpec` (qkv
bias, q/k norm, RoPE layout, scaling and rotary fraction, tied embeddings, norm kind and offset, sandwich
norms, MLP activation and gating, sparse MoE layers (:mod:`quantlab.graph_builder.mlp_ops`), sliding-window
layers with their own RoPE base, query scale, soft-capping, embedding scale), never a branch on the
family's name.

Graph contract (the names optimum and onnxruntime-genai use, so both load what we emit):

    inputs   input_ids                    int64 (batch, sequence_length)
             attention_mask               int64 (batch, total_sequence_length)
             position_ids                 int64 (batch, sequence_length)
             past_key_values.{i}.key      f32   (batch, kv_heads, past_sequence_length, head_dim)
             past_key_values.{i}.value    f32   (batch, kv_heads, past_sequence_length, head_dim)
    outputs  logits                       f32   (batch, sequence_length, vocab)
             present.{i}.key / .value     f32   (batch, kv_heads, total_sequence_length, head_dim)

With a quantized cache (``BuildOptions.kv_cache``, see :mod:`quantlab.graph_builder.kv_cache`) the key/value
tensors are int8 (or uint8, two int4 per byte, last dim head_dim / 2) and each has a scale beside it,
in and out: ``past_key_values.{i}.key_scale`` -> ``present.{i}.key_scale`` f32 (batch, kv_heads, seq,
groups). New keys/values are quantized in the graph when appended; the whole cache is dequantized
before attention. A static format (int8-static) has no scale tensors: its scales are constants.

``BuildOptions.attention = "fused"`` emits each layer's attention core (cache append, GQA, softmax) as
one com.microsoft.GroupQueryAttention node over the same inputs and outputs, with RoPE as
com.microsoft.RotaryEmbedding at the position_ids input (see :meth:`_Builder.fused_attention`). It reads
fp32 and static int8/int4 caches. The passes in passes/fuse_*.py then fuse that graph's linears and norms
(quantlab.pipelines.fusion_pipeline); ``plain`` stays standard opset-21 ONNX.

Every linear is ``MatMul(x, W)`` with ``W`` an initializer of shape (in, out), named after the
checkpoint tensor it came from (``model.layers.0.self_attn.q_proj.weight``), so weight passes find
them by pattern and by name. Weights are ``onnx_ir.LazyTensor``s: nothing is read from the
checkpoint until the emitter writes that tensor, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from quantlab.graph_builder.attention_ops import MASKED_SCORE, MS_DOMAIN, CacheOps, FusedAttention
from quantlab.graph_builder.kv_cache import (
    RESIDUAL_SUFFIX,
    SCALE_SUFFIX,
    TAIL_SUFFIX,
    KvCacheFormat,
)
from quantlab.graph_builder.mlp_ops import EXPERT_PROJECTIONS, MOE_FORMS, MlpOps
from quantlab.graph_builder.rope import RopeOps
from quantlab.io.spec import Checkpoint, ModelSpec
from quantlab.passes.graph_utils import OUT_IN_SOURCE

OPSET = 21
IR_VERSION = 10

_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}

ATTENTION_KINDS = ("plain", "fused")
_IR_DTYPES = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How to lay out the graph. ``weight_dtype`` fp16 stores weights in half precision and casts
    them to fp32 in the graph, so a CPU runs fp32 arithmetic on half the bytes on disk. ``kv_cache`` is
    the format of the cache tensors crossing the graph's inputs and outputs. ``attention`` is ``plain``
    (MatMul/Softmax, runs anywhere) or ``fused``: onnxruntime's com.microsoft.GroupQueryAttention, with
    the same cache I/O (see :meth:`_Builder.fused_attention`)."""

    weight_dtype: str = "fp32"
    kv_cache: KvCacheFormat = KvCacheFormat()
    # (layers, kv_heads, head_dim) f32, for a ``-smooth`` or ``-static`` cache format: the keys' calibrated
    # range per channel (kv_cache.collect_key_scales, or static_cache_ranges for -static)
    key_channel_scales: np.ndarray | None = dataclasses.field(default=None, compare=False)
    # (layers, kv_heads, head_dim) f32, for a ``-static`` cache format: the values' calibrated range
    value_channel_scales: np.ndarray | None = dataclasses.field(default=None, compare=False)
    attention: str = "plain"
    # a sparse MLP as com.microsoft.MoE ("op") or plain ONNX ("decomposed"); "auto": op with fused attention
    moe: str = "auto"

    def __post_init__(self):
        if self.moe not in MOE_FORMS:
            raise ValueError(f"moe must be one of {', '.join(MOE_FORMS)}, got {self.moe!r}")
        if self.weight_dtype not in _NP_DTYPES:
            raise ValueError(f"weight_dtype must be one of {sorted(_NP_DTYPES)}, got {self.weight_dtype!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        if self.attention == "fused" and self.kv_cache.quantized and not self.kv_cache.static:
            raise ValueError(
                f"fused attention (GroupQueryAttention) reads a quantized cache with static per-channel scales "
                f"only: use int8-static or int4-static, or plain attention for {self.kv_cache}"
            )
        if self.kv_cache.smooth_keys and self.key_channel_scales is None:
            raise ValueError(f"kv cache {self.kv_cache} needs calibrated key_channel_scales")
        if self.kv_cache.static and (self.key_channel_scales is None or self.value_channel_scales is None):
            raise ValueError(f"kv cache {self.kv_cache} needs calibrated key_ and value_channel_scales")


class _Builder(CacheOps, FusedAttention, MlpOps, RopeOps):
    def __init__(self, ckpt: Checkpoint, options: BuildOptions):
        self.spec: ModelSpec = ckpt.spec
        self.source = ckpt.tensors
        self.options = options
        self.tape = ir_tape.Tape()
        self._consts: dict[tuple, ir.Value] = {}
        self.recent: ir.Value | None = None  # (seq, total) bool, with a residual window: see recent_mask
        self.gqa_inputs: tuple | None = None  # (seqlens_k, total_sequence_length, attention_bias), fused only
        self._rotary_caches: dict | None = None  # theta -> cos, sin (max_positions, rotary_dim / 2), fused only
        self.position_ids: ir.Value | None = None
        self._score_bias: ir.Value | None = None  # see score_bias
        self._window_bias: dict[int, ir.Value] = {}  # sliding window -> its score bias, see layer_score_bias
        self._rope: dict[float, tuple[ir.Value, ir.Value]] = {}  # theta -> (cos, sin), see rope_tables
        self._mask_positions: tuple | None = None  # (seq, 1) query and (1, total) key cache indices, see attention_mask

    # -- initializers ----------------------------------------------------------------------------
    def _lazy(
        self,
        name: str,
        shape: tuple[int, ...],
        fn: Callable[[], np.ndarray],
        dtype: str,
        out_in: Callable[[], np.ndarray] | None = None,
    ) -> ir.Value:
        """``out_in``: for a weight stored transposed, its (out, in) float32 source, which weight
        quantizers read instead of transposing the graph tensor back (see ``OUT_IN_SOURCE``)."""
        np_dtype = _NP_DTYPES[dtype]

        def load() -> ir.Tensor:
            return ir.Tensor(np.ascontiguousarray(fn(), dtype=np_dtype), name=name)

        tensor = ir.LazyTensor(load, dtype=_IR_DTYPES[dtype], shape=ir.Shape(shape), name=name)
        if out_in is not None and dtype == "fp32":
            tensor.meta[OUT_IN_SOURCE] = out_in
        return self.tape.initializer(tensor, name=name)

    def _as_f32(self, value: ir.Value) -> ir.Value:
        if self.options.weight_dtype == "fp32":
            return value
        return self.tape.op("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{value.name}.Cast")

    def linear_weight(self, name: str) -> ir.Value:
        """A torch-layout (out, in) weight stored transposed as (in, out) for ``MatMul(x, W)``."""
        out_f, in_f = self.source.shape(name)
        load = functools.partial(self.source.load, name)
        w = self._lazy(name, (in_f, out_f), lambda: load().T, self.options.weight_dtype, out_in=load)
        return self._as_f32(w)

    def vector(self, name: str) -> ir.Value:
        """Norm weights and biases stay fp32: they are tiny and numerically sensitive."""
        return self._lazy(name, self.source.shape(name), lambda: self.source.load(name), "fp32")

    def norm_weight(self, name: str) -> ir.Value:
        """A norm's scale with ``spec.norm_weight_offset`` folded in (Gemma's 1 + w, in fp32 as Gemma does it),
        so every norm in the graph is the plain ``normed * w`` the fusion passes know."""
        offset = self.spec.norm_weight_offset
        if not offset:
            return self.vector(name)
        return self._lazy(name, self.source.shape(name), lambda: self.source.load(name) + np.float32(offset), "fp32")

    def embedding(self) -> ir.Value:
        name = "model.embed_tokens.weight"
        w = self._lazy(name, self.source.shape(name), lambda: self.source.load(name), self.options.weight_dtype)
        return self._as_f32(w)

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        key = (name, array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tape.initializer(ir.tensor(array, name=name), name=name)
        return self._consts[key]

    def i64(self, values: list[int], name: str) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64), name)

    def f32(self, value: float, name: str) -> ir.Value:
        return self.const(np.array(value, dtype=np.float32), name)

    # -- blocks ----------------------------------------------------------------------------------
    def op(self, op_type: str, inputs, attributes=None, *, name: str) -> ir.Value:
        return self.tape.op(op_type, inputs, attributes, name=name, output=ir.Value(name=name))

    def norm(self, x: ir.Value, weight_name: str, prefix: str) -> ir.Value:
        """The spec's norm: RMSNorm, or LayerNorm with its bias beside the weight (Nemotron)."""
        if self.spec.norm_kind == "rms":
            return self.rms_norm(x, weight_name, prefix)
        bias = self.vector(weight_name.removesuffix(".weight") + ".bias")
        attrs = {"axis": -1, "epsilon": self.spec.rms_norm_eps}
        return self.op("LayerNormalization", [x, self.norm_weight(weight_name), bias], attrs, name=f"{prefix}.out")

    def rms_norm(self, x: ir.Value, weight_name: str, prefix: str) -> ir.Value:
        """x * rsqrt(mean(x^2, -1) + eps) * w, the Llama RMSNorm."""
        sq = self.op("Mul", [x, x], name=f"{prefix}.sq")
        mean = self.op("ReduceMean", [sq, self.i64([-1], "axes_last")], {"keepdims": 1}, name=f"{prefix}.mean")
        var = self.op("Add", [mean, self.f32(self.spec.rms_norm_eps, "rms_eps")], name=f"{prefix}.var_eps")
        inv = self.op("Reciprocal", [self.op("Sqrt", [var], name=f"{prefix}.std")], name=f"{prefix}.inv_std")
        normed = self.op("Mul", [x, inv], name=f"{prefix}.normed")
        return self.op("Mul", [normed, self.norm_weight(weight_name)], name=f"{prefix}.out")

    def linear(self, x: ir.Value, prefix: str, bias: bool = False) -> ir.Value:
        y = self.op("MatMul", [x, self.linear_weight(f"{prefix}.weight")], name=f"{prefix}.MatMul")
        if bias:
            y = self.op("Add", [y, self.vector(f"{prefix}.bias")], name=f"{prefix}.Add")
        return y

    def attention_mask(self, queries: ir.Value, attention_mask: ir.Value) -> ir.Value:
        """Boolean (batch, 1, seq, total_seq): key j visible to query i iff j <= past + i and not padding.

        ``queries`` is any value shaped (batch, seq, ...): the input ids, or a layer's hidden states.
        """
        total = self.op("Shape", [attention_mask], {"start": 1, "end": 2}, name="mask.total")
        seq = self.op("Shape", [queries], {"start": 1, "end": 2}, name="mask.seq")
        total_s = self.op("Squeeze", [total], name="mask.total_s")
        past_s = self.op("Squeeze", [self.op("Sub", [total, seq], name="mask.past")], name="mask.past_s")
        one = self.const(np.array(1, dtype=np.int64), "one_scalar")
        zero = self.const(np.array(0, dtype=np.int64), "zero_scalar")
        q_pos = self.op("Range", [past_s, total_s, one], name="mask.q_pos")  # (seq,)
        k_pos = self.op("Range", [zero, total_s, one], name="mask.k_pos")  # (total,)
        q_col = self.op("Unsqueeze", [q_pos, self.i64([1], "axes_1")], name="mask.q_col")  # (seq, 1)
        k_row = self.op("Unsqueeze", [k_pos, self.i64([0], "axes_0")], name="mask.k_row")  # (1, total)
        causal = self.op("LessOrEqual", [k_row, q_col], name="mask.causal")  # (seq, total)
        keep = self.op("Cast", [attention_mask], {"to": ir.DataType.BOOL}, name="mask.keep")
        keep = self.op("Unsqueeze", [keep, self.i64([1, 2], "axes_12")], name="mask.keep4")  # (batch,1,1,total)
        self._mask_positions = q_col, k_row
        return self.op("And", [causal, keep], name="mask.allowed")  # (batch, 1, seq, total)

    def layer_score_bias(self, i: int, allowed: ir.Value) -> ir.Value:
        """Layer i's score bias: score_bias, or for a sliding layer one that also masks key j from query i
        when j <= i - window (transformers' sliding_window_overlay), built once per window."""
        window = self.spec.window_of(i)
        if not window:
            return self.score_bias(allowed)
        if window not in self._window_bias:
            q_col, k_row = self._mask_positions  # (seq, 1), (1, total) cache indices
            first = self.op("Sub", [q_col, self.i64([window], f"window{window}")], name=f"window{window}.edge")
            inside = self.op("Greater", [k_row, first], name=f"window{window}.inside")  # (seq, total)
            allowed_w = self.op("And", [allowed, inside], name=f"window{window}.allowed")
            zero, masked = self.f32(0.0, "kv_zero"), self.f32(MASKED_SCORE, "masked_score")
            self._window_bias[window] = self.op("Where", [allowed_w, zero, masked], name=f"window{window}.bias")
        return self._window_bias[window]

    def attention_scale(self) -> ir.Value:
        s = self.spec
        scale = s.attention_scale if s.attention_scale is not None else 1.0 / float(np.sqrt(s.head_dim))
        return self.f32(scale, "attn_scale")

    def softcap(self, x: ir.Value, cap: float, prefix: str) -> ir.Value:
        """cap * tanh(x / cap) (Gemma's soft-capping), or x when cap is 0."""
        if not cap:
            return x
        c = self.f32(cap, f"softcap{cap:g}")
        return self.op(
            "Mul",
            [self.op("Tanh", [self.op("Div", [x, c], name=f"{prefix}.div")], name=f"{prefix}.tanh"), c],
            name=f"{prefix}.capped",
        )

    def score_bias(self, allowed: ir.Value) -> ir.Value:
        """(batch, 1, seq, total) f32, 0 where ``allowed`` and MASKED_SCORE elsewhere, built once per graph.

        Added to the attention scores it gives the same bits as ``Where(allowed, scores, MASKED_SCORE)``:
        s + 0 = s, and s + MASKED_SCORE rounds to MASKED_SCORE for any |s| < 1e31. onnxruntime runs the
        broadcast Add about 3.5x faster than the broadcast Where (20 vs 72 ms on 2 x 32 x 512 x 512 scores,
        15% of a 1B layer's prefill on 2 cores).
        """
        if self._score_bias is None:
            zero, masked = self.f32(0.0, "kv_zero"), self.f32(MASKED_SCORE, "masked_score")
            self._score_bias = self.op("Where", [allowed, zero, masked], name="mask.bias")
        return self._score_bias

    def heads(self, x: ir.Value, n_heads: int, prefix: str) -> ir.Value:
        """(batch, seq, n_heads * head_dim) -> (batch, n_heads, seq, head_dim)."""
        shape = self.i64([0, 0, n_heads, self.spec.head_dim], f"shape_bs{n_heads}d")
        x = self.op("Reshape", [x, shape], name=f"{prefix}.split_heads")
        return self.op("Transpose", [x], {"perm": [0, 2, 1, 3]}, name=f"{prefix}.bhsd")

    def repeat_kv(self, x: ir.Value, prefix: str) -> ir.Value:
        """GQA: (batch, kv_heads, total, d) -> (batch, heads, total, d), each kv head shared by a group."""
        s = self.spec
        group = s.num_heads // s.num_kv_heads
        if group == 1:
            return x
        x = self.op("Unsqueeze", [x, self.i64([2], "axes_2")], name=f"{prefix}.u")  # (b, kvh, 1, t, d)
        x = self.op("Expand", [x, self.i64([1, 1, group, 1, 1], "gqa_expand")], name=f"{prefix}.expand")
        return self.op(
            "Reshape", [x, self.i64([0, s.num_heads, -1, s.head_dim], "shape_b_h_t_d")], name=f"{prefix}.rep"
        )

    def attention(self, x, i, cos, sin, allowed, past_k, past_v):
        s = self.spec
        p = f"model.layers.{i}.self_attn"
        q = self.heads(self.linear(x, f"{p}.q_proj", s.attention_bias), s.num_heads, f"{p}.q")
        k = self.heads(self.linear(x, f"{p}.k_proj", s.attention_bias), s.num_kv_heads, f"{p}.k")
        v = self.heads(self.linear(x, f"{p}.v_proj", s.attention_bias), s.num_kv_heads, f"{p}.v")
        if s.qk_norm:  # Qwen3: RMSNorm over head_dim before RoPE
            q = self.rms_norm(q, f"{p}.q_norm.weight", f"{p}.q_norm")
            k = self.rms_norm(k, f"{p}.k_norm.weight", f"{p}.k_norm")
        cos, sin = self.layer_rope(i, cos, sin)
        q = self.apply_rope(q, cos, sin, f"{p}.q_rope")
        k = self.apply_rope(k, cos, sin, f"{p}.k_rope")
        key_scale = value_scale = None
        if self.options.kv_cache.smooth_keys:
            table = np.asarray(self.options.key_channel_scales[i], dtype=np.float32)  # (kv_heads, head_dim)
            key_scale = self.const(table[None, :, None, :], f"{p}.key_channel_scale")  # (1, kv_heads, 1, d)
        if self.options.kv_cache.static:
            key_scale, value_scale = self.static_scale(i, "key"), self.static_scale(i, "value")
        present_k, k_cache, k_recent = self.append_to_cache(past_k, k, f"present.{i}.key", key_scale)
        present_v, v_cache, v_recent = self.append_to_cache(past_v, v, f"present.{i}.value", value_scale)
        k_all = self.repeat_kv(k_cache, f"{p}.k")
        v_all = self.repeat_kv(v_cache, f"{p}.v")
        if v_recent is not None:
            k_r = None if k_recent is None else self.repeat_kv(k_recent, f"{p}.kr")
            v_r = self.repeat_kv(v_recent, f"{p}.vr")
            ctx = self.mixed_attention(q, k_all, v_all, k_r, v_r, self.layer_score_bias(i, allowed), p)
            ctx = self.op("Transpose", [ctx], {"perm": [0, 2, 1, 3]}, name=f"{p}.ctx_bshd")
            ctx = self.op("Reshape", [ctx, self.i64([0, 0, -1], "shape_bs_")], name=f"{p}.ctx_flat")
            return self.linear(ctx, f"{p}.o_proj"), present_k, present_v
        k_t = self.op("Transpose", [k_all], {"perm": [0, 1, 3, 2]}, name=f"{p}.k_t")
        scores = self.op("MatMul", [q, k_t], name=f"{p}.qk")  # (batch, heads, seq, total)
        scores = self.op("Mul", [scores, self.attention_scale()], name=f"{p}.scaled")
        scores = self.softcap(scores, s.attention_softcap, f"{p}.softcap")
        scores = self.op("Add", [scores, self.layer_score_bias(i, allowed)], name=f"{p}.masked")
        probs = self.op("Softmax", [scores], {"axis": -1}, name=f"{p}.probs")
        ctx = self.op("MatMul", [probs, v_all], name=f"{p}.ctx")  # (batch, heads, seq, d)
        ctx = self.op("Transpose", [ctx], {"perm": [0, 2, 1, 3]}, name=f"{p}.ctx_bshd")
        ctx = self.op("Reshape", [ctx, self.i64([0, 0, -1], "shape_bs_")], name=f"{p}.ctx_flat")
        return self.linear(ctx, f"{p}.o_proj"), present_k, present_v

    def layer(self, x, i, cos, sin, allowed, past_k, past_v):
        """One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)); with sandwich norms each
        sublayer's output is normalized too before its residual Add (Gemma 2/3).

        Node names follow the role, weight names the checkpoint: the MLP's input norm is named
        ``post_attention_layernorm`` (the Llama name calibration taps) even where its weight is Gemma's
        ``pre_feedforward_layernorm``."""
        p = f"model.layers.{i}"
        h = self.norm(x, f"{p}.input_layernorm.weight", f"{p}.input_layernorm")
        attention = self.fused_attention if self.options.attention == "fused" else self.attention
        attn, pk, pv = attention(h, i, cos, sin, allowed, past_k, past_v)
        mlp_norm = "post_attention_layernorm"
        if self.spec.sandwich_norms:
            attn = self.norm(attn, f"{p}.post_attention_layernorm.weight", f"{p}.attn_output_norm")
            mlp_norm = "pre_feedforward_layernorm"
        x = self.op("Add", [x, attn], name=f"{p}.attn_residual")
        h = self.norm(x, f"{p}.{mlp_norm}.weight", f"{p}.post_attention_layernorm")
        y = self.mlp(h, i)
        if self.spec.sandwich_norms:
            y = self.norm(y, f"{p}.post_feedforward_layernorm.weight", f"{p}.mlp_output_norm")
        x = self.op("Add", [x, y], name=f"{p}.mlp_residual")
        return x, pk, pv


# The value feeding each linear of layer i, by role: what calibration observes (the input X of
# y = X W), named as the builder names it. q/k/v share one input, and so do gate/up.
LINEAR_INPUTS = {
    "self_attn.q_proj": "input_layernorm.out",
    "self_attn.k_proj": "input_layernorm.out",
    "self_attn.v_proj": "input_layernorm.out",
    "self_attn.o_proj": "self_attn.ctx_flat",
    "mlp.gate_proj": "post_attention_layernorm.out",
    "mlp.up_proj": "post_attention_layernorm.out",
    "mlp.down_proj": "mlp.act",
}


def expert_roles(e: int) -> tuple[str, ...]:
    """Expert e's linears in a sparse MLP, as roles of its layer: ``mlp.experts.{e}.gate_proj`` ..."""
    return tuple(f"mlp.experts.{e}.{proj}" for proj in EXPERT_PROJECTIONS)


def layer_linear_roles(spec: ModelSpec, i: int) -> tuple[str, ...]:
    """Every weight-quantizable linear of layer i, as roles: those of LINEAR_INPUTS it has (an ungated MLP
    has no gate_proj, a sparse MLP none of the dense MLP's), then a sparse MLP's experts (see expert_roles).
    The router (``mlp.gate``) is not among them: it stays float."""
    shapes = spec.expected_shapes()
    roles = tuple(role for role in LINEAR_INPUTS if f"model.layers.{i}.{role}.weight" in shapes)
    if i in spec.moe_layers:
        roles += tuple(role for e in range(spec.num_experts) for role in expert_roles(e))
    return roles


def layer_taps(spec: ModelSpec, i: int) -> tuple[str, ...]:
    """The values of layer i that calibration observes (without the ``model.layers.{i}.`` prefix): the
    inputs of its linears (LINEAR_INPUTS), and in a sparse MLP the router's choice ``mlp.topk_indices``
    (batch, seq, k) int64 and each expert's ``mlp.experts.{e}.act`` (batch, seq, moe_ff), its down_proj's
    input, computed for every token (the decomposed form computes every expert)."""
    taps = tuple(dict.fromkeys(LINEAR_INPUTS[role] for role in layer_linear_roles(spec, i) if role in LINEAR_INPUTS))
    if i in spec.moe_layers:
        taps = tuple(dict.fromkeys((*taps, "post_attention_layernorm.out")))
        taps += ("mlp.topk_indices", *(f"mlp.experts.{e}.act" for e in range(spec.num_experts)))
    return taps


def _io(name: str, dtype: ir.DataType, dims: list) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))


def _cache_inputs(spec: ModelSpec, fmt: KvCacheFormat, name: str) -> tuple[ir.Value, ...]:
    """(cache,) or (stored, scale) graph inputs for ``past_key_values.{i}.key`` (or .value)."""
    d = spec.head_dim
    cache = _io(name, fmt.storage, ["batch_size", spec.num_kv_heads, "past_sequence_length", fmt.stored_dim(d)])
    if not fmt.quantized or fmt.static:
        return (cache,)
    if fmt.channel_keys and name.endswith(".key"):  # whole blocks, a scale per block and channel, the f32 tail
        blocks = ["batch_size", spec.num_kv_heads, "past_key_block_tokens", fmt.stored_dim(d)]
        return (
            _io(name, fmt.storage, blocks),
            _io(f"{name}{SCALE_SUFFIX}", ir.DataType.FLOAT, ["batch_size", spec.num_kv_heads, "past_key_blocks", d]),
            _io(f"{name}{TAIL_SUFFIX}", ir.DataType.FLOAT, ["batch_size", spec.num_kv_heads, "past_key_tail", d]),
        )
    scale_dims = ["batch_size", spec.num_kv_heads, "past_sequence_length", fmt.scale_dim(d)]
    scale = _io(f"{name}{SCALE_SUFFIX}", ir.DataType.FLOAT, scale_dims)
    if not fmt.residual:
        return cache, scale
    residual_dims = ["batch_size", spec.num_kv_heads, "residual_length", d]
    return cache, scale, _io(f"{name}{RESIDUAL_SUFFIX}", ir.DataType.FLOAT, residual_dims)


def build_decoder(ckpt: Checkpoint, options: BuildOptions | None = None) -> ir.Model:
    """Checkpoint -> plain-ONNX decoder graph with KV cache I/O (see the module docstring)."""
    options = options or BuildOptions()
    s = ckpt.spec
    b = _Builder(ckpt, options)
    f32 = ir.DataType.FLOAT
    input_ids = _io("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    attention_mask = _io("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
    position_ids = _io("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    fmt = options.kv_cache
    pasts = [
        (_cache_inputs(s, fmt, f"past_key_values.{i}.key"), _cache_inputs(s, fmt, f"past_key_values.{i}.value"))
        for i in range(s.num_layers)
    ]

    x = b.op("Gather", [b.embedding(), input_ids], {"axis": 0}, name="model.embed_tokens")  # (batch, seq, hidden)
    if s.embedding_scale != 1.0:
        x = b.op("Mul", [x, b.f32(s.embedding_scale, "embedding_scale")], name="model.embed_tokens.scaled")
    cos, sin = b.rope_tables(position_ids)
    allowed = b.attention_mask(input_ids, attention_mask)
    if fmt.residual:
        b.recent = b.recent_mask(input_ids, attention_mask, fmt.residual)
    if options.attention == "fused":
        b.gqa_inputs = b.gqa_common_inputs(input_ids, attention_mask, allowed)
        b.position_ids = position_ids
    presents = []
    for i in range(s.num_layers):
        x, pk, pv = b.layer(x, i, cos, sin, allowed, *pasts[i])
        presents += [*pk, *pv]
    x = b.norm(x, "model.norm.weight", "model.norm")
    if s.tie_word_embeddings:
        # A transposed copy of the embedding, so the head is a MatMul like every other linear and weight
        # passes treat it uniformly (the fp32 artifact pays vocab * hidden * 4 bytes for it).
        name = "model.embed_tokens.weight"
        v, h = ckpt.tensors.shape(name)
        load = functools.partial(ckpt.tensors.load, name)
        head = b._as_f32(b._lazy("lm_head.weight", (h, v), lambda: load().T, options.weight_dtype, out_in=load))
    else:
        head = b.linear_weight("lm_head.weight")
    logits = b.op("MatMul", [x, head], name="logits" if not s.final_softcap else "logits.raw")
    if s.final_softcap:
        logits = b.op("Identity", [b.softcap(logits, s.final_softcap, "logits")], name="logits")
    logits.shape = ir.Shape(["batch_size", "sequence_length", s.vocab_size])
    logits.type = ir.TensorType(f32)
    past_inputs = [v for kv in pasts for tensors in kv for v in tensors]
    for p, past in zip(presents, past_inputs, strict=True):  # same dtype and last dim as the matching input
        seq_dim = {"residual_length": "residual_length", "past_sequence_length": "total_sequence_length"}.get(
            past.shape[2], f"present_{str(past.shape[2]).removeprefix('past_')}"
        )
        p.shape = ir.Shape(["batch_size", s.num_kv_heads, seq_dim, past.shape[3]])
        p.type = ir.TensorType(past.dtype)

    graph = ir.Graph(
        inputs=[input_ids, attention_mask, position_ids, *past_inputs],
        outputs=[logits, *presents],
        nodes=b.tape.nodes,
        initializers=b.tape.initializers,
        opset_imports={"": OPSET, **({MS_DOMAIN: 1} if _uses_ms_domain(b) else {})},
        name="quantlab_decoder",
    )
    return ir.Model(graph, ir_version=IR_VERSION, producer_name="quantlab")


def _uses_ms_domain(b: _Builder) -> bool:
    return any(node.domain == MS_DOMAIN for node in b.tape.nodes)


LAYER_OUTPUTS = ("all", "taps", "hidden")


def build_layer(ckpt: Checkpoint, i: int, options: BuildOptions | None = None, outputs: str = "all") -> ir.Model:
    """Decoder layer ``i`` alone, for calibration: one layer's weights, no cache.

    inputs   hidden_states (batch, seq, hidden) f32, position_ids (batch, seq) int64,
             attention_mask (batch, seq) int64
    outputs  ``all``: hidden_out (batch, seq, hidden), then the values of :func:`layer_taps`, named
             ``model.layers.{i}.<tap>`` (e.g. model.layers.3.mlp.act); ``taps``: those
             values alone, and only the nodes they need (no down_proj: a quarter of the layer's
             FLOPs); ``hidden``: hidden_out alone. onnxruntime computes every node of a graph whatever
             outputs a run asks for, so what is not needed is left out of the graph.
    """
    if outputs not in LAYER_OUTPUTS:
        raise ValueError(f"outputs must be one of {LAYER_OUTPUTS}, got {outputs!r}")
    # the layer runs without a cache, so the cache format does not apply; a sparse MLP is decomposed, the
    # form with a tap at each expert's input
    options = dataclasses.replace(
        options or BuildOptions(), kv_cache=KvCacheFormat(), attention="plain", moe="decomposed"
    )
    s = ckpt.spec
    b = _Builder(ckpt, options)
    f32 = ir.DataType.FLOAT
    hidden = _io("hidden_states", f32, ["batch_size", "sequence_length", s.hidden_size])
    position_ids = _io("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    attention_mask = _io("attention_mask", ir.DataType.INT64, ["batch_size", "sequence_length"])
    cos, sin = b.rope_tables(position_ids)
    allowed = b.attention_mask(hidden, attention_mask)
    empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), dtype=np.float32)  # (batch, kv_heads, 0, head_dim)
    past = b.const(empty, "empty_cache")
    out, _, _ = b.layer(hidden, i, cos, sin, allowed, (past,), (past,))
    out = b.op("Identity", [out], name="hidden_out")
    taps = []
    produced = {v.name: v for node in b.tape.nodes for v in node.outputs}
    for tap in layer_taps(s, i):
        taps.append(produced[f"model.layers.{i}.{tap}"])
    graph_outputs = {"all": [out, *taps], "taps": taps, "hidden": [out]}[outputs]
    nodes = _needed_nodes(b.tape.nodes, graph_outputs)
    used = {v.name for node in nodes for v in node.inputs if v is not None}
    graph = ir.Graph(
        inputs=[hidden, position_ids, attention_mask],
        outputs=graph_outputs,
        nodes=nodes,
        initializers=[v for v in b.tape.initializers if v.name in used],
        opset_imports={"": OPSET, **({MS_DOMAIN: 1} if _uses_ms_domain(b) else {})},
        name=f"quantlab_layer_{i}",
    )
    return ir.Model(graph, ir_version=IR_VERSION, producer_name="quantlab")


def _needed_nodes(nodes, outputs: list[ir.Value]) -> list[ir.Node]:
    """The nodes some of ``outputs`` depend on, in their original (topological) order."""
    wanted = {id(v) for v in outputs}
    keep = []
    for node in reversed(nodes):
        if any(id(v) in wanted for v in node.outputs):
            keep.append(node)
            wanted.update(id(v) for v in node.inputs if v is not None)
    return keep[::-1]
