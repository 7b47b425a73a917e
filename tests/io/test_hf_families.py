"""config.json -> ModelSpec for Qwen3-MoE, Mixtral, Nemotron and Gemma 3: each difference lands on a spec
field; Mixtral's tensor names are read under the canonical (Qwen3-MoE) names."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.errors import InputError
from quantlab.io import load_checkpoint
from quantlab.io.hf import spec_from_hf_config
from quantlab.io.spec import ModelSpec

DIMS = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _spec(architecture: str, **config) -> ModelSpec:
    return spec_from_hf_config({"architectures": [architecture], **DIMS, **config}, "config.json")


def test_qwen3_moe_sparse_layers_from_mlp_only_layers_and_step():
    # Qwen's own configs say num_experts; transformers 5 writes num_local_experts
    spec = _spec(
        "Qwen3MoeForCausalLM",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        norm_topk_prob=True,
        mlp_only_layers=[3],
        decoder_sparse_step=1,
    )
    assert (spec.num_experts, spec.experts_per_token, spec.moe_intermediate_size) == (8, 2, 24)
    assert spec.moe_normalize_topk and spec.moe_layers == (0, 1, 2) and spec.qk_norm
    spec = _spec("Qwen3MoeForCausalLM", num_local_experts=4, num_experts_per_tok=1, decoder_sparse_step=2)
    assert spec.num_experts == 4 and spec.moe_layers == (1, 3) and not spec.moe_normalize_topk
    shapes = spec.expected_shapes()
    assert shapes["model.layers.1.mlp.gate.weight"] == (4, 32)
    assert shapes["model.layers.1.mlp.experts.3.down_proj.weight"] == (32, 768)  # transformers' default size
    assert "model.layers.1.mlp.gate_proj.weight" not in shapes
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (48, 32)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (dict(mlp_only_layers=[7]), "mlp_only_layers"),
        (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_qwen3_moe_config_errors_name_the_field(config, field):
    with pytest.raises(InputError) as e:
        _spec("Qwen3MoeForCausalLM", **config)
    assert e.value.field == field


def test_mixtral_spec_and_canonical_tensor_names(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(**DIMS, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ckpt = load_checkpoint(tmp_path)
    spec = ckpt.spec
    assert spec.moe_layers == (0, 1, 2, 3) and spec.moe_normalize_topk
    assert spec.moe_intermediate_size == 48 and spec.rope_theta == 1e6
    gate_up = model.state_dict()["model.layers.2.mlp.experts.gate_up_proj"].numpy()  # (experts, 2 * ff, hidden)
    np.testing.assert_array_equal(ckpt.tensors.load("model.layers.2.mlp.experts.1.gate_proj.weight"), gate_up[1, :48])
    np.testing.assert_array_equal(ckpt.tensors.load("model.layers.2.mlp.experts.1.up_proj.weight"), gate_up[1, 48:])
    assert ckpt.tensors.shape("model.layers.2.mlp.gate.weight") == (4, 32)


def test_nemotron_layernorm1p_relu2_partial_rotary():
    spec = _spec("NemotronForCausalLM", rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    assert (spec.norm_kind, spec.norm_weight_offset, spec.mlp_activation, spec.mlp_gated) == (
        "layernorm",
        1.0,
        "relu2",
        False,
    )
    assert spec.rotary_dim == spec.head_dim // 2 == 4
    assert spec.rms_norm_eps == 1e-5  # norm_eps
    shapes = spec.expected_shapes()
    assert "model.layers.0.mlp.gate_proj.weight" not in shapes
    assert shapes["model.layers.0.input_layernorm.bias"] == shapes["model.norm.bias"] == (32,)
    # transformers' Nemotron defaults to half the head rotated when the config does not say
    assert _spec("NemotronForCausalLM").rope_fraction == 0.5


def test_gemma3_transformers5_config():
    spec = _spec(
        "Gemma3ForCausalLM",
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=64,
        final_logit_softcapping=30.0,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )
    assert spec.sliding_layers == (0, 1, 3) and spec.sliding_window == 16
    assert spec.window_of(2) == 0 and spec.window_of(3) == 16
    assert spec.rope_theta_of(2) == 1e6 and spec.rope_theta_of(0) == 1e4
    assert spec.attention_scale == pytest.approx(1 / 8) and spec.final_softcap == 30.0
    assert spec.embedding_scale == pytest.approx(32**0.5) and spec.norm_weight_offset == 1.0
    assert spec.sandwich_norms and spec.qk_norm and spec.mlp_activation == "gelu_tanh" and spec.tie_word_embeddings
    assert spec.expected_shapes()["model.layers.3.post_feedforward_layernorm.weight"] == (32,)


def test_gemma3_transformers4_config_keys():
    """rope_theta + rope_local_base_freq and sliding_window_pattern (no layer_types)."""
    spec = _spec(
        "Gemma3ForCausalLM",
        head_dim=8,
        rope_theta=5e5,
        rope_local_base_freq=2e4,
        sliding_window_pattern=2,
        attn_logit_softcapping=50.0,  # transformers' Gemma 3 ignores it; so do we
    )
    assert spec.sliding_layers == (0, 2) and spec.rope_theta == 5e5 and spec.sliding_rope_theta == 2e4
    assert spec.attention_softcap == 0.0


def test_gemma3_bidirectional_attention_is_refused():
    with pytest.raises(InputError) as e:
        _spec("Gemma3ForCausalLM", head_dim=8, use_bidirectional_attention=True)
    assert e.value.field == "use_bidirectional_attention"


def test_spec_round_trips_through_a_dict():
    spec = _spec("Qwen3MoeForCausalLM", num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])
    assert ModelSpec.from_dict(spec.to_dict() | {"moe_layers": list(spec.moe_layers)}) == spec
