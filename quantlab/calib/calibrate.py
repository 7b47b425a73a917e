"""Calibrated quantization, layer by layer: GPTQ, AWQ and SmoothQuant decide each layer's integers.

    result = calibrate(ckpt, recipe, tokens)        # an analysis: returns a CalibrationResult
    QuantizeWeightsPass(schemes, precomputed=result.quantized)   # a pass consumes it

Per layer: observe the inputs of its linears on the calibration data (fp weights, earlier layers
already quantized), let the method decide, then run the layer again quantized and hand its outputs
to the next layer. The progress bar shows each layer's relative output error.

A sparse MLP's experts are calibrated one by one on the tokens routed to each (quantlab.calib.experts);
an expert that saw too few is rounded to nearest. The router stays float.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from quantlab.calib.experts import MOE_INPUT, RoutedTaps, expert_of, linear_input
from quantlab.calib.layerwise import (
    CalibrationResult,
    LayerRunner,
    embed_tokens,
    observe_layer,
    progress_bar,
    relative_error,
    release_freed_memory,
    with_layer_cache,
    with_overrides,
)
from quantlab.calib.resume import LayerCheckpoints
from quantlab.graph_builder.decoder import layer_linear_roles
from quantlab.io.spec import Checkpoint
from quantlab.quant import awq, linalg, smoothquant
from quantlab.quant.gptq import GPTQConfig, gptq_quantize
from quantlab.quant.rtn import QuantizedWeight, dequantize, rtn_quantize
from quantlab.quant.scheme import PER_CHANNEL
from quantlab.recipe import Recipe

logger = logging.getLogger(__name__)

# Tokens per linear input kept for AWQ's searches (spread over all calibration sequences).
AWQ_SAMPLE_TOKENS = 4096
CALIBRATION_BATCH_TOKENS = 1024
# Tokens per linear input kept to report each layer's quantization error.
ERROR_SAMPLE_TOKENS = 512


def calibrate(
    ckpt: Checkpoint,
    recipe: Recipe,
    tokens: np.ndarray,
    *,
    batch: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    checkpoints: LayerCheckpoints | None = None,
    all_experts: bool = False,
) -> CalibrationResult:
    """tokens (n, seq) int64 -> the integers and folded scales for every linear the recipe quantizes.

    With ``checkpoints``, each finished layer is saved, and layers saved by an earlier run of the same
    inputs are restored instead of recomputed (see quantlab.calib.resume). ``all_experts``: a sparse
    MLP's experts are each calibrated on every token, not only on those routed to them (the layer's
    output still mixes only the chosen experts).
    """
    method = recipe.method
    if method not in METHODS:
        raise ValueError(f"calibrate() is for {sorted(METHODS)}, not {method!r}")
    decide = METHODS[method]
    sequential = recipe.gptq.sequential if method == "gptq" else True
    hidden = embed_tokens(ckpt, tokens)  # (n, seq, hidden)
    # About CALIBRATION_BATCH_TOKENS tokens per onnxruntime run: the MLP's intermediate tensors (and the
    # taps the Hessians read) scale with it, about 0.5 GB at 1024 tokens of a 1B model, and beyond about
    # a thousand rows the GEMMs gain nothing.
    batch = batch or max(1, CALIBRATION_BATCH_TOKENS // max(1, tokens.shape[1]))
    result, first = CalibrationResult(), 0
    if checkpoints is not None:
        first, result, restored = checkpoints.restore(ckpt.spec.num_layers, hidden.shape)
        hidden = hidden if restored is None else restored
    seed = recipe.calibration.seed
    with progress_bar(ckpt.spec.num_layers, f"calibrate {method}", progress) as bar:
        bar.update(first)
        for i in range(first, ckpt.spec.num_layers):
            before = LayerCheckpoints.keys_of(result)
            fp = with_layer_cache(with_overrides(ckpt, result.float_overrides), i)
            runner = LayerRunner(fp, i, threads, outputs="taps" if sequential else "all")
            if i in ckpt.spec.moe_layers:  # per-expert statistics on each expert's routed tokens
                runner = RoutedTaps(runner, ckpt.spec, all_experts, keep_input=method != "gptq")
            fp_out, stats = observe_layer(
                runner,
                hidden,
                batch=batch,
                hessians=method == "gptq",
                samples=AWQ_SAMPLE_TOKENS if method == "awq" else ERROR_SAMPLE_TOKENS,
                absmax=method == "smoothquant",
                seed=seed + i,
                outputs=None if sequential else hidden,  # in place: one copy of the hidden states
            )
            if isinstance(runner, RoutedTaps):
                result.experts[i] = runner.tokens()
                logger.info("layer %d: tokens per expert %s", i, list(result.experts[i].calibrated))
            del runner
            release_freed_memory()  # the observing session's weights and arena, before the method's peak
            layer_weights, divisors = decide(fp, i, stats, recipe, result)
            result.layer_errors.append(_linear_errors(fp, i, stats, layer_weights, divisors))
            bar.set_postfix(layer=i, rel_err=f"{result.layer_errors[-1]:.2e}")
            bar.update()
            logger.info("layer %d: relative output error of its linears %.3e", i, result.layer_errors[-1])
            del fp, stats, layer_weights  # the layer's float weights and Hessians: not needed past this point
            if sequential:  # the next layer calibrates on this layer's quantized outputs, as the artifact computes them
                runner = _quantized_layer(ckpt, i, recipe, result, threads)
                for start in range(0, hidden.shape[0], batch):
                    hidden[start : start + batch], _ = runner.run(hidden[start : start + batch])
                del runner  # its weights and arena, before the next layer's session exists
            else:
                hidden = fp_out
            if checkpoints is not None:
                checkpoints.save_layer(i, result, before, hidden)
                checkpoints.offload_layer(i, result, before)  # its codes are read back from there when needed
            release_freed_memory()
    return result


def _quantized_layer(ckpt: Checkpoint, i: int, recipe: Recipe, result: CalibrationResult, threads) -> LayerRunner:
    """Layer i as the artifact will run it: the recipe's own weight passes over the calibrated integers
    (MatMulNBits at the recipe's accuracy level, or DequantizeLinear -> MatMul; dynamic int8 for W8A8),
    so the next layer calibrates on what it will see in onnxruntime, int8 activation rounding included.
    At accuracy level 4 this is also the faster pass: int8 GEMMs instead of fp32 ones (1.6-1.7x on the
    1B shapes at 1024 tokens on 2 cores)."""
    from quantlab.passes.dead_nodes import RemoveDeadNodesPass
    from quantlab.pipelines import quantization_pipeline

    def quantize(model: ir.Model) -> ir.Model:
        for graph_pass in [*quantization_pipeline(model, recipe, result, embedding=False), RemoveDeadNodesPass()]:
            model = graph_pass(model).model
        return model

    return LayerRunner(with_overrides(ckpt, result.float_overrides), i, threads, outputs="hidden", transform=quantize)


def _linear_errors(fp: Checkpoint, i: int, stats, layer_weights: dict, divisors: dict) -> float:
    """Mean over the layer's quantized linears of ||x W^T - (x / s) W_q^T|| / ||x W^T|| on sampled tokens,
    where s is the input scale AWQ or SmoothQuant folded in (1 when none); an expert without tokens has
    no samples and no share in it."""
    errors = []
    for role in layer_linear_roles(fp.spec, i):
        name = _linear(i, role) + ".weight"
        if name not in layer_weights or linear_input(role) not in stats.samples:
            continue
        x = stats.sample(linear_input(role))[:ERROR_SAMPLE_TOKENS]  # (tokens, K)
        reference = linalg.linear(x, fp.tensors.load(name))
        scaled_x = x / divisors[role] if role in divisors else x
        weight = layer_weights[name]
        weight = dequantize(weight) if isinstance(weight, QuantizedWeight) else weight
        errors.append(relative_error(linalg.linear(scaled_x, weight), reference))
    return float(np.mean(errors)) if errors else 0.0


def _linear(i: int, role: str) -> str:
    return f"model.layers.{i}.{role}"


def _rtn_experts(result: CalibrationResult, i: int) -> set[int]:
    """Layer i's experts that saw too few tokens to calibrate (quantlab.calib.experts.min_expert_tokens)."""
    experts = result.experts.get(i)
    return set(experts.rtn_fallback) if experts is not None else set()


def split_rows(qw, names, rows_of):
    """(name, codes) for each linear of a stack solved as one (q/k/v, gate/up): ``qw``'s rows in ``names``'
    order, ``rows_of(name)`` rows each."""
    start = 0
    for name in names:
        rows = slice(start, start + rows_of(name))
        start = rows.stop
        zero_points = None if qw.zero_points is None else qw.zero_points[rows]
        yield name, dataclasses.replace(qw, q=qw.q[rows], scales=qw.scales[rows], zero_points=zero_points)


def _decide_gptq(fp: Checkpoint, i: int, stats, recipe: Recipe, result: CalibrationResult) -> dict:
    """GPTQ (arXiv 2210.17323) for every linear of layer i, from the Hessian of its input.

    Linears that read the same input with the same scheme (q/k/v, gate/up, an expert's gate/up) are solved
    as one stacked weight: GPTQ treats rows independently given the shared Hessian, so this gives each
    linear its own result while factoring the Hessian once and walking the columns once. An expert that
    saw too few tokens is rounded to nearest: its Hessian never reaches a Cholesky factorization.
    """
    dequantized = {}
    rtn_experts = _rtn_experts(result, i)
    todo = [role for role in layer_linear_roles(fp.spec, i) if recipe.scheme_for(_linear(i, role)) is not None]
    stacks: dict[tuple, list[str]] = {}
    for role in todo:
        scheme = recipe.scheme_for(_linear(i, role))
        if expert_of(role) in rtn_experts:
            stats.hessians.pop(linear_input(role), None)
            weight = fp.tensors.load(_linear(i, role) + ".weight")
            qw = rtn_quantize(weight, scheme.bits, scheme.group_size, scheme.symmetric)
            result.quantized[_linear(i, role)] = qw
            dequantized[_linear(i, role) + ".weight"] = qw
            continue
        stacks.setdefault((linear_input(role), scheme), []).append(role)
    for n, ((x_name, scheme), roles) in enumerate(stacks.items()):
        names = [_linear(i, role) for role in roles]
        weights = [fp.tensors.load(name + ".weight") for name in names]  # stacked by GPTQ as it transposes
        config = GPTQConfig.from_scheme(
            scheme, percdamp=recipe.gptq.damp, act_order=recipe.gptq.act_order, block_size=recipe.gptq.block_size
        )
        if any(key[0] == x_name for key in list(stacks)[n + 1 :]):
            qw = gptq_quantize(weights, stats.hessians[x_name], config)
        else:  # its last user: GPTQ may work in the Hessian's own buffer (256 MB for down_proj at 1B)
            # (run_gptq holds the only reference, so its permuted copy can replace the original)
            qw = gptq_quantize(weights, stats.hessians.pop(x_name), config, consume=True)
        del weights
        forget = getattr(fp.tensors, "forget", None)
        for name in names if forget is not None else ():
            # Solved: down_proj's solve (the calibration's peak) then runs without the float weights of
            # q/k/v/o/gate/up (176 MB at 1B); the error report reads them again.
            forget(name + ".weight")
        for name, part in split_rows(qw, names, lambda n: fp.tensors.shape(n + ".weight")[0]):
            result.quantized[name] = part
            dequantized[name + ".weight"] = part  # dequantized one at a time by _linear_errors
    linalg.release()  # the GEMM sessions' arenas: a K = 8192 factor's inverse leaves ~0.2 GB in them
    return dequantized, {}


@dataclasses.dataclass(frozen=True)
class _ScaleGroup:
    """Linears whose input channels take one scale s, folded into the op before them (AWQ_MAPPINGS
    resolved for one layer). previous: the norm's weight tensor, or the previous linear's role; also:
    float tensors reading the same input, scaled by s too (a sparse MLP's router)."""

    roles: tuple[str, ...]
    previous: str
    previous_kind: str
    also: tuple[str, ...] = ()


# The norm whose output a mapping's linears read, where the spec names it otherwise: with sandwich norms
# (Gemma 2/3) the MLP's input norm is pre_feedforward_layernorm (post_attention_layernorm then normalizes
# the attention's output; see quantlab.graph_builder.decoder._Builder.layer).
_SANDWICH_NORMS = {"post_attention_layernorm": "pre_feedforward_layernorm"}


def _scale_groups(spec, i: int) -> list[_ScaleGroup]:
    """awq.AWQ_MAPPINGS for layer i: a norm's group holds every linear of those names (a sparse MLP's:
    every expert's gate and up, with the router scaled beside them); a previous linear's group is per
    owner (the attention, the dense MLP, each expert). An ungated MLP's down_proj has no such fold: its
    input act(up(x)) does not scale with up's rows."""
    roles = layer_linear_roles(spec, i)
    groups = []
    for mapping in awq.AWQ_MAPPINGS:
        if mapping.previous_kind == "norm":
            members = tuple(r for r in roles if r.rsplit(".", 1)[-1] in mapping.linears)
            norm = _SANDWICH_NORMS.get(mapping.previous, mapping.previous) if spec.sandwich_norms else mapping.previous
            moe = any(expert_of(r) is not None for r in members)
            also = (_linear(i, "mlp.gate") + ".weight",) if moe else ()
            if members:
                groups.append(_ScaleGroup(members, f"model.layers.{i}.{norm}.weight", "norm", also))
            continue
        for owner in dict.fromkeys(r.rsplit(".", 1)[0] for r in roles):
            previous = f"{owner}.{mapping.previous}"
            members = tuple(f"{owner}.{short}" for short in mapping.linears)
            if previous in roles and all(m in roles for m in members) and (owner != "mlp" or spec.mlp_gated):
                groups.append(_ScaleGroup(members, previous, "linear"))
    return groups


def _scaled_groups(fp: Checkpoint, i: int, recipe: Recipe, scales_for) -> tuple[dict, dict, dict, set]:
    """Apply per-input-channel scales group by group (_scale_groups), folding 1/s into the producer.

    scales_for(group, weights) -> s (K,) or None to leave that group alone. Returns the scaled weights
    by role, the divisor each role's input now carries, float overrides for the producers (and the
    router), and the roles whose weights changed.
    """
    weights = {role: fp.tensors.load(_linear(i, role) + ".weight") for role in layer_linear_roles(fp.spec, i)}
    divisors: dict[str, np.ndarray] = {}
    overrides: dict[str, np.ndarray] = {}
    touched: set[str] = set()
    offset = np.float32(fp.spec.norm_weight_offset)
    for group in _scale_groups(fp.spec, i):
        if group.previous_kind == "linear" and weights[group.previous].shape[0] != weights[group.roles[0]].shape[1]:
            continue  # v_proj -> o_proj under grouped-query attention: widths differ, no fold
        s = scales_for(group, weights)
        if s is None:
            continue
        for role in group.roles:
            weights[role] = awq.scale_input_channels(weights[role], s)
            divisors[role] = s
            touched.add(role)
        for name in group.also:
            overrides[name] = awq.scale_input_channels(fp.tensors.load(name), s)
        if group.previous_kind == "norm":
            # the graph scales by (w + offset) (Gemma's 1 + w): the stored w' makes (w' + offset) = (w + offset) / s
            bias_name = group.previous.removesuffix(".weight") + ".bias"
            bias = fp.tensors.load(bias_name) if bias_name in fp.tensors.names() else None  # LayerNorm (Nemotron)
            folded, new_bias = awq.fold_into_norm(fp.tensors.load(group.previous) + offset, s, bias)
            overrides[group.previous] = folded - offset
            if new_bias is not None:
                overrides[bias_name] = new_bias
        else:
            bias_name = _linear(i, group.previous) + ".bias"
            bias = fp.tensors.load(bias_name) if bias_name in fp.tensors.names() else None
            weights[group.previous], new_bias = awq.fold_into_previous_linear(weights[group.previous], s, bias)
            touched.add(group.previous)
            if new_bias is not None:
                overrides[bias_name] = new_bias
    return weights, divisors, overrides, touched


def _finish(
    i: int, recipe: Recipe, weights: dict, touched: set, overrides: dict, result: CalibrationResult, quantize
) -> dict:
    """Quantize the scaled weights; keep scaled float weights for linears the recipe leaves in float."""
    result.float_overrides.update(overrides)
    dequantized = {}
    for role, weight in weights.items():
        name = _linear(i, role)
        scheme = recipe.scheme_for(name)
        if scheme is None:
            if role in touched:
                result.float_overrides[name + ".weight"] = weight
            continue
        dequantized[name + ".weight"] = quantize(name, role, scheme, weight)
    return dequantized


def _decide_awq(fp: Checkpoint, i: int, stats, recipe: Recipe, result: CalibrationResult) -> dict:
    """AWQ (arXiv 2306.00978): scale search per group of linears, then clipping search, then RTN.

    A sparse MLP's experts share their input norm, so their gate/up take one s, searched on each expert's
    own tokens (awq.search_shared_awq_scales) and folded into the norm (and the float router's columns);
    each expert's down_proj gets its own s, folded into its up_proj, and its own clips. An expert that saw
    too few tokens searches nothing of its own: it takes the shared s and is rounded to nearest.
    """
    rtn_experts = _rtn_experts(result, i)

    def own_tokens(role: str) -> bool:
        return expert_of(role) not in rtn_experts and linear_input(role) in stats.samples

    def scales_for(group: _ScaleGroup, weights):
        schemes = [recipe.scheme_for(_linear(i, r)) for r in group.roles]
        if all(s is None for s in schemes):
            return None
        scheme = next(s for s in schemes if s is not None)
        inputs = {linear_input(r) for r in group.roles}
        if len(inputs) == 1:  # a dense group: one input
            if not all(own_tokens(r) for r in group.roles):
                return None
            members = [weights[r] for r in group.roles]
            return awq.search_awq_scales(stats.sample(inputs.pop()), members, scheme, grid=recipe.awq.grid)
        by_input: dict[str, list[str]] = {}
        for role in group.roles:
            if own_tokens(role):
                by_input.setdefault(linear_input(role), []).append(role)
        parts = [(stats.sample(x), [weights[r] for r in rs]) for x, rs in by_input.items()]
        if not parts:
            return None
        return awq.search_shared_awq_scales(stats.sample(MOE_INPUT), parts, scheme, grid=recipe.awq.grid)

    weights, divisors, overrides, touched = _scaled_groups(fp, i, recipe, scales_for)

    def quantize(name, role, scheme, weight):
        if recipe.awq.clip and role.split(".")[-1] not in awq.AWQ_CLIP_SKIP and own_tokens(role):
            x = stats.sample(linear_input(role))
            if role in divisors:
                x = x / divisors[role]  # the input this scaled weight will see
            max_val = awq.search_awq_clip(x, weight, scheme, grid=recipe.awq.grid)
            weight = awq.apply_awq_clip(weight, max_val, scheme.group_size)
        qw = rtn_quantize(weight, scheme.bits, scheme.group_size, scheme.symmetric)
        result.quantized[name] = qw
        return dequantize(qw)

    return _finish(i, recipe, weights, touched, overrides, result, quantize), divisors


def _decide_smoothquant(fp: Checkpoint, i: int, stats, recipe: Recipe, result: CalibrationResult) -> dict:
    """SmoothQuant (arXiv 2211.10438): move activation outliers into the weights, then int8 per channel.
    A sparse MLP's experts share one smoothing of their input (its max over every token)."""

    def scales_for(group: _ScaleGroup, weights):
        if all(recipe.scheme_for(_linear(i, r)) is None for r in group.roles):
            return None
        inputs = {linear_input(r) for r in group.roles}
        x_name = inputs.pop() if len(inputs) == 1 else MOE_INPUT
        if x_name not in stats.absmax:
            return None
        return smoothquant.smooth_scales(
            stats.absmax[x_name], [weights[r] for r in group.roles], alpha=recipe.smoothquant.alpha
        )

    weights, divisors, overrides, touched = _scaled_groups(fp, i, recipe, scales_for)

    def quantize(name, role, scheme, weight):
        if scheme.weight_only:  # an override to a weight-only scheme inside a W8A8 recipe
            qw = rtn_quantize(weight, scheme.bits, scheme.group_size, scheme.symmetric)
            result.quantized[name] = qw
            return dequantize(qw)
        q, scales = smoothquant.quantize_weight_per_channel_int8(weight)
        result.int8[name] = (q, scales)
        return q.astype(np.float32) * scales[:, None]

    return _finish(i, recipe, weights, touched, overrides, result, quantize), divisors


METHODS = {"gptq": _decide_gptq, "awq": _decide_awq, "smoothquant": _decide_smoothquant}
assert PER_CHANNEL == -1
