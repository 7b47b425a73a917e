"""Quantized caches in the built graph, on tiny random decoders in onnxruntime.

Structure (the cache I/O really is int8 / uint8, with f32 scales beside it), the graph's quantization
against the numpy reference, full forward against token-by-token decoding, and closeness to the fp32
cache.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from quantlab.emit.artifact import genai_config, save_model, write_json
from quantlab.graph_builder.decoder import BuildOptions, build_decoder
from quantlab.graph_builder.kv_cache import collect_key_scales, dequantize, parse_kv_cache, quantize
from quantlab.quant.metrics import kl_divergence_per_token
from quantlab.runtime.generate import OrtDecoder, cache_bytes
from tests.tiny import tiny_checkpoint

# Full forward vs token-by-token over the same quantized cache: only f32 summation order differs.
INCREMENTAL_ATOL = 1e-4
# Mean KL (nats) of the next-token distribution against the fp32 cache on a tiny random decoder
# without outlier channels (a tiny random model is no proxy for a real one: the SmolLM2 figures are
# in benchmarks/results/kv_cache.md).
MAX_KLD = {"int8": 1e-3, "int4": 0.1, "int8-smooth": 1e-3, "int4-smooth": 0.1, "int2-r8": 0.5}

CKPT = tiny_checkpoint(3, outliers=False)
IDS = np.random.default_rng(1).integers(3, 96, (2, 24))  # (batch, seq)


def artifact(tmp_path, fmt: str, ckpt=CKPT, name: str | None = None):
    kv = parse_kv_cache(fmt)
    folder = tmp_path / (name or fmt)
    folder.mkdir()
    scales = None
    if kv.smooth_keys:  # calibrated on other ids than the ones the tests run
        calib = np.random.default_rng(7).integers(3, 96, (4, 32))
        scales = collect_key_scales(artifact(tmp_path, "fp32", ckpt, "calib"), calib, ckpt.spec.rope_interleaved)
    options = BuildOptions(kv_cache=kv, key_channel_scales=scales)
    save_model(build_decoder(ckpt, options), folder, progress=False)
    write_json(folder / "genai_config.json", genai_config(ckpt, kv_cache=kv))
    return OrtDecoder(folder)


def test_fp32_graph_is_unchanged():
    model = build_decoder(CKPT)
    names = [v.name for v in model.graph.inputs]
    assert not any(n.endswith("_scale") for n in names)
    assert {v.dtype for v in model.graph.inputs if v.name.startswith("past_")} == {ir.DataType.FLOAT}
    assert not any(n.op_type in ("Round", "Clip") for n in model.graph)
    assert "kv_cache" not in genai_config(CKPT)["model"]["decoder"]


@pytest.mark.parametrize("fmt, dtype, last", [("int8", np.int8, 16), ("int4", np.uint8, 8)])
def test_cache_io_is_really_integer(tmp_path, fmt, dtype, last):
    dec = artifact(tmp_path, fmt)
    s = CKPT.spec
    for i in range(s.num_layers):
        for kind in ("key", "value"):
            assert dec.input_types[f"past_key_values.{i}.{kind}"] == dtype
            assert dec.input_types[f"past_key_values.{i}.{kind}_scale"] == np.float32
    _, cache = dec.forward(IDS, dec.empty_cache(2))
    assert len(cache) == 4 * s.num_layers
    key = cache["past_key_values.0.key"]
    assert key.dtype == dtype and key.shape == (2, s.num_kv_heads, IDS.shape[1], last)
    assert cache["past_key_values.0.key_scale"].shape == (2, s.num_kv_heads, IDS.shape[1], 1)
    per_token = cache_bytes(cache) / (2 * IDS.shape[1])
    assert per_token == parse_kv_cache(fmt).bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-g8", "int2", "int2-g8"])
def test_graph_quantizes_like_the_reference(tmp_path, fmt):
    """Layer 0's keys/values do not depend on the cache format, so the fp32 graph's present.0.* quantized
    by the numpy reference must equal what the quantized graph stores."""
    f = parse_kv_cache(fmt)
    fp32 = artifact(tmp_path, "fp32")
    _, ref_cache = fp32.forward(IDS, fp32.empty_cache(2))
    dec = artifact(tmp_path, fmt)
    _, cache = dec.forward(IDS, dec.empty_cache(2))
    for kind in ("key", "value"):
        x = ref_cache[f"past_key_values.0.{kind}"]
        stored, scale = quantize(x, f)
        np.testing.assert_allclose(cache[f"past_key_values.0.{kind}_scale"], scale, rtol=1e-5)
        got = dequantize(cache[f"past_key_values.0.{kind}"], cache[f"past_key_values.0.{kind}_scale"], f)
        want = dequantize(stored, scale, f)
        # a value on a rounding tie may land one step apart; nothing further
        step = np.repeat(scale, f.group_size(x.shape[-1]), axis=-1)
        assert np.all(np.abs(got - want) <= step * 1.001)
        assert np.mean(np.isclose(got, want, rtol=1e-5, atol=0)) > 0.99  # int2's RMS sums in another order


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "int4-smooth", "int2", "int2-r8", "int4-g8-r5-smooth"])
def test_full_forward_equals_incremental(tmp_path, fmt):
    dec = artifact(tmp_path, fmt)
    full, _ = dec.forward(IDS, dec.empty_cache(2))
    logits, cache = dec.forward(IDS[:, :7], dec.empty_cache(2))
    steps = [logits]
    for t in range(7, IDS.shape[1]):
        logits, cache = dec.forward(IDS[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=INCREMENTAL_ATOL)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int8-smooth", "int4-smooth", "int2-r8"])
def test_close_to_fp32_cache(tmp_path, fmt):
    base = artifact(tmp_path, "fp32")
    dec = artifact(tmp_path, fmt)
    ref, _ = base.forward(IDS, base.empty_cache(2))
    got, _ = dec.forward(IDS, dec.empty_cache(2))
    assert float(np.mean(kl_divergence_per_token(ref, got))) < MAX_KLD[fmt]


def test_genai_config_describes_a_quantized_cache():
    cfg = genai_config(CKPT, kv_cache=parse_kv_cache("int4"))["model"]["decoder"]["kv_cache"]
    assert cfg["format"] == "int4" and cfg["dtype"] == "uint8" and cfg["bits"] == 4
    assert cfg["past_key_scale_names"] == "past_key_values.%d.key_scale"
    assert "cannot" in cfg["onnxruntime_genai"]


def test_smooth_keys_need_scales_and_store_them():
    with pytest.raises(ValueError, match="key_channel_scales"):
        BuildOptions(kv_cache=parse_kv_cache("int4-smooth"))
    scales = np.ones((CKPT.spec.num_layers, CKPT.spec.num_kv_heads, CKPT.spec.head_dim), np.float32)
    model = build_decoder(CKPT, BuildOptions(kv_cache=parse_kv_cache("int4-smooth"), key_channel_scales=scales))
    names = {v.name for v in model.graph.initializers.values()}
    assert "model.layers.0.self_attn.key_channel_scale" in names


def test_residual_window_io_and_a_window_longer_than_the_text_is_exact(tmp_path):
    base = artifact(tmp_path, "fp32")
    dec = artifact(tmp_path, "int2-r8")
    _, cache = dec.forward(IDS[:, :5], dec.empty_cache(2))
    assert cache["past_key_values.0.key"].shape == (2, CKPT.spec.num_kv_heads, 5, CKPT.spec.head_dim // 4)
    assert cache["past_key_values.0.key_residual"].shape == (2, CKPT.spec.num_kv_heads, 5, CKPT.spec.head_dim)
    _, cache = dec.forward(IDS[:, 5:], cache)
    assert cache["past_key_values.1.value_residual"].shape[2] == 8  # only the latest 8 stay in f32
    wide = artifact(tmp_path, f"int2-r{IDS.shape[1]}")  # every token within the window: no quantized key used
    ref, _ = base.forward(IDS, base.empty_cache(2))
    got, _ = wide.forward(IDS, wide.empty_cache(2))
    np.testing.assert_allclose(got, ref, atol=INCREMENTAL_ATOL)
    residual = cache["past_key_values.0.key_residual"]
    _, fp32_cache = base.forward(IDS, base.empty_cache(2))
    np.testing.assert_allclose(residual, fp32_cache["past_key_values.0.key"][:, :, -8:], atol=1e-6)
