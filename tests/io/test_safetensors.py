"""The safetensors header parser against well-formed files and every hostile header we could think of."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from quantlab.errors import InputError
from quantlab.io.safetensors_file import MAX_HEADER_BYTES, SafetensorsFile


def _write(path, header, data: bytes, *, length: int | None = None, raw_header: bytes | None = None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _two_tensors(path, **overrides):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(4, dtype=np.float16)
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
    }
    header.update(overrides)
    return _write(path, header, a.tobytes() + b.tobytes())


def test_reads_against_the_reference_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {
        "x": rng.standard_normal((3, 5)).astype(np.float32),
        "y": rng.standard_normal(7).astype(np.float16),
        "z": rng.standard_normal((2, 2, 2)).astype(np.float64),
    }
    path = tmp_path / "ref.safetensors"
    safetensors_numpy.save_file(tensors, str(path))
    file = SafetensorsFile(path)
    for name, want in tensors.items():
        assert file.shape(name) == want.shape
        np.testing.assert_array_equal(file.load(name), want.astype(np.float32))


def test_bf16_is_exact(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    value = torch.randn(4, 8).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    safetensors_torch.save_file({"w": value}, str(path))
    np.testing.assert_array_equal(SafetensorsFile(path).load("w"), value.float().numpy())


def _raises(path, field=None, words=""):
    with pytest.raises(InputError) as e:
        SafetensorsFile(path)
    assert e.value.path == str(path)
    if field is not None:
        assert e.value.field == field
    assert words in e.value.message
    return e.value


def test_truncated_file(tmp_path):
    path = _two_tensors(tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:-3])
    _raises(path, "data_offsets", "file has")
    path.write_bytes(b"\x01\x02")
    _raises(path, "header length", "too short")


def test_header_length_lies(tmp_path):
    _raises(_write(tmp_path / "long.safetensors", {}, b"", length=10_000), "header length", "past the end")
    _raises(_write(tmp_path / "huge.safetensors", {}, b"", length=MAX_HEADER_BYTES + 1), "header length", "cap")


def test_header_not_json(tmp_path):
    _raises(_write(tmp_path / "a.safetensors", None, b"", raw_header=b"{not json"), "header", "JSON")
    _raises(_write(tmp_path / "b.safetensors", None, b"", raw_header=b"\xff\xfe"), "header", "JSON")
    _raises(_write(tmp_path / "c.safetensors", None, b"", raw_header=b"[1, 2]"), "header", "object")


def test_overlapping_offsets(tmp_path):
    path = _two_tensors(tmp_path / "o.safetensors", b={"dtype": "F16", "shape": [4], "data_offsets": [16, 24]})
    _raises(path, "b", "overlap")


def test_hole_between_tensors(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
    }
    _raises(_write(tmp_path / "h.safetensors", header, bytes(20)), "b", "unaccounted")


def test_trailing_bytes(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _raises(_write(tmp_path / "t.safetensors", header, bytes(12)), "data_offsets", "belong to no tensor")


def test_dtype_shape_mismatch(tmp_path):
    path = _two_tensors(tmp_path / "m.safetensors", a={"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 24]})
    _raises(path, "a", "bytes")


def test_unknown_dtype_and_bad_shape(tmp_path):
    _raises(_two_tensors(tmp_path / "d.safetensors", a={"dtype": "F24", "shape": [2, 3], "data_offsets": [0, 24]}), "a")
    _raises(
        _two_tensors(tmp_path / "s.safetensors", a={"dtype": "F32", "shape": [-2, 3], "data_offsets": [0, 24]}), "a"
    )
    _raises(_two_tensors(tmp_path / "f.safetensors", a={"dtype": "F32", "shape": [2, 3], "data_offsets": [0]}), "a")


def test_duplicate_names(tmp_path):
    raw = (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    )
    _raises(_write(tmp_path / "dup.safetensors", None, bytes(8), raw_header=raw), "a", "twice")


def test_integer_tensor_is_not_a_weight(tmp_path):
    header = {"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}
    file = SafetensorsFile(_write(tmp_path / "i.safetensors", header, bytes(16)))
    with pytest.raises(InputError) as e:
        file.load("ids")
    assert e.value.field == "ids" and "floating-point" in e.value.message
