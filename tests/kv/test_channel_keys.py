"""-channel-keys (KIVI's key layout): keys per channel over blocks of R tokens, the unfinished block in f32.

The graph against the numpy reference (layer 0's keys do not depend on the cache format), the cache
state independent of how the tokens were split into steps, bytes per token, closeness to the fp32
cache when decoding, and the bounded cache's refusal.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantlab.cli.main import main
from quantlab.graph_builder.kv_cache import KvCacheFormat, dequantize, parse_kv_cache, quantize
from quantlab.graph_builder.kv_channel_keys import dequantize_key_blocks, quantize_key_blocks, split_key_blocks
from quantlab.quant.metrics import kl_divergence_per_token
from quantlab.runtime.generate import BoundedCache, cache_bytes, cache_length
from tests.kv.test_kv_graph import CKPT, IDS, artifact
from tests.models import model_path

# Mean KL (nats) against the fp32 cache when decoding token by token, tiny random decoder (no outliers)
MAX_KLD = {"int2-r8-channel-keys": 0.1, "int4-r8-channel-keys": 0.01, "int8-r5-channel-keys": 1e-4}


def decode(dec, ids: np.ndarray, prefill: int):
    """Prefill ``prefill`` tokens, then one token per step -> (logits (batch, seq, vocab), final cache)."""
    logits, cache = dec.forward(ids[:, :prefill], dec.empty_cache(ids.shape[0]))
    steps = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, cache = dec.forward(ids[:, t : t + 1], cache)
        steps.append(logits)
    return np.concatenate(steps, axis=1), cache


def layer0_keys(cache: dict) -> dict:
    return {s: cache[f"past_key_values.0.key{s}"] for s in ("", "_scale", "_tail")}


@pytest.mark.parametrize("fmt", sorted(MAX_KLD))
def test_graph_state_is_the_reference_and_independent_of_steps(tmp_path, fmt):
    kv = parse_kv_cache(fmt)
    base = artifact(tmp_path, "fp32")
    ref, ref_cache = base.forward(IDS, base.empty_cache(2))
    dec = artifact(tmp_path, fmt)
    _, full_cache = dec.forward(IDS, dec.empty_cache(2))
    got, cache = decode(dec, IDS, 7)
    assert cache_length(cache) == IDS.shape[1]
    state = layer0_keys(cache)
    blocks = IDS.shape[1] // kv.residual
    s = CKPT.spec
    assert state[""].shape == (2, s.num_kv_heads, blocks * kv.residual, kv.stored_dim(s.head_dim))
    assert state["_scale"].shape == (2, s.num_kv_heads, blocks, s.head_dim)
    assert state["_tail"].shape == (2, s.num_kv_heads, IDS.shape[1] % kv.residual, s.head_dim)
    want = split_key_blocks(ref_cache["past_key_values.0.key"], kv)
    np.testing.assert_allclose(state["_scale"], want["scale"], rtol=1e-5)
    np.testing.assert_allclose(state["_tail"], want["tail"], atol=1e-6)
    # a key on a rounding tie may land one step apart; nothing further
    step = np.repeat(want["scale"], kv.residual, axis=2)
    deq = dequantize_key_blocks(state[""], state["_scale"], kv)
    assert np.all(np.abs(deq - dequantize_key_blocks(want["stored"], want["scale"], kv)) <= step * 1.001)
    for name, t in layer0_keys(full_cache).items():  # one forward leaves the same layer-0 state
        np.testing.assert_array_equal(t, state[name])
    assert float(np.mean(kl_divergence_per_token(ref, got))) < MAX_KLD[fmt]


def test_bytes_per_token(tmp_path):
    kv = parse_kv_cache("int2-r8-channel-keys")
    dec = artifact(tmp_path, str(kv))
    ids = np.random.default_rng(3).integers(3, 96, (1, 48))
    _, at16 = dec.forward(ids[:, :16], dec.empty_cache())
    _, at48 = dec.forward(ids[:, 16:], at16)
    per_token = (cache_bytes(at48) - cache_bytes(at16)) / 32  # both whole blocks: no tail
    assert per_token == kv.bytes_per_token(CKPT.spec.num_layers, CKPT.spec.num_kv_heads, CKPT.spec.head_dim)


def test_per_channel_blocks_beat_per_token_on_an_outlier_channel():
    """KIVI's point: a key channel 20x larger than the rest sets every token's step when keys share a scale
    per token, crushing the other channels; with scales per channel it sets only its own."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 2, 64, 16)).astype(np.float32)  # (batch, kv_heads, seq, head_dim)
    keys[..., 3] *= 20.0
    others = np.arange(16) != 3
    for kind in ("int2", "int4", "int8"):
        per_token = KvCacheFormat(kind)
        err_token = (dequantize(*quantize(keys, per_token), per_token) - keys) ** 2
        blocks = KvCacheFormat(kind, residual=32, channel_keys=True)
        err_channel = (dequantize_key_blocks(*quantize_key_blocks(keys, blocks), blocks) - keys) ** 2
        assert err_channel[..., others].mean() < err_token[..., others].mean() / 10
        assert err_channel.mean() < err_token.mean()


def test_key_block_golden_codes():
    """int4, blocks of 2 tokens: channel c of a block has scale max|k| / 7 over the block's 2 tokens."""
    keys = np.array([[[[7.0, -1.0], [3.5, 0.3]]]], np.float32)  # (1, 1, 2 tokens, 2 channels)
    fmt = KvCacheFormat("int4", residual=2, channel_keys=True)
    stored, scale = quantize_key_blocks(keys, fmt)
    np.testing.assert_allclose(scale, [[[[1.0, 1.0 / 7]]]], rtol=1e-6)
    # codes token 0: 7, -7; token 1: round(3.5) = 4 (half to even), round(2.1) = 2 -> nibbles q + 8
    assert stored.tolist() == [[[[15 | 1 << 4], [12 | 10 << 4]]]]


def test_bounded_cache_refuses_key_blocks(tmp_path, capsys):
    dec = artifact(tmp_path, "int2-r8-channel-keys")
    _, cache = dec.forward(IDS[:, :20], dec.empty_cache(2))
    with pytest.raises(ValueError, match="channel-keys"):
        BoundedCache(window=8, sinks=2).evict(cache)
    out = tmp_path / "stories-int2-channel-keys"
    src = str(model_path("stories260K.bin"))
    argv = ["convert", src, "-o", str(out), "--kv", "int2-r32-channel-keys", "--no-eval", "--no-progress"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kv_cache"]["format"] == "int2-r32-channel-keys"
    assert "past_key_values.0.key_tail" in manifest["graph"]["inputs"]
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["kv_cache"]
    assert genai["past_key_tail_names"] == "past_key_values.%d.key_tail" and genai["bits"] == 2
    capsys.readouterr()
    argv = ["generate", str(out), "--prompt-ids", "1", "--max-new-tokens", "40", "--ignore-eos", "--json"]
    assert main(argv) == 0  # past one 32-token block
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"]) == 40
    assert main([*argv, "--kv-window", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--kv-window" in err and "channel-keys" in err and len(err.splitlines()) == 1
