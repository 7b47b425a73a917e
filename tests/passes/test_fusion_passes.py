"""FuseParallelMatMulNBitsPass and FuseRmsNormPass on a whole quantized tiny decoder: structure,
``modified`` both ways, and logits in onnxruntime against the graph before the pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from quantlab.graph_builder.decoder import BuildOptions, build_decoder
from quantlab.passes.dead_nodes import RemoveDeadNodesPass
from quantlab.passes.fuse_matmul_nbits import FuseParallelMatMulNBitsPass
from quantlab.passes.fuse_norms import FuseRmsNormPass
from quantlab.passes.manager import run_passes
from quantlab.pipelines import quantization_pipeline
from quantlab.recipe import load_recipe
from tests.passes.graphs import ops, run_ort
from tests.tiny import tiny_checkpoint

# stacking rows of MatMulNBits changes nothing per output (same codes, same per-row dot products)
FUSED_LINEAR_ATOL = 1e-6
# onnxruntime's norm kernels sum the mean square in another order than ReduceMean
FUSED_NORM_ATOL = 1e-4
LAYERS = 2


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _quantized_decoder(attention: str) -> ir.Model:
    """A tiny decoder with every linear MatMulNBits (fp32 accuracy: no int8 rounding of activations)."""
    ckpt = tiny_checkpoint(7, layers=LAYERS, outliers=False)
    model = build_decoder(ckpt, BuildOptions(attention=attention))
    recipe = dataclasses.replace(load_recipe("w4a16-g32-asym"), accuracy_level=0)
    model, _ = run_passes(model, [*quantization_pipeline(model, recipe), RemoveDeadNodesPass()])
    return model


def _feeds(model: ir.Model) -> dict[str, np.ndarray]:
    ids = np.array([[5, 17, 3, 40, 9, 2]], dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
    }
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values"):
            feeds[v.name] = np.zeros((1, v.shape[1], 0, v.shape[3]), np.float32)
    return feeds


@pytest.mark.parametrize("attention", ["plain", "fused"])
def test_parallel_matmul_nbits_fuse_into_one_node(attention):
    model = _quantized_decoder(attention)
    before = _copy(model)
    n_before = ops(model).count("MatMulNBits")
    result = FuseParallelMatMulNBitsPass()(model)
    assert result.modified
    names = [n.name for n in result.model.graph if n.op_type == "MatMulNBits"]
    # q/k/v -> qkv and gate/up -> gate_up in every layer: 7 linears -> 4
    assert len(names) == n_before - 3 * LAYERS
    assert "model.layers.0.self_attn.qkv_proj.MatMulNBits" in names
    assert "model.layers.1.mlp.gate_up_proj.MatMulNBits" in names
    assert ops(result.model).count("Split") == 2 * LAYERS
    assert not any(n.endswith("q_proj.qweight") for n in result.model.graph.initializers)
    want, got = run_ort(before, _feeds(before)), run_ort(result.model, _feeds(result.model))
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=FUSED_LINEAR_ATOL)
    assert not FuseParallelMatMulNBitsPass()(result.model).modified


@pytest.mark.parametrize("attention", ["plain", "fused"])
def test_rms_norms_and_residual_adds_fuse(attention):
    model = _quantized_decoder(attention)
    before = _copy(model)
    result = FuseRmsNormPass()(model)
    assert result.modified
    kinds = ops(result.model)
    assert "ReduceMean" not in kinds and "Reciprocal" not in kinds
    # the first norm reads the embedding (no residual yet); the other 2 * LAYERS follow a residual Add
    assert kinds.count("SimplifiedLayerNormalization") == 1
    assert kinds.count("SkipSimplifiedLayerNormalization") == 2 * LAYERS
    want, got = run_ort(before, _feeds(before)), run_ort(result.model, _feeds(result.model))
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=FUSED_NORM_ATOL)
    assert not FuseRmsNormPass()(result.model).modified


def test_linears_with_different_block_sizes_stay_apart():
    """Only MatMulNBits of one K, bits, block size and accuracy level can share a node."""
    model = _quantized_decoder("plain")
    for node in model.graph:
        if node.name == "model.layers.0.self_attn.k_proj.MatMulNBits":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 4)
    result = FuseParallelMatMulNBitsPass()(model)
    names = [n.name for n in result.model.graph if n.op_type == "MatMulNBits"]
    assert "model.layers.0.self_attn.k_proj.MatMulNBits" in names
    assert "model.layers.0.self_attn.qv_proj.MatMulNBits" in names
