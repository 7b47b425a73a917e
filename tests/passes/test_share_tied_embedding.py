"""ShareTiedEmbeddingPass: one tensor read by the embedding lookup and the tied head.

Structure (both nodes name the same initializers, stored once), ``modified`` both ways, and numerics in
onnxruntime against the unshared graph: a tied checkpoint untied by hand, its table replaced by the
dequantized head codes, so only where the bytes live differs. End to end, stories260K (tied) converts
quantized and onnxruntime-genai generates the same greedy tokens as quantlab from the shared artifact.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from quantlab.cli.main import main
from quantlab.graph_builder.decoder import BuildOptions, build_decoder
from quantlab.io.spec import Checkpoint
from quantlab.passes.manager import run_passes
from quantlab.passes.quantize_weights import QuantizeWeightsPass
from quantlab.passes.share_tied_embedding import ShareTiedEmbeddingPass
from quantlab.pipelines import cleanup_pipeline, quantization_pipeline
from quantlab.quant.rtn import dequantize, rtn_quantize
from quantlab.quant.scheme import parse_scheme
from quantlab.recipe import load_recipe
from tests.cli.test_clients import genai_greedy
from tests.models import model_path
from tests.tiny import ArraySource, run_decoder, tiny_checkpoint

IDS = np.array([[1, 5, 9, 33, 70, 2, 11, 64]], dtype=np.int64)
# Same codes, scales and float arithmetic on both sides; only which initializer holds them differs.
ATOL = 1e-5
TABLE = "model.embed_tokens.weight"


def tied_checkpoint() -> Checkpoint:
    return tiny_checkpoint(tie=True)


def untied(ckpt: Checkpoint, table: np.ndarray) -> Checkpoint:
    """The oracle: ``ckpt`` with its own head (the original table) and ``table`` as the embedding."""
    import dataclasses

    arrays = {n: ckpt.tensors.load(n) for n in ckpt.tensors.names()}
    arrays["lm_head.weight"] = arrays[TABLE]
    arrays[TABLE] = table
    spec = dataclasses.replace(ckpt.spec, tie_word_embeddings=False)
    return Checkpoint(spec=spec, tensors=ArraySource(arrays), tokenizer=None, source_format="test")


def node(model, op_type):
    return next(n for n in model.graph if n.op_type == op_type)


def source_name(value) -> str:
    """The initializer behind a value, through a Reshape."""
    producer = value.producer()
    return producer.inputs[0].name if producer is not None and producer.op_type == "Reshape" else value.name


def shared(scheme: str, weight_dtype: str = "fp32"):
    model = build_decoder(tied_checkpoint(), BuildOptions(weight_dtype=weight_dtype))
    head = parse_scheme(scheme) if scheme != "float" else None
    if head is not None:
        assert QuantizeWeightsPass({"lm_head": head})(model).modified
    result = ShareTiedEmbeddingPass(head)(model)
    model, _ = run_passes(result.model, cleanup_pipeline())
    return result, model


QUANTIZED = ["w8a16-g128-asym", "w4a16-g32-asym", "w4a16-g128-asym", "w8a16-g32-sym", "w4a16-g256-sym", "w4a16-pc-asym"]


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_quantized_head_and_lookup_read_one_tensor(scheme, tmp_path):
    result, model = shared(scheme)
    assert result.modified
    lookup, head = node(model, "GatherBlockQuantized"), node(model, "MatMulNBits")
    assert "Gather" not in [n.op_type for n in model.graph]
    assert lookup.inputs[0].name == source_name(head.inputs[1]) == "lm_head.qweight"
    assert lookup.inputs[2].name == head.inputs[2].name
    if not parse_scheme(scheme).symmetric:
        assert lookup.inputs[3].name == head.inputs[3].name
    assert TABLE not in model.graph.initializers and "lm_head.weight" not in model.graph.initializers
    assert not ShareTiedEmbeddingPass(parse_scheme(scheme))(model).modified  # nothing left to share
    run_decoder(model, tied_checkpoint(), tmp_path, IDS)
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    stored = [i.name for i in proto.graph.initializer if i.external_data]
    assert stored.count("lm_head.qweight") == 1 and not any("embed_tokens" in n for n in stored)


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_quantized_logits_equal_the_unshared_graph(scheme, tmp_path):
    ckpt, s = tied_checkpoint(), parse_scheme(scheme)
    table = ckpt.tensors.load(TABLE)
    oracle = untied(ckpt, dequantize(rtn_quantize(table, s.bits, s.group_size, s.symmetric)))
    reference_model = build_decoder(oracle)
    QuantizeWeightsPass({"lm_head": s})(reference_model)
    reference = run_decoder(reference_model, oracle, tmp_path / "ref", IDS)
    _, model = shared(scheme)
    got = run_decoder(model, ckpt, tmp_path / "shared", IDS)
    np.testing.assert_allclose(got, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("weight_dtype", ["fp32", "fp16"])
def test_float_head_multiplies_by_the_transposed_table(weight_dtype, tmp_path):
    ckpt = tied_checkpoint()
    reference = run_decoder(build_decoder(ckpt, BuildOptions(weight_dtype=weight_dtype)), ckpt, tmp_path / "ref", IDS)
    result, model = shared("float", weight_dtype)
    assert result.modified
    transpose = next(n for n in model.graph if n.name == "lm_head.Transpose")
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[1].name == "input_ids")
    assert transpose.inputs[0] is gather.inputs[0]  # the table itself, or its one Cast to fp32
    assert "lm_head.weight" not in model.graph.initializers and TABLE in model.graph.initializers
    assert not ShareTiedEmbeddingPass()(model).modified
    got = run_decoder(model, ckpt, tmp_path / "shared", IDS)
    np.testing.assert_allclose(got, reference, atol=ATOL, rtol=0)


def test_qdq_head_is_left_unshared():
    model = build_decoder(tied_checkpoint())
    QuantizeWeightsPass({"lm_head": parse_scheme("w8a16-g32-asym")}, format="qdq")(model)
    assert not ShareTiedEmbeddingPass(parse_scheme("w8a16-g32-asym"))(model).modified
    assert TABLE in model.graph.initializers


def test_untied_pipeline_has_no_sharing():
    model = build_decoder(tiny_checkpoint())
    names = [type(p).__name__ for p in quantization_pipeline(model, load_recipe("w4a16-g32-asym"))]
    assert "ShareTiedEmbeddingPass" not in names and "QuantizeEmbeddingPass" in names


def test_pipeline_head_scheme_wins_and_a_float_head_keeps_the_table_float(tmp_path):
    recipe = load_recipe("w4a16-g32-asym")  # lm_head w8a16-g128-asym, embedding w8a16-g64-asym
    model = build_decoder(tied_checkpoint())
    model, records = run_passes(model, quantization_pipeline(model, recipe, tied=True) + cleanup_pipeline())
    done = {r["pass"]: r for r in records}
    assert done["ShareTiedEmbeddingPass"]["modified"] and not done["QuantizeEmbeddingPass"]["modified"]
    assert done["ShareTiedEmbeddingPass"]["config"]["scheme"] == "w8a16-g128-asym"
    assert done["ShareTiedEmbeddingPass"]["config"]["embedding_requested"] == "w8a16-g64-asym"
    assert node(model, "GatherBlockQuantized").attributes["block_size"].value == 128

    import dataclasses

    float_head = dataclasses.replace(recipe, lm_head=None)
    model = build_decoder(tied_checkpoint())
    model, records = run_passes(model, quantization_pipeline(model, float_head, tied=True) + cleanup_pipeline())
    assert "GatherBlockQuantized" not in [n.op_type for n in model.graph]  # one float table, read twice
    assert TABLE in model.graph.initializers and len(model.graph.initializers[TABLE].uses()) == 2


@pytest.mark.slow
def test_stories_quantized_shared_artifact_runs_in_genai(tmp_path, capsys):
    out = tmp_path / "w4"
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(out), "--recipe", "w4a16-g32-asym"]
    assert main([*argv, "--no-eval", "--no-progress"]) == 0
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    lookup = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    reshape = next(n for n in proto.graph.node if n.output[0] == head.input[1])
    assert reshape.input[0] == lookup.input[0] and lookup.input[2:] == head.input[2:]
    capsys.readouterr()
    argv = ["generate", str(out), "--prompt-ids", "1", "--greedy", "--ignore-eos", "--max-new-tokens", "48", "--json"]
    assert main(argv) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"]
    assert genai_greedy(out, [1], 48) == ours
