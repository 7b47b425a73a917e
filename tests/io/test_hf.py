"""Hugging Face folders: tiny random transformers models saved with save_pretrained, read back exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantlab.errors import InputError
from quantlab.io import RopeScaling, load_checkpoint
from quantlab.io.hf import spec_from_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DIMS = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _save(folder, model, dtype, **kwargs):
    torch.manual_seed(0)
    model = model.to(dtype)
    model.save_pretrained(folder, **kwargs)
    return {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**DIMS, rope_theta=50000.0, rope_scaling=dict(LLAMA3_ROPE))
    return folder, _save(folder, transformers.LlamaForCausalLM(config), torch.float32)


@pytest.fixture(scope="module")
def qwen3_sharded_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    torch.manual_seed(1)
    config = transformers.Qwen3Config(**DIMS, head_dim=16, tie_word_embeddings=True)
    state = _save(folder, transformers.Qwen3ForCausalLM(config), torch.bfloat16, max_shard_size="20KB")
    return folder, state


def _assert_round_trip(ckpt, state):
    names = ckpt.tensors.names()
    assert names == list(ckpt.spec.expected_shapes())
    for name in names:
        array = ckpt.tensors.load(name)
        assert array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable
        np.testing.assert_array_equal(array, state[name], err_msg=name)


def test_llama_round_trip_and_rope(llama_dir):
    folder, state = llama_dir
    ckpt = load_checkpoint(folder)
    assert ckpt.source_format == "hf-safetensors" and ckpt.hf_config["model_type"] == "llama"
    spec = ckpt.spec
    assert (spec.family, spec.num_kv_heads, spec.head_dim, spec.tie_word_embeddings) == ("llama", 2, 8, False)
    assert spec.rope_theta == 50000.0 and spec.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    assert "lm_head.weight" in ckpt.tensors.names()
    _assert_round_trip(ckpt, state)


def test_qwen3_sharded_bf16_tied(qwen3_sharded_dir):
    folder, state = qwen3_sharded_dir
    assert (folder / "model.safetensors.index.json").is_file()
    ckpt = load_checkpoint(folder)
    assert len([f for f in ckpt.source_files if f.endswith(".safetensors")]) > 1
    spec = ckpt.spec
    assert (spec.family, spec.qk_norm, spec.attention_bias, spec.head_dim) == ("qwen3", True, False, 16)
    assert spec.tie_word_embeddings and "lm_head.weight" not in ckpt.tensors.names()
    _assert_round_trip(ckpt, state)


def test_qwen2_fp16_has_qkv_bias(tmp_path):
    torch.manual_seed(2)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DIMS))
    state = _save(tmp_path, model, torch.float16)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.spec.attention_bias and ckpt.spec.family == "qwen2"
    assert "model.layers.1.self_attn.k_proj.bias" in ckpt.tensors.names()
    _assert_round_trip(ckpt, state)


def test_transformers4_and_5_config_shapes_agree():
    v4 = {"architectures": ["LlamaForCausalLM"], **DIMS, "rope_theta": 50000.0, "rope_scaling": dict(LLAMA3_ROPE)}
    v5 = {"architectures": ["LlamaForCausalLM"], **DIMS, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 50000.0}}
    v4_legacy_key = {
        **v4,
        "rope_scaling": {**{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}, "type": "llama3"},
    }
    assert (
        spec_from_hf_config(v4, "c.json")
        == spec_from_hf_config(v5, "c.json")
        == spec_from_hf_config(v4_legacy_key, "c")
    )
    plain = spec_from_hf_config({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}, "c.json")
    assert plain.rope_scaling is None and plain.rope_theta == 7.0


def test_defaults_follow_transformers_config_classes():
    dims = {k: v for k, v in DIMS.items() if k not in ("num_key_value_heads", "max_position_embeddings")}
    qwen3 = spec_from_hf_config({"architectures": ["Qwen3ForCausalLM"], **dims, "num_attention_heads": 32}, "c")
    assert (qwen3.head_dim, qwen3.num_kv_heads, qwen3.max_position_embeddings) == (128, 32, 32768)
    assert (qwen3.tie_word_embeddings, qwen3.rms_norm_eps, qwen3.rope_theta) == (False, 1e-6, 10000.0)
    llama = spec_from_hf_config({"model_type": "llama", **dims}, "c")
    assert (llama.head_dim, llama.num_kv_heads, llama.max_position_embeddings) == (8, 4, 2048)
    mistral = spec_from_hf_config({"architectures": ["MistralForCausalLM"], **DIMS, "num_attention_heads": 8}, "c")
    assert mistral.max_position_embeddings == 128 and mistral.family == "mistral"
    windowed = spec_from_hf_config({"architectures": ["MistralForCausalLM"], **DIMS, "sliding_window": 32}, "c")
    assert windowed.max_position_embeddings == 32  # exact only inside the window


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "rope_scaling.low_freq_factor"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": "64"}, "vocab_size"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ],
)
def test_bad_configs(change, field):
    config = {"architectures": ["LlamaForCausalLM"], **DIMS, **change}
    with pytest.raises(InputError) as e:
        spec_from_hf_config(config, "folder/config.json")
    assert e.value.field == field and e.value.path == "folder/config.json"


def _copy_folder(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _edit_config(folder, **change):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return path


def test_config_dim_contradicting_a_tensor(llama_dir, tmp_path):
    folder = _copy_folder(llama_dir[0], tmp_path / "m")
    config = _edit_config(folder, intermediate_size=40)
    with pytest.raises(InputError) as e:
        load_checkpoint(folder)
    assert e.value.path == str(config) and e.value.field == "intermediate_size"


def test_missing_tensor_is_named(llama_dir, tmp_path):
    folder = _copy_folder(llama_dir[0], tmp_path / "m")
    _edit_config(folder, num_hidden_layers=3)
    with pytest.raises(InputError) as e:
        load_checkpoint(folder)
    assert e.value.field == "model.layers.2.input_layernorm.weight" and "missing" in e.value.message


def test_unsupported_architecture_in_folder(llama_dir, tmp_path):
    folder = _copy_folder(llama_dir[0], tmp_path / "m")
    config = _edit_config(folder, architectures=["FalconForCausalLM"])
    with pytest.raises(InputError) as e:
        load_checkpoint(folder)
    assert e.value.path == str(config) and e.value.field == "architectures"


@pytest.mark.parametrize(
    ("shard", "words"),
    [("../outside.safetensors", "'..'"), ("/etc/passwd", "absolute"), ("sub/../../x.safetensors", "'..'")],
)
def test_shard_names_cannot_escape(qwen3_sharded_dir, tmp_path, shard, words):
    folder = _copy_folder(qwen3_sharded_dir[0], tmp_path / "m")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError) as e:
        load_checkpoint(folder)
    assert e.value.path == str(index_path) and e.value.field == "weight_map" and words in e.value.message


def test_shard_symlink_outside_is_refused(qwen3_sharded_dir, tmp_path):
    folder = _copy_folder(qwen3_sharded_dir[0], tmp_path / "m")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = next(iter(index["weight_map"].values()))
    outside = tmp_path / "outside.safetensors"
    (folder / victim).rename(outside)
    (folder / victim).symlink_to(outside)
    with pytest.raises(InputError) as e:
        load_checkpoint(folder)
    assert e.value.field == "weight_map" and "outside" in e.value.message


def test_tokenizer_json_and_chat_template(llama_dir, tmp_path):
    folder = _copy_folder(llama_dir[0], tmp_path / "m")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3, "hello": 4, "world": 5}
    tokenizer = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
            for t, i in vocab.items()
            if i < 4
        ],
        "pre_tokenizer": {"type": "Whitespace"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    ckpt = load_checkpoint(folder)
    tok = ckpt.tokenizer
    assert tok.kind == "hf-json" and tok.chat_template == template and tok.bos_token_id == 1
    assert tok.eos_token_ids == (2, 5, 3)  # config, generation_config, ChatML's <|im_end|>
    assert ckpt.spec.eos_token_ids == (2, 5, 3)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError) as e:
        load_checkpoint(folder)
    assert e.value.path == str(folder / "tokenizer.json")


def test_pickle_needs_allow_pickle(llama_dir, tmp_path):
    folder, state = llama_dir
    pickled = tmp_path / "p"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((folder / "config.json").read_bytes())
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}, pickled / "pytorch_model.bin")
    with pytest.raises(InputError) as e:
        load_checkpoint(pickled)
    assert "--allow-pickle" in e.value.message
    ckpt = load_checkpoint(pickled, allow_pickle=True)
    assert ckpt.source_format == "torch-pickle"
    name = "model.layers.1.mlp.up_proj.weight"
    want = torch.from_numpy(state[name]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ckpt.tensors.load(name), want)
