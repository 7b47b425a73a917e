"""The default graph is the fused one (GroupQueryAttention + RotaryEmbedding, fused linears and norms) and
it computes what the plain opset-21 graph computes: `quantlab convert` both ways, same logits through a
prefill and decode steps, on the real stories260K (llama2.c's adjacent-pair RoPE)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from quantlab.cli.main import main
from quantlab.runtime.generate import OrtDecoder
from tests.models import model_path

# fp32: another summation order; w4 at accuracy level 4: the same int8 activation blocks, and where a
# rounding tie flips, one int8 step of one block (the torch-vs-onnxruntime tests use the same bound)
LOGITS_ATOL = {"fp32": 1e-4, "w4a16-g32-asym": 1e-3}
IDS = np.array([[1, 403, 407, 261, 378, 432, 383]])


def _convert(tmp_path, recipe: str, *flags: str):
    out = tmp_path / (recipe + "".join(flags).replace("-", "_"))
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(out), "--recipe", recipe, "--no-eval"]
    assert main([*argv, "--no-progress", *flags]) == 0
    return out


def _run(folder) -> list[np.ndarray]:
    dec = OrtDecoder(folder)
    logits, cache = dec.forward(IDS, dec.empty_cache(1))
    out = [logits[0]]
    for step, token in enumerate([5, 77, 301]):
        n = IDS.shape[1] + step
        logits, cache = dec.forward(
            np.array([[token]]), cache, attention_mask=np.ones((1, n + 1), np.int64), position_ids=np.array([[n]])
        )
        out.append(logits[0])
    return out


@pytest.mark.parametrize("recipe", ["fp32", "w4a16-g32-asym"])
def test_default_fused_graph_matches_the_plain_one(tmp_path, recipe):
    fused, plain = _convert(tmp_path, recipe), _convert(tmp_path, recipe, "--attention", "plain")
    kinds = [n.op_type for n in onnx.load(fused / "model.onnx", load_external_data=False).graph.node]
    assert {"GroupQueryAttention", "RotaryEmbedding"} <= set(kinds) and "Softmax" not in kinds
    if recipe != "fp32":
        assert kinds.count("MatMulNBits") == 4 * 5 + 1  # qkv, o, gate_up, down per layer, and the head
    plain_kinds = {n.op_type for n in onnx.load(plain / "model.onnx", load_external_data=False).graph.node}
    assert not plain_kinds & {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"}
    genai = json.loads((fused / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    for got, want in zip(_run(fused), _run(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_ATOL[recipe])


def test_a_per_token_quantized_cache_keeps_the_plain_graph(tmp_path):
    out = _convert(tmp_path, "fp32", "--kv", "int8")
    kinds = {n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node}
    assert "GroupQueryAttention" not in kinds
    assert json.loads((out / "manifest.json").read_text())["attention"]["kind"] == "plain"
