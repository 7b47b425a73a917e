"""Bad input through the real CLI process: a one-line error naming file and field, exit 2, nothing left."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def run_convert(source, out, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "quantlab", "convert", str(source), "-o", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_clean_failure(code, err, out_dir, *expected_words):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("quantlab: error: ")
    for word in expected_words:
        assert word in lines[0], lines[0]
    assert not out_dir.exists()
    leftovers = [p.name for p in out_dir.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]
    assert leftovers == []


@pytest.fixture()
def hf_dir(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    return tmp_path / "hf"


def test_missing_file(tmp_path):
    code, _, err = run_convert(tmp_path / "nope.gguf", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "nope.gguf")


def test_truncated_safetensors(hf_dir, tmp_path):
    st = hf_dir / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) - 100])
    code, _, err = run_convert(hf_dir, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "model.safetensors")


def test_config_dims_contradict_tensor_shapes(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_convert(hf_dir, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "config.json", "intermediate_size")


def test_unsupported_architecture(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_convert(hf_dir, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "config.json", "architectures")


def test_existing_output_is_kept_without_force(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_convert(hf_dir, out)
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_output_completely(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run_convert(hf_dir, out, "--force", "--no-progress")
    assert code == 0, err
    assert not (out / "stale.txt").exists()
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_pickle_refused_without_flag(tmp_path):
    ckpt = tmp_path / "pytorch_model.bin"
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    torch.save({"x": Evil()}, ckpt)
    code, _, err = run_convert(ckpt, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "pytorch_model.bin", "--allow-pickle")
    assert not canary.exists()
    code, _, err = run_convert(ckpt, tmp_path / "out", "--allow-pickle")
    assert code == 2, err
    assert not canary.exists()
    assert not (tmp_path / "out").exists()


def test_usage_error_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "quantlab", "convert"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "required" in proc.stderr
