"""Small checkpoints written in code, and the checks every hostile case shares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DIMS = dict(vocab=64, hidden=32, ff=48, layers=1, heads=2, kv_heads=1)


def llama_config(**change) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": DIMS["vocab"],
        "hidden_size": DIMS["hidden"],
        "intermediate_size": DIMS["ff"],
        "num_hidden_layers": DIMS["layers"],
        "num_attention_heads": DIMS["heads"],
        "num_key_value_heads": DIMS["kv_heads"],
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(change)
    return config


def llama_tensors(
    seed: int = 0,
    *,
    layers: int | None = None,
    hidden: int | None = None,
    ff: int | None = None,
    vocab: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
) -> dict:
    """Random float32 tensors in Hugging Face naming for the config above (or the dims given)."""
    rng = np.random.default_rng(seed)
    layers = DIMS["layers"] if layers is None else layers
    h = hidden or DIMS["hidden"]
    f = ff or DIMS["ff"]
    v = vocab or DIMS["vocab"]
    nh = heads or DIMS["heads"]
    nkv = kv_heads or DIMS["kv_heads"]
    hd = h // nh

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": np.ones(h, np.float32), "lm_head.weight": w(v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        t[p + "mlp.gate_proj.weight"] = w(f, h)
        t[p + "mlp.up_proj.weight"] = w(f, h)
        t[p + "mlp.down_proj.weight"] = w(h, f)
    return t


def write_hf(folder: Path, *, config: dict | None = None, tensors: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or llama_config()))
    save_file(tensors if tensors is not None else llama_tensors(), str(folder / "model.safetensors"))
    return folder


@pytest.fixture()
def hf_dir(tmp_path) -> Path:
    return write_hf(tmp_path / "hf")


def run_cli(*argv, cwd=None, env=None, timeout=300, prefix=()) -> subprocess.CompletedProcess:
    """The real CLI in a child process (``prefix``: a launcher such as ``taskset -c 0``)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    return subprocess.run(
        [*prefix, sys.executable, "-m", "quantlab", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=full_env,
    )


def leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.iterdir() if any(m in p.name for m in (".staging-", ".old-", ".baseline-", ".resume"))
    )


def assert_one_line_error(err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("quantlab: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]
