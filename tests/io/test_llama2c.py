"""llama2.c reader: the real stories260K, synthetic v0/v1/v2 files written like export.py, hostile headers."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from quantlab.errors import InputError
from quantlab.io import load_checkpoint
from quantlab.io.llama2c import MAGIC, load_llama2c, read_llama2c_tokenizer

STORIES_PARAMS = 260_032  # the README's parameter count


def test_stories260k_spec_and_tensors(require_model):
    ckpt = load_checkpoint(require_model("stories260K.bin"))
    spec = ckpt.spec
    assert ckpt.source_format == "llama2c"
    assert (spec.hidden_size, spec.intermediate_size, spec.num_layers) == (64, 172, 5)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (8, 4, 8, 512)
    assert spec.tie_word_embeddings and spec.rope_interleaved
    assert (spec.rope_theta, spec.rms_norm_eps, spec.bos_token_id, spec.eos_token_ids) == (10000.0, 1e-5, 1, (2,))
    assert ckpt.tensors.names() == list(spec.expected_shapes())
    total = 0
    for name in ckpt.tensors.names():
        array = ckpt.tensors.load(name)
        assert array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable
        assert array.shape == ckpt.tensors.shape(name) and np.isfinite(array).all()
        total += array.size
    assert total == STORIES_PARAMS
    assert ckpt.tokenizer.kind == "llama2c" and ckpt.tokenizer.path.endswith("tok512.bin")
    assert [p.rsplit("/", 1)[-1] for p in ckpt.tokenizer.extra_files] == ["tok512.model"]
    assert ckpt.hf_config["num_key_value_heads"] == 4


# --- synthetic files, written in the order of karpathy/llama2.c export.py -----------------------

DIMS = {"dim": 16, "hidden_dim": 24, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 32, "seq_len": 8}


def _random_model(rng, d=DIMS):
    kv = d["dim"] * d["n_kv_heads"] // d["n_heads"]
    shapes = {
        "wq": (d["dim"], d["dim"]),
        "wk": (kv, d["dim"]),
        "wv": (kv, d["dim"]),
        "wo": (d["dim"], d["dim"]),
        "w1": (d["hidden_dim"], d["dim"]),
        "w2": (d["dim"], d["hidden_dim"]),
        "w3": (d["hidden_dim"], d["dim"]),
        "attention_norm": (d["dim"],),
        "ffn_norm": (d["dim"],),
    }
    layers = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(d["n_layers"])]
    emb = rng.standard_normal((d["vocab_size"], d["dim"])).astype(np.float32)
    out = rng.standard_normal((d["vocab_size"], d["dim"])).astype(np.float32)
    return layers, emb, rng.standard_normal(d["dim"]).astype(np.float32), out


def _stack(layers, kind):
    return [layer[kind] for layer in layers]


def _write_v0(path, model, shared, d=DIMS):
    layers, emb, norm, out = model
    vocab = d["vocab_size"] if shared else -d["vocab_size"]
    head = struct.pack(
        "7i", d["dim"], d["hidden_dim"], d["n_layers"], d["n_heads"], d["n_kv_heads"], vocab, d["seq_len"]
    )
    tensors = [emb]
    for kind in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
        tensors += _stack(layers, kind)
    rope = np.zeros((d["seq_len"], d["dim"] // d["n_heads"] // 2), np.float32)
    tensors += [norm, rope, rope] + ([] if shared else [out])
    path.write_bytes(head + b"".join(t.tobytes() for t in tensors))


def _v1_header(version, shared, d=DIMS, group_size=None):
    head = struct.pack("I", MAGIC) + struct.pack("i", version)
    head += struct.pack(
        "7i", *(d[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads")), d["vocab_size"], d["seq_len"]
    )
    head += struct.pack("B", int(shared))
    if group_size is not None:
        head += struct.pack("i", group_size)
    return head + b"\0" * (256 - len(head))


def _matrices(model, shared):
    layers, emb, _, out = model
    mats = [emb]
    for kind in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        mats += _stack(layers, kind)
    return mats + ([] if shared else [out])


def _write_v1(path, model, shared):
    layers, _, norm, _ = model
    tensors = _stack(layers, "attention_norm") + _stack(layers, "ffn_norm") + [norm] + _matrices(model, shared)
    path.write_bytes(_v1_header(1, shared) + b"".join(t.tobytes() for t in tensors))


def _q80(w, group_size):
    w = w.reshape(-1, group_size)
    scale = np.abs(w).max(axis=1) / 127.0
    q = np.round(w / scale[:, None]).astype(np.int8)
    return q, scale.astype(np.float32)


def _write_v2(path, model, shared, group_size=8):
    layers, _, norm, _ = model
    body = b"".join(t.tobytes() for t in _stack(layers, "attention_norm") + _stack(layers, "ffn_norm") + [norm])
    quantized = [_q80(m, group_size) for m in _matrices(model, shared)]
    body += b"".join(q.tobytes() for q, _ in quantized) + b"".join(s.tobytes() for _, s in quantized)
    path.write_bytes(_v1_header(2, shared, group_size=group_size) + body)
    return quantized


def _expected(model, shared):
    layers, emb, norm, out = model
    names = {
        "attention_norm": "input_layernorm.weight",
        "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight",
        "wv": "self_attn.v_proj.weight",
        "wo": "self_attn.o_proj.weight",
        "ffn_norm": "post_attention_layernorm.weight",
        "w1": "mlp.gate_proj.weight",
        "w2": "mlp.down_proj.weight",
        "w3": "mlp.up_proj.weight",
    }
    want = {"model.embed_tokens.weight": emb, "model.norm.weight": norm}
    if not shared:
        want["lm_head.weight"] = out
    for i, layer in enumerate(layers):
        want.update({f"model.layers.{i}.{names[k]}": v for k, v in layer.items()})
    return want


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("writer", [_write_v0, _write_v1])
def test_fp32_versions_round_trip(tmp_path, writer, shared):
    model = _random_model(np.random.default_rng(0))
    path = tmp_path / "model.bin"
    writer(path, model, shared)
    ckpt = load_checkpoint(path)
    assert ckpt.spec.tie_word_embeddings is shared
    want = _expected(model, shared)
    assert sorted(ckpt.tensors.names()) == sorted(want)
    for name, array in want.items():
        np.testing.assert_array_equal(ckpt.tensors.load(name), array, err_msg=name)


def test_q80_version_dequantizes(tmp_path):
    model = _random_model(np.random.default_rng(1))
    path = tmp_path / "model_q80.bin"
    quantized = _write_v2(path, model, shared=False)
    ckpt = load_checkpoint(path)
    emb_q, emb_s = quantized[0]
    want = (emb_q.astype(np.float32) * emb_s[:, None]).reshape(DIMS["vocab_size"], DIMS["dim"])
    np.testing.assert_array_equal(ckpt.tensors.load("model.embed_tokens.weight"), want)
    layers = model[0]
    got = ckpt.tensors.load("model.layers.1.mlp.down_proj.weight")
    np.testing.assert_allclose(got, layers[1]["w2"], atol=np.abs(layers[1]["w2"]).max() / 127)
    np.testing.assert_array_equal(ckpt.tensors.load("model.norm.weight"), model[2])


# --- hostile inputs ------------------------------------------------------------------------------


def _v0(tmp_path, **overrides):
    d = {**DIMS, **overrides}
    path = tmp_path / "bad.bin"
    _write_v0(path, _random_model(np.random.default_rng(0)), True)
    data = bytearray(path.read_bytes())
    data[:28] = struct.pack("7i", *(d[k] for k in DIMS))
    path.write_bytes(bytes(data))
    return path


def test_truncated_file_names_the_header(tmp_path):
    path = tmp_path / "model.bin"
    _write_v0(path, _random_model(np.random.default_rng(0)), True)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(InputError) as e:
        load_llama2c(path)
    assert e.value.path == str(path) and e.value.field == "header" and "bytes" in e.value.message


@pytest.mark.parametrize("field", ["dim", "n_layers", "n_heads", "vocab_size", "seq_len"])
def test_zero_dimension(tmp_path, field):
    path = _v0(tmp_path, **{field: 0})
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert e.value.field == field and str(path) in str(e.value)


def test_heads_that_do_not_divide(tmp_path):
    with pytest.raises(InputError) as e:
        load_checkpoint(_v0(tmp_path, n_kv_heads=3))
    assert e.value.field == "n_kv_heads"


def test_classifier_flag_contradicting_size(tmp_path):
    path = tmp_path / "model.bin"
    _write_v0(path, _random_model(np.random.default_rng(0)), shared=False)
    data = bytearray(path.read_bytes())
    data[20:24] = struct.pack("i", DIMS["vocab_size"])  # claims shared, but the classifier is there
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert e.value.field == "vocab_size" and "classifier" in e.value.message


def test_unknown_version_and_short_file(tmp_path):
    path = tmp_path / "v9.bin"
    path.write_bytes(struct.pack("Ii", MAGIC, 9) + b"\0" * 248)
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert e.value.field == "version"
    path.write_bytes(b"\1\2\3")
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert e.value.field == "header"


def test_tokenizer_size_must_match_vocab(tmp_path, require_model):
    tok = require_model("tok512.bin")
    path = tmp_path / "model.bin"
    _write_v0(path, _random_model(np.random.default_rng(0)), True)
    with pytest.raises(InputError) as e:
        load_checkpoint(path, tokenizer_path=tok)
    assert e.value.path == str(tok) and e.value.field == "vocab_size"


def test_tokenizer_file_parse_errors(tmp_path):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(struct.pack("<i", 4) + struct.pack("<fi", 0.0, 9) + b"toolong!!")
    with pytest.raises(InputError) as e:
        read_llama2c_tokenizer(path)
    assert e.value.field == "token 0"
