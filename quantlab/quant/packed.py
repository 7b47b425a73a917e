"""Quantized weights held with their codes bit-packed, unpacked one at a time on access.

Calibration produces every linear's integer codes before the graph is built. As ``(N, K)`` uint8
arrays they take a byte per code: about 60 MB per layer of a 1B model, close to a gigabyte over
its 16 layers, held until the emitter packs them anyway. :class:`PackedWeights` keeps 2- and 4-bit
codes packed ``8 // bits`` to a byte (little end first, the layout MatMulNBits uses) and hands out an
ordinary :class:`~quantlab.quant.rtn.QuantizedWeight` per lookup, so a consumer that walks the
linears one at a time holds one unpacked weight at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

import numpy as np

from quantlab.quant.rtn import QuantizedWeight


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """(N, K) uint8 codes below 2^bits -> (N, ceil(K * bits / 8)) uint8, ``8 // bits`` per byte."""
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    per_byte = 8 // bits
    n, k = q.shape
    padded = np.zeros((n, -(-k // per_byte) * per_byte), np.uint8)
    padded[:, :k] = q
    lanes = padded.reshape(n, -1, per_byte)
    out = lanes[:, :, 0].copy()
    for j in range(1, per_byte):
        out |= lanes[:, :, j] << np.uint8(j * bits)
    return out


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: (N, bytes) -> (N, k) uint8."""
    if bits == 8:
        return np.array(packed[:, :k], dtype=np.uint8)
    per_byte = 8 // bits
    n = packed.shape[0]
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((n, packed.shape[1], per_byte), np.uint8)
    for j in range(per_byte):
        np.bitwise_and(packed >> np.uint8(j * bits), mask, out=out[:, :, j])
    return out.reshape(n, -1)[:, :k].copy()


@dataclass(frozen=True)
class _Packed:
    codes: np.ndarray  # (N, packed bytes)
    k: int
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.codes.nbytes + self.scales.nbytes + zp


@dataclass(frozen=True)
class _Elsewhere:
    """An entry whose codes live outside memory (a checkpoint file); ``load`` reads them back."""

    shape: tuple[int, int]
    load: Callable[[], QuantizedWeight]
    nbytes: int = 0


class PackedWeights(MutableMapping[str, QuantizedWeight]):
    """linear name -> QuantizedWeight, stored packed (see the module docstring), or only referenced
    once :meth:`offload` says where they can be read back from."""

    def __init__(self, items: dict[str, QuantizedWeight] | None = None) -> None:
        self._store: dict[str, _Packed] = {}
        for name, qw in (items or {}).items():
            self[name] = qw

    def __setitem__(self, name: str, qw: QuantizedWeight) -> None:
        if not isinstance(qw, QuantizedWeight):
            raise TypeError(f"{name}: expected a QuantizedWeight, got {type(qw).__name__}")
        self._store[name] = _Packed(
            pack_codes(qw.q, qw.bits), qw.shape[1], qw.scales, qw.zero_points, qw.bits, qw.group_size
        )

    def __getitem__(self, name: str) -> QuantizedWeight:
        p = self._store[name]
        if isinstance(p, _Elsewhere):
            return p.load()
        return QuantizedWeight(unpack_codes(p.codes, p.bits, p.k), p.scales, p.zero_points, p.bits, p.group_size)

    def __delitem__(self, name: str) -> None:
        del self._store[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def shape(self, name: str) -> tuple[int, int]:
        p = self._store[name]
        return p.shape if isinstance(p, _Elsewhere) else (p.codes.shape[0], p.k)

    def offload(self, name: str, shape: tuple[int, int], load: Callable[[], QuantizedWeight]) -> None:
        """Hold no codes for ``name``: ``load()`` returns its weight on every later lookup. Calibration
        points its entries at their layer checkpoints this way, so the codes of finished layers (486 MB
        for a 1B model at 4 bits) do not stay in memory until the emitter asks for them."""
        self._store[name] = _Elsewhere(tuple(shape), load)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed codes, scales and zero points."""
        return sum(p.nbytes for p in self._store.values())
