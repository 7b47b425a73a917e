"""quantlab's ONNX decoder against transformers as the oracle: logits on a prompt and through the KV cache.

Tiny random-weight models of every family in scope are saved as Hugging Face folders, read back through
quantlab's own reader, built, written and run in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from quantlab.emit.artifact import genai_config, save_model, write_json  # noqa: E402
from quantlab.graph_builder.decoder import BuildOptions, build_decoder  # noqa: E402
from quantlab.io import load_checkpoint  # noqa: E402
from quantlab.runtime.generate import OrtDecoder  # noqa: E402
from tests.parity import LOGITS_ATOL, compare_prompt_and_decode  # noqa: E402

# fp16 weight storage: the oracle runs on the same fp16-rounded weights, so only arithmetic order differs.
FP16_LOGITS_ATOL = 1e-4

COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

CONFIGS = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3-rope-scaling-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=2, head_dim=16, sliding_window=None, tie_word_embeddings=False),
    ),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qk-norm": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    ),
}


def _hf_model(name: str):
    config_cls, model_cls, extra = CONFIGS[name]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms too, so a missing or misplaced norm cannot hide
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def _convert(hf_dir, out_dir, weight_dtype="fp32"):
    ckpt = load_checkpoint(hf_dir)
    model = build_decoder(ckpt, BuildOptions(weight_dtype=weight_dtype))
    out_dir.mkdir()
    save_model(model, out_dir, progress=False)
    write_json(out_dir / "genai_config.json", genai_config(ckpt))
    return OrtDecoder(out_dir)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    model = _hf_model(name)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    compare_prompt_and_decode(model, _convert(tmp_path / "hf", tmp_path / "onnx"), LOGITS_ATOL)


def test_fp16_weights_match_transformers_on_rounded_weights(tmp_path):
    model = _hf_model("qwen2-bias")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    decoder = _convert(tmp_path / "hf", tmp_path / "onnx", weight_dtype="fp16")
    with torch.no_grad():  # the oracle sees what we stored: matrices rounded to fp16, norms and biases fp32
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    compare_prompt_and_decode(model, decoder, FP16_LOGITS_ATOL)


def test_left_padding_matches_unpadded(tmp_path):
    """A padded batch row gives the same logits as the same prompt alone."""
    model = _hf_model("llama-gqa-untied")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    decoder = _convert(tmp_path / "hf", tmp_path / "onnx")
    alone, _ = decoder.forward(np.array([[5, 6, 7]]), decoder.empty_cache())
    ids = np.array([[0, 0, 5, 6, 7], [9, 8, 5, 6, 7]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    padded, _ = decoder.forward(ids, decoder.empty_cache(2), attention_mask=mask, position_ids=pos)
    np.testing.assert_allclose(padded[0, 2:], alone[0], atol=LOGITS_ATOL, rtol=0)
    assert np.isfinite(padded).all()
