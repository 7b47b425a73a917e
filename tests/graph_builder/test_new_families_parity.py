"""Qwen3-MoE, Mixtral, Nemotron and Gemma 3 against transformers as the oracle.

Tiny random-weight models saved with ``save_pretrained`` (safetensors) are read back through quantlab's
reader, built with plain and fused attention (and, for the MoE families, the sparse MLP both as
com.microsoft.MoE and as the plain-ONNX decomposition), run in onnxruntime through a prefill and decode
steps with the KV cache, and held to transformers' logits and greedy tokens.
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
from tests.parity import PROMPT, compare_prompt_and_decode, greedy  # noqa: E402

GREEDY_TOKENS = 6

COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1], head_dim=16)

CONFIGS = {
    "qwen3-moe-norm-topk": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE, num_experts=8, norm_topk_prob=True)),
    "qwen3-moe-raw-topk": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE, num_experts=8, norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(head_dim=16, partial_rotary_factor=0.5)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        # sliding layers 0 and 2 see 4 keys, shorter than the 11-token test sequence
        dict(
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
        ),
    ),
}
MOE_FAMILIES = {"qwen3-moe-norm-topk", "qwen3-moe-raw-topk", "mixtral"}
CASES = [
    (name, attention, moe)
    for name in sorted(CONFIGS)
    for attention in ("plain", "fused")
    for moe in (("op", "decomposed") if name in MOE_FAMILIES else ("auto",))
]


def _hf_model(name: str):
    config_cls, model_cls, extra = CONFIGS[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms too, so a missing or misplaced norm cannot hide
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5) if "gemma" not in name else p.uniform_(-0.5, 0.5)  # Gemma scales by 1 + w
            elif n.endswith(".bias"):
                p.normal_(0, 0.1)
            elif n.endswith("gate.weight"):  # a decisive router: no near-ties between the top-k and the rest
                p.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    folders = {}
    for name in CONFIGS:
        model = _hf_model(name)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        folders[name] = (model, folder)
    return folders


def _convert(hf_dir, out_dir, **options) -> OrtDecoder:
    ckpt = load_checkpoint(hf_dir)
    model = build_decoder(ckpt, BuildOptions(**options))
    out_dir.mkdir()
    save_model(model, out_dir, progress=False)
    write_json(out_dir / "genai_config.json", genai_config(ckpt))
    return OrtDecoder(out_dir), model


@pytest.mark.parametrize(("name", "attention", "moe"), CASES)
def test_logits_and_greedy_tokens_match_transformers(name, attention, moe, hf_folders, tmp_path):
    model, folder = hf_folders[name]
    decoder, graph = _convert(folder, tmp_path / "onnx", attention=attention, moe=moe)
    ops = {node.op_type for node in graph.graph}
    if name in MOE_FAMILIES:
        assert ("MoE" in ops) == (moe == "op")
        assert ("TopK" in ops) == (moe == "decomposed")
    assert ("GroupQueryAttention" in ops) == (attention == "fused")
    compare_prompt_and_decode(model, decoder)
    with torch.no_grad():
        want = model.generate(
            torch.tensor(PROMPT), max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, len(PROMPT[0]) :].tolist()
    assert greedy(decoder, PROMPT[0], GREEDY_TOKENS) == want


def test_fused_matches_plain_with_padding_softcap_and_windows(hf_folders, tmp_path):
    """A left-padded batch through sliding-window layers with attention soft-capping: GroupQueryAttention
    (local_window_size, softcap, the padding as attention_bias) gives the plain graph's logits. transformers'
    Gemma 3 applies no attention soft-capping, so the spec field is set here by hand."""
    import dataclasses

    from tests.kv.test_fused_attention import FUSED_ATOL, run_padded

    ckpt = load_checkpoint(hf_folders["gemma3"][1])
    ckpt = dataclasses.replace(ckpt, spec=dataclasses.replace(ckpt.spec, attention_softcap=1.5))
    runs = {}
    for attention in ("plain", "fused"):
        folder = tmp_path / attention
        folder.mkdir()
        save_model(build_decoder(ckpt, BuildOptions(attention=attention)), folder, progress=False)
        write_json(folder / "genai_config.json", genai_config(ckpt))
        ids = np.random.default_rng(0).integers(3, ckpt.spec.vocab_size, (2, 9))
        runs[attention], _ = run_padded(OrtDecoder(folder), ids, ckpt.spec.vocab_size)
    for plain, fused in zip(runs["plain"], runs["fused"], strict=True):
        np.testing.assert_allclose(fused, plain, atol=FUSED_ATOL, rtol=0)


@pytest.mark.parametrize("moe", ["op", "decomposed"])
def test_experts_are_weight_linears_and_the_router_is_not(moe, hf_folders):
    """Weight passes see every expert's linears (MatMuls in the decomposed form, names carried by the MoE
    op), never the router; tests/calib/test_moe_calibration.py quantizes them."""
    from quantlab.passes.quantize_weights import moe_expert_linears, quantizable_linears

    ckpt = load_checkpoint(hf_folders["qwen3-moe-norm-topk"][1])
    model = build_decoder(ckpt, BuildOptions(moe=moe))
    linears = [*quantizable_linears(model), *moe_expert_linears(model)]
    experts = {
        f"model.layers.{i}.mlp.experts.{e}.{p}"
        for i in (0, 2)
        for e in range(8)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert experts <= set(linears) and len(linears) == len(set(linears))
    assert (moe == "op") == experts.isdisjoint(quantizable_linears(model))
    assert not [name for name in linears if name.endswith(".mlp.gate")]
    assert "model.layers.1.mlp.gate_proj" in linears  # the dense layer (mlp_only_layers) is an ordinary MLP
    assert "model.layers.0.self_attn.q_proj" in linears


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantlab_convert_end_to_end(name, hf_folders, tmp_path, capsys):
    """``quantlab convert DIR -o OUT`` (fp32, the default fused graph) gives transformers' logits."""
    from quantlab.cli.main import main

    model, folder = hf_folders[name]
    assert main(["convert", str(folder), "-o", str(tmp_path / "out"), "--no-progress", "--no-eval"]) == 0
    decoder = OrtDecoder(tmp_path / "out")
    compare_prompt_and_decode(model, decoder)
