"""The cache formats as pure maths: parsing, bytes per token, quantize/dequantize bounds, int4 packing."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.graph_builder.kv_cache import (
    KvCacheFormat,
    dequantize,
    key_channel_scales,
    pack_int2,
    pack_int4,
    parse_kv_cache,
    quantize,
    unpack_int2,
    unpack_int4,
)

# SmolLM2-135M's cache shape: 30 layers, 3 kv heads, head_dim 64
SMOLLM2 = (30, 3, 64)
FP16_BYTES = 2 * 30 * 3 * 64 * 2


@pytest.mark.parametrize(
    "text",
    [
        "fp32",
        "int8",
        "int4",
        "int4-g32",
        "int8-g16",
        "int4-smooth",
        "int8-g16-smooth",
        "int2",
        "int2-r32",
        "int4-g32-r16-smooth",
        "int8-static",
        "int4-static",
        "int2-r32-channel-keys",
        "int4-g32-r16-channel-keys",
    ],
)
def test_parse_round_trips(text):
    assert str(parse_kv_cache(text)) == text
    assert parse_kv_cache(str(parse_kv_cache(text))) == parse_kv_cache(text)


def test_kv_prefix_and_kivi2_alias():
    assert parse_kv_cache("kv-int8") == KvCacheFormat("int8")
    assert parse_kv_cache("kivi2") == KvCacheFormat("int2", smooth_keys=True, residual=32)


@pytest.mark.parametrize(
    "text",
    [
        "int3",
        "INT8",
        "int8-g",
        "int8-g0",
        "int2-r0",
        "fp32-r8",
        "int8-gx",
        "fp32-g32",
        "fp32-smooth",
        "int4-smooth-g32",
        "int2-channel-keys",  # a key block needs -r<R>
        "int2-r32-smooth-channel-keys",
        "int8-r8-static",
        "int2-static",
        "int8-static-smooth",
        "fp16",
        "",
    ],
)
def test_parse_rejects(text):
    with pytest.raises(ValueError):
        parse_kv_cache(text)


def test_bytes_per_token_against_fp16():
    """The issue's budget, scales included: int8 <= 0.55 x fp16, int4 <= 0.3 x fp16."""
    int8 = KvCacheFormat("int8").bytes_per_token(*SMOLLM2)
    int4 = KvCacheFormat("int4").bytes_per_token(*SMOLLM2)
    assert int8 == 2 * 30 * 3 * (64 + 4)
    assert int4 == 2 * 30 * 3 * (32 + 4)
    assert int8 / FP16_BYTES <= 0.55
    assert int4 / FP16_BYTES <= 0.3
    assert KvCacheFormat().bytes_per_token(*SMOLLM2) == 2 * FP16_BYTES
    kivi2 = parse_kv_cache("kivi2")
    assert kivi2.bytes_per_token(*SMOLLM2) == 2 * 30 * 3 * (16 + 4)
    assert kivi2.residual_bytes(*SMOLLM2) == 2 * 30 * 3 * 32 * 64 * 4  # fixed, whatever the length
    blocks = parse_kv_cache("int2-r32-channel-keys")  # keys: 16 B + 64 f32 scales per 32-token block
    assert blocks.bytes_per_token(*SMOLLM2) == 30 * 3 * ((16 + 64 * 4 / 32) + (16 + 4))
    assert blocks.residual_bytes(*SMOLLM2) == 30 * 3 * (32 + 31) * 64 * 4  # value window + at most 31 keys


def test_int4_golden_bytes():
    """Low nibble channel 2j, high nibble 2j+1, each stored as q + 8."""
    q = np.arange(-8, 8, dtype=np.int8)  # 16 values -> 8 bytes
    packed = pack_int4(q)
    assert packed.dtype == np.uint8
    assert packed.tobytes() == bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE])
    np.testing.assert_array_equal(unpack_int4(packed), q)


def test_int2_golden_bytes():
    """Channel 4j + k in bits 2k..2k+1 of byte j."""
    codes = np.array([0, 1, 2, 3, 3, 2, 1, 0], dtype=np.uint8)
    packed = pack_int2(codes)
    assert packed.tobytes() == bytes([0b11100100, 0b00011011])
    np.testing.assert_array_equal(unpack_int2(packed), codes)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-g8", "int2", "int2-g8"])
def test_round_trip_error_is_half_a_step(fmt):
    f = parse_kv_cache(fmt)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 16)).astype(np.float32) * rng.uniform(0.1, 10, (2, 3, 5, 1)).astype(np.float32)
    x[0, 0, 0] = 0.0  # an all-zero token: no division by zero
    stored, scale = quantize(x, f)
    assert stored.dtype == (np.int8 if f.kind == "int8" else np.uint8)
    if f.kind == "int2":  # mid-rise, scale = RMS: half a step inside +-2 RMS, clipped to 1.5 RMS beyond
        step = np.repeat(scale, f.group_size(16), axis=-1)
        y = dequantize(stored, scale, f)
        inside = np.abs(x) <= 2 * step
        assert np.all(np.abs(y - x)[inside] <= step[inside] / 2 + 1e-5)
        np.testing.assert_allclose(np.abs(y[~inside]), 1.5 * step[~inside], rtol=1e-6)
        return
    assert stored.shape[-1] == f.stored_dim(16) and scale.shape == (2, 3, 5, f.scale_dim(16))
    y = dequantize(stored, scale, f)
    step = np.repeat(scale, f.group_size(16), axis=-1)
    assert np.all(np.abs(y - x) <= step / 2 + 1e-6)
    np.testing.assert_array_equal(y[0, 0, 0], 0.0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_key_channel_scales_hold_at_every_position(interleaved):
    """The pair norm RoPE preserves: keys rotated to other positions give the same channel scales."""
    rng = np.random.default_rng(0)
    d = 16
    k = rng.standard_normal((1, 2, 50, d)) * rng.uniform(0.1, 20, d)  # (batch, kv_heads, seq, d)
    theta = rng.uniform(0, 2 * np.pi, (1, 1, 50, d // 2))
    c, s = np.cos(theta), np.sin(theta)
    if interleaved:
        x1, x2 = k[..., 0::2], k[..., 1::2]
        r = np.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(k.shape)
    else:
        x1, x2 = k[..., : d // 2], k[..., d // 2 :]
        r = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    np.testing.assert_allclose(key_channel_scales(r, interleaved), key_channel_scales(k, interleaved), rtol=1e-5)
    assert key_channel_scales(k, interleaved).shape == (2, d)
