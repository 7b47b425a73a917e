"""Packing of :class:`QuantizedWeight` into onnxruntime's ``com.microsoft.MatMulNBits`` inputs, and back.

Contract (onnxruntime docs/ContribOperators.md, MatMulNBits; Y = A @ dequant(B)^T):

- attributes K, N, bits, block_size (a power of two >= 16);
- ``B``: uint8 ``(N, n_blocks, blob_size)``, ``n_blocks = ceil(K / block_size)``,
  ``blob_size = block_size * bits / 8``;
- ``scales``: ``(N, n_blocks)``, same float type as A (float32 here). The docs give this 2-D shape
  and onnxruntime's quantizer emits it; onnxruntime 1.32 also accepts it flattened to
  ``(N * n_blocks,)``, the older docs' shape, with the same bytes;
- ``zero_points`` (optional): uint8 ``(N, ceil(n_blocks * bits / 8))``, packed like B;
  absent means every zero point is 2^(bits-1), which is how symmetric weights are emitted.

Bit layout of one block (the codes of ``W[n, b*block_size : (b+1)*block_size]``), little end first::

    bits=4: byte j = code[2j] | code[2j+1] << 4           (low nibble first)   blob = block_size / 2
    bits=8: byte j = code[j]                                                  blob = block_size

    e.g. 4-bit codes 0,1,2,...,15 pack to 0x10 0x32 0x54 0x76 0x98 0xBA 0xDC 0xFE

Codes past K in the last block are 0: MatMulNBits never reads them (A has only K columns), and 0
is what onnxruntime's own quantizer leaves there, so whole tensors compare byte for byte (except,
for 4-bit with odd K, the last byte's high nibble, where onnxruntime leaves whatever code it packed
before). 4-bit zero points pack the same way along the blocks of a row: byte i = zp[2i] | zp[2i+1] << 4,
and an odd block count leaves a high nibble of 8 (2^(bits-1), also onnxruntime's choice) that no
block reads.

Per-channel weights (``group_size == -1``) use one block per row of size ``max(16, next power of
two >= K)``: MatMulNBits needs a power-of-two block, so that block is mostly padding when K is not
a power of two.
"""

from __future__ import annotations

import numpy as np

from quantlab.quant.rtn import QuantizedWeight, group_count
from quantlab.quant.scheme import PER_CHANNEL

MIN_BLOCK_SIZE = 16


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def matmul_nbits_block_size(qw: QuantizedWeight) -> int:
    """The MatMulNBits ``block_size`` attribute for ``qw`` (its group size, or a padded pow2 per channel)."""
    if qw.group_size == PER_CHANNEL:
        k = qw.shape[1]
        return max(MIN_BLOCK_SIZE, 1 << (k - 1).bit_length())
    if not _is_power_of_two(qw.group_size) or qw.group_size < MIN_BLOCK_SIZE:
        raise ValueError(f"MatMulNBits needs a power-of-two block size >= 16, got group size {qw.group_size}")
    return qw.group_size


def matmul_nbits_attributes(qw: QuantizedWeight) -> dict[str, int]:
    """Attributes of the MatMulNBits node consuming :func:`pack_matmul_nbits` of ``qw``."""
    n, k = qw.shape
    return {"K": k, "N": n, "bits": qw.bits, "block_size": matmul_nbits_block_size(qw)}


def blob_size(block_size: int, bits: int) -> int:
    """Bytes per packed block: block_size codes of ``bits`` bits."""
    size, rem = divmod(block_size * bits, 8)
    assert rem == 0, f"a {bits}-bit block of {block_size} codes is not whole bytes"
    return size


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes along the last axis, ``8 // bits`` per byte, first code in the low bits."""
    per_byte = 8 // bits
    assert codes.shape[-1] % per_byte == 0
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint8)
    packed = np.zeros(codes.shape[:-1], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= codes[..., slot] << np.uint8(slot * bits)
    return packed


def _unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_codes`: (..., bytes) -> (..., bytes * 8 // bits) uint8 codes."""
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    slots = [(packed >> np.uint8(slot * bits)) & mask for slot in range(per_byte)]
    return np.stack(slots, axis=-1).reshape(*packed.shape[:-1], -1)


def pack_matmul_nbits(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pack ``qw`` into MatMulNBits ``(B, scales, zero_points)`` (layout: module docstring).

    Returns B uint8 (N, n_blocks, blob_size), scales float32 (N, n_blocks) and zero points uint8
    (N, ceil(n_blocks * bits / 8)), or None when ``qw`` is symmetric (leave the input out).
    Node attributes come from :func:`matmul_nbits_attributes`.
    """
    if qw.bits not in (4, 8):
        raise ValueError(f"MatMulNBits packing supports 4 and 8 bits here, got {qw.bits}")
    n, k = qw.shape
    block_size = matmul_nbits_block_size(qw)
    n_blocks = group_count(k, block_size)
    blob = blob_size(block_size, qw.bits)

    padded = np.zeros((n, n_blocks * block_size), dtype=np.uint8)  # (N, n_blocks * block_size)
    padded[:, :k] = qw.q
    b_packed = _pack_codes(padded.reshape(n, n_blocks, block_size), qw.bits)  # (N, n_blocks, blob)
    assert b_packed.shape == (n, n_blocks, blob)

    packed_zero_points = None
    if not qw.symmetric:
        per_byte = 8 // qw.bits
        zp_bytes = -(-n_blocks // per_byte)
        zp_padded = np.full((n, zp_bytes * per_byte), 1 << (qw.bits - 1), dtype=np.uint8)
        zp_padded[:, :n_blocks] = qw.zero_points  # (N, n_blocks): one group is one block
        packed_zero_points = _pack_codes(zp_padded, qw.bits)  # (N, ceil(n_blocks * bits / 8))
    return b_packed, np.array(qw.scales, dtype=np.float32), packed_zero_points


def unpack_matmul_nbits(
    b_packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    k: int,
    bits: int,
    block_size: int,
    group_size: int | None = None,
) -> QuantizedWeight:
    """Inverse of :func:`pack_matmul_nbits`.

    ``group_size`` is the :class:`QuantizedWeight` group size to report (default ``block_size``;
    pass -1 for a per-channel weight, whose single block is wider than K).
    """
    n, n_blocks, blob = b_packed.shape
    if blob != blob_size(block_size, bits) or n_blocks != group_count(k, block_size):
        raise ValueError(f"B shape {b_packed.shape} does not match K={k}, bits={bits}, block_size={block_size}")
    group_size = block_size if group_size is None else group_size
    if group_count(k, group_size) != n_blocks:
        raise ValueError(f"group size {group_size} gives a different block count than block size {block_size}")
    codes = _unpack_codes(np.asarray(b_packed, dtype=np.uint8), bits).reshape(n, n_blocks * block_size)
    scales = np.asarray(scales, dtype=np.float32).reshape(n, n_blocks)
    unpacked_zero_points = None
    if zero_points is not None:
        zp_codes = _unpack_codes(np.asarray(zero_points, dtype=np.uint8).reshape(n, -1), bits)
        unpacked_zero_points = np.ascontiguousarray(zp_codes[:, :n_blocks])
    return QuantizedWeight(np.ascontiguousarray(codes[:, :k]), scales, unpacked_zero_points, bits, group_size)
