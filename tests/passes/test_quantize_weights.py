"""QuantizeWeightsPass: structure, ``modified`` both ways, numerics against the dequantized fp32 graph."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.graph_builder.decoder import build_decoder
from quantlab.io.spec import Checkpoint
from quantlab.passes.dead_nodes import RemoveDeadNodesPass
from quantlab.passes.quantize_weights import QuantizeWeightsPass, quantizable_linears
from quantlab.quant.rtn import dequantize, rtn_quantize
from quantlab.quant.scheme import parse_scheme
from tests.tiny import ArraySource, run_decoder, tiny_checkpoint

IDS = np.array([[1, 5, 9, 33, 70, 2, 11, 64]], dtype=np.int64)
# accuracy_level 0: fp32 arithmetic on the dequantized weights; only summation order differs.
EXACT_ATOL = 2e-4
# qdq and MatMulNBits (level 0) carry the same integers and scales.
FORMAT_ATOL = 2e-4
# accuracy_level 4 quantizes activations to int8 per block: the logits move, but little.
LEVEL4_MAX_REL = 0.05


def _schemes(ckpt: Checkpoint, text: str) -> dict:
    model = build_decoder(ckpt)
    return {name: parse_scheme(text) for name in quantizable_linears(model)}


def _dequantized_checkpoint(ckpt: Checkpoint, scheme_text: str) -> Checkpoint:
    s = parse_scheme(scheme_text)
    arrays = {}
    for name in ckpt.tensors.names():
        w = ckpt.tensors.load(name)
        if w.ndim == 2 and name != "model.embed_tokens.weight":
            w = dequantize(rtn_quantize(w, s.bits, s.group_size, s.symmetric))
        arrays[name] = w
    return Checkpoint(spec=ckpt.spec, tensors=ArraySource(arrays), tokenizer=None, source_format="test")


def test_structure_and_modified_both_ways():
    ckpt = tiny_checkpoint()
    model = build_decoder(ckpt)
    n_linears = len(quantizable_linears(model))
    assert n_linears == 2 * 7 + 1
    result = QuantizeWeightsPass(_schemes(ckpt, "w4a16-g32-asym"))(model)
    assert result.modified
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("MatMulNBits") == n_linears
    assert quantizable_linears(result.model) == {}
    node = next(n for n in result.model.graph if n.op_type == "MatMulNBits")
    assert {a: node.attributes[a].value for a in ("K", "N", "bits", "block_size")} == {
        "K": 64,
        "N": 64,
        "bits": 4,
        "block_size": 32,
    }
    assert len(node.inputs) == 4  # asymmetric: zero points present
    again = QuantizeWeightsPass(_schemes(ckpt, "w4a16-g32-asym"))(result.model)
    assert not again.modified
    RemoveDeadNodesPass()(result.model)
    assert not any(
        name.endswith(".weight") and "norm" not in name and "embed" not in name
        for name in result.model.graph.initializers
    )


def test_unlisted_linears_are_left_alone():
    ckpt = tiny_checkpoint()
    model = build_decoder(ckpt)
    result = QuantizeWeightsPass({"lm_head": parse_scheme("w8a16-g32-asym")})(model)
    assert result.modified
    assert [n.op_type for n in result.model.graph].count("MatMulNBits") == 1
    assert not QuantizeWeightsPass({})(build_decoder(ckpt)).modified


@pytest.mark.parametrize("scheme", ["w4a16-g32-asym", "w4a16-g64-sym", "w8a16-g32-asym", "w4a16-pc-asym"])
def test_numerics_match_dequantized_graph(scheme, tmp_path):
    ckpt = tiny_checkpoint()
    reference = run_decoder(build_decoder(_dequantized_checkpoint(ckpt, scheme)), ckpt, tmp_path / "ref", IDS)
    model = build_decoder(ckpt)
    QuantizeWeightsPass(_schemes(ckpt, scheme), accuracy_level=0)(model)
    got = run_decoder(model, ckpt, tmp_path / "q", IDS)
    np.testing.assert_allclose(got, reference, atol=EXACT_ATOL, rtol=0)


@pytest.mark.parametrize("scheme", ["w4a16-g32-asym", "w4a16-g32-sym", "w8a16-g64-asym"])
@pytest.mark.parametrize("level", [0, 4])
def test_qdq_format_equals_matmul_nbits(scheme, level, tmp_path):
    """onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits itself, at the accuracy level its
    session option names (4 by default), so the two formats agree level for level."""
    ckpt = tiny_checkpoint()
    nbits = build_decoder(ckpt)
    QuantizeWeightsPass(_schemes(ckpt, scheme), accuracy_level=level)(nbits)
    qdq = build_decoder(ckpt)
    QuantizeWeightsPass(_schemes(ckpt, scheme), format="qdq")(qdq)
    ops = [n.op_type for n in qdq.graph]
    assert "MatMulNBits" not in ops and ops.count("DequantizeLinear") == 15
    assert "com.microsoft" not in qdq.opset_imports
    a = run_decoder(nbits, ckpt, tmp_path / "nbits", IDS)
    b = run_decoder(
        qdq, ckpt, tmp_path / "qdq", IDS, session_config={"session.qdq_matmulnbits_accuracy_level": str(level)}
    )
    np.testing.assert_allclose(a, b, atol=FORMAT_ATOL, rtol=0)


def test_accuracy_level_4_stays_close(tmp_path):
    ckpt = tiny_checkpoint()
    exact = build_decoder(ckpt)
    QuantizeWeightsPass(_schemes(ckpt, "w4a16-g32-asym"), accuracy_level=0)(exact)
    fast = build_decoder(ckpt)
    QuantizeWeightsPass(_schemes(ckpt, "w4a16-g32-asym"), accuracy_level=4)(fast)
    a = run_decoder(exact, ckpt, tmp_path / "l0", IDS)
    b = run_decoder(fast, ckpt, tmp_path / "l4", IDS)
    assert np.abs(a - b).max() / np.abs(a).max() < LEVEL4_MAX_REL


def test_precomputed_integers_are_emitted_as_given(tmp_path):
    ckpt = tiny_checkpoint()
    name = "model.layers.0.mlp.down_proj"
    w = ckpt.tensors.load(name + ".weight")
    scheme = parse_scheme("w4a16-g32-asym")
    other = rtn_quantize(w * 0.5, 4, 32, False)  # deliberately not RTN of the graph's weight
    model = build_decoder(ckpt)
    QuantizeWeightsPass({name: scheme}, precomputed={name: other}, accuracy_level=0)(model)
    arrays = {n: ckpt.tensors.load(n) for n in ckpt.tensors.names()}
    arrays[name + ".weight"] = dequantize(other)
    reference = run_decoder(
        build_decoder(Checkpoint(spec=ckpt.spec, tensors=ArraySource(arrays), tokenizer=None, source_format="test")),
        ckpt,
        tmp_path / "ref",
        IDS,
    )
    np.testing.assert_allclose(run_decoder(model, ckpt, tmp_path / "q", IDS), reference, atol=EXACT_ATOL, rtol=0)


def test_rtn_in_row_chunks_equals_whole(tmp_path, monkeypatch):
    """Big heads are quantized a few rows at a time; the integers must not depend on it."""
    import quantlab.passes.quantize_weights as qw_module

    ckpt = tiny_checkpoint()
    names = ("lm_head.qweight", "lm_head.scales", "lm_head.qzeros")
    whole = build_decoder(ckpt)
    QuantizeWeightsPass(_schemes(ckpt, "w4a16-g32-asym"), accuracy_level=0)(whole)
    expected = [whole.graph.initializers[n].const_value.numpy() for n in names]  # evaluated now, unchunked
    monkeypatch.setattr(qw_module, "RTN_CHUNK_ELEMENTS", 64 * 7)  # 7 rows at a time, a ragged last chunk
    chunked = build_decoder(ckpt)
    QuantizeWeightsPass(_schemes(ckpt, "w4a16-g32-asym"), accuracy_level=0)(chunked)
    for name, a in zip(names, expected, strict=True):
        np.testing.assert_array_equal(chunked.graph.initializers[name].const_value.numpy(), a)
