"""Which graph passes run for a recipe: the weight passes (quantization_pipeline), onnxruntime's fusions
(fusion_pipeline, for the graph ``default_attention`` picks) and the cleanup every artifact ends with.

quantlab.api.convert runs them in that order; calibration, ``convert --max-size`` and ``package --fit``
build the same lists for their own graphs.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

from quantlab.graph_builder.kv_cache import parse_kv_cache
from quantlab.passes.check import CheckModelPass, InferShapesPass
from quantlab.passes.dead_nodes import RemoveDeadNodesPass
from quantlab.passes.fold_constants import FoldConstantsPass
from quantlab.passes.keep_source_quantization import KeepSourceQuantizationPass
from quantlab.passes.quantize_dynamic import QuantizeDynamicInt8Pass
from quantlab.passes.quantize_embedding import QuantizeEmbeddingPass
from quantlab.passes.quantize_weights import (
    W8_PER_CHANNEL,
    Int8AsWeights,
    QuantizeWeightsPass,
    moe_expert_linears,
    quantizable_linears,
)
from quantlab.passes.share_tied_embedding import ShareTiedEmbeddingPass
from quantlab.recipe import Recipe


def default_attention(recipe: Recipe) -> str:
    """``auto``: the graph onnxruntime runs fastest (``fused``: GroupQueryAttention with RotaryEmbedding,
    fused q/k/v and gate/up linears, fused norms), unless the recipe asks for something only the plain
    graph has: a quantized cache with per-token scales (a static one needs ``--attention fused``
    explicitly, since it changes the cache format) or standard-ONNX ``qdq`` weights for other runtimes."""
    if parse_kv_cache(recipe.kv_cache).quantized or recipe.format == "qdq":
        return "plain"
    return "fused"


def fusion_pipeline(attention: str, recipe: Recipe) -> list[ir.passes.PassBase]:
    """onnxruntime's fused kernels, for the graph built for them (``attention="fused"``): one MatMulNBits
    per group of linears reading one input (q/k/v, gate/up), and RMSNorm with its residual Add as one node.
    The plain graph stays standard opset-21 ONNX.

    The norms stay unfused in front of int8-accuracy MatMulNBits (accuracy_level 4): there onnxruntime
    1.32 gives other results when the linear's input comes from SkipSimplifiedLayerNormalization (stories260K
    logits 0.27 apart from the unfused graph, though every intermediate value agrees when read out as a graph
    output, and bit-exact at accuracy level 0 and in fp32); until that is understood, no fusion that
    changes a model's outputs."""
    if attention != "fused":
        return []
    from quantlab.passes.fuse_matmul_nbits import FuseParallelMatMulNBitsPass
    from quantlab.passes.fuse_norms import FuseRmsNormPass

    int8_linears = recipe.scheme is not None and recipe.accuracy_level == 4
    return [FuseParallelMatMulNBitsPass()] + ([] if int8_linears else [FuseRmsNormPass()])


def cleanup_pipeline() -> list[ir.passes.PassBase]:
    """The passes every artifact goes through last, top to bottom."""
    return [RemoveDeadNodesPass(), FoldConstantsPass(), RemoveDeadNodesPass(), InferShapesPass(), CheckModelPass()]


def quantization_pipeline(
    model: ir.Model,
    recipe: Recipe,
    calibration=None,
    prequantized=None,
    *,
    embedding: bool = True,
    tied: bool = False,
    source=None,
) -> list[ir.passes.PassBase]:
    """The weight passes a recipe asks for (empty for a float recipe); ``prequantized`` (a checkpoint's
    trained codes by linear name) are emitted as they are. ``embedding=False`` leaves out the token
    embedding's pass, for a graph without one (calibration's single decoder layer). ``tied``: the head is
    the embedding table (``spec.tie_word_embeddings``), and both read one tensor with the head's scheme."""
    # source: a GGUF's own codes (recipe keep_source, a SourceQuantization), emitted without rounding
    kept = [KeepSourceQuantizationPass(source, accuracy_level=recipe.accuracy_level)] if source is not None else []
    if recipe.scheme is None:
        return kept + ([ShareTiedEmbeddingPass()] if tied and embedding else [])
    share = [ShareTiedEmbeddingPass(recipe.scheme_for("lm_head"), recipe.embedding)] if tied and embedding else []
    # every linear, and the experts inside a com.microsoft.MoE node (the router is neither)
    linears = [*quantizable_linears(model), *moe_expert_linears(model)]
    schemes = {name: recipe.scheme_for(name) for name in linears}
    weight_only = {n: s for n, s in schemes.items() if s is not None and s.weight_only}
    pipeline: list[ir.passes.PassBase] = [*kept]  # kept codes first: the rest is rounded (convert --max-size)
    int8_experts = {}
    if calibration is not None and calibration.int8:
        pipeline.append(QuantizeDynamicInt8Pass(calibration.int8))
        int8_experts = Int8AsWeights(calibration.int8, moe_expert_linears(model))  # for QMoE: see the class
        weight_only.update(dict.fromkeys(int8_experts, W8_PER_CHANNEL))
    pipeline.append(
        QuantizeWeightsPass(
            weight_only,
            # a view, not a merged copy: the calibrated codes stay packed until the pass takes each
            precomputed=collections.ChainMap(
                calibration.quantized if calibration is not None else {}, int8_experts, prequantized or {}
            ),
            format=recipe.format,
            accuracy_level=recipe.accuracy_level,
        )
    )
    pipeline += share  # before the embedding's pass, which then finds no table of its own to quantize
    if recipe.embedding is not None and embedding:
        pipeline.append(QuantizeEmbeddingPass(recipe.embedding))
    return pipeline
