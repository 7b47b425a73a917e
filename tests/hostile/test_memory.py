"""Peak memory of a conversion follows one layer, not the model: 16 layers x ~64 MiB, fp32 in and out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.hostile.conftest import REPO, llama_config

LAYERS = 16
HIDDEN = 2816  # 22 heads x 128: q_proj and o_proj are 2816 x 2816 fp32 = 30.25 MiB each, ~61 MiB a layer
HEADS = 22
FF = 64  # the MLP kept tiny: the point is many big tensors, not a realistic model
VOCAB = 256
MIB = 1 << 20
# Allowed above the interpreter's own peak (imports and all): a few layers' worth, far below the model.
ALLOWED_LAYERS = 5


def _write_model(folder) -> int:
    from safetensors.numpy import save_file

    folder.mkdir()
    config = llama_config(
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        vocab_size=VOCAB,
    )
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    index, total = {}, 0
    head_dim = HIDDEN // HEADS

    def w(*shape):
        # uniform is several times faster than normal; values stay small like a trained model's
        return rng.random(shape, dtype=np.float32) * 0.02 - 0.01

    globals_ = {
        "model.embed_tokens.weight": w(VOCAB, HIDDEN),
        "model.norm.weight": np.ones(HIDDEN, np.float32),
        "lm_head.weight": w(VOCAB, HIDDEN),
    }
    shards = [("model-globals.safetensors", globals_)]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shards.append(
            (
                f"model-layer{i:02d}.safetensors",
                {
                    p + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
                    p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN),
                    p + "self_attn.k_proj.weight": w(head_dim, HIDDEN),
                    p + "self_attn.v_proj.weight": w(head_dim, HIDDEN),
                    p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": w(FF, HIDDEN),
                    p + "mlp.up_proj.weight": w(FF, HIDDEN),
                    p + "mlp.down_proj.weight": w(HIDDEN, FF),
                },
            )
        )
    # One shard per layer, written and dropped in turn, so the test itself never holds the model.
    for name, tensors in shards:
        save_file(tensors, str(folder / name))
        index.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return total


@pytest.mark.slow
def test_peak_rss_follows_a_layer_not_the_model(tmp_path):
    total = _write_model(tmp_path / "big")
    baseline = _measure(
        [sys.executable, "-c", "import quantlab.api, quantlab.cli.main, onnxruntime, onnx; import quantlab.io.hf"]
    )
    out = tmp_path / "out"
    big = tmp_path / "big"
    peak = _measure([sys.executable, "-m", "quantlab", "convert", str(big), "-o", str(out), "--no-progress"])
    assert (out / "model.onnx.data").stat().st_size >= total  # every weight went through, in fp32
    layer = total / LAYERS
    print(
        f"model {total / MIB:.0f} MiB ({LAYERS} layers x {layer / MIB:.1f} MiB); interpreter baseline "
        f"{baseline / MIB:.0f} MiB; conversion peak {peak / MIB:.0f} MiB (+{(peak - baseline) / MIB:.0f} MiB)"
    )
    assert peak < baseline + ALLOWED_LAYERS * layer, (peak, baseline, layer)


# The measured process is started by a small launcher, not by pytest: ru_maxrss survives fork and exec,
# so a child forked from this (large) test process would report the test's own size as its peak.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _measure(argv) -> int:
    """Peak resident set of ``argv``, from wait4's rusage in a launcher (ru_maxrss is in KiB on Linux)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], capture_output=True, text=True, env=env)
    code, maxrss = (int(v) for v in proc.stdout.split())
    assert code == 0, proc.stderr
    return maxrss * 1024
