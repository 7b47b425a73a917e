"""Layer-wise calibration: the layer graphs chain to the full model, and calibrated methods beat RTN."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from quantlab.calib.calibrate import calibrate
from quantlab.calib.layerwise import LayerRunner, embed_tokens, with_overrides
from quantlab.graph_builder.decoder import build_decoder, build_layer
from quantlab.passes.quantize_dynamic import QuantizeDynamicInt8Pass
from quantlab.passes.quantize_weights import QuantizeWeightsPass, quantizable_linears
from quantlab.quant.metrics import compare_logits
from quantlab.quant.smoothquant import quantize_weight_per_channel_int8
from quantlab.recipe import load_recipe
from tests.tiny import run_decoder, tiny_checkpoint

# The layer graphs and the full graph run the same ops in onnxruntime.
CHAIN_ATOL = 1e-4
# Calibrated methods must beat round-to-nearest on held-out data by at least this factor (KL mean).
MUST_BEAT = 0.95

CALIB = np.random.default_rng(1).integers(3, 96, size=(24, 48))
HELD_OUT = np.random.default_rng(2).integers(3, 96, size=(6, 48))


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint(seed=4, hidden=64, ff=128, layers=2, heads=4, kv_heads=4)


@pytest.fixture(scope="module")
def fp_logits(ckpt, tmp_path_factory):
    return run_decoder(build_decoder(ckpt), ckpt, tmp_path_factory.mktemp("fp"), HELD_OUT)


def _kl(candidate_logits, fp_logits) -> float:
    return compare_logits(
        fp_logits.reshape(-1, fp_logits.shape[-1]), candidate_logits.reshape(-1, candidate_logits.shape[-1])
    ).kl_mean


def _quantized_logits(ckpt, recipe_name, tmp_path, calibrated=True):
    recipe = load_recipe(recipe_name)
    recipe = dataclasses.replace(recipe, accuracy_level=0, lm_head=None)
    result = calibrate(ckpt, recipe, CALIB, progress=False) if calibrated else None
    build_ckpt = with_overrides(ckpt, result.float_overrides) if result else ckpt
    model = build_decoder(build_ckpt)
    schemes = {n: recipe.scheme_for(n) for n in quantizable_linears(model)}
    if result is not None and result.int8:
        QuantizeDynamicInt8Pass(result.int8)(model)
    QuantizeWeightsPass(
        {n: s for n, s in schemes.items() if s is not None and s.weight_only},
        precomputed=result.quantized if result else None,
        accuracy_level=0,
    )(model)
    return run_decoder(model, ckpt, tmp_path, HELD_OUT), result


def test_layer_graphs_chain_to_the_full_model(ckpt):
    model = build_decoder(ckpt)
    import tempfile
    from pathlib import Path

    full = run_decoder(model, ckpt, Path(tempfile.mkdtemp()), HELD_OUT[:2])
    hidden = embed_tokens(ckpt, HELD_OUT[:2])
    for i in range(ckpt.spec.num_layers):
        hidden, taps = LayerRunner(ckpt, i).run(hidden)
        assert set(taps) == {"input_layernorm.out", "self_attn.ctx_flat", "post_attention_layernorm.out", "mlp.act"}
    norm = ckpt.tensors.load("model.norm.weight")
    x = hidden / np.sqrt((hidden**2).mean(-1, keepdims=True) + ckpt.spec.rms_norm_eps) * norm
    logits = x @ ckpt.tensors.load("lm_head.weight").T
    np.testing.assert_allclose(logits, full, atol=CHAIN_ATOL, rtol=0)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_weight_only_beats_rtn(ckpt, fp_logits, method, tmp_path):
    rtn, _ = _quantized_logits(ckpt, "w4a16-g32-asym", tmp_path / "rtn", calibrated=False)
    calibrated, result = _quantized_logits(ckpt, f"w4a16-g32-asym-{method}", tmp_path / method)
    kl_rtn, kl_cal = _kl(rtn, fp_logits), _kl(calibrated, fp_logits)
    assert kl_cal < MUST_BEAT * kl_rtn, (kl_cal, kl_rtn)
    assert len(result.quantized) == 2 * 7
    assert len(result.layer_errors) == 2 and all(0 < e < 0.5 for e in result.layer_errors)


def test_awq_folds_scales_into_the_norms(ckpt, tmp_path):
    _, result = _quantized_logits(ckpt, "w4a16-g32-asym-awq", tmp_path)
    folded = {n for n in result.float_overrides if n.endswith("layernorm.weight")}
    assert folded == {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }
    for name in folded:
        assert not np.allclose(result.float_overrides[name], ckpt.tensors.load(name))


def test_smoothquant_w8a8_beats_unsmoothed(ckpt, fp_logits, tmp_path):
    smoothed, result = _quantized_logits(ckpt, "w8a8-smoothquant", tmp_path / "sq")
    assert len(result.int8) == 2 * 7
    model = build_decoder(ckpt)
    plain = {}
    for name in quantizable_linears(model):
        if name != "lm_head":
            plain[name] = quantize_weight_per_channel_int8(ckpt.tensors.load(name + ".weight"))
    QuantizeDynamicInt8Pass(plain)(model)
    assert [n.op_type for n in model.graph].count("DynamicQuantizeMatMul") == 14
    unsmoothed = run_decoder(model, ckpt, tmp_path / "plain", HELD_OUT)
    assert _kl(smoothed, fp_logits) < MUST_BEAT * _kl(unsmoothed, fp_logits)


def test_gptq_sequential_and_parallel_modes(ckpt):
    recipe = load_recipe("w4a16-g32-asym-gptq")
    seq = calibrate(ckpt, recipe, CALIB[:8], progress=False)
    par = calibrate(
        ckpt,
        dataclasses.replace(recipe, gptq=dataclasses.replace(recipe.gptq, sequential=False)),
        CALIB[:8],
        progress=False,
    )
    first = "model.layers.0.mlp.up_proj"
    last = "model.layers.1.mlp.up_proj"
    # layer 0 sees the same inputs either way; layer 1 sees quantized vs fp outputs of layer 0
    np.testing.assert_array_equal(seq.quantized[first].q, par.quantized[first].q)
    assert not np.array_equal(seq.quantized[last].q, par.quantized[last].q)


def test_layer_graph_output_subsets_compute_the_same_values(ckpt):
    # "taps" leaves out down_proj and the residual (a quarter of a layer's FLOPs), "hidden" the taps;
    # what they keep must equal the full layer's outputs bit for bit: same ops, same inputs.
    hidden = embed_tokens(ckpt, HELD_OUT[:2])
    out, taps = LayerRunner(ckpt, 1).run(hidden)
    taps_only = LayerRunner(ckpt, 1, outputs="taps")
    none, subset = taps_only.run(hidden)
    assert none is None and subset.keys() == taps.keys()
    for name in taps:
        np.testing.assert_array_equal(subset[name], taps[name])
    names = {node.name for node in build_layer(ckpt, 1, outputs="taps").graph}
    assert not any("down_proj" in name for name in names)
    assert any("down_proj" in node.name for node in build_layer(ckpt, 1).graph)
    only_out, no_taps = LayerRunner(ckpt, 1, outputs="hidden").run(hidden)
    assert no_taps == {}
    np.testing.assert_array_equal(only_out, out)


def test_the_quantized_layer_runs_the_calibrated_integers(ckpt):
    # Sequential calibration feeds the next layer the artifact's own computation: the recipe's weight
    # passes over the calibrated codes. At accuracy level 0 (fp32 on dequantized weights) that must
    # agree with the layer run on the dequantized weights as floats; at level 4 (int8 activations) it
    # differs by the activation rounding only, and must differ (the passes did run).
    from quantlab.calib.calibrate import _quantized_layer
    from quantlab.quant.rtn import dequantize

    recipe = load_recipe("w4a16-g32-asym-gptq")
    result = calibrate(ckpt, recipe, CALIB[:8], progress=False)
    hidden = embed_tokens(ckpt, HELD_OUT[:2])
    floats = {f"{name}.weight": dequantize(result.quantized[name]) for name in result.quantized}
    as_floats, _ = LayerRunner(with_overrides(ckpt, floats), 0, outputs="hidden").run(hidden)
    fp, _ = LayerRunner(ckpt, 0, outputs="hidden").run(hidden)
    level0, _ = _quantized_layer(ckpt, 0, dataclasses.replace(recipe, accuracy_level=0), result, None).run(hidden)
    level4, _ = _quantized_layer(ckpt, 0, recipe, result, None).run(hidden)
    np.testing.assert_allclose(level0, as_floats, atol=1e-5, rtol=0)
    assert not np.array_equal(level0, fp)
    # int8 activations add their rounding: smaller than what the 4-bit weights changed, but not nothing
    activation_error = np.linalg.norm(level4 - as_floats)
    assert 0 < activation_error < 0.5 * np.linalg.norm(fp - as_floats)


def test_stacked_linears_get_their_own_gptq_result(ckpt):
    # q/k/v (and gate/up) share a Hessian and are solved as one stacked weight; GPTQ rows are
    # independent, so each linear must get what a GPTQ run on it alone gives.
    from quantlab.calib.layerwise import observe_layer
    from quantlab.quant.gptq import GPTQConfig, gptq_quantize

    recipe = load_recipe("w4a16-g32-asym-gptq")
    result = calibrate(ckpt, recipe, CALIB[:8], progress=False)
    _, stats = observe_layer(
        LayerRunner(ckpt, 0), embed_tokens(ckpt, CALIB[:8]), batch=8, hessians=True, samples=0, absmax=False, seed=0
    )
    config = GPTQConfig.from_scheme(
        recipe.scheme_for("model.layers.0.self_attn.k_proj"),
        percdamp=recipe.gptq.damp,
        act_order=recipe.gptq.act_order,
        block_size=recipe.gptq.block_size,
    )
    for role in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        name = f"model.layers.0.{role}"
        alone = gptq_quantize(ckpt.tensors.load(name + ".weight"), stats.hessians["input_layernorm.out"], config)
        stacked = result.quantized[name]
        assert np.mean(alone.q == stacked.q) >= 0.999
        np.testing.assert_array_equal(alone.scales, stacked.scales)


def test_checkpointed_layers_hold_their_codes_on_disk(ckpt, tmp_path):
    # With layer checkpoints, a finished layer's integers are read back from its file when the
    # emitter asks, instead of staying in memory for the rest of the calibration: same values.
    from quantlab.calib.resume import LayerCheckpoints

    recipe = load_recipe("w4a16-g32-asym-gptq")
    in_memory = calibrate(ckpt, recipe, CALIB[:8], progress=False)
    checkpoints = LayerCheckpoints(tmp_path / "resume", {"sha256": "test", "inputs": {}}, resume=False)
    on_disk = calibrate(ckpt, recipe, CALIB[:8], progress=False, checkpoints=checkpoints)
    assert in_memory.quantized.nbytes > 0 and on_disk.quantized.nbytes == 0
    assert sorted(on_disk.quantized) == sorted(in_memory.quantized)
    for name in in_memory.quantized:
        a, b = in_memory.quantized[name], on_disk.quantized[name]
        assert on_disk.quantized.shape(name) == a.shape
        np.testing.assert_array_equal(a.q, b.q)
        np.testing.assert_array_equal(a.scales, b.scales)
        np.testing.assert_array_equal(a.zero_point_array(), b.zero_point_array())
