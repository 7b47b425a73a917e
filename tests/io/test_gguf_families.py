"""GGUF ``gemma3``, ``qwen3moe`` and ``llama`` with experts (llama.cpp's Mixtral layout) against transformers.

A tiny random Hugging Face model is saved with ``save_pretrained``; its tensors are written into a GGUF the
way llama.cpp's convert_hf_to_gguf.py writes them (q/k rows permuted for ``llama`` only, Gemma's norms as
1 + w, the experts stacked as (experts, out, in), the converter's metadata keys), read back with quantlab's
GGUF reader and held to the Hugging Face reader's spec and tensors and to transformers' logits (prefill and
decode with the cache) and greedy tokens. transformers writes no GGUF, so the writer here is a transcription
of the converter's conventions, and llama.cpp itself (when llama-cpp-python is installed) reads the written
files to transformers' logits and tokenizes the SentencePiece vocabulary as quantlab's rebuilt tokenizer does.
The real Gemma 3 270M file is tests/io/test_gemma3_270m.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from quantlab.io import load_checkpoint  # noqa: E402
from quantlab.runtime.generate import OrtDecoder  # noqa: E402
from tests.io.test_gguf import llama_cpp_permute  # noqa: E402
from tests.parity import PROMPT, compare_prompt_and_decode, greedy  # noqa: E402

GREEDY_TOKENS = 6

# (1 + w) - 1 in float32: Gemma's norms come back within an ulp of 1 of the Hugging Face weight
NORM_ATOL = 2**-23
VOCAB = 300  # 4 specials + 256 byte tokens + merged pieces + padding, for both vocabulary kinds

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)
CONFIGS = {
    # llama.cpp's qwen3moe: every layer sparse, top-k weights renormalized
    "qwen3moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6),
    ),
    # llama.cpp's gemma3: layers 0-4 slide (every sixth is global), the sliding RoPE base 10000, the
    # attention scaled by 1/sqrt(head_dim); a window of 4 is shorter than the 11-token test sequence
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=6,
            sliding_window=4,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            query_pre_attn_scalar=16,
            rope_theta=1e6,
            rope_local_base_freq=10000.0,
            final_logit_softcapping=3.0,
        ),
    ),
}
# canonical (Hugging Face) name -> llama.cpp's, per layer; sandwich norms renamed for Gemma
GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
}
GEMMA_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
ARCH = {"qwen3moe": "qwen3moe", "mixtral": "llama", "gemma3": "gemma3"}


def _hf_model(name: str):
    config_cls, model_cls, extra = CONFIGS[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms, so a missing or misplaced norm cannot hide
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5) if name != "gemma3" else p.uniform_(-0.5, 0.5)  # Gemma scales by 1 + w
            elif n.endswith("gate.weight"):  # a decisive router: no near-ties between the top-k and the rest
                p.normal_(0, 1.0)
    return model


def _add_byte_level_vocab(writer) -> None:
    from tests.io.test_gguf import _byte_level_alphabet

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", *_byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    tokens += [f"<|extra_{i}|>" for i in range(VOCAB - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 4 + [1] * 259 + [3] * (VOCAB - 263))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)


SPM_PIECES = ["▁", "t", "h", "e", "a", "th", "he", "the", "▁t", "▁the", "at", "▁a"]


def _add_sentencepiece_vocab(writer) -> None:
    """Gemma's layout: <pad> <eos> <bos> <unk>, then bytes, pieces best first, unused control tokens."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES, "  "]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(SPM_PIECES) + [4]
    tokens += [f"<unused{i}>" for i in range(VOCAB - len(tokens))]
    types += [3] * (VOCAB - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0 if t != 1 else -float(i) for i, t in enumerate(types)])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)


def write_gguf(name: str, hf_dir, path) -> dict[str, np.ndarray]:
    """The HF checkpoint in ``hf_dir`` as llama.cpp's converter writes it; returns its canonical tensors."""
    ckpt = load_checkpoint(hf_dir)
    spec, config = ckpt.spec, ckpt.hf_config
    tensors = {n: ckpt.tensors.load(n) for n in ckpt.tensors.names()}
    arch = ARCH[name]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    if spec.moe_layers:
        writer.add_expert_count(spec.num_experts)
        writer.add_expert_used_count(spec.experts_per_token)
        if arch == "qwen3moe":
            writer.add_expert_feed_forward_length(spec.moe_intermediate_size)
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        _add_sentencepiece_vocab(writer)
    else:
        _add_byte_level_vocab(writer)
    names = {**GGUF_NAMES, **(GEMMA_NAMES if arch == "gemma3" else {})}
    heads = {"self_attn.q_proj": spec.num_heads, "self_attn.k_proj": spec.num_kv_heads} if arch == "llama" else {}
    writer.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    if "lm_head.weight" in tensors:
        writer.add_tensor("output.weight", tensors["lm_head.weight"])
    shift = np.float32(1.0 if arch == "gemma3" else 0.0)  # Gemma3Model.modify_tensors: norm weights + 1
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"] + shift)
    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}."
        for canonical, short in names.items():
            key = f"{prefix}{canonical}.weight"
            if key not in tensors:
                continue
            array = tensors[key]
            if canonical in heads:
                array = llama_cpp_permute(array, heads[canonical])
            elif canonical.endswith("norm"):
                array = array + shift
            writer.add_tensor(f"blk.{i}.{short}.weight", array)
        if i in spec.moe_layers:
            for proj, short in (
                ("gate_proj", "ffn_gate_exps"),
                ("up_proj", "ffn_up_exps"),
                ("down_proj", "ffn_down_exps"),
            ):
                stacked = [tensors[f"{prefix}mlp.experts.{e}.{proj}.weight"] for e in range(spec.num_experts)]
                writer.add_tensor(f"blk.{i}.{short}.weight", np.stack(stacked))  # (experts, out, in)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (transformers model, HF checkpoint, GGUF checkpoint, the HF reader's tensors)."""
    out = {}
    for name in CONFIGS:
        model = _hf_model(name)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder / "hf", safe_serialization=True)
        tensors = write_gguf(name, folder / "hf", folder / f"{name}.gguf")
        out[name] = (model, load_checkpoint(folder / "hf"), load_checkpoint(folder / f"{name}.gguf"), tensors)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_and_tensors_equal_the_hf_readers(name, families):
    _, hf, ckpt, tensors = families[name]
    assert ckpt.source_format == "gguf"
    # the tokenizer's ids and the context are the file's, the rest of the spec is the Hugging Face reader's
    keep = ("bos_token_id", "eos_token_ids")
    want = dataclasses.replace(hf.spec, **{k: getattr(ckpt.spec, k) for k in keep})
    assert ckpt.spec == want
    assert ckpt.tensors.names() == hf.tensors.names()
    for tensor_name, array in tensors.items():
        got = ckpt.tensors.load(tensor_name)
        assert got.shape == ckpt.tensors.shape(tensor_name) == array.shape
        if name == "gemma3" and tensor_name.endswith("norm.weight"):
            np.testing.assert_allclose(got, array, atol=NORM_ATOL, rtol=0, err_msg=tensor_name)
            assert np.array_equal(got + np.float32(1), array + np.float32(1)), tensor_name  # llama.cpp's 1 + w
        else:
            np.testing.assert_array_equal(got, array, err_msg=tensor_name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantlab_convert_gguf_matches_transformers(name, families, tmp_path, capsys):
    """``quantlab convert FILE.gguf -o OUT`` (fp32): transformers' logits through prefill and decode, and its
    greedy tokens."""
    from quantlab.cli.main import main

    model, _, ckpt, _ = families[name]
    path = ckpt.source_files[0]
    assert main(["convert", path, "-o", str(tmp_path / "out"), "--no-progress", "--no-eval"]) == 0
    decoder = OrtDecoder(tmp_path / "out")
    compare_prompt_and_decode(model, decoder)
    with torch.no_grad():
        want = model.generate(
            torch.tensor(PROMPT), max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, len(PROMPT[0]) :].tolist()
    assert greedy(decoder, PROMPT[0], GREEDY_TOKENS) == want


# llama.cpp over the same F32 file: the SwiGLU families agree to float32 rounding; Gemma's logits differ by up
# to 2.6e-4 (measured), which we take for ggml's GELU (its CPU build reads GELU from an fp16 lookup table).
LLAMA_CPP_ATOL = {"qwen3moe": 1e-5, "mixtral": 1e-5, "gemma3": 2e-3}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_llama_cpp_reads_the_written_file_as_transformers(name, families):
    """The writer here follows llama.cpp's conventions: llama.cpp itself gives transformers' logits for it."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (extra: llama)")
    import llama_cpp.llama_cpp as low_level

    from quantlab.bench.peers import llama_cpp_extra_buffers

    model, _, ckpt, _ = families[name]
    default_params = low_level.llama_model_default_params

    def model_params():  # no AMX repacking: llama-cpp-python 0.3.36 crashes with it on AMX CPUs
        params = default_params()
        params.use_extra_bufts = llama_cpp_extra_buffers()
        return params

    low_level.llama_model_default_params = model_params
    try:
        llm = llama_cpp.Llama(ckpt.source_files[0], n_ctx=64, logits_all=True, type_k=0, type_v=0, verbose=False)
    finally:
        low_level.llama_model_default_params = default_params
    llm.eval(PROMPT[0])
    got = np.array(llm.scores[: len(PROMPT[0])], dtype=np.float32)  # (seq, vocab), f32 KV cache (type 0)
    with torch.no_grad():
        want = model(torch.tensor(PROMPT)).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=LLAMA_CPP_ATOL[name], rtol=0)


def test_onnxruntime_genai_runs_the_qwen3_moe_artifact(families, tmp_path, capsys):
    """onnxruntime-genai loads the Qwen3-MoE artifact (com.microsoft.MoE) and generates quantlab's greedy tokens."""
    from quantlab.cli.main import main
    from tests.cli.test_clients import genai_greedy, quantlab_greedy

    path = families["qwen3moe"][2].source_files[0]
    assert main(["convert", path, "-o", str(tmp_path / "out"), "--no-progress", "--no-eval"]) == 0
    ours = quantlab_greedy(capsys, tmp_path / "out", PROMPT[0], 12, ignore_eos=True)
    assert len(ours) == 12 and genai_greedy(tmp_path / "out", PROMPT[0], 12) == ours


SPM_TEXTS = ["the that  a\u00e9", "hat the", " the", "a  the   t", "thethe"]


def test_sentencepiece_vocabulary_rebuilt(families):
    """Gemma's vocabulary kind: merges from the scores (``th`` outranks ``▁t``), spaces as ▁, byte fallback,
    user-defined tokens (two spaces) whole."""
    import tokenizers

    spec = families["gemma3"][2].tokenizer
    tok = tokenizers.Tokenizer.from_str(spec.content)
    encoding = tok.encode(SPM_TEXTS[0])
    assert encoding.tokens == ["<bos>", "the", "▁", "th", "at", "  ", "a", "<0xC3>", "<0xA9>"]
    assert tok.decode(encoding.ids, skip_special_tokens=True) == SPM_TEXTS[0]
    assert (spec.bos_token_id, spec.eos_token_ids) == (2, (1,))


def test_sentencepiece_vocabulary_tokenizes_as_llama_cpp(families):
    """llama.cpp's own SentencePiece tokenizer over the same file is the oracle."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (extra: llama)")
    import tokenizers

    ckpt = families["gemma3"][2]
    tok = tokenizers.Tokenizer.from_str(ckpt.tokenizer.content)
    llm = llama_cpp.Llama(ckpt.source_files[0], vocab_only=True, verbose=False)
    for text in SPM_TEXTS:
        assert tok.encode(text).ids == llm.tokenize(text.encode(), add_bos=True, special=False), text


def test_experts_without_expert_count_are_refused(families, tmp_path):
    from quantlab.errors import InputError

    _, _, ckpt, _ = families["mixtral"]
    reader = gguf.GGUFReader(ckpt.source_files[0])
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "llama.expert_count"):
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError) as e:
        load_checkpoint(tmp_path / "bad.gguf")
    assert e.value.field == "llama.expert_count" and e.value.path == str(tmp_path / "bad.gguf")


@pytest.mark.parametrize("name", ["gemma3", "qwen3moe"])
def test_bulk_metadata_parse_equals_the_packages(name, families):
    """open_gguf parses array metadata in bulk: every field as gguf.GGUFReader itself gives it."""
    from quantlab.io.gguf_reader import open_gguf

    path = families[name][2].source_files[0]
    stock, fast = gguf.GGUFReader(path), open_gguf(path)
    assert list(fast.fields) == list(stock.fields)
    for key, want in stock.fields.items():
        got = fast.fields[key]
        assert (got.contents(), got.data, got.types, got.offset) == (
            want.contents(),
            want.data,
            want.types,
            want.offset,
        )
        assert [(p.dtype, p.tobytes()) for p in got.parts] == [(p.dtype, p.tobytes()) for p in want.parts], key
    assert [(t.name, t.data_offset) for t in fast.tensors] == [(t.name, t.data_offset) for t in stock.tensors]
