"""KV-cache formats: how the decoder stores past keys and values between steps.

A format is one spelled-out string parsed into a frozen :class:`KvCacheFormat`:

    fp32    the cache tensors are f32 (the default; onnxruntime-genai and optimum load it)
    int8    symmetric int8, one f32 scale per (token, kv head): (batch, kv_heads, seq, head_dim) int8
            plus ``..._scale`` (batch, kv_heads, seq, 1) f32
    int4    symmetric int4 in [-7, 7], two per byte (uint8), one f32 scale per (token, kv head, group of
            ``group`` channels; default the whole head)
    int2    2-bit, four per byte (uint8), a mid-rise quantizer: levels (q - 1.5) * scale, q in 0..3, scale =
            the RMS of x per (token, kv head[, group]): near the MSE-optimal 4-level step for bell-shaped
            data (values beyond 2 RMS clip); scaling by max|x| instead wastes the levels on the tails
            (SmolLM2 keys: -3 dB SQNR with max scaling, +4 dB with RMS)
    -r<R>   a residual window (KIVI's, arXiv 2402.02750): the last R tokens are also kept in f32
            (``..._residual`` (batch, kv_heads, <= R, head_dim)), and a query attends to the R latest keys
            and values (its own included) in full precision and to older ones quantized. The residual is
            a fixed cost, not a per-token one.
    -channel-keys  keys per channel over blocks of R tokens, the unfinished block in f32 (KIVI's own design,
            :mod:`quantlab.graph_builder.kv_channel_keys`); values as above. ``kivi2`` spells ``int2-r32-smooth``.
    -smooth a suffix (``int4-smooth``, ``int8-g32-smooth``): keys are divided by a static per-channel scale
            calibrated on data before the per-token quantization, and multiplied back after it, so outlier
            key channels (KIVI's observation: keys have them, values do not) no longer set every token's
            step. The channel scale is the largest RoPE pair norm seen, sqrt(k[c]^2 + k[c']^2) for the
            channels c, c' RoPE rotates together: rotation keeps it, so it covers every position.
    -static int8-static, int4-static: static per-channel scales for keys and values, calibrated on data
            (the clipped per-channel range of least squared error, :func:`static_cache_ranges`), constants
            in the graph, so the cache state holds the integers alone. This is the layout onnxruntime's
            GroupQueryAttention reads (k_quant_type / v_quant_type PER_CHANNEL, scale (1, kv_heads, 1,
            head_dim)): codes round(x / scale) clipped to [-128, 127] / [-8, 7], int4 packed as below.
            The fused attention path needs it; the plain path runs it too, with the same numbers.

Scales (but -static's) are dynamic: computed inside the graph from each new token's own key/value when it is appended
(per token, KIVI's choice for values, arXiv 2402.02750), and carried in the cache state as extra
tensors ``past_key_values.{i}.key_scale`` / ``present.{i}.key_scale`` (same for values). Every key and
value, the current token's included, is quantized and dequantized before attention, so a full-sequence
forward from an empty cache gives the same numbers as token-by-token decoding: quality measured on a
full forward is the quality of decoding with this cache (not with -channel-keys: see its module).

The maths (quantize, dequantize, int4 packing) is here as pure numpy functions, the reference the graph
is tested against; :func:`quantize_in_graph` and :func:`dequantize_in_graph` emit the same maths as
plain ONNX ops through the decoder builder.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

KV_CACHE_FORMATS = ("fp32", "int8", "int4", "int2")
_QMAX = {"int8": 127, "int4": 7, "int2": 1.5}
_BITS = {"fp32": 32, "int8": 8, "int4": 4, "int2": 2}
# kivi2 keeps its per-token keys: int2-r32-channel-keys (KIVI's own key layout) measured worse on SmolLM2
# (benchmarks/results/kv_cache.md), so the alias was not moved to it.
_ALIASES = {"kivi2": "int2-r32-smooth"}
_FORMAT_RE = re.compile(r"(fp32|int8|int4|int2)(?:-g(\d+))?(?:-r(\d+))?(-smooth)?(-static)?(-channel-keys)?")
# Smallest scale: an all-zero token would otherwise divide by zero.
MIN_SCALE = 1e-8
SCALE_SUFFIX = "_scale"
RESIDUAL_SUFFIX = "_residual"
TAIL_SUFFIX = "_tail"  # -channel-keys: the latest keys of a block not yet full, f32 (see kv_channel_keys)


@dataclasses.dataclass(frozen=True)
class KvCacheFormat:
    """One cache format. ``group`` is channels per scale (0: the whole head, one scale per token per head)."""

    kind: str = "fp32"
    group: int = 0
    smooth_keys: bool = False  # static calibrated per-channel key scales (see the module docstring)
    residual: int = 0  # recent tokens also kept in f32 (0: none)
    static: bool = False  # static calibrated per-channel scales for keys and values, none in the cache state
    channel_keys: bool = False  # keys per channel over blocks of ``residual`` tokens (KIVI), see kv_channel_keys

    def __post_init__(self):
        if self.kind not in KV_CACHE_FORMATS:
            raise ValueError(f"kv cache format must be one of {', '.join(KV_CACHE_FORMATS)}, got {self.kind!r}")
        if self.group < 0 or self.residual < 0:
            raise ValueError("group and residual must be >= 0")
        if self.kind == "fp32" and (self.group or self.smooth_keys or self.residual):
            raise ValueError("an fp32 cache takes no group, residual or smoothing")
        if self.static and (self.kind not in ("int8", "int4") or self.group or self.residual or self.smooth_keys):
            raise ValueError("-static is int8-static or int4-static alone (per-channel scales, no -g, -r or -smooth)")
        if self.channel_keys and (not self.residual or self.smooth_keys or self.static):
            raise ValueError(
                "-channel-keys needs -r<R> (the key block and the value window, int2-r32-channel-keys) and takes "
                "no -smooth or -static"
            )

    def __str__(self) -> str:
        return (
            self.kind
            + (f"-g{self.group}" if self.group else "")
            + (f"-r{self.residual}" if self.residual else "")
            + ("-smooth" if self.smooth_keys else "")
            + ("-static" if self.static else "")
            + ("-channel-keys" if self.channel_keys else "")
        )

    def with_residual(self, tokens: int) -> KvCacheFormat:
        """This format with a residual window of ``tokens`` (0: none), for ``--kv kivi2 --kv-residual 64``."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"the residual window must be a whole number of tokens >= 0, got {tokens!r}")
        if tokens and not self.quantized:
            raise ValueError(f"a residual window needs a quantized cache (--kv int8, int4, int2, kivi2), not {self}")
        return dataclasses.replace(self, residual=tokens)

    @property
    def quantized(self) -> bool:
        return self.kind != "fp32"

    @property
    def qmax(self) -> int:
        return _QMAX[self.kind]

    @property
    def storage(self) -> ir.DataType:
        return {"fp32": ir.DataType.FLOAT, "int8": ir.DataType.INT8}.get(self.kind, ir.DataType.UINT8)

    @property
    def per_byte(self) -> int:
        """Values per stored element: 1, or 2 (int4) / 4 (int2) per byte."""
        return {"int4": 2, "int2": 4}.get(self.kind, 1)

    def group_size(self, head_dim: int) -> int:
        g = self.group or head_dim
        if head_dim % g or g % self.per_byte:
            raise ValueError(f"group {g} must divide head_dim {head_dim} (and hold whole bytes)")
        return g

    def stored_dim(self, head_dim: int) -> int:
        """Last dimension of the stored cache tensor: head_dim, or head_dim / 2 (int4), / 4 (int2) bytes."""
        return head_dim // self.per_byte

    def scale_dim(self, head_dim: int) -> int:
        """Last dimension of the per-token scale tensor in the cache state (0: none)."""
        return head_dim // self.group_size(head_dim) if self.quantized and not self.static else 0

    @property
    def qmin(self) -> int:
        """Lowest code of a static format: the full two's-complement range, as GroupQueryAttention clips."""
        return -self.qmax - 1

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int) -> float:
        """Cache bytes one token costs across all layers, keys and values, scales included (with
        -channel-keys a key block's head_dim scales are shared by its R tokens: a fraction per token)."""
        itemsize = 4 if self.kind == "fp32" else 1
        value = self.stored_dim(head_dim) * itemsize + self.scale_dim(head_dim) * 4
        key = self.stored_dim(head_dim) + head_dim * 4 / self.residual if self.channel_keys else value
        per_head = key + value
        return num_layers * num_kv_heads * (int(per_head) if per_head == int(per_head) else per_head)

    def residual_bytes(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """The fixed cost of the f32 residual window, once it is full (with -channel-keys: the value window
        and at most R - 1 key tail tokens)."""
        keys = self.residual - 1 if self.channel_keys else self.residual
        return num_layers * num_kv_heads * (self.residual + keys) * head_dim * 4

    def describe(self, num_layers: int, num_kv_heads: int, head_dim: int) -> dict:
        """The cache's description for genai_config.json and the manifest."""
        d = {
            "format": str(self),
            "dtype": {"fp32": "float32", "int8": "int8"}.get(self.kind, "uint8"),
            "bytes_per_token": self.bytes_per_token(num_layers, num_kv_heads, head_dim),
            "fp16_bytes_per_token": 2 * num_layers * num_kv_heads * head_dim * 2,
        }
        if self.quantized:
            d.update(
                bits=_BITS[self.kind],
                symmetric=True,
                residual_tokens=self.residual or None,
                residual="past_key_values.{i}.key_residual / value_residual f32 (batch, kv_heads, <= residual, "
                "head_dim): the latest tokens, attended in full precision; a fixed "
                f"{self.residual_bytes(num_layers, num_kv_heads, head_dim)} bytes"
                if self.residual and not self.channel_keys
                else "past_key_values.{i}.value_residual f32 (batch, kv_heads, <= residual, head_dim), the latest "
                "values attended in full precision, and the keys' tail: at most "
                f"{self.residual_bytes(num_layers, num_kv_heads, head_dim)} fixed bytes"
                if self.residual
                else None,
                group_size=None if self.static else self.group_size(head_dim),
                keys="per token, per kv head"
                + ("" if not self.group else f", per {self.group} channels")
                + (", after dividing by static calibrated per-channel scales" if self.smooth_keys else "")
                if not (self.static or self.channel_keys)
                else "per (kv head, channel), static"
                if self.static
                else f"per (kv head, channel) over blocks of {self.residual} tokens (KIVI): "
                "past_key_values.{i}.key holds whole blocks, key_scale (batch, kv_heads, blocks, head_dim) f32, "
                f"key_tail (batch, kv_heads, < {self.residual}, head_dim) f32 the latest keys of the unfinished block",
                values="per token, per kv head" + ("" if not self.group else f", per {self.group} channels")
                if not self.static
                else "per (kv head, channel), static",
                scales="dynamic, float32, in the cache state as past_key_values.{i}.key_scale / value_scale "
                f"(batch, kv_heads, seq, {self.scale_dim(head_dim)})"
                if not self.static
                else "static, float32 (1, kv_heads, 1, head_dim) per layer, calibrated, constants in the graph "
                "(model.layers.{i}.self_attn.key_cache_scale / value_cache_scale); GroupQueryAttention PER_CHANNEL",
                packing={
                    "int4": "two int4 per byte: low nibble channel 2j, high nibble 2j+1, stored as q + 8",
                    "int2": "four per byte: channel 4j + k in bits 2k..2k+1, level (q - 1.5) * scale",
                }.get(self.kind),
            )
            d = {k: v for k, v in d.items() if v is not None}
        return d


def parse_kv_cache(text: str) -> KvCacheFormat:
    """``fp32`` | ``int8`` | ``int4`` | ``int2``, then ``-g<group>``, ``-r<residual>``, ``-smooth``, ``-static``,
    ``-channel-keys`` in that order (``int4-g32-r32-smooth``, ``int2-r32-channel-keys``); ``kivi2`` is
    ``int2-r32-smooth``; a ``kv-`` prefix is allowed. Raises ValueError."""
    body = str(text).removeprefix("kv-")
    body = _ALIASES.get(body, body)
    m = _FORMAT_RE.fullmatch(body)
    if not m or m.group(2) == "0" or m.group(3) == "0":
        raise ValueError(
            f"unknown kv cache format {text!r}; expected one of {', '.join(KV_CACHE_FORMATS)} or kivi2, "
            "optionally with -g<group>, -r<residual>, -smooth (int4-g32-r32-smooth), -channel-keys "
            "(int2-r32-channel-keys), or int8-static / int4-static"
        )
    kind, group, residual = m.group(1), int(m.group(2) or 0), int(m.group(3) or 0)
    return KvCacheFormat(kind, group, bool(m.group(4)), residual, bool(m.group(5)), bool(m.group(6)))


def rope_partner(head_dim: int, interleaved: bool) -> np.ndarray:
    """For each channel, the channel RoPE rotates it with: c ^ 1 (pairs 2i, 2i+1) or c +- d/2 (halves)."""
    c = np.arange(head_dim)
    return c ^ 1 if interleaved else (c + head_dim // 2) % head_dim


def key_channel_scales(keys: np.ndarray, interleaved: bool) -> np.ndarray:
    """keys (batch, kv_heads, seq, head_dim), after RoPE -> (kv_heads, head_dim) f32: the largest RoPE pair
    norm per channel over every token, which rotation leaves unchanged (so it holds at any position)."""
    k = keys.astype(np.float64)
    pair = np.sqrt(k**2 + k[..., rope_partner(k.shape[-1], interleaved)] ** 2)
    return np.maximum(pair.max(axis=(0, 2)), 1e-6).astype(np.float32)


def collect_key_scales(decoder, ids: np.ndarray, interleaved: bool, batch: int = 4) -> np.ndarray:
    """Calibrate ``-smooth`` formats: run the fp32-cache ``decoder`` (an OrtDecoder) over ``ids`` (n, seq)
    and read the keys it caches -> (layers, kv_heads, head_dim) f32, the max over all sequences."""
    scales = None
    for start in range(0, ids.shape[0], batch):
        rows = ids[start : start + batch]
        _, cache = decoder.forward(rows, decoder.empty_cache(rows.shape[0]))
        layer = np.stack([key_channel_scales(cache[n], interleaved) for n in decoder.past_key_names])
        scales = layer if scales is None else np.maximum(scales, layer)
    return scales


# Clipping ratios tried per channel by static_cache_ranges: the range that minimizes the squared error
# of the static quantization on the calibration data (a few outliers clipped beat a coarser step for all).
CLIP_RATIOS = tuple(np.round(np.arange(1.0, 0.29, -0.05), 2))


def static_cache_ranges(
    decoder, ids: np.ndarray, interleaved: bool, fmt: KvCacheFormat, batch: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrate a ``-static`` format -> (keys, values) ranges, each (layers, kv_heads, head_dim) f32: per
    channel the clipped range (a CLIP_RATIOS fraction of the largest value) whose static quantization has
    the least squared error over ``ids`` run through the fp32-cache ``decoder``. A key channel is judged on
    its own values pooled with its RoPE partner's, which rotation mixes into it at other positions, and
    clipped from the pair norm range (:func:`key_channel_scales`), which covers every position."""
    keys = {n: [] for n in decoder.past_key_names}
    values = {n: [] for n in decoder.past_value_names}
    for start in range(0, ids.shape[0], batch):
        rows = ids[start : start + batch]
        _, cache = decoder.forward(rows, decoder.empty_cache(rows.shape[0]))
        for store in (keys, values):
            for n in store:
                store[n].append(cache[n])
    out = []
    for store, is_key in ((keys, True), (values, False)):
        layers = []
        for n in store:
            x = np.concatenate(store[n], axis=0)  # (sequences, kv_heads, seq, head_dim)
            if is_key:
                top = key_channel_scales(x, interleaved)  # (kv_heads, head_dim)
                x = np.concatenate([x, x[..., rope_partner(x.shape[-1], interleaved)]], axis=2)
            else:
                top = np.maximum(np.abs(x).max(axis=(0, 2)), 1e-6)
            layers.append(_least_error_range(x, top, fmt))
        out.append(np.stack(layers).astype(np.float32))
    return out[0], out[1]


def _least_error_range(x: np.ndarray, top: np.ndarray, fmt: KvCacheFormat) -> np.ndarray:
    """x (n, kv_heads, seq, head_dim), top (kv_heads, head_dim) -> the range among top * CLIP_RATIOS with the
    least squared error of round-and-clip quantization per channel."""
    best, best_err = top, None
    for ratio in CLIP_RATIOS:
        rng = (top * ratio).astype(np.float32)
        scale = rng[None, :, None, :] / np.float32(fmt.qmax)
        err = ((np.clip(np.round(x / scale), fmt.qmin, fmt.qmax) * scale - x) ** 2).mean(axis=(0, 2))
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best, best_err = np.where(better, rng, best), np.where(better, err, best_err)
    return best


def static_scales(ranges: np.ndarray, fmt: KvCacheFormat) -> np.ndarray:
    """Calibrated ranges (layers, kv_heads, head_dim) -> the static per-channel scales, range / qmax."""
    return (np.asarray(ranges, dtype=np.float32) / np.float32(fmt.qmax)).astype(np.float32)


def quantize_static(x: np.ndarray, scale: np.ndarray, fmt: KvCacheFormat) -> np.ndarray:
    """x (batch, kv_heads, seq, head_dim), scale broadcastable (1, kv_heads, 1, head_dim) -> int8, or int4
    packed by :func:`pack_int4`: round_half_even(x / scale) clipped to [qmin, qmax]."""
    q = np.clip(np.round(x.astype(np.float32) / scale), fmt.qmin, fmt.qmax).astype(np.int8)
    return q if fmt.kind == "int8" else pack_int4(q)


def dequantize_static(stored: np.ndarray, scale: np.ndarray, fmt: KvCacheFormat) -> np.ndarray:
    q = unpack_int4(stored) if fmt.kind == "int4" else stored
    return q.astype(np.float32) * scale


# -- the maths, as the reference -----------------------------------------------------------------
def quantize(x: np.ndarray, fmt: KvCacheFormat) -> tuple[np.ndarray, np.ndarray]:
    """x (batch, kv_heads, seq, head_dim) f32 -> (stored, scale (batch, kv_heads, seq, head_dim / group)).

    scale = max|x| / qmax over each group (at least MIN_SCALE); q = clip(round_half_even(x / scale)).
    """
    d = x.shape[-1]
    g = fmt.group_size(d)
    xg = x.astype(np.float32).reshape(*x.shape[:-1], d // g, g)  # (batch, kv_heads, seq, groups, g)
    if fmt.kind == "int2":  # mid-rise: thresholds at -scale, 0, scale; scale = RMS
        scale = np.maximum(np.sqrt((xg * xg).mean(axis=-1, keepdims=True)), np.float32(MIN_SCALE))
        q = np.clip(np.floor(xg / scale) + 2, 0, 3).reshape(x.shape)
        return pack_int2(q.astype(np.uint8)), scale[..., 0].astype(np.float32)
    scale = np.maximum(np.abs(xg).max(axis=-1, keepdims=True) / np.float32(fmt.qmax), np.float32(MIN_SCALE))
    q = np.clip(np.round(xg / scale), -fmt.qmax, fmt.qmax).reshape(x.shape)
    scale = scale[..., 0].astype(np.float32)  # (batch, kv_heads, seq, groups)
    if fmt.kind == "int8":
        return q.astype(np.int8), scale
    return pack_int4(q.astype(np.int8)), scale


def dequantize(stored: np.ndarray, scale: np.ndarray, fmt: KvCacheFormat) -> np.ndarray:
    q = {"int4": unpack_int4, "int2": lambda t: unpack_int2(t).astype(np.float32) - 1.5}.get(fmt.kind, np.asarray)(
        stored
    )
    d = q.shape[-1]
    g = fmt.group_size(d)
    qg = q.astype(np.float32).reshape(*q.shape[:-1], d // g, g)
    return (qg * scale[..., None]).reshape(q.shape)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 values in [-8, 7], last axis even -> uint8 with half the last axis.

    Byte j holds channel 2j in its low nibble and channel 2j+1 in its high nibble, each stored as q + 8
    (an unsigned nibble), so one byte is ``(q[2j] + 8) | (q[2j+1] + 8) << 4``.
    """
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def pack_int2(q: np.ndarray) -> np.ndarray:
    """2-bit codes in [0, 3], last axis a multiple of 4 -> uint8 with a quarter of it: channel 4j + k in
    bits 2k..2k+1 of byte j, ``q[4j] | q[4j+1] << 2 | q[4j+2] << 4 | q[4j+3] << 6``."""
    u = q.astype(np.uint8)
    return (u[..., 0::4] | u[..., 1::4] << 2 | u[..., 2::4] << 4 | u[..., 3::4] << 6).astype(np.uint8)


def unpack_int2(packed: np.ndarray) -> np.ndarray:
    codes = np.stack([(packed >> (2 * k)) & 3 for k in range(4)], axis=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 4).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# -- the same maths as ONNX ops ------------------------------------------------------------------
def quantize_in_graph(
    b, x: ir.Value, fmt: KvCacheFormat, head_dim: int, prefix: str, channel_scale: ir.Value | None = None
) -> tuple[ir.Value, ir.Value]:
    """x (batch, kv_heads, seq, head_dim) f32 -> stored (int8 or packed uint8), scale f32, as :func:`quantize`
    of ``x / channel_scale`` when a (1, kv_heads, 1, head_dim) channel scale is given.

    ``b`` is the decoder builder (its ``op``/``i64``/``f32`` helpers).
    """
    if channel_scale is not None:
        x = b.op("Div", [x, channel_scale], name=f"{prefix}.smooth")
    g = fmt.group_size(head_dim)
    groups = head_dim // g
    xg = b.op("Reshape", [x, b.i64([0, 0, 0, groups, g], f"kv_shape_groups{g}")], name=f"{prefix}.groups")
    last = b.i64([-1], "axes_last")
    if fmt.kind == "int2":  # the RMS (see the module docstring)
        ms = b.op("ReduceMean", [b.op("Mul", [xg, xg], name=f"{prefix}.sq"), last], name=f"{prefix}.ms")
        scale = b.op("Sqrt", [ms], name=f"{prefix}.scale_raw")
    else:
        amax = b.op("ReduceMax", [b.op("Abs", [xg], name=f"{prefix}.abs"), last], name=f"{prefix}.amax")
        scale = b.op("Div", [amax, b.f32(float(fmt.qmax), f"kv_qmax{fmt.qmax}")], name=f"{prefix}.scale_raw")
    scale = b.op("Max", [scale, b.f32(MIN_SCALE, "kv_min_scale")], name=f"{prefix}.scale_g")  # (b, h, s, groups, 1)
    scaled = b.op("Div", [xg, scale], name=f"{prefix}.div")
    scale = b.op("Reshape", [scale, b.i64([0, 0, 0, groups], f"kv_shape_scales{groups}")], name=f"{prefix}.scale")
    if fmt.kind == "int2":  # mid-rise codes 0..3: floor(x / scale) + 2, clipped
        code = b.op("Add", [b.op("Floor", [scaled], name=f"{prefix}.floor"), b.f32(2.0, "kv_two")], name=f"{prefix}.q")
        code = b.op("Clip", [code, b.f32(0.0, "kv_zero"), b.f32(3.0, "kv_three")], name=f"{prefix}.clip")
        return _pack_in_graph(b, code, fmt, head_dim, prefix), scale
    q = b.op("Round", [scaled], name=f"{prefix}.round")
    lim = float(fmt.qmax)
    q = b.op(
        "Clip", [q, b.f32(-lim, f"kv_neg_qmax{fmt.qmax}"), b.f32(lim, f"kv_qmax{fmt.qmax}")], name=f"{prefix}.clip"
    )
    if fmt.kind == "int8":
        q = b.op("Reshape", [q, b.i64([0, 0, 0, head_dim], f"kv_shape_d{head_dim}")], name=f"{prefix}.q")
        return b.op("Cast", [q], {"to": ir.DataType.INT8}, name=f"{prefix}.int8"), scale
    code = b.op("Add", [q, b.f32(8.0, "kv_int4_offset")], name=f"{prefix}.unsigned")  # int4 codes q + 8 in 1..15
    return _pack_in_graph(b, code, fmt, head_dim, prefix), scale


def _pack_in_graph(b, code: ir.Value, fmt: KvCacheFormat, head_dim: int, prefix: str) -> ir.Value:
    """Codes (batch, kv_heads, seq, groups, g) f32 in [0, 2^bits) -> (batch, kv_heads, seq, head_dim / n) uint8,
    n codes per byte, code k of a byte in bits k*bits..: byte = codes @ (1, 2^bits, ...), exact in f32."""
    n = fmt.per_byte
    bits = 8 // n
    per = b.op(
        "Reshape",
        [code, b.i64([0, 0, 0, head_dim // n, n], f"kv_shape_bytes{head_dim}x{n}")],
        name=f"{prefix}.per_byte",
    )
    weights = b.const(np.array([[float(1 << (bits * k))] for k in range(n)], dtype=np.float32), f"kv_pack{n}")  # (n, 1)
    byte = b.op("MatMul", [per, weights], name=f"{prefix}.byte")  # (b, h, s, d/n, 1)
    byte = b.op(
        "Reshape", [byte, b.i64([0, 0, 0, head_dim // n], f"kv_shape_d{head_dim // n}")], name=f"{prefix}.bytes"
    )
    return b.op("Cast", [byte], {"to": ir.DataType.UINT8}, name=f"{prefix}.uint8")


def _unpack_in_graph(b, stored: ir.Value, fmt: KvCacheFormat, head_dim: int, prefix: str) -> ir.Value:
    """uint8 (batch, kv_heads, t, head_dim / n) -> codes f32 (batch, kv_heads, t, head_dim):
    code k = floor(byte / 2^(bits k)) - 2^bits * floor(byte / 2^(bits (k + 1))), exact in f32."""
    n = fmt.per_byte
    bits = 8 // n
    f = b.op("Cast", [stored], {"to": ir.DataType.FLOAT}, name=f"{prefix}.f32")
    f = b.op("Unsqueeze", [f, b.i64([-1], "axes_last")], name=f"{prefix}.f32_u")  # (b, h, t, d/n, 1)
    inv = b.const(np.array([2.0 ** (-bits * k) for k in range(n + 1)], dtype=np.float32), f"kv_unpack{n}")
    shifted = b.op("Floor", [b.op("Mul", [f, inv], name=f"{prefix}.shift")], name=f"{prefix}.shifted")  # (.., n+1)
    last = b.i64([-1], "axes_last")
    low = b.op("Slice", [shifted, b.i64([0], "zero1"), b.i64([n], f"kv_n{n}"), last], name=f"{prefix}.low")
    high = b.op("Slice", [shifted, b.i64([1], "one1"), b.i64([n + 1], f"kv_n{n + 1}"), last], name=f"{prefix}.high")
    radix = b.f32(float(1 << bits), f"kv_radix{bits}")
    codes = b.op("Sub", [low, b.op("Mul", [high, radix], name=f"{prefix}.high_r")], name=f"{prefix}.codes")
    return b.op("Reshape", [codes, b.i64([0, 0, 0, head_dim], f"kv_shape_d{head_dim}")], name=f"{prefix}.unpacked")


def dequantize_in_graph(
    b,
    stored: ir.Value,
    scale: ir.Value,
    fmt: KvCacheFormat,
    head_dim: int,
    prefix: str,
    channel_scale: ir.Value | None = None,
) -> ir.Value:
    """stored (batch, kv_heads, total, stored_dim), scale (batch, kv_heads, total, groups) -> f32 (.., head_dim)."""
    g = fmt.group_size(head_dim)
    groups = head_dim // g
    if fmt.kind == "int8":
        q = b.op("Cast", [stored], {"to": ir.DataType.FLOAT}, name=f"{prefix}.f32")
    elif fmt.kind == "int4":
        q = b.op(
            "Sub",
            [_unpack_in_graph(b, stored, fmt, head_dim, prefix), b.f32(8.0, "kv_int4_offset")],
            name=f"{prefix}.signed",
        )
    elif fmt.kind == "int2":
        q = b.op(
            "Sub",
            [_unpack_in_graph(b, stored, fmt, head_dim, prefix), b.f32(1.5, "kv_int2_mid")],
            name=f"{prefix}.signed",
        )
    if groups == 1:  # scale (b, h, t, 1) broadcasts over head_dim
        deq = b.op("Mul", [q, scale], name=f"{prefix}.deq")
    else:
        qg = b.op("Reshape", [q, b.i64([0, 0, 0, groups, g], f"kv_shape_groups{g}")], name=f"{prefix}.groups")
        sg = b.op("Unsqueeze", [scale, b.i64([-1], "axes_last")], name=f"{prefix}.scale_u")
        deq = b.op("Mul", [qg, sg], name=f"{prefix}.deq_g")
        deq = b.op("Reshape", [deq, b.i64([0, 0, 0, head_dim], f"kv_shape_d{head_dim}")], name=f"{prefix}.deq")
    if channel_scale is not None:
        deq = b.op("Mul", [deq, channel_scale], name=f"{prefix}.unsmooth")
    return deq


def quantize_static_in_graph(
    b, x: ir.Value, fmt: KvCacheFormat, head_dim: int, scale: ir.Value, prefix: str
) -> ir.Value:
    """x (batch, kv_heads, seq, head_dim) f32, scale (1, kv_heads, 1, head_dim) -> :func:`quantize_static`."""
    q = b.op("Round", [b.op("Div", [x, scale], name=f"{prefix}.div")], name=f"{prefix}.round")
    lo, hi = float(fmt.qmin), float(fmt.qmax)
    q = b.op("Clip", [q, b.f32(lo, f"kv_qmin{fmt.qmin}"), b.f32(hi, f"kv_qmax{fmt.qmax}")], name=f"{prefix}.clip")
    if fmt.kind == "int8":
        return b.op("Cast", [q], {"to": ir.DataType.INT8}, name=f"{prefix}.int8")
    code = b.op("Add", [q, b.f32(8.0, "kv_int4_offset")], name=f"{prefix}.unsigned")  # codes q + 8 in 0..15
    return _pack_in_graph(b, code, fmt, head_dim, prefix)


def dequantize_static_in_graph(
    b, stored: ir.Value, fmt: KvCacheFormat, head_dim: int, scale: ir.Value, prefix: str
) -> ir.Value:
    """stored (batch, kv_heads, total, stored_dim) -> f32 (.., head_dim), :func:`dequantize_static`."""
    if fmt.kind == "int8":
        q = b.op("Cast", [stored], {"to": ir.DataType.FLOAT}, name=f"{prefix}.f32")
    else:
        q = b.op(
            "Sub",
            [_unpack_in_graph(b, stored, fmt, head_dim, prefix), b.f32(8.0, "kv_int4_offset")],
            name=f"{prefix}.signed",
        )
    return b.op("Mul", [q, scale], name=f"{prefix}.deq")
