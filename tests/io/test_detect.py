"""Format detection: what each kind of path becomes, and the errors for paths that are none of them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantlab.errors import InputError
from quantlab.io import load_checkpoint
from quantlab.io.detect import detect_format


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(InputError) as e:
        load_checkpoint(missing)
    assert e.value.path == str(missing) and "no such file" in e.value.message


def test_unknown_format(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\x93NUMPY stuff")
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert e.value.path == str(path) and "unknown checkpoint format" in e.value.message


def test_folder_without_config(tmp_path):
    with pytest.raises(InputError) as e:
        load_checkpoint(tmp_path)
    assert e.value.field == "config.json"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError) as e:
        load_checkpoint(tmp_path)
    assert e.value.field == "model.safetensors"


@pytest.mark.parametrize(
    ("name", "head", "fmt"),
    [
        ("m.gguf", b"GGUF\3\0\0\0", "gguf"),
        ("anything", b"GGUF\3\0\0\0", "gguf"),
        ("m.bin", b"24ka\1\0\0\0", "llama2c"),
        ("m.bin", b"\x40\0\0\0\xac\0\0\0", "llama2c"),
        ("m.pt", b"PK\3\4rest", "torch-pickle"),
        ("pytorch_model.bin", b"\x80\x02rest", "torch-pickle"),
    ],
)
def test_detect_by_content(tmp_path, name, head, fmt):
    path = tmp_path / name
    path.write_bytes(head + b"\0" * 32)
    assert detect_format(path) == fmt


def test_legacy_llama2c_without_bin_suffix(tmp_path, require_model):
    path = tmp_path / "stories.ckpt"
    path.symlink_to(require_model("stories260K.bin"))
    assert detect_format(path) == "llama2c"


def test_pickle_refused_without_flag(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\3\4" + b"\0" * 32)
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert e.value.path == str(path) and "--allow-pickle" in e.value.message


def test_io_does_not_import_torch():
    code = (
        "import sys, quantlab.io, quantlab.io.detect, quantlab.io.hf, quantlab.io.gguf_reader, "
        "quantlab.io.llama2c, quantlab.io.torch_pickle, quantlab.runtime.tokenizer; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
