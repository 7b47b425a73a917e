"""Hostile inputs for every reader and every file quantlab accepts.

Each case asserts one line on stderr naming the file (and the field, where there is one), exit 2,
and no output or staging folder left. Most go through ``quantlab.cli.main.main`` in this process
(the CLI's own code path, minus the interpreter start); the code-running payloads go through a real
child process with a canary file that must never appear.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from quantlab.cli.main import main
from tests.hostile.conftest import (
    assert_one_line_error,
    leftovers,
    llama_config,
    llama_tensors,
    run_cli,
    write_hf,
)
from tests.models import model_path

STORIES = "stories260K.bin"
DEEP = 100_000  # far beyond Python's recursion limit


def convert(capsys, source, out, *extra) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["convert", str(source), "-o", str(out), "--no-progress", *map(str, extra)])
    return code, capsys.readouterr().err


def assert_refused(capsys, source, tmp_path, *words, extra=()) -> str:
    out = tmp_path / "out"
    code, err = convert(capsys, source, out, *extra)
    assert code == 2, err
    line = assert_one_line_error(err, *words)
    assert not out.exists()
    assert leftovers(tmp_path) == []
    return line


# --- config.json -----------------------------------------------------------------------------------


def _write_config_text(folder: Path, text: str) -> None:
    (folder / "config.json").write_text(text)


def test_config_duplicate_key(capsys, hf_dir, tmp_path):
    text = json.dumps(llama_config())[:-1] + ', "hidden_size": 64}'
    _write_config_text(hf_dir, text)
    assert_refused(capsys, hf_dir, tmp_path, "config.json", "duplicate key 'hidden_size'")


def test_config_deep_nesting(capsys, hf_dir, tmp_path):
    _write_config_text(hf_dir, '{"x": ' + "[" * DEEP + "]" * DEEP + "}")
    assert_refused(capsys, hf_dir, tmp_path, "config.json", "nested too deeply")


def test_config_huge_string(capsys, hf_dir, tmp_path):
    config = llama_config(hidden_act="x" * (20 << 20))
    _write_config_text(hf_dir, json.dumps(config))
    line = assert_refused(capsys, hf_dir, tmp_path, "config.json", "cap")
    assert len(line) < 500


@pytest.mark.parametrize(
    ("text_value", "field"),
    [
        ("NaN", "rms_norm_eps"),
        ("Infinity", "rms_norm_eps"),
        ("-Infinity", "rope_theta"),
    ],
)
def test_config_non_finite_numbers(capsys, hf_dir, tmp_path, text_value, field):
    config = json.dumps(llama_config(**{field: 1.0})).replace(f'"{field}": 1.0', f'"{field}": {text_value}')
    _write_config_text(hf_dir, config)
    assert_refused(capsys, hf_dir, tmp_path, "config.json", field)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_hidden_layers": 10**12}, "num_hidden_layers"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"hidden_size": 1e300}, "hidden_size"),
        ({"max_position_embeddings": 2**63}, "max_position_embeddings"),
        ({"eos_token_id": [2, -5]}, "eos_token_id"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ],
)
def test_config_absurd_values(capsys, hf_dir, tmp_path, change, field):
    _write_config_text(hf_dir, json.dumps(llama_config(**change)))
    assert_refused(capsys, hf_dir, tmp_path, "config.json", field)


def test_generation_config_not_json(capsys, hf_dir, tmp_path):
    (hf_dir / "generation_config.json").write_bytes(b"\xff\xfe{")
    (hf_dir / "tokenizer.json").write_text("{}")
    assert_refused(capsys, hf_dir, tmp_path, "generation_config.json")


def test_tokenizer_config_chat_template_wrong_type(capsys, hf_dir, tmp_path):
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": 12}))
    assert_refused(capsys, hf_dir, tmp_path, "tokenizer_config.json", "chat_template")


@pytest.mark.parametrize(
    "content",
    [b'{"model": {"type": "BPE", "vocab": 5}}', b"[" * DEEP, b'{"version": "1.0", "\xff": 1}'],
    ids=["wrong-types", "deep-nesting", "not-utf8"],
)
def test_tokenizer_json_hostile(capsys, hf_dir, tmp_path, content):
    (hf_dir / "tokenizer.json").write_bytes(content)
    assert_refused(capsys, hf_dir, tmp_path, "tokenizer.json")


def test_index_deep_nesting(capsys, hf_dir, tmp_path):
    (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": ' + "{" * 0 + "[" * DEEP + "]" * DEEP + "}")
    assert_refused(capsys, hf_dir, tmp_path, "model.safetensors.index.json")


# --- safetensors -----------------------------------------------------------------------------------


def _safetensors_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_safetensors_header_deep_nesting(capsys, hf_dir, tmp_path):
    raw = b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    (hf_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert_refused(capsys, hf_dir, tmp_path, "model.safetensors", "header", "nested too deeply")


def test_safetensors_shape_overflow(capsys, hf_dir, tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}
    (hf_dir / "model.safetensors").write_bytes(_safetensors_bytes(header, b"\0" * 16))
    assert_refused(capsys, hf_dir, tmp_path, "model.safetensors", "w")


def test_safetensors_metadata_not_strings(capsys, hf_dir, tmp_path):
    header = {"__metadata__": {"format": {"nested": 1}}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    (hf_dir / "model.safetensors").write_bytes(_safetensors_bytes(header, b"\0" * 4))
    assert_refused(capsys, hf_dir, tmp_path, "model.safetensors", "__metadata__")


def test_safetensors_offsets_past_end(capsys, hf_dir, tmp_path):
    header = {"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}
    (hf_dir / "model.safetensors").write_bytes(_safetensors_bytes(header, b"\0" * 64))
    assert_refused(capsys, hf_dir, tmp_path, "model.safetensors", "data_offsets")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_safetensors_non_finite_weight(capsys, tmp_path, bad):
    tensors = llama_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = bad
    folder = write_hf(tmp_path / "hf", tensors=tensors)
    assert_refused(capsys, folder, tmp_path, "model.safetensors", "model.layers.0.mlp.up_proj.weight", "NaN or Inf")


# --- GGUF ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> tuple[bytes, int, int]:
    """(a valid tiny GGUF, the offset of token_embd's type field, of its data offset field)."""
    from tests.io.test_gguf import _write_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_gguf(path, tied=True, quantize_embedding=False)
    data = path.read_bytes()
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    (n_dims,) = struct.unpack_from("<I", data, at)
    type_at = at + 4 + 8 * n_dims
    return data, type_at, type_at + 4


def _patched(data: bytes, at: int, fmt: str, value: int) -> bytes:
    blob = bytearray(data)
    struct.pack_into(fmt, blob, at, value)
    return bytes(blob)


@pytest.mark.parametrize(
    ("where", "value", "field"),
    [
        ("tensor_count", 1 << 40, "header"),
        ("kv_count", 1 << 40, "header"),
        ("version", 99, "header"),
        ("type", 9999, "header"),
        ("offset", 1, "token_embd.weight"),  # not a multiple of the alignment
        ("offset", 1 << 40, "header"),  # data far past the end of the file
    ],
)
def test_gguf_hostile_header(capsys, tmp_path, gguf_bytes, where, value, field):
    data, type_at, offset_at = gguf_bytes
    at, fmt = {"version": (4, "<I"), "tensor_count": (8, "<Q"), "kv_count": (16, "<Q"), "type": (type_at, "<I")}.get(
        where, (offset_at, "<Q")
    )
    path = tmp_path / "bad.gguf"
    path.write_bytes(_patched(data, at, fmt, value))
    assert_refused(capsys, path, tmp_path, "bad.gguf", field)


def test_gguf_non_finite_weight(capsys, tmp_path, gguf_bytes):
    data, _, offset_at = gguf_bytes
    # token_embd is the first tensor: its first float sits at the start of the aligned data section.
    path = tmp_path / "nan.gguf"
    path.write_bytes(data)
    from quantlab.io.gguf_reader import open_gguf

    reader = open_gguf(path)
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    start = int(tensor.data_offset)
    del reader
    blob = bytearray(data)
    struct.pack_into("<f", blob, start + 4 * 7, float("nan"))
    path.write_bytes(bytes(blob))
    assert_refused(capsys, path, tmp_path, "nan.gguf", "token_embd.weight", "NaN or Inf")


# --- llama2.c --------------------------------------------------------------------------------------


def _stories_copy(tmp_path: Path) -> Path:
    src = model_path(STORIES)
    folder = tmp_path / "l2c"
    folder.mkdir()
    dst = folder / "model.bin"
    dst.write_bytes(src.read_bytes())
    (folder / "tok512.bin").write_bytes((src.parent / "tok512.bin").read_bytes())
    return dst


@pytest.mark.parametrize(("index", "value", "field"), [(2, 2**31 - 1, "n_layers"), (4, -3, "n_kv_heads")])
def test_llama2c_absurd_header(capsys, tmp_path, index, value, field):
    path = _stories_copy(tmp_path)
    blob = bytearray(path.read_bytes())
    struct.pack_into("<i", blob, 4 * index, value)
    path.write_bytes(bytes(blob))
    assert_refused(capsys, path, tmp_path, "model.bin", field)


def test_llama2c_non_finite_weight(capsys, tmp_path):
    path = _stories_copy(tmp_path)
    blob = bytearray(path.read_bytes())
    struct.pack_into("<f", blob, 28 + 4 * 100, float("inf"))  # inside the token embedding
    path.write_bytes(bytes(blob))
    assert_refused(capsys, path, tmp_path, "model.bin", "model.embed_tokens.weight", "NaN or Inf")


def test_llama2c_tokenizer_huge_length(capsys, tmp_path):
    path = _stories_copy(tmp_path)
    tok = path.parent / "tok512.bin"
    blob = bytearray(tok.read_bytes())
    struct.pack_into("<i", blob, 8, 2**31 - 1)  # the first token's length
    tok.write_bytes(bytes(blob))
    assert_refused(capsys, path, tmp_path, "tok512.bin", "token 0")


# --- recipes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("r.json", '{"scheme": "w4a16-g128-asym", "scheme": "w8a16-g128-asym"}', ["duplicate key"]),
        ("r.toml", 'scheme = "w4a16-g128-gptq"\n[calibration]\nsamples = nan\n', ["calibration.samples"]),
        ("r.toml", 'scheme = "w4a16-g128-gptq"\n[calibration]\nsamples = 1_000_000_000_000\n', ["samples"]),
        ("r.toml", "x = " + "[" * 5000 + "]" * 5000 + "\n", ["r.toml"]),
        ("r.json", '{"scheme": "' + "w" * (1 << 20) + '"}', ["scheme"]),
        ("r.json", '{"override": [{"pattern": "*", "scheme": "w4a16-g128-asym", "evil": 1}]}', ["override[0].evil"]),
    ],
    ids=["json-duplicate", "toml-nan", "toml-absurd", "toml-deep", "json-huge-string", "unknown-override-key"],
)
def test_recipe_hostile(capsys, tmp_path, name, text, words):
    recipe = tmp_path / name
    recipe.write_text(text)
    line = assert_refused(capsys, model_path(STORIES), tmp_path, name, *words, extra=["--recipe", recipe])
    assert len(line) < 2000


# --- calibration data ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("c.json", "[" * DEEP + "]" * DEEP, ["c.json"]),
        ("c.json", "[[1, 2, NaN]]", ["c.json", "[0][2]"]),
        ("c.json", "[[1, 2, 1e400]]", ["c.json", "[0][2]"]),
        ("c.json", "[[1, 99999999]]", ["c.json", "sequence 0, position 1"]),
        ("c.jsonl", '{"text": "a", "text": "b"}\n', ["c.jsonl", "line 1", "duplicate key"]),
    ],
    ids=["deep", "nan", "inf", "out-of-vocab", "jsonl-duplicate"],
)
def test_calibration_hostile(capsys, tmp_path, name, content, words):
    data = tmp_path / name
    data.write_text(content)
    assert_refused(capsys, model_path(STORIES), tmp_path, *words, extra=["--recipe", "w4a16-g32-gptq", "--calib", data])


# --- code-running payloads, through the real CLI ---------------------------------------------------


class _Evil:
    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _assert_cli_refused(proc, out: Path, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, *words)
    assert not out.exists()
    assert leftovers(out.parent) == []


def test_legacy_pickle_in_hf_folder_with_allow_pickle(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(llama_config()))
    canary = tmp_path / "canary"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Evil(canary)}, protocol=2))
    out = tmp_path / "out"
    proc = run_cli("convert", folder, "-o", out, "--allow-pickle", "--no-progress")
    _assert_cli_refused(proc, out, "pytorch_model.bin", "weights_only")
    assert not canary.exists()


def test_npy_calibration_with_pickle_payload(tmp_path):
    canary = tmp_path / "canary"
    data = tmp_path / "calib.npy"
    np.save(data, np.array([_Evil(canary)], dtype=object), allow_pickle=True)
    out = tmp_path / "out"
    proc = run_cli(
        "convert", model_path(STORIES), "-o", out, "--recipe", "w4a16-g32-gptq", "--calib", data, "--no-progress"
    )
    _assert_cli_refused(proc, out, "calib.npy")
    assert not canary.exists()


def test_yaml_recipe_with_python_object(tmp_path):
    pytest.importorskip("yaml")
    canary = tmp_path / "canary"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'scheme: !!python/object/apply:os.system ["touch {canary}"]\n')
    out = tmp_path / "out"
    proc = run_cli("convert", model_path(STORIES), "-o", out, "--recipe", recipe, "--no-progress")
    _assert_cli_refused(proc, out, "r.yaml")
    assert not canary.exists()


# --- regressions found by benchmarks/fuzz_parsers.py -----------------------------------------------


def test_fuzz_config_model_type_unhashable(capsys, hf_dir, tmp_path):
    config = llama_config(model_type=["llama"])
    del config["architectures"]
    _write_config_text(hf_dir, json.dumps(config))
    assert_refused(capsys, hf_dir, tmp_path, "config.json", "architectures")


def test_fuzz_recipe_override_not_a_list(capsys, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text('{"scheme": "w4a16-g32-sym", "override": null}')
    assert_refused(capsys, model_path(STORIES), tmp_path, "r.json", "override", extra=["--recipe", recipe])


def test_fuzz_yaml_recipe_with_an_integer_key(capsys, tmp_path):
    """Found by fuzzing: `1:` parses as {1: None}, and the int key broke the error message itself."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("1:")
    assert_refused(capsys, model_path(STORIES), tmp_path, "r.yaml", "1: unknown key", extra=["--recipe", recipe])


def test_fuzz_gguf_string_array_claiming_4g_elements_is_refused_fast(capsys, tmp_path):
    """Found by fuzzing as a hang: the gguf package looped over 2^32 string slices past the file's end."""
    key = b"tokenizer.ggml.tokens"
    body = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    body += struct.pack("<IIQ", 9, 8, 1 << 32) + struct.pack("<Q", 1) + b"a" + b"\0" * 64
    path = tmp_path / "model.gguf"
    path.write_bytes(body)
    start = time.monotonic()
    assert_refused(capsys, path, tmp_path, "model.gguf", "tokenizer.ggml.tokens", "4294967296 elements")
    assert time.monotonic() - start < 5.0


def test_fuzz_npy_header_that_breaks_numpy_tokenizer(capsys, tmp_path):
    data = tmp_path / "c.npy"
    header = b"{'descr': '<i8', 'fortran_order': False, 'shape': (1, (}"
    data.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
    extra = ["--recipe", "w4a16-g32-gptq", "--calib", data]
    assert_refused(capsys, model_path(STORIES), tmp_path, "c.npy", extra=extra)


def test_fuzz_llama2c_header_claiming_16m_layers_is_refused_fast(capsys, tmp_path):
    """Found as a hang: the layout was built slot by slot (16M x 9) before the file size was checked."""
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<7i", 2, 2, 1 << 24, 1, 1, 1, 1) + b"\0" * 64)
    start = time.monotonic()
    assert_refused(capsys, path, tmp_path, "model.bin", "header", "n_layers=16777216")
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_fuzz_layer_count_of_16m_is_refused_fast(capsys, tmp_path, gguf_bytes, fmt):
    """Found as a hang: 16M layers made the reader build 16M x 9 expected tensor names first."""
    if fmt == "hf":
        source = write_hf(tmp_path / "hf", config=llama_config(num_hidden_layers=1 << 24))
        words = ["model.safetensors", "model.layers.1.input_layernorm.weight"]
    else:
        data = gguf_bytes[0]
        key = b"llama.block_count"
        at = data.index(key) + len(key) + 4  # the uint32 value after its type tag
        source = tmp_path / "bad.gguf"
        source.write_bytes(_patched(data, at, "<I", 1 << 24))
        words = ["bad.gguf", "input_layernorm.weight"]
    start = time.monotonic()
    assert_refused(capsys, source, tmp_path, *words)
    assert time.monotonic() - start < 5.0
