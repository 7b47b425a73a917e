"""GGUF reader: the real SmolLM2 file (a few tensors), tiny GGUF files written with gguf.GGUFWriter, hostile files."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.errors import InputError
from quantlab.io import load_checkpoint
from quantlab.io.gguf_reader import load_gguf, unpermute_rows

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, transcribed (n_head already the KV count for k)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.fixture(scope="module")
def smollm2(require_model):
    return load_checkpoint(require_model(SMOLLM2))


def test_smollm2_spec(smollm2):
    spec = smollm2.spec
    assert smollm2.source_format == "gguf"
    assert (spec.family, spec.vocab_size, spec.hidden_size, spec.intermediate_size) == ("llama", 49152, 576, 1536)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    assert (spec.rope_theta, spec.rms_norm_eps, spec.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert spec.tie_word_embeddings and not spec.rope_interleaved
    assert spec.bos_token_id == 1 and 2 in spec.eos_token_ids
    assert smollm2.tensors.names() == list(spec.expected_shapes())
    config = smollm2.hf_config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0 and config["head_dim"] == 64


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.layers.3.input_layernorm.weight",
        "model.norm.weight",
    ],
)
def test_smollm2_tensors_dequantize(smollm2, name):
    array = smollm2.tensors.load(name)
    assert array.shape == smollm2.spec.expected_shapes()[name] == smollm2.tensors.shape(name)
    assert array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable
    assert np.isfinite(array).all() and np.abs(array).max() > 0


@pytest.mark.parametrize("layer", [0, 29])
def test_qk_unpermutation_matches_transformers(smollm2, require_model, layer):
    """transformers' own GGUF loader (LlamaTensorProcessor) is the oracle for the row order."""
    gguf = pytest.importorskip("gguf")
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    processor = utils.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    reader = gguf.GGUFReader(require_model(SMOLLM2))
    raw = {t.name: t for t in reader.tensors}
    for short, ours in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        tensor = raw[f"blk.{layer}.{short}.weight"]
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        want = processor.process(stored, f"blk.{layer}.{short}.weight").weights
        got = smollm2.tensors.load(f"model.layers.{layer}.self_attn.{ours}.weight")
        np.testing.assert_array_equal(got, want)


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, head_dim, cols in ((9, 64, 5), (3, 8, 7), (1, 2, 1)):
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
    bias = rng.standard_normal(4 * 6).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(bias, 4), 4), bias)


@pytest.mark.slow
def test_layer0_matches_transformers_gguf_loader(smollm2, require_model):
    """Whole-file oracle: transformers' load_gguf_checkpoint (dequantizes every tensor, ~1 min)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(require_model(SMOLLM2))
    config = transformers.LlamaConfig(**load_gguf_checkpoint(path)["config"])
    with torch.device("meta"):  # only the parameter names are needed to map GGUF names
        model = transformers.LlamaForCausalLM(config)
    loaded = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    for suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
        name = f"model.layers.0.{suffix}.weight"
        np.testing.assert_array_equal(smollm2.tensors.load(name), np.asarray(loaded[name], dtype=np.float32))
    assert "lm_head.weight" not in loaded or smollm2.spec.tie_word_embeddings


# --- tiny GGUF files ---------------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FF, LAYERS = 4, 2, 8, 32, 24, 2  # HIDDEN: a multiple of the Q8_0 block


def _byte_level_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, the 256 single-character byte-level tokens."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _write_gguf(path, *, arch="llama", tied=False, quantize_embedding=False, seed=0):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    canonical = {}

    def add(gguf_name, canonical_name, shape, permute_heads=None):
        array = rng.standard_normal(shape).astype(np.float32)
        canonical[canonical_name] = array
        stored = llama_cpp_permute(array, permute_heads) if permute_heads else array
        writer.add_tensor(gguf_name, stored)

    emb = rng.standard_normal((vocab, HIDDEN)).astype(np.float32)
    if quantize_embedding:
        q = gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        canonical["model.embed_tokens.weight"] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor("token_embd.weight", emb)
        canonical["model.embed_tokens.weight"] = emb
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (HIDDEN,))
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), HEADS)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), KV_HEADS)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN))
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM))
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (HIDDEN,))
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (FF, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (FF, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (HIDDEN, FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return canonical


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_round_trip(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    want = _write_gguf(path, tied=tied, quantize_embedding=tied)
    ckpt = load_checkpoint(path)
    assert ckpt.spec.tie_word_embeddings is tied and ckpt.spec.rope_theta == 500000.0
    assert (ckpt.spec.num_kv_heads, ckpt.spec.head_dim, ckpt.spec.rms_norm_eps) == (KV_HEADS, HEAD_DIM, 1e-6)
    assert sorted(ckpt.tensors.names()) == sorted(want)
    for name, array in want.items():
        np.testing.assert_array_equal(ckpt.tensors.load(name), array, err_msg=name)
    assert ckpt.tokenizer.kind == "hf-json" and ckpt.tokenizer.bos_token_id == 1
    assert set(ckpt.tokenizer.eos_token_ids) == {0, 2}  # eos + <|im_end|> of the ChatML template


def test_tiny_gguf_tokenizer_merges(tmp_path):
    import tokenizers

    _write_gguf(tmp_path / "tiny.gguf")
    spec = load_checkpoint(tmp_path / "tiny.gguf").tokenizer
    tok = tokenizers.Tokenizer.from_str(spec.content)
    encoding = tok.encode("<|im_start|>the the", add_special_tokens=False)
    assert encoding.tokens == ["<|im_start|>", "t", "he", "Ġthe"]
    assert tok.decode(encoding.ids, skip_special_tokens=True) == "the the"


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, arch="gpt2")
    with pytest.raises(InputError) as e:
        load_gguf(path)
    assert e.value.field == "general.architecture" and e.value.path == str(path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf(tmp_path, keep):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert e.value.path == str(path) and e.value.field


def test_bad_magic(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert e.value.field == "magic"
