"""A GGUF's quantized blocks as MatMulNBits codes, block scales and block offsets, without re-rounding.

Every GGUF type kept here dequantizes, per block of ``block_size`` weights along a row, as

    w = scale * (code - 2^(bits-1)) + offset          offset = min + min_shift * scale   (fp32)

where ``code`` is an unsigned ``bits``-bit integer (the GGUF's own integer, shifted by a constant),
``2^(bits-1)`` is MatMulNBits' implicit zero point, and ``min`` is the GGUF's additive term (Q4_1's
``m``, the K-quants' ``-dmin * m``; absent for the symmetric types). The offset is carried outside
MatMulNBits: ``y = MatMulNBits(x) + block_sums(x) @ offset^T``. onnxruntime 1.32's CPU kernel accepts
float zero points (which could hold ``-m / d``) only for 2 and 4 bits, and runs them through a
dequantize-then-GEMM fallback 50-150x slower than its packed kernel for one token; integer codes
with the implicit zero point and the small offset product stay on the fast path
(benchmarks/bench_source_layouts.py). onnxruntime's CPU kernel takes 2, 4 and 8 bits only, so 3-, 5-
and 6-bit codes are kept exactly but stored wider.

Block layouts (ggml's ``block_*`` structs, little-endian; ``K`` = 256 weights per super-block):

    Q4_0  18 B / 32:  d f16 | qs[16]       w[j] = d * (q[j] - 8);  q[j] = qs[j] & 15, q[j+16] = qs[j] >> 4
    Q4_1  20 B / 32:  d f16 | m f16 | qs[16]              w = d * q + m   (nibbles as Q4_0)
    Q5_0  22 B / 32:  d f16 | qh u32 | qs[16]             w = d * (q - 16); q[j] = nibble | ((qh >> j) & 1) << 4
    Q5_1  24 B / 32:  d f16 | m f16 | qh u32 | qs[16]     w = d * q + m
    Q8_0  34 B / 32:  d f16 | qs i8[32]                   w = d * q
    Q2_K  84 B / K:   scales[16] (lo 4 bits sc, hi 4 bits m) | qs[64] | d f16 | dmin f16
                      sub-block of 16 s: w = d*sc[s] * q - dmin*m[s]
                      q[e] = (qs[32h + e%32] >> 2*((e%128)//32)) & 3 with h = e//128
    Q3_K  110 B / K:  hmask[32] | qs[64] | scales[12] (16 x 6-bit, see _q3_k_scales) | d f16
                      sub-block of 16 s: w = d*(sc[s]-32) * (lo2 + 4*hbit - 4); hbit = (hmask[e%32] >> e//32) & 1
    Q4_K  144 B / K:  d f16 | dmin f16 | scales[12] (8 x 6-bit sc, 8 x 6-bit m) | qs[128]
                      sub-block of 32 s: w = d*sc[s] * q - dmin*m[s]
                      sub-blocks 2i, 2i+1: low, high nibbles of qs[32i:32i+32]
    Q5_K  176 B / K:  d f16 | dmin f16 | scales[12] | qh[32] | qs[128]     as Q4_K, q |= ((qh[e%32] >> s) & 1) << 4
    Q6_K  210 B / K:  ql[128] | qh[64] | scales i8[16] | d f16
                      sub-block of 16 s: w = d*sc[s] * (q - 32); in half h (128 weights), t = e % 128:
                      q = ((ql[64h + t%64] >> 4*(t//64)) & 15) | ((qh[32h + t%32] >> 2*(t//32)) & 3) << 4

What each type becomes (``KEPT``): codes shifted to unsigned and widened where MatMulNBits has no such
width (Q5_0/Q5_1/Q5_K/Q6_K -> 8 bits, Q3_K -> 4 bits: every code kept exactly). Scales and mins of the
32-blocks types are the file's own fp16 values, so they are stored fp16 and widened to fp32 in the
graph (exact); the K-quants' ``d * sc`` products need 17 bits and are stored fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QK_K = 256
# bytes of one block of each kept type, as ggml's static_asserts pin them
BLOCK_BYTES = {
    "Q4_0": 18,
    "Q4_1": 20,
    "Q5_0": 22,
    "Q5_1": 24,
    "Q8_0": 34,
    "Q2_K": 84,
    "Q3_K": 110,
    "Q4_K": 144,
    "Q5_K": 176,
    "Q6_K": 210,
}
BLOCK_WEIGHTS = {t: 32 for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")} | {
    t: QK_K for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
}


@dataclass(frozen=True)
class KeptLayout:
    """How one GGUF type is emitted: MatMulNBits ``bits`` and ``block_size``, with or without the
    offset product, and whether scales and mins are exact in fp16 (stored so, widened in the graph)."""

    ggml_type: str
    bits: int
    block_size: int
    has_mins: bool
    fp16_exact: bool
    min_shift: int  # offset = min + min_shift * scale
    note: str

    def describe(self) -> str:
        storage = "fp16 scales/mins widened in the graph" if self.fp16_exact else "fp32 scales/offsets"
        offset = ", per-block offset" if self.has_mins else ""
        return f"MatMulNBits {self.bits}-bit block {self.block_size}{offset}, {storage}: {self.note}"


KEPT = {
    "Q4_0": KeptLayout("Q4_0", 4, 32, False, True, 0, "codes as they are, zero point 8"),
    "Q4_1": KeptLayout("Q4_1", 4, 32, True, True, 8, "codes as they are, offset m + 8d"),
    "Q5_0": KeptLayout("Q5_0", 8, 32, False, True, 0, "5-bit codes kept exactly, stored 8-bit (q + 112)"),
    "Q5_1": KeptLayout(
        "Q5_1", 8, 32, True, True, 16, "5-bit codes kept exactly, stored 8-bit (q + 112), offset m + 16d"
    ),
    "Q8_0": KeptLayout("Q8_0", 8, 32, False, True, 0, "codes as they are (q + 128)"),
    "Q2_K": KeptLayout(
        "Q2_K", 2, 16, True, False, 2, "codes as they are, sub-block scale d*sc, offset 2*d*sc - dmin*m"
    ),
    "Q3_K": KeptLayout(
        "Q3_K", 4, 16, False, False, 0, "3-bit codes kept exactly, stored 4-bit (q + 4), scale d*(sc-32)"
    ),
    "Q4_K": KeptLayout("Q4_K", 4, 32, True, False, 8, "codes as they are, scale d*sc, offset 8*d*sc - dmin*m"),
    "Q5_K": KeptLayout("Q5_K", 8, 32, True, False, 16, "5-bit codes kept exactly, stored 8-bit (q + 112)"),
    "Q6_K": KeptLayout("Q6_K", 8, 16, False, False, 0, "6-bit codes kept exactly, stored 8-bit (q + 96)"),
}


@dataclass(frozen=True, eq=False)
class SourceBlocks:
    """A ``(N, K)`` weight as MatMulNBits codes: ``w = scales * (codes - 2^(bits-1)) + offsets``.

    codes: (N, K) uint8 below 2^bits. scales, mins: (N, K // block_size) float32 (mins None for a
    symmetric type). offsets = mins + min_shift * scales, in fp32 (the graph computes the same).
    """

    layout: KeptLayout
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def offsets(self) -> np.ndarray | None:
        if self.mins is None:
            return None
        return self.mins + np.float32(self.layout.min_shift) * self.scales

    def dequantize(self) -> np.ndarray:
        """(N, K) float32, the way the emitted graph computes it."""
        n, k = self.codes.shape
        b = self.layout.block_size
        centred = self.codes.reshape(n, k // b, b).astype(np.float32) - np.float32(1 << (self.layout.bits - 1))
        w = centred * self.scales[:, :, None]  # (N, n_blocks, block)
        if self.mins is not None:
            w = w + self.offsets[:, :, None]
        return w.reshape(n, k)

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> SourceBlocks:
        """The same weight with ``fn`` applied to the rows (output channels) of every array: a row
        permutation is exact on codes, scales and mins alike."""
        mins = None if self.mins is None else fn(self.mins)
        return SourceBlocks(self.layout, fn(self.codes), fn(self.scales), mins)


def stack_rows(parts: list[SourceBlocks]) -> SourceBlocks:
    """Weights of one layout that read one input, as one: their rows (output channels) stacked, exactly."""
    if len(parts) == 1:
        return parts[0]
    mins = None if parts[0].mins is None else np.concatenate([p.mins for p in parts])
    codes = np.concatenate([p.codes for p in parts])
    return SourceBlocks(parts[0].layout, codes, np.concatenate([p.scales for p in parts]), mins)


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """(..., bytes) -> (...,) float32 of the fp16 at byte ``at`` of each block."""
    return np.ascontiguousarray(raw[..., at : at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _bits_of(word: np.ndarray, count: int) -> np.ndarray:
    """(..., 4) little-endian bytes of a u32 -> (..., count) of its bits, bit j first."""
    return np.unpackbits(word, axis=-1, bitorder="little")[..., :count]


def _q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) bytes -> (..., 8) 6-bit scales and mins (ggml's get_scale_min_k4).

    bytes 0-3: sc[0..3] low 6 bits, sc[4..7] bits 4-5 on top; 4-7: m[0..3], m[4..7] bits 4-5;
    8-11: sc[4..7] low nibble | m[4..7] high nibble.
    """
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 6) << 4)], axis=-1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=-1)
    return sc, mn


def _q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """(..., 12) bytes -> (..., 16) signed sub-block scales (6-bit, minus 32).

    bytes 0-7 hold the low nibbles of scales 0-7 (low nibble) and 8-15 (high nibble); bytes 8-11 hold
    the top two bits: scale s's are bits 2*(s // 4) of byte 8 + s % 4.
    """
    low = np.concatenate([scales[..., 0:8] & 15, scales[..., 0:8] >> 4], axis=-1)  # (..., 16)
    hi_bytes = scales[..., 8:12]
    high = np.concatenate([(hi_bytes >> (2 * j)) & 3 for j in range(4)], axis=-1)  # (..., 16)
    return (low | (high << 4)).astype(np.int16) - 32


def _decode_32(raw: np.ndarray, ggml_type: str):
    """Types with 32-weight blocks: (rows, n_blocks, bytes) -> codes (rows, n_blocks, 32), d, m."""
    if ggml_type == "Q8_0":
        codes = (raw[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes, _f16(raw, 0), None
    if ggml_type == "Q4_0":
        return _nibbles_32(raw[..., 2:18]), _f16(raw, 0), None
    if ggml_type == "Q4_1":
        return _nibbles_32(raw[..., 4:20]), _f16(raw, 0), _f16(raw, 2)
    with_min = ggml_type == "Q5_1"
    at = 4 if with_min else 2
    low = _nibbles_32(raw[..., at + 4 : at + 20])
    high = _bits_of(raw[..., at : at + 4], 32)
    q = low | (high << 4)  # 0..31
    if with_min:
        return q + 112, _f16(raw, 0), _f16(raw, 2)  # 8-bit codes, zero point 128: d*(q+112-128) + m + 16d
    return q + 112, _f16(raw, 0), None  # Q5_0: d*(q - 16) = d*((q + 112) - 128)


def _decode_k(raw: np.ndarray, ggml_type: str):
    """K-quants: (rows, n_super, bytes) -> codes (rows, n_super, 256), scales and mins per sub-block."""
    if ggml_type == "Q2_K":
        sub = raw[..., 0:16]
        qs = raw[..., 16:80].reshape(*raw.shape[:-1], 2, 1, 32)  # (.., half, 1, byte)
        q = ((qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(*raw.shape[:-1], QK_K)
        d, dmin = _f16(raw, 80), _f16(raw, 82)
        return q, d[..., None] * (sub & 15), -(dmin[..., None] * (sub >> 4))
    if ggml_type == "Q3_K":
        hmask = raw[..., 0:32]
        qs = raw[..., 32:96].reshape(*raw.shape[:-1], 2, 1, 32)
        lo = ((qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(*raw.shape[:-1], QK_K)
        hbit = ((hmask[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(*raw.shape[:-1], QK_K)
        d = _f16(raw, 108)
        # w = d*(sc-32) * (lo + 4*hbit - 4) = scale * ((lo + 4*hbit + 4) - 8)
        return lo + 4 * hbit + 4, d[..., None] * _q3_k_scales(raw[..., 96:108]), None
    if ggml_type == "Q6_K":
        ql = raw[..., 0:128].reshape(*raw.shape[:-1], 2, 1, 64)
        qh = raw[..., 128:192].reshape(*raw.shape[:-1], 2, 1, 32)
        lo = ((ql >> np.array([0, 4], np.uint8)[:, None]) & 15).reshape(*raw.shape[:-1], QK_K)
        hi = ((qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(*raw.shape[:-1], QK_K)
        sc = raw[..., 192:208].view(np.int8).astype(np.float32)
        d = _f16(raw, 208)
        return (lo | (hi << 4)) + 96, d[..., None] * sc, None  # d*sc*(q - 32) = scale*((q + 96) - 128)
    # Q4_K, Q5_K
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _q4_k_scale_min(raw[..., 4:16])
    qs = raw[..., -128:].reshape(*raw.shape[:-1], 4, 1, 32)
    q = ((qs >> np.array([0, 4], np.uint8)[:, None]) & 15).reshape(*raw.shape[:-1], QK_K)
    if ggml_type == "Q5_K":
        qh = raw[..., 16:48]
        q = q | ((((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4).reshape(q.shape))
        q = q + 112
    return q, d[..., None] * sc, -(dmin[..., None] * mn)


def decode_blocks(raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> SourceBlocks:
    """A GGUF tensor's raw bytes -> :class:`SourceBlocks` of shape ``(N, K)`` (torch Linear order).

    ``raw`` is the tensor's data as the gguf package hands it out: uint8 ``(N, K // B * bytes)``.
    Raises ValueError for a type not in :data:`KEPT` or bytes that do not match the shape.
    """
    if ggml_type not in KEPT:
        raise ValueError(f"GGUF type {ggml_type} has no kept layout")
    layout = KEPT[ggml_type]
    n, k = shape
    per_block, size = BLOCK_WEIGHTS[ggml_type], BLOCK_BYTES[ggml_type]
    if k % per_block or raw.size != n * (k // per_block) * size:
        raise ValueError(f"{ggml_type} data of {raw.size} bytes does not hold a {shape} weight")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // per_block, size)  # (N, blocks per row, bytes)
    decode = _decode_32 if per_block == 32 else _decode_k
    codes, scales, mins = decode(blocks, ggml_type)
    n_blocks = k // layout.block_size
    return SourceBlocks(
        layout,
        np.ascontiguousarray(codes.reshape(n, k), dtype=np.uint8),
        np.ascontiguousarray(scales.reshape(n, n_blocks), dtype=np.float32),
        None if mins is None else np.ascontiguousarray(mins.reshape(n, n_blocks), dtype=np.float32),
    )


# GatherBlockQuantized (the token embedding) reads 4- or 8-bit codes with an implicit zero point and
# no offset term, in blocks of at least 16.
EMBEDDING_BITS = (4, 8)


def embedding_keepable(layout: KeptLayout) -> str | None:
    """None when GatherBlockQuantized can hold ``layout``'s codes, else why not."""
    if layout.has_mins:
        return f"{layout.ggml_type} has a per-block min, which GatherBlockQuantized cannot add"
    if layout.bits not in EMBEDDING_BITS:
        return f"GatherBlockQuantized reads 4 or 8 bits, {layout.ggml_type} needs {layout.bits}"
    return None


@dataclass(frozen=True)
class SourceQuantization:
    """A checkpoint's own quantization, planned per tensor before anything is decoded.

    ``kept`` maps linear names (``model.layers.0.mlp.up_proj``, ``lm_head``) and ``model.embed_tokens``
    to their layout; ``not_kept`` maps the others to the reason (they stay in float). ``load`` decodes
    one of ``kept`` when the emitter asks for it.
    """

    kept: dict[str, KeptLayout]
    not_kept: dict[str, str]
    source_types: dict[str, str]
    load: Callable[[str], SourceBlocks]
    tied: bool = False  # lm_head is the embedding: one table, shared after the head is emitted

    def describe(self) -> dict:
        """For the manifest: per tensor, the source type and what became of it."""
        tensors = {}
        for name in sorted({*self.kept, *self.not_kept}):
            entry = {"source_type": self.source_types[name], "kept": name in self.kept}
            if name in self.kept:
                entry["as"] = self.kept[name].describe()
                if self.tied and name == "model.embed_tokens":
                    entry["as"] = "the tied head's tensor (lm_head), shared by ShareTiedEmbeddingPass"
            else:
                entry["reason"] = self.not_kept[name]
            tensors[name] = entry
        return {"kept": len(self.kept), "not_kept": len(self.not_kept), "tensors": tensors}


def plan_source_quantization(
    types: dict[str, str],
    load: Callable[[str], SourceBlocks],
    *,
    tied: bool = False,
    embedding: str = "model.embed_tokens",
) -> SourceQuantization:
    """Which tensors keep their GGUF quantization: ``types`` maps each linear name (and the embedding's)
    to its GGUF type name (``Q4_1``, ``F32``...). ``tied``: ``lm_head`` is the embedding table; its
    codes are kept as a linear, and the embedding shares them (ShareTiedEmbeddingPass)."""
    types = dict(types)
    if tied:
        types["lm_head"] = types[embedding]
    kept, not_kept = {}, {}
    for name, ggml_type in types.items():
        layout = KEPT.get(ggml_type)
        if layout is None:
            not_kept[name] = f"{ggml_type} has no exact MatMulNBits layout here: emitted as float"
        elif name == embedding and (reason := embedding_keepable(layout)) is not None:
            not_kept[name] = reason + ": emitted as float"
        else:
            kept[name] = layout
    return SourceQuantization(kept, not_kept, types, load, tied)
