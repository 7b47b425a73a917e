"""Calibrating and quantizing a sparse MLP's experts, and GPTQ/AWQ on the Nemotron and Gemma 3 layer shapes.

Tiny random models saved with transformers' ``save_pretrained`` are read back through quantlab's reader.
Quality is the KL divergence of the quantized model's logits from the fp32 artifact's on held-out tokens;
token counts are held to transformers' own router (its top-k, run on the same calibration tokens).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from quantlab.calib.calibrate import calibrate  # noqa: E402
from quantlab.calib.experts import min_expert_tokens  # noqa: E402
from quantlab.calib.layerwise import with_overrides  # noqa: E402
from quantlab.emit.artifact import read_manifest  # noqa: E402
from quantlab.graph_builder.decoder import BuildOptions, build_decoder  # noqa: E402
from quantlab.io import load_checkpoint  # noqa: E402
from quantlab.passes.manager import run_passes  # noqa: E402
from quantlab.passes.quantize_weights import QMOE_SCHEMES  # noqa: E402
from quantlab.pipelines import quantization_pipeline  # noqa: E402
from quantlab.quant.metrics import compare_logits  # noqa: E402
from quantlab.quant.rtn import rtn_quantize  # noqa: E402
from quantlab.quant.scheme import GROUP_SIZES  # noqa: E402
from quantlab.recipe import load_recipe  # noqa: E402
from tests.tiny import run_decoder  # noqa: E402

# Calibrated methods must beat round-to-nearest on held-out data by at least this factor (KL mean),
# as in tests/calib/test_calibrate.py.
MUST_BEAT = 0.95
# QMoE (or MoE over DequantizeLinear) against the decomposed graph's MatMulNBits on the same codes, fp32
# accumulation in a different order, through three layers.
FORMS_ATOL = 1e-4
# quantlab's layer graphs against transformers' layers, fp32
CHAIN_ATOL = 1e-4

VOCAB = 160
CALIB = np.random.default_rng(1).integers(3, VOCAB, size=(16, 32))
HELD_OUT = np.random.default_rng(2).integers(3, VOCAB, size=(6, 32))
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)
QWEN3_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1])
DENSE = {
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(partial_rotary_factor=0.5)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    ),
}
# the expert of layer 0 that the "starved" model's router never picks
STARVED = 5


def _randomize(model, gemma: bool = False):
    with torch.no_grad():  # random norms and biases too, so a misplaced fold cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)  # Gemma scales by 1 + w
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
            elif name.endswith("gate.weight"):  # a decisive router
                p.normal_(0, 1.0)
    return model


def _qwen3_moe(seed: int, starve: bool = False):
    config = transformers.Qwen3MoeConfig(**COMMON, **QWEN3_MOE, norm_topk_prob=True)
    torch.manual_seed(seed)
    model = _randomize(transformers.Qwen3MoeForCausalLM(config).eval())
    if starve:
        # Channel 0 of layer 0's MLP input is always positive: the embedding's channel 0 is +3 for every
        # token and the attention adds nothing to it (o_proj row 0 is zero). A router row reading only that
        # channel, strongly negative, then scores expert STARVED far below every other for every token.
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0, 1.0)
            model.model.embed_tokens.weight[:, 0] = 3.0
            model.model.layers[0].self_attn.o_proj.weight[0] = 0.0
            row = model.model.layers[0].mlp.gate.weight[STARVED]
            row.zero_()
            row[0] = -30.0
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {"qwen3-moe": _qwen3_moe(0), "starved": _qwen3_moe(1, starve=True)}
    for name, (config_cls, model_cls, extra) in DENSE.items():
        config = getattr(transformers, config_cls)(**COMMON, **extra)
        torch.manual_seed(sum(map(ord, name)))
        made[name] = _randomize(getattr(transformers, model_cls)(config).eval(), gemma=name == "gemma3")
    out = {}
    for name, model in made.items():
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (model, folder)
    return out


def _recipe(name: str):
    """The built-in recipe at accuracy level 0 (fp32 products: the differences are the weights'), head and
    embedding left float, as in tests/calib/test_calibrate.py."""
    return dataclasses.replace(load_recipe(name), accuracy_level=0, lm_head=None, embedding=None)


def _logits(ckpt, recipe, result, folder, moe="op"):
    model = build_decoder(with_overrides(ckpt, result.float_overrides) if result else ckpt, BuildOptions(moe=moe))
    model, _ = run_passes(model, quantization_pipeline(model, recipe, result))
    return run_decoder(model, ckpt, folder, HELD_OUT), {node.op_type for node in model.graph}


def _kl(candidate, reference) -> float:
    return compare_logits(reference.reshape(-1, VOCAB), candidate.reshape(-1, VOCAB)).kl_mean


def _transformers_routing(model, tokens: np.ndarray) -> dict[int, np.ndarray]:
    """layer -> tokens per expert, from transformers' own router (Qwen3MoeTopKRouter's top-k indices)."""
    counts, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        counts[i] = np.zeros(model.config.num_experts, dtype=np.int64)

        def count(_module, _inputs, output, i=i):
            counts[i] += np.bincount(output[2].reshape(-1).numpy(), minlength=model.config.num_experts)

        hooks.append(layer.mlp.gate.register_forward_hook(count))
    with torch.no_grad():
        model(torch.tensor(tokens))
    for hook in hooks:
        hook.remove()
    return counts


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_experts_beat_rtn(method, folders, tmp_path):
    ckpt = load_checkpoint(folders["qwen3-moe"][1])
    fp, _ = _logits(ckpt, _recipe("fp32"), None, tmp_path / "fp")
    rtn, ops = _logits(ckpt, _recipe("w4a16-g32-asym"), None, tmp_path / "rtn")
    assert "QMoE" in ops and "MoE" not in ops
    recipe = _recipe(f"w4a16-g32-asym-{method}")
    result = calibrate(ckpt, recipe, CALIB, progress=False)
    calibrated, ops = _logits(ckpt, recipe, result, tmp_path / method)
    assert "QMoE" in ops
    kl_rtn, kl_cal = _kl(rtn, fp), _kl(calibrated, fp)
    assert kl_cal < MUST_BEAT * kl_rtn, (kl_cal, kl_rtn)
    experts = {
        f"model.layers.{i}.mlp.experts.{e}.{p}"
        for i in (0, 2)
        for e in range(8)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert experts <= set(result.quantized)
    assert not [name for name in result.quantized if name.endswith(".mlp.gate")]  # the router stays float
    assert set(result.experts) == {0, 2} and all(not t.rtn_fallback for t in result.experts.values())


def test_qmoe_and_the_decomposed_graph_run_the_same_codes(folders, tmp_path):
    """One set of codes through both sparse forms: QMoE (4-bit), MoE over DequantizeLinear (8-bit in blocks,
    which QMoE does not compute exactly), dequantized floats (experts with mixed schemes)."""
    from quantlab.quant.scheme import parse_scheme
    from quantlab.recipe import Override

    ckpt = load_checkpoint(folders["qwen3-moe"][1])
    mixed = dataclasses.replace(
        _recipe("w4a16-g32-asym"),
        overrides=(Override("model.layers.0.mlp.experts.3.*", parse_scheme("w8a16-g32-asym")),),
    )
    cases = [(_recipe("w4a16-g32-asym-gptq"), "QMoE"), (_recipe("w8a16-g32-asym"), "DequantizeLinear"), (mixed, "MoE")]
    for n, (recipe, op) in enumerate(cases):
        result = calibrate(ckpt, recipe, CALIB[:8], progress=False) if recipe.needs_calibration else None
        sparse, ops = _logits(ckpt, recipe, result, tmp_path / f"op{n}")
        assert op in ops
        dense, ops = _logits(ckpt, recipe, result, tmp_path / f"decomposed{n}", moe="decomposed")
        assert "MoE" not in ops and "QMoE" not in ops and "MatMulNBits" in ops
        np.testing.assert_allclose(sparse, dense, atol=FORMS_ATOL, rtol=0)


QMOE_CASES = [
    f"w{bits}a16-{'pc' if group == -1 else f'g{group}'}-{symmetry}"
    for bits, groups in QMOE_SCHEMES.items()
    for group in groups
    if group in (-1, *GROUP_SIZES)  # the groups a scheme can spell
    for symmetry in ("sym", "asym")
]


@pytest.mark.parametrize("scheme", QMOE_CASES)
def test_qmoe_computes_every_scheme_it_is_given(scheme, folders, tmp_path):
    """QMOE_SCHEMES is what onnxruntime's CPU QMoE was measured to compute exactly: each gives the decomposed
    graph's logits on the same codes (moe_intermediate_size 48: a partial last group for g32 and wider)."""
    ckpt = load_checkpoint(folders["qwen3-moe"][1])
    recipe = _recipe(scheme)
    sparse, ops = _logits(ckpt, recipe, None, tmp_path / "op")
    assert "QMoE" in ops and "MoE" not in ops
    dense, _ = _logits(ckpt, recipe, None, tmp_path / "decomposed", moe="decomposed")
    np.testing.assert_allclose(sparse, dense, atol=FORMS_ATOL, rtol=0)


def test_smoothquant_experts_are_int8_in_both_forms(folders, tmp_path):
    """W8A8: the decomposed graph's experts are DynamicQuantizeMatMul, QMoE takes the same int8 codes as
    8-bit weights (float activations); both carry the smoothing folded into the norm and the router."""
    ckpt = load_checkpoint(folders["qwen3-moe"][1])
    recipe = _recipe("w8a8-smoothquant")
    result = calibrate(ckpt, recipe, CALIB[:8], progress=False)
    assert {f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(8)} <= set(result.int8)
    assert "model.layers.0.mlp.gate.weight" in result.float_overrides  # the router's columns take the scale
    fp, _ = _logits(ckpt, _recipe("fp32"), None, tmp_path / "fp")
    sparse, ops = _logits(ckpt, recipe, result, tmp_path / "op")
    assert "QMoE" in ops
    dense, ops = _logits(ckpt, recipe, result, tmp_path / "decomposed", moe="decomposed")
    assert "DynamicQuantizeMatMul" in ops
    kl_sparse, kl_dense = _kl(sparse, fp), _kl(dense, fp)
    assert 0 < kl_sparse < 2 * kl_dense and kl_dense < 1e-4, (kl_sparse, kl_dense)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_an_expert_without_tokens_falls_back_to_rtn(method, folders):
    model, folder = folders["starved"]
    assert _transformers_routing(model, CALIB)[0][STARVED] == 0  # the router never picks it
    ckpt = load_checkpoint(folder)
    recipe = _recipe(f"w4a16-g32-asym-{method}")
    result = calibrate(ckpt, recipe, CALIB, progress=False)
    tokens = result.experts[0]
    assert tokens.routed[STARVED] == tokens.calibrated[STARVED] == 0
    assert STARVED in tokens.rtn_fallback
    assert set(tokens.rtn_fallback) == {e for e, n in enumerate(tokens.calibrated) if n < min_expert_tokens(ckpt.spec)}
    calibrated = [e for e in range(8) if e not in tokens.rtn_fallback]
    assert calibrated, tokens
    scheme = recipe.scheme
    # GPTQ rounds all three of its linears to nearest; AWQ its down_proj (its gate/up take the scale the
    # experts share with the router, folded into their norm)
    for proj in ("gate_proj", "up_proj", "down_proj") if method == "gptq" else ("down_proj",):
        name = f"model.layers.0.mlp.experts.{STARVED}.{proj}"
        want = rtn_quantize(ckpt.tensors.load(name + ".weight"), scheme.bits, scheme.group_size, scheme.symmetric)
        np.testing.assert_array_equal(result.quantized[name].q, want.q)
        np.testing.assert_array_equal(result.quantized[name].scales, want.scales)
        other = f"model.layers.0.mlp.experts.{calibrated[0]}.{proj}"
        plain = rtn_quantize(ckpt.tensors.load(other + ".weight"), scheme.bits, scheme.group_size, scheme.symmetric)
        assert not np.array_equal(result.quantized[other].q, plain.q)  # a calibrated expert is not RTN


def _convert(folder, out, tmp_path, *flags) -> dict:
    from quantlab.cli.main import main

    recipe = tmp_path / "gptq.toml"
    recipe.write_text(
        'scheme = "w4a16-g32-asym"\nmethod = "gptq"\nlm_head = "none"\nembedding = "none"\n'
        f"[calibration]\nsamples = {CALIB.shape[0]}\nseq_len = {CALIB.shape[1]}\n"
        "[gptq]\nsequential = false\n"  # every layer calibrates on the fp32 model's inputs, as transformers runs
    )
    np.save(tmp_path / "calib.npy", CALIB)
    argv = ["convert", str(folder), "-o", str(out), "--recipe", str(recipe), "--calib", str(tmp_path / "calib.npy")]
    assert main([*argv, "--no-eval", "--no-progress", *flags]) == 0
    return read_manifest(out)["calibration"]["experts"]


def test_manifest_counts_the_tokens_transformers_routes_to_each_expert(folders, tmp_path):
    model, folder = folders["qwen3-moe"]
    experts = _convert(folder, tmp_path / "out", tmp_path)
    want = _transformers_routing(model, CALIB)
    minimum = max(COMMON["hidden_size"], QWEN3_MOE["moe_intermediate_size"])  # one token per input channel
    assert experts["calibrate_all_experts"] is False and experts["min_tokens_for_calibration"] == minimum
    assert set(experts["layers"]) == {str(i) for i in want}
    for i, counts in want.items():
        layer = experts["layers"][str(i)]
        assert layer["routed_tokens"] == layer["calibrated_tokens"] == counts.tolist()
        assert sum(counts) == CALIB.size * QWEN3_MOE["num_experts_per_tok"]
        assert layer["rtn_fallback"] == [e for e, n in enumerate(counts) if n < minimum]


def test_calibrate_all_experts_gives_every_expert_every_token(folders, tmp_path):
    model, folder = folders["qwen3-moe"]
    experts = _convert(folder, tmp_path / "all", tmp_path, "--calibrate-all-experts")
    want = _transformers_routing(model, CALIB)
    assert experts["calibrate_all_experts"] is True
    for i, counts in want.items():
        layer = experts["layers"][str(i)]
        assert layer["calibrated_tokens"] == [CALIB.size] * QWEN3_MOE["num_experts"]
        assert layer["routed_tokens"] == counts.tolist()  # the router's choice, and the layer's output, unchanged
        assert layer["rtn_fallback"] == []


def test_expert_counts_survive_a_resumed_calibration(folders, tmp_path):
    from quantlab.calib.resume import LayerCheckpoints

    ckpt = load_checkpoint(folders["qwen3-moe"][1])
    recipe = _recipe("w4a16-g32-asym-gptq")
    fingerprint = {"sha256": "test", "inputs": {}}
    first = calibrate(
        ckpt, recipe, CALIB[:8], progress=False, checkpoints=LayerCheckpoints(tmp_path, fingerprint, resume=False)
    )
    _, restored, _ = LayerCheckpoints(tmp_path, fingerprint, resume=True).restore(ckpt.spec.num_layers, (8, 32, 64))
    assert restored.experts == first.experts and set(first.experts) == {0, 2}


@pytest.mark.parametrize("family", sorted(DENSE))
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibration_on_nemotron_and_gemma3_beats_rtn(family, method, folders, tmp_path):
    """Nemotron: LayerNorm with a bias and weight + 1, an ungated squared-ReLU MLP (no gate_proj). Gemma 3:
    1 + w RMSNorms, sandwich norms (the MLP reads pre_feedforward_layernorm), the embedding scaled by
    sqrt(hidden). AWQ folds its scales into those norms; a wrong fold shows as a loss against RTN."""
    ckpt = load_checkpoint(folders[family][1])
    fp, _ = _logits(ckpt, _recipe("fp32"), None, tmp_path / "fp")
    rtn, _ = _logits(ckpt, _recipe("w4a16-g32-asym"), None, tmp_path / "rtn")
    recipe = _recipe(f"w4a16-g32-asym-{method}")
    result = calibrate(ckpt, recipe, CALIB, progress=False)
    calibrated, _ = _logits(ckpt, recipe, result, tmp_path / method)
    kl_rtn, kl_cal = _kl(rtn, fp), _kl(calibrated, fp)
    assert kl_cal < MUST_BEAT * kl_rtn, (kl_cal, kl_rtn)
    assert len(result.quantized) == 3 * (6 if family == "nemotron" else 7)  # Nemotron has no gate_proj


@pytest.mark.parametrize("family", ["qwen3-moe", *sorted(DENSE)])
def test_awq_folds_leave_the_float_model_as_it_was(family, folders, tmp_path):
    """At 8 bits rounding costs almost nothing, so AWQ's model must be as close to fp32 as RTN's: a scale
    folded into the wrong norm (Gemma 3's MLP reads pre_feedforward_layernorm), without the norm's 1 + w
    offset or LayerNorm bias (Nemotron), or not into the router beside the experts, is 100x further."""
    ckpt = load_checkpoint(folders[family][1])
    fp, _ = _logits(ckpt, _recipe("fp32"), None, tmp_path / "fp")
    rtn, _ = _logits(ckpt, _recipe("w8a16-g32-asym"), None, tmp_path / "rtn")
    recipe = _recipe("w8a16-g32-asym-awq")
    result = calibrate(ckpt, recipe, CALIB[:8], progress=False)
    awq, _ = _logits(ckpt, recipe, result, tmp_path / "awq")
    kl_rtn, kl_awq = _kl(rtn, fp), _kl(awq, fp)
    assert kl_awq < 3 * kl_rtn, (kl_awq, kl_rtn)
    # a norm's weight (with its offset) and its bias are divided by one s
    offset = ckpt.spec.norm_weight_offset
    for name in [n for n in result.float_overrides if n.endswith("layernorm.bias")]:
        weight = name.removesuffix(".bias") + ".weight"
        s = (ckpt.tensors.load(weight) + offset) / (result.float_overrides[weight] + offset)
        np.testing.assert_allclose(ckpt.tensors.load(name) / result.float_overrides[name], s, rtol=1e-4)
    assert (family == "nemotron") == any(n.endswith("layernorm.bias") for n in result.float_overrides)


@pytest.mark.parametrize("family", ["qwen3-moe", *sorted(DENSE)])
def test_calibration_sees_the_hidden_states_transformers_computes(family, folders):
    """What calibration feeds each layer (the embedding, scaled by sqrt(hidden) for Gemma, then one layer
    graph after another, the sparse MLP decomposed) is transformers' hidden state at that layer."""
    from quantlab.calib.layerwise import LayerRunner, embed_tokens

    model, folder = folders[family]
    ckpt = load_checkpoint(folder)
    ids = HELD_OUT[:2]
    with torch.no_grad():
        want = model(torch.tensor(ids), output_hidden_states=True).hidden_states  # inputs of each layer, then normed
    hidden = embed_tokens(ckpt, ids)
    for i in range(ckpt.spec.num_layers):
        np.testing.assert_allclose(hidden, want[i].numpy(), atol=CHAIN_ATOL, rtol=0)
        hidden, _ = LayerRunner(ckpt, i, outputs="hidden").run(hidden)


@pytest.mark.parametrize("all_experts", [False, True])
def test_each_expert_is_solved_on_its_routed_tokens(all_experts, folders):
    """Expert e's GPTQ codes are GPTQ's on the Hessians of its own inputs: transformers' MLP input at the
    tokens its router sends to e (every token with all_experts) for gate/up, and e's activation there for
    down_proj."""
    from quantlab.quant.gptq import GPTQConfig, accumulate_hessian, gptq_quantize

    model, folder = folders["qwen3-moe"]
    ckpt = load_checkpoint(folder)
    recipe = _recipe("w4a16-g32-asym-gptq")
    result = calibrate(ckpt, recipe, CALIB, progress=False, all_experts=all_experts)
    seen = {}
    hook = model.model.layers[0].mlp.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
    with torch.no_grad():
        model(torch.tensor(CALIB))
        x = seen["x"].reshape(-1, COMMON["hidden_size"])  # (tokens, hidden)
        chosen = model.model.layers[0].mlp.gate(x)[2].numpy()  # (tokens, k)
    hook.remove()
    x = x.numpy()
    config = GPTQConfig.from_scheme(recipe.scheme, percdamp=recipe.gptq.damp, act_order=recipe.gptq.act_order)
    for e in range(QWEN3_MOE["num_experts"]):
        rows = slice(None) if all_experts else (chosen == e).any(axis=-1)
        p = f"model.layers.0.mlp.experts.{e}"
        gate, up, down = (ckpt.tensors.load(f"{p}.{proj}.weight") for proj in ("gate_proj", "up_proj", "down_proj"))
        x_e = x[rows]
        g = x_e @ gate.T
        act = g / (1 + np.exp(-g)) * (x_e @ up.T)  # (tokens of e, moe_ff)
        for names, weights, inputs in ((("gate_proj", "up_proj"), [gate, up], x_e), (("down_proj",), [down], act)):
            want = gptq_quantize(weights, accumulate_hessian(None, 0, inputs)[0], config)
            got = np.concatenate([result.quantized[f"{p}.{n}"].q for n in names])
            assert np.mean(got == want.q) >= 0.99, (e, names)  # float sums in another order flip a few ties


def test_the_weight_pass_rewrites_a_moe_node_only_for_expert_schemes(folders):
    """QuantizeWeightsPass on the op form: schemes for the experts alone turn each MoE into QMoE (modified);
    schemes for none of them leave the graph as it was (not modified)."""
    from quantlab.passes.quantize_weights import QuantizeWeightsPass, moe_expert_linears
    from quantlab.quant.scheme import parse_scheme

    ckpt = load_checkpoint(folders["qwen3-moe"][1])
    scheme = parse_scheme("w4a16-g32-asym")
    model = build_decoder(ckpt, BuildOptions(moe="op"))
    result = QuantizeWeightsPass({})(model)
    assert not result.modified and [n.op_type for n in result.model.graph].count("MoE") == 2
    result = QuantizeWeightsPass(dict.fromkeys(moe_expert_linears(model), scheme))(model)
    ops = [n.op_type for n in result.model.graph]
    assert result.modified and ops.count("QMoE") == 2 and "MoE" not in ops and "MatMulNBits" not in ops


def test_a_zero_hessian_never_reaches_a_cholesky():
    """The fallback is the calibration's job; GPTQ itself refuses a Hessian without signal."""
    from quantlab.quant.gptq import GPTQConfig, gptq_quantize

    weight = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="zero"):
        gptq_quantize(weight, np.zeros((64, 64), np.float32), GPTQConfig(group_size=32))
