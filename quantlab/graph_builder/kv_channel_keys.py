"""Keys quantized per channel over blocks of R tokens (KIVI, arXiv 2402.02750): the ``-channel-keys`` formats.

Measured on SmolLM2-135M (benchmarks/results/kv_cache.md) int2-r32-channel-keys is worse than the per-token
int2-r32-smooth that ``kivi2`` names, so the alias stays there. A likely cause, not yet verified: the
first block holds the attention-sink token, whose large key channels set (int2: through the RMS, clip)
the block's scales; keeping the first tokens in f32 as well is the next thing to try.

KIVI's observation: key outliers sit in fixed channels, value outliers do not, so keys want one scale per
channel and values one per token. A per-channel scale needs several tokens to be computed over, so the
key cache is kept in two parts (cache state, per layer):

    past_key_values.{i}.key        whole blocks of R tokens, int8 / packed uint8 (batch, kv_heads, n * R, ..)
    past_key_values.{i}.key_scale  f32 (batch, kv_heads, n, head_dim): block b's scale of channel c,
                                   max|k| / qmax (int8, int4) or the RMS (int2) over the block's R tokens
    past_key_values.{i}.key_tail   f32 (batch, kv_heads, t < R, head_dim): the latest keys, not yet a block

Each step appends the new keys to the tail; every full block of R at the tail's front is quantized and
moved to the blocks, the rest stays the tail. Attention reads the dequantized blocks followed by the tail,
so a key is attended in full precision until its block fills, and quantized (with scales computed over
its block) from then on. Values stay per token with an f32 window of the latest R (kv_cache's residual).

Unlike the per-token formats, a full forward is not token-by-token decoding here: in a forward of several
tokens a key can be quantized with a block scale that already includes later tokens of the same forward.
Quality is therefore measured by decoding token by token (benchmarks/bench_kv_cache.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantlab.graph_builder.kv_cache import (
    MIN_SCALE,
    TAIL_SUFFIX,
    KvCacheFormat,
    _pack_in_graph,
    _unpack_in_graph,
    pack_int2,
    pack_int4,
    unpack_int2,
    unpack_int4,
)


# -- the maths, as the reference -----------------------------------------------------------------
def quantize_key_blocks(x: np.ndarray, fmt: KvCacheFormat) -> tuple[np.ndarray, np.ndarray]:
    """x (batch, kv_heads, n * R, head_dim) f32 -> (stored, scale (batch, kv_heads, n, head_dim)), each
    channel of each block of R tokens quantized on its own scale (the int2 / int4 / int8 rules of kv_cache)."""
    b, h, t, d = x.shape
    r = fmt.residual
    xb = x.astype(np.float32).reshape(b, h, t // r, r, d)  # (batch, kv_heads, blocks, R, head_dim)
    if fmt.kind == "int2":
        scale = np.maximum(np.sqrt((xb * xb).mean(axis=3, keepdims=True)), np.float32(MIN_SCALE))
        q = np.clip(np.floor(xb / scale) + 2, 0, 3).reshape(x.shape)
        return pack_int2(q.astype(np.uint8)), scale[:, :, :, 0].astype(np.float32)
    scale = np.maximum(np.abs(xb).max(axis=3, keepdims=True) / np.float32(fmt.qmax), np.float32(MIN_SCALE))
    q = np.clip(np.round(xb / scale), -fmt.qmax, fmt.qmax).reshape(x.shape).astype(np.int8)
    return (q if fmt.kind == "int8" else pack_int4(q)), scale[:, :, :, 0].astype(np.float32)


def dequantize_key_blocks(stored: np.ndarray, scale: np.ndarray, fmt: KvCacheFormat) -> np.ndarray:
    q = {"int4": unpack_int4, "int2": lambda t: unpack_int2(t).astype(np.float32) - 1.5}.get(fmt.kind, np.asarray)(
        stored
    )
    b, h, t, d = q.shape
    qb = q.astype(np.float32).reshape(b, h, t // fmt.residual, fmt.residual, d)
    return (qb * scale[:, :, :, None, :]).reshape(q.shape)


def split_key_blocks(keys: np.ndarray, fmt: KvCacheFormat) -> dict[str, np.ndarray]:
    """All keys so far (batch, kv_heads, T, head_dim) -> the cache state a token-by-token decode leaves:
    {"stored", "scale", "tail"}."""
    full = keys.shape[2] // fmt.residual * fmt.residual
    stored, scale = quantize_key_blocks(keys[:, :, :full], fmt)
    return {"stored": stored, "scale": scale, "tail": keys[:, :, full:]}


# -- the same maths as ONNX ops ------------------------------------------------------------------
def append_key_blocks_in_graph(
    b, past: tuple[ir.Value, ir.Value, ir.Value], new: ir.Value, fmt: KvCacheFormat, head_dim: int, name: str
) -> tuple[list[ir.Value], ir.Value]:
    """(past stored, scale, tail) + new keys (batch, kv_heads, seq, head_dim) -> ([present stored, scale,
    tail], keys for attention f32 (batch, kv_heads, total, head_dim)). ``name`` is present.{i}.key."""
    r = fmt.residual
    recent = b.op("Concat", [past[2], new], {"axis": 2}, name=f"{name}.recent")  # (b, h, t + seq, d)
    length = b.op("Shape", [recent], {"start": 2, "end": 3}, name=f"{name}.recent_len")  # (1,) int64
    blocks = b.op("Div", [length, b.i64([r], f"kv_block{r}")], name=f"{name}.blocks")  # whole blocks, floor
    full = b.op("Mul", [blocks, b.i64([r], f"kv_block{r}")], name=f"{name}.full")
    axis = b.i64([2], "axes_2")
    block = b.op("Slice", [recent, b.i64([0], "zero1"), full, axis], name=f"{name}.block")  # (b, h, n * R, d)
    tail = b.op("Slice", [recent, full, b.i64([2**62], "kv_end"), axis], name=f"{name}{TAIL_SUFFIX}")  # (b, h, < R, d)
    shape5 = b.op(
        "Concat",
        [b.i64([0, 0], "zeros2"), blocks, b.i64([r, head_dim], f"kv_block_shape{r}x{head_dim}")],
        {"axis": 0},
        name=f"{name}.block_shape",
    )
    xb = b.op("Reshape", [block, shape5], name=f"{name}.blocks5")  # (b, h, n, R, d)
    tokens = b.i64([3], "axes_3")
    if fmt.kind == "int2":
        ms = b.op("ReduceMean", [b.op("Mul", [xb, xb], name=f"{name}.sq"), tokens], name=f"{name}.ms")
        scale = b.op("Sqrt", [ms], name=f"{name}.scale_raw")
    else:
        amax = b.op("ReduceMax", [b.op("Abs", [xb], name=f"{name}.abs"), tokens], name=f"{name}.amax")
        scale = b.op("Div", [amax, b.f32(float(fmt.qmax), f"kv_qmax{fmt.qmax}")], name=f"{name}.scale_raw")
    scale = b.op("Max", [scale, b.f32(MIN_SCALE, "kv_min_scale")], name=f"{name}.scale_b")  # (b, h, n, 1, d)
    scaled = b.op("Div", [xb, scale], name=f"{name}.div")
    if fmt.kind == "int2":  # mid-rise codes 0..3
        code = b.op("Add", [b.op("Floor", [scaled], name=f"{name}.floor"), b.f32(2.0, "kv_two")], name=f"{name}.q")
        code = b.op("Clip", [code, b.f32(0.0, "kv_zero"), b.f32(3.0, "kv_three")], name=f"{name}.clip")
    else:
        q = b.op("Round", [scaled], name=f"{name}.round")
        lim = float(fmt.qmax)
        code = b.op(
            "Clip", [q, b.f32(-lim, f"kv_neg_qmax{fmt.qmax}"), b.f32(lim, f"kv_qmax{fmt.qmax}")], name=f"{name}.clip"
        )
    code = b.op("Reshape", [code, b.op("Shape", [block], name=f"{name}.block_dims")], name=f"{name}.codes")
    if fmt.kind == "int8":
        stored = b.op("Cast", [code], {"to": ir.DataType.INT8}, name=f"{name}.int8")
    else:
        if fmt.kind == "int4":
            code = b.op("Add", [code, b.f32(8.0, "kv_int4_offset")], name=f"{name}.unsigned")
        stored = _pack_in_graph(b, code, fmt, head_dim, f"{name}.pack")
    scale = b.op("Squeeze", [scale, tokens], name=f"{name}.scale_new")  # (b, h, n, d)
    present = b.op("Concat", [past[0], stored], {"axis": 2}, name=name)
    present_scale = b.op("Concat", [past[1], scale], {"axis": 2}, name=f"{name}_scale")
    keys = b.op(
        "Concat", [_dequantize(b, present, present_scale, fmt, head_dim, name), tail], {"axis": 2}, name=f"{name}.all"
    )
    return [present, present_scale, tail], keys


def _dequantize(b, stored: ir.Value, scale: ir.Value, fmt: KvCacheFormat, head_dim: int, name: str) -> ir.Value:
    """stored (b, h, n * R, ..), scale (b, h, n, d) -> f32 (b, h, n * R, d)."""
    if fmt.kind == "int8":
        q = b.op("Cast", [stored], {"to": ir.DataType.FLOAT}, name=f"{name}.deq_f32")
    else:
        mid = {"int4": (8.0, "kv_int4_offset"), "int2": (1.5, "kv_int2_mid")}[fmt.kind]
        q = b.op(
            "Sub", [_unpack_in_graph(b, stored, fmt, head_dim, f"{name}.unpack"), b.f32(*mid)], name=f"{name}.signed"
        )
    blocks = b.op("Shape", [scale], {"start": 2, "end": 3}, name=f"{name}.deq_blocks")
    shape5 = b.op(
        "Concat",
        [b.i64([0, 0], "zeros2"), blocks, b.i64([fmt.residual, head_dim], f"kv_block_shape{fmt.residual}x{head_dim}")],
        {"axis": 0},
        name=f"{name}.deq_shape",
    )
    qb = b.op("Reshape", [q, shape5], name=f"{name}.deq_blocks5")  # (b, h, n, R, d)
    sb = b.op("Unsqueeze", [scale, b.i64([3], "axes_3")], name=f"{name}.deq_scale")  # (b, h, n, 1, d)
    deq = b.op("Mul", [qb, sb], name=f"{name}.deq5")
    return b.op("Reshape", [deq, b.op("Shape", [q], name=f"{name}.deq_dims")], name=f"{name}.deq")
