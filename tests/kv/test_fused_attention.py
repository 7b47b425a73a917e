"""Fused attention (com.microsoft.GroupQueryAttention) against the plain MatMul/Softmax graph.

The plain graph is the oracle: the same checkpoint built both ways gives the same logits (fp32, within
FUSED_ATOL) for a left-padded batch through a prefill and several decode steps, on a tiny random GQA
Llama, Qwen2/Qwen3-style variants (qkv bias, q/k norm) and stories260K (llama2.c's adjacent-pair RoPE);
static int8/int4 caches store the same bytes both ways. stories260K's greedy tokens equal the llama2.c
golden file through `quantlab generate`, and onnxruntime-genai drives the fused artifact to the same
tokens.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from quantlab.cli.main import main
from quantlab.emit.artifact import genai_config, save_model, write_json
from quantlab.graph_builder.decoder import BuildOptions, build_decoder
from quantlab.graph_builder.kv_cache import dequantize_static, parse_kv_cache, quantize_static, static_cache_ranges
from quantlab.io import load_checkpoint
from quantlab.io.spec import Checkpoint
from quantlab.runtime.generate import OrtDecoder
from tests.cli.test_clients import genai_greedy
from tests.models import golden, model_path
from tests.tiny import ArraySource, tiny_checkpoint

# fp32, same maths in another summation order (the op's own softmax and GEMMs)
FUSED_ATOL = 1e-4
DECODE_STEPS = 4
PAD = 3  # left padding of the second row


def variant(ckpt: Checkpoint, **spec_changes) -> Checkpoint:
    """``ckpt`` with spec fields changed (qk_norm, attention_bias); new tensors random, seeded."""
    spec = dataclasses.replace(ckpt.spec, **spec_changes)
    rng = np.random.default_rng(11)
    arrays = dict(ckpt.tensors.arrays)
    for name, shape in spec.expected_shapes().items():
        if name not in arrays:
            base = 1.0 if name.endswith("norm.weight") else 0.0
            arrays[name] = (base + rng.normal(0, 0.2, shape)).astype(np.float32)
    return dataclasses.replace(ckpt, spec=spec, tensors=ArraySource(arrays))


CHECKPOINTS = {
    "llama-gqa": tiny_checkpoint(3, outliers=False),  # 4 heads over 2 kv heads
    "qwen2-bias": variant(tiny_checkpoint(4, outliers=False), attention_bias=True),
    "qwen3-qk-norm": variant(tiny_checkpoint(5, outliers=False, kv_heads=1), qk_norm=True),
}


def decoder(folder, ckpt: Checkpoint, **options) -> OrtDecoder:
    folder.mkdir()
    save_model(build_decoder(ckpt, BuildOptions(**options)), folder, progress=False)
    write_json(folder / "genai_config.json", genai_config(ckpt, kv_cache=options.get("kv_cache")))
    return OrtDecoder(folder)


def run_padded(dec: OrtDecoder, ids: np.ndarray, vocab: int):
    """Prefill ``ids`` (batch 2, row 1 left-padded by PAD), then DECODE_STEPS single tokens ->
    (logits of every real position (list of arrays), final cache)."""
    mask = np.ones_like(ids)
    mask[1, :PAD] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits, cache = dec.forward(ids, dec.empty_cache(2), attention_mask=mask, position_ids=positions)
    real = [logits[0], logits[1, PAD:]]
    rng = np.random.default_rng(5)
    for _ in range(DECODE_STEPS):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        step = rng.integers(3, vocab, (2, 1))
        logits, cache = dec.forward(step, cache, attention_mask=mask, position_ids=mask.sum(1, keepdims=True) - 1)
        real.append(logits[:, 0])
    return real, cache


def assert_same_run(plain, fused, vocab: int, ids: np.ndarray):
    want, want_cache = run_padded(plain, ids, vocab)
    got, got_cache = run_padded(fused, ids, vocab)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=FUSED_ATOL, rtol=0)
    assert want_cache.keys() == got_cache.keys()
    for name, w in want_cache.items():
        g = got_cache[name]
        assert g.dtype == w.dtype and g.shape == w.shape
        # A padded query row has no visible key: the plain softmax spreads over every key, the op's over
        # the causal ones, so later layers cache different (never attended) values at padded positions.
        np.testing.assert_allclose(g[0], w[0], atol=FUSED_ATOL)
        np.testing.assert_allclose(g[1, :, PAD:], w[1, :, PAD:], atol=FUSED_ATOL)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_fused_equals_plain_with_left_padding(tmp_path, name):
    ckpt = CHECKPOINTS[name]
    ids = np.random.default_rng(1).integers(3, ckpt.spec.vocab_size, (2, 9))
    plain = decoder(tmp_path / "plain", ckpt)
    fused = decoder(tmp_path / "fused", ckpt, attention="fused")
    assert_same_run(plain, fused, ckpt.spec.vocab_size, ids)


def test_graph_structure():
    ckpt = CHECKPOINTS["llama-gqa"]
    fused = build_decoder(ckpt, BuildOptions(attention="fused"))
    plain = build_decoder(ckpt)
    ops = [n.op_type for n in fused.graph]
    assert ops.count("GroupQueryAttention") == ckpt.spec.num_layers and "Softmax" not in ops
    assert fused.opset_imports["com.microsoft"] == 1
    assert "GroupQueryAttention" not in [n.op_type for n in plain.graph] and "com.microsoft" not in plain.opset_imports
    gqa = next(n for n in fused.graph if n.op_type == "GroupQueryAttention")
    attrs = {k: a.value for k, a in gqa.attributes.items()}
    assert attrs == {"num_heads": ckpt.spec.num_heads, "kv_num_heads": ckpt.spec.num_kv_heads}
    # the same cache I/O as the plain graph: what genai and quantlab generate feed
    io = lambda m: [(v.name, v.dtype) for v in [*m.graph.inputs, *m.graph.outputs]]  # noqa: E731
    assert io(fused) == io(plain)


@pytest.fixture(scope="module")
def tiny_ranges(tmp_path_factory):
    ckpt = CHECKPOINTS["llama-gqa"]
    base = decoder(tmp_path_factory.mktemp("calib") / "fp32", ckpt)
    calib = np.random.default_rng(7).integers(3, 96, (4, 32))  # other ids than the tests run
    return {fmt: static_cache_ranges(base, calib, False, parse_kv_cache(fmt)) for fmt in ("int8-static", "int4-static")}


@pytest.mark.parametrize("fmt, dtype", [("int8-static", np.int8), ("int4-static", np.uint8)])
def test_static_quantized_cache_fused_equals_plain(tmp_path, tiny_ranges, fmt, dtype):
    """onnxruntime 1.32's CPU GroupQueryAttention reads int8 and int4 caches (PER_CHANNEL scales): the
    plain graph's static quantization stores the same bytes and gives the same logits."""
    ckpt = CHECKPOINTS["llama-gqa"]
    kv = parse_kv_cache(fmt)
    keys, values = tiny_ranges[fmt]
    options = dict(kv_cache=kv, key_channel_scales=keys, value_channel_scales=values)
    plain = decoder(tmp_path / "plain", ckpt, **options)
    fused = decoder(tmp_path / "fused", ckpt, attention="fused", **options)
    assert fused.input_types["past_key_values.0.key"] == dtype
    assert not any(n.endswith("_scale") for n in fused.input_names)  # the scales are constants
    ids = np.random.default_rng(2).integers(3, 96, (2, 9))
    assert_same_run(plain, fused, ckpt.spec.vocab_size, ids)
    _, cache = fused.forward(ids[:1], fused.empty_cache(1))
    key = cache["past_key_values.0.key"]
    s = ckpt.spec
    assert key.shape == (1, s.num_kv_heads, ids.shape[1], kv.stored_dim(s.head_dim))
    per_token = sum(t.nbytes for t in cache.values()) / ids.shape[1]
    assert per_token == kv.bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim)


def test_static_reference_round_trip():
    """quantize_static: codes round(x / scale) clipped to [qmin, qmax], int4 two per byte."""
    x = np.array([[[[0.1, -0.26, 3.0, -3.0]]]], np.float32)  # (1, 1, 1, 4)
    scale = np.full((1, 1, 1, 4), 0.1, np.float32)
    q8 = quantize_static(x, scale, parse_kv_cache("int8-static"))
    assert q8.tolist() == [[[[1, -3, 30, -30]]]]
    fmt4 = parse_kv_cache("int4-static")
    q4 = quantize_static(x, scale, fmt4)  # codes 1, -3, 7 (clipped), -8 (clipped) -> +8 -> 9, 5, 15, 0
    assert q4.tolist() == [[[[9 | 5 << 4, 15 | 0 << 4]]]]
    np.testing.assert_allclose(dequantize_static(q4, scale, fmt4), [[[[0.1, -0.3, 0.7, -0.8]]]], atol=1e-6)


@pytest.fixture(scope="module")
def stories_fused(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "fused"
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(out), "--attention", "fused"]
    assert main([*argv, "--no-progress"]) == 0
    return out


def test_stories_fused_equals_plain(tmp_path):
    """llama2.c's adjacent-pair RoPE (rope_interleaved), 8 heads over 4 kv heads."""
    ckpt = load_checkpoint(model_path("stories260K.bin"))
    ids = np.random.default_rng(3).integers(3, ckpt.spec.vocab_size, (2, 12))
    plain = decoder(tmp_path / "plain", ckpt)
    fused = decoder(tmp_path / "fused", ckpt, attention="fused")
    assert_same_run(plain, fused, ckpt.spec.vocab_size, ids)


def test_stories_fused_greedy_is_golden_and_genai_agrees(stories_fused, capsys):
    manifest = json.loads((stories_fused / "manifest.json").read_text())
    assert manifest["attention"]["kind"] == "fused" and manifest["graph"]["opset"]["com.microsoft"] == 1
    want = golden("stories260K_greedy.json")["ids"]
    argv = ["generate", str(stories_fused), "--prompt-ids", "1", "--greedy", "--ignore-eos"]
    assert main([*argv, "--max-new-tokens", str(len(want) - 1), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"]
    assert ours == want[1:]
    assert genai_greedy(stories_fused, [1], 64) == ours[:64]


def test_fused_int8_cache_from_the_cli_runs_in_genai(tmp_path, capsys):
    """--attention fused --kv int8 stores int8-static (calibrated), which genai allocates by input type."""
    out = tmp_path / "fused-int8"
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(out), "--attention", "fused", "--kv", "int8"]
    assert main([*argv, "--calib-from-model", "2", "--no-eval", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["kv_cache"] == "int8-static"
    kv = manifest["kv_cache"]
    assert (kv["format"], kv["dtype"], kv["onnxruntime_genai"]) == ("int8-static", "int8", "supported")
    assert kv["bytes_per_token"] * 2 == kv["fp16_bytes_per_token"]  # no scale bytes per token
    assert "kv_cache" not in json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    capsys.readouterr()
    argv = ["generate", str(out), "--prompt-ids", "1", "--greedy", "--ignore-eos", "--max-new-tokens", "48"]
    assert main([*argv, "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"]
    assert genai_greedy(out, [1], 48) == ours


@pytest.mark.parametrize("kv", ["kivi2", "int4-g4", "int8-r8", "int2"])
def test_fused_refuses_a_cache_it_cannot_read(tmp_path, capsys, kv):
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(tmp_path / "x"), "--attention", "fused"]
    assert main([*argv, "--kv", kv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--attention" in err and "GroupQueryAttention" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="static"):
        BuildOptions(kv_cache=parse_kv_cache(kv), attention="fused")
