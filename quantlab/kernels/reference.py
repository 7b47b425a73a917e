"""The MatMulNBits contract in numpy: the slow fallback path and the tests' oracle.

Layout (onnxruntime ``com.microsoft.MatMulNBits``), with ``k_blocks = ceil(K / block_size)`` and
``blob = block_size * bits // 8``:

- ``B`` uint8 ``(N, k_blocks, blob)``: 4-bit codes two per byte, element ``2i`` in the low nibble and
  ``2i + 1`` in the high nibble; 8-bit codes one per byte.
- ``scales`` ``(N * k_blocks,)`` or ``(N, k_blocks)``, the dtype of ``A``.
- ``zero_points`` optional uint8: 4-bit packed two per byte (even block in the low nibble), each row
  padded to ``ceil(k_blocks / 2)`` bytes; 8-bit one per block. Absent means ``2 ** (bits - 1)``.

``W[n, k] = (code[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size]`` and
``Y = A @ W.T``.
"""

from __future__ import annotations

import numpy as np


def k_blocks(k: int, block_size: int) -> int:
    """Blocks per weight row."""
    return (k + block_size - 1) // block_size


def unpack_codes(b: np.ndarray, *, k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """``B`` -> uint8 codes ``(N, K)``."""
    kb = k_blocks(k, block_size)
    flat = np.ascontiguousarray(b, dtype=np.uint8).reshape(n, kb * block_size * bits // 8)
    if bits == 8:
        codes = flat
    elif bits == 4:
        codes = np.empty((n, flat.shape[1] * 2), dtype=np.uint8)  # (N, k_blocks * block_size)
        codes[:, 0::2] = flat & 0x0F
        codes[:, 1::2] = flat >> 4
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return codes[:, :k]


def unpack_zero_points(zero_points: np.ndarray | None, *, k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """Packed zero points -> uint8 ``(N, k_blocks)`` (the default ``2 ** (bits - 1)`` when absent)."""
    kb = k_blocks(k, block_size)
    if zero_points is None:
        return np.full((n, kb), 1 << (bits - 1), dtype=np.uint8)
    zp = np.ascontiguousarray(zero_points, dtype=np.uint8)
    if bits == 8:
        return zp.reshape(n, kb)
    packed = zp.reshape(n, (kb + 1) // 2)
    out = np.empty((n, packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out[:, :kb]


def dequantize_nbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None = None,
    *,
    k: int,
    n: int,
    bits: int = 4,
    block_size: int = 32,
) -> np.ndarray:
    """The float32 weight ``(N, K)`` that ``B, scales, zero_points`` encode."""
    kb = k_blocks(k, block_size)
    codes = unpack_codes(b, k=k, n=n, bits=bits, block_size=block_size).astype(np.float32)
    zp = unpack_zero_points(zero_points, k=k, n=n, bits=bits, block_size=block_size).astype(np.float32)
    s = np.asarray(scales, dtype=np.float32).reshape(n, kb)
    per_elem = np.repeat(np.arange(kb), block_size)[:k]
    return (codes - zp[:, per_elem]) * s[:, per_elem]


def matmul_nbits_reference(
    a: np.ndarray,
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    k: int,
    n: int,
    bits: int = 4,
    block_size: int = 32,
) -> np.ndarray:
    """``A @ dequant(B).T (+ bias)`` in float32; ``A`` of shape ``(..., K)``."""
    w = dequantize_nbits(b, scales, zero_points, k=k, n=n, bits=bits, block_size=block_size)
    y = np.asarray(a, dtype=np.float32) @ w.T  # (..., N)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)
    return y
