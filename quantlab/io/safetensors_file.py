"""A validating reader for one ``.safetensors`` file.

Layout (https://github.com/huggingface/safetensors):

    bytes [0, 8)          N, the header length, uint64 little-endian
    bytes [8, 8 + N)      JSON object: name -> {"dtype", "shape", "data_offsets": [begin, end]},
                          plus an optional "__metadata__": {str: str}
    bytes [8 + N, EOF)    the data buffer; offsets are relative to its start

Nothing in the header is trusted: the tensors must tile the data buffer exactly (no holes, no
overlaps, nothing past the end), each byte range must equal dtype size x element count, names are
unique. Tensors are read one at a time with ``np.fromfile`` at their offset.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantlab.errors import InputError
from quantlab.io.common import check_finite, fresh_float32

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own cap

# safetensors dtype -> (numpy dtype to read, bytes per element). BF16 and F8 are read as raw bits.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U64": ("<u8", 8),
    "U32": ("<u4", 4),
    "U16": ("<u2", 2),
    "U8": ("u1", 1),
    "BOOL": ("u1", 1),
    "F8_E4M3": ("u1", 1),
    "F8_E5M2": ("u1", 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
WIDEN_SLICE_ELEMENTS = 1 << 22  # 8 MB of 16-bit values per read


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


class SafetensorsFile:
    """The validated header of one safetensors file; ``load(name)`` reads one tensor as float32."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(self.path, "header length", f"file is {size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise InputError(self.path, "header length", f"{n} bytes exceeds the {MAX_HEADER_BYTES}-byte cap")
            if 8 + n > size:
                raise InputError(self.path, "header length", f"header of {n} bytes runs past the end of the file")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except _DuplicateKey as e:
            raise InputError(self.path, str(e), "tensor name appears twice in the header") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(self.path, "header", f"header is not valid JSON ({e})") from None
        except RecursionError:
            raise InputError(self.path, "header", "header is not valid JSON (nested too deeply)") from None
        if not isinstance(header, dict):
            raise InputError(self.path, "header", f"header must be a JSON object, got {type(header).__name__}")
        self.metadata = _check_metadata(self.path, header.pop("__metadata__", {}))
        data_start = 8 + n
        self.tensors = _parse_entries(self.path, header, data_start, size)

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def load(self, name: str) -> np.ndarray:
        entry = self.tensors[name]
        if entry.dtype not in FLOAT_DTYPES:
            raise InputError(self.path, name, f"dtype {entry.dtype} is not a floating-point weight type")
        np_dtype, width = DTYPES[entry.dtype]
        count = (entry.end - entry.begin) // width
        if entry.dtype in ("BF16", "F16"):
            out = self._widen(entry, name, count)
        else:
            raw = np.fromfile(self.path, dtype=np_dtype, count=count, offset=entry.begin)
            if raw.size != count:
                raise InputError(self.path, name, "file shrank while reading")
            out = fresh_float32(raw)
        return check_finite(out.reshape(entry.shape), self.path, name)

    def _widen(self, entry, name: str, count: int) -> np.ndarray:
        """16-bit floats -> float32, read a slice at a time into the result: the peak is the float32
        tensor plus one slice, not plus the whole 16-bit copy and a 32-bit temporary (a 128k x 2048
        bf16 embedding would otherwise take 2.5 GB for a moment)."""
        out = np.empty(count, dtype=np.float32)
        step = WIDEN_SLICE_ELEMENTS
        with open(self.path, "rb") as f:
            f.seek(entry.begin)
            for start in range(0, count, step):
                n = min(step, count - start)
                raw = np.fromfile(f, dtype="<u2", count=n)
                if raw.size != n:
                    raise InputError(self.path, name, "file shrank while reading")
                if entry.dtype == "BF16":  # bfloat16 is the top half of a float32: widen the bits, exact
                    bits = out[start : start + n].view(np.uint32)
                    bits[:] = raw
                    bits <<= 16
                else:
                    out[start : start + n] = raw.view(np.float16)
        return out


class _DuplicateKey(Exception):
    pass


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _check_metadata(path, metadata) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(path, "__metadata__", "must be an object of string values")
    return metadata


def _parse_entries(path, header: dict, data_start: int, size: int) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
            raise InputError(path, name, "entry must be an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise InputError(path, name, f"unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InputError(path, name, f"shape must be a list of non-negative integers, got {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise InputError(path, name, f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        count = int(np.prod(shape, dtype=object)) if shape else 1
        nbytes = count * DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            raise InputError(
                path,
                name,
                f"dtype {dtype} x shape {shape} is {nbytes} bytes but data_offsets span {offsets[1] - offsets[0]}",
            )
        entries[name] = TensorEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    # The tensors must tile the data buffer: sorted by offset, each begins where the previous ends.
    cursor = data_start
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin < cursor:
            raise InputError(path, name, f"data_offsets overlap the previous tensor (begin {entry.begin - data_start})")
        if entry.begin > cursor:
            raise InputError(path, name, f"{entry.begin - cursor} unaccounted bytes before this tensor's data_offsets")
        cursor = entry.end
    if cursor > size:
        raise InputError(path, "data_offsets", f"tensor data ends at byte {cursor} but the file has {size} bytes")
    if cursor < size:
        raise InputError(path, "data_offsets", f"{size - cursor} bytes after the last tensor belong to no tensor")
    return entries
