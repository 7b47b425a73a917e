"""GGUF blocks -> MatMulNBits codes: every kept type against the gguf package's own dequantization."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from quantlab.quant.gguf_blocks import BLOCK_BYTES, BLOCK_WEIGHTS, KEPT, decode_blocks

# the gguf package quantizes these in numpy; the K-quants are built from random blocks
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# |ours - gguf| relative to the block's largest magnitude: the two evaluate the same products in
# another order (scale * (code - zp) + offset against d * q + m), so a few fp32 ulps apart
REL_TOL = 1e-6


def random_blocks(ggml_type: str, rows: int, cols: int, seed: int = 0, d_range=(1e-3, 2e-2)) -> np.ndarray:
    """Random bytes of a valid tensor: every fp16 field set to a finite, positive value in ``d_range``."""
    rng = np.random.default_rng(seed)
    size, per = BLOCK_BYTES[ggml_type], BLOCK_WEIGHTS[ggml_type]
    raw = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    fp16_at = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[ggml_type]
    for at in fp16_at:
        raw[..., at : at + 2] = rng.uniform(*d_range, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def assert_matches_gguf(raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> None:
    ours = decode_blocks(raw, ggml_type, shape)
    reference = dequantize(raw, gguf.GGMLQuantizationType[ggml_type]).reshape(shape)
    got = ours.dequantize()
    layout = KEPT[ggml_type]
    assert ours.codes.max() < 1 << layout.bits
    assert ours.scales.shape == (shape[0], shape[1] // layout.block_size)
    assert (ours.mins is not None) == layout.has_mins
    per_block = np.abs(reference).reshape(shape[0], -1, layout.block_size).max(-1, keepdims=True) + 1e-30
    rel = (np.abs(got - reference).reshape(per_block.shape[:2] + (-1,)) / per_block).max()
    assert rel <= REL_TOL, f"{ggml_type}: relative error {rel:.3g}"


def test_block_sizes_are_ggmls():
    for ggml_type, size in BLOCK_BYTES.items():
        per, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
        assert (per, nbytes) == (BLOCK_WEIGHTS[ggml_type], size)


@pytest.mark.parametrize("ggml_type", QUANTIZABLE)
def test_quantized_by_gguf_matches_its_dequantize(ggml_type):
    w = np.random.default_rng(1).standard_normal((6, 96)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block: d == 0 (and m == 0 for the _1 types)
    w[1, :32] = 0.25  # a constant block: d == 0 with m != 0 for the _1 types
    raw = quantize(w, gguf.GGMLQuantizationType[ggml_type])
    assert_matches_gguf(raw, ggml_type, w.shape)


@pytest.mark.parametrize("ggml_type", K_QUANTS)
def test_k_quants_match_gguf_dequantize(ggml_type):
    assert_matches_gguf(random_blocks(ggml_type, 4, 512, seed=2), ggml_type, (4, 512))


def test_q8_0_and_q4_1_codes_are_the_files_integers():
    """Golden bytes: one hand-written block of each, codes read straight off the bytes."""
    d = np.float16(0.5).tobytes()
    q8 = np.frombuffer(d + bytes(np.arange(-16, 16, dtype=np.int8).view(np.uint8)), np.uint8).reshape(1, 34)
    blocks = decode_blocks(q8, "Q8_0", (1, 32))
    assert blocks.codes.tolist() == [list(range(112, 144))]  # int8 q + 128
    assert blocks.scales.tolist() == [[0.5]] and blocks.mins is None

    qs = bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] * 2)  # low nibble: weight j, high: j + 16
    q41 = np.frombuffer(d + np.float16(-2.0).tobytes() + qs, np.uint8).reshape(1, 20)
    blocks = decode_blocks(q41, "Q4_1", (1, 32))
    assert blocks.codes[0, :16].tolist() == [0, 2, 4, 6, 8, 10, 12, 14] * 2
    assert blocks.codes[0, 16:].tolist() == [1, 3, 5, 7, 9, 11, 13, 15] * 2
    assert blocks.mins.tolist() == [[-2.0]] and blocks.offsets.tolist() == [[-2.0 + 8 * 0.5]]


def test_row_permutation_moves_whole_rows():
    raw = random_blocks("Q4_K", 8, 256, seed=3)
    blocks = decode_blocks(raw, "Q4_K", (8, 256))
    order = np.array([3, 1, 0, 2, 7, 5, 6, 4])
    moved = blocks.map_rows(lambda a: a[order])
    np.testing.assert_array_equal(moved.dequantize(), blocks.dequantize()[order])


def test_rejects_unknown_type_and_wrong_size():
    with pytest.raises(ValueError, match="no kept layout"):
        decode_blocks(np.zeros((1, 66), np.uint8), "IQ4_NL", (1, 64))
    with pytest.raises(ValueError, match="does not hold"):
        decode_blocks(np.zeros((1, 20), np.uint8), "Q4_1", (1, 64))
