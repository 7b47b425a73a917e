"""KeepSourceQuantizationPass on tiny GGUF files of every kept type: structure, ``modified`` both ways, and
logits in onnxruntime against the graph before the pass (which holds the gguf package's dequantization)."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import onnx_ir as ir
import pytest

from quantlab.graph_builder.decoder import BuildOptions, build_decoder
from quantlab.io import load_checkpoint
from quantlab.passes.keep_source_quantization import KeepSourceQuantizationPass
from quantlab.passes.manager import run_passes
from quantlab.pipelines import cleanup_pipeline, quantization_pipeline
from quantlab.quant.gguf_blocks import KEPT, plan_source_quantization
from quantlab.recipe import load_recipe
from tests.io.test_gguf import _byte_level_alphabet, llama_cpp_permute
from tests.quant.test_gguf_blocks import random_blocks
from tests.tiny import run_decoder

# HIDDEN and FF are multiples of 256, the K-quants' super-block
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FF, LAYERS = 4, 2, 64, 256, 512, 2
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# Logits of the kept codes against the float graph of the same GGUF: accuracy_level 0 computes in fp32
# (differences are summation order), 4 quantizes activations to int8 inside MatMulNBits.
EXACT_REL_TOL = 1e-4
INT8_REL_TOL = 5e-2
IDS = np.array([[1, 40, 77, 200, 3, 9, 120, 250]], dtype=np.int64)


def write_tiny_gguf(path, linear_type: str, *, tied: bool = False, embedding_type: str = "Q8_0", seed: int = 0):
    """A 2-layer llama GGUF with every linear (and an untied head) in ``linear_type``."""
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)  # quality figures sample 128 tokens
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)

    def quantized(ggml_type: str, shape) -> np.ndarray:
        if ggml_type in QUANTIZABLE:
            w = rng.normal(0, 1 / np.sqrt(shape[1]), shape).astype(np.float32)
            return gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type])
        if ggml_type == "F16":
            return rng.normal(0, 1 / np.sqrt(shape[1]), shape).astype(np.float16)
        return random_blocks(ggml_type, *shape, seed=int(rng.integers(1 << 30)), d_range=(2e-4, 1e-3))

    def add(name: str, ggml_type: str, shape, permute_heads: int | None = None) -> None:
        raw = quantized(ggml_type, shape)
        if permute_heads:  # rows of blocks move with their weights' rows
            raw = llama_cpp_permute(raw, permute_heads)
        if ggml_type == "F16":
            writer.add_tensor(name, raw)
        else:
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[ggml_type])

    def norm(name: str) -> None:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    add("token_embd.weight", embedding_type, (vocab, HIDDEN))
    norm("output_norm.weight")
    if not tied:
        add("output.weight", linear_type, (vocab, HIDDEN))
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        add(f"blk.{i}.attn_q.weight", linear_type, (HEADS * HEAD_DIM, HIDDEN), HEADS)
        add(f"blk.{i}.attn_k.weight", linear_type, (KV_HEADS * HEAD_DIM, HIDDEN), KV_HEADS)
        add(f"blk.{i}.attn_v.weight", linear_type, (KV_HEADS * HEAD_DIM, HIDDEN))
        add(f"blk.{i}.attn_output.weight", linear_type, (HIDDEN, HEADS * HEAD_DIM))
        norm(f"blk.{i}.ffn_norm.weight")
        add(f"blk.{i}.ffn_gate.weight", linear_type, (FF, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", linear_type, (FF, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", linear_type, (HIDDEN, FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def logits_before_and_after(ckpt, tmp_path, pipeline_after):
    before, _ = run_passes(build_decoder(ckpt), cleanup_pipeline())
    expected = run_decoder(before, ckpt, tmp_path / "before", IDS)
    after, records = run_passes(build_decoder(ckpt), pipeline_after + cleanup_pipeline())
    return expected, after, records, run_decoder(after, ckpt, tmp_path / "after", IDS)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("ggml_type", sorted(KEPT))
def test_kept_codes_reproduce_the_gguf_logits(tmp_path, ggml_type):
    ckpt = load_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf", ggml_type))
    plan = ckpt.tensors.source_quantization(tied=False)
    assert not plan.not_kept and len(plan.kept) == 7 * LAYERS + 2  # linears, head and the embedding
    # the decoded blocks of every kept tensor (rows un-permuted) equal the reader's float load
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "lm_head"):
        want = ckpt.tensors.load(f"{name}.weight")
        got = ckpt.tensors.source_blocks(f"{name}.weight").dequantize()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name)

    expected, after, records, got = logits_before_and_after(
        ckpt, tmp_path, [KeepSourceQuantizationPass(plan, accuracy_level=0)]
    )
    assert records[0]["modified"] is True
    kinds = ops(after)
    # per layer q/k/v as one node, o, gate/up as one, down; and the head
    assert kinds.count("MatMulNBits") == 4 * LAYERS + 1 and kinds.count("Split") == 2 * LAYERS
    assert kinds.count("GatherBlockQuantized") == 1
    assert {n.name for n in after.graph if n.op_type == "Split"} >= {"model.layers.0.self_attn.qkv_proj.Split"}
    assert not any(
        n.op_type == "MatMul" and n.inputs[1].is_initializer() and n.inputs[1].name.endswith(".weight")
        for n in after.graph
    )
    with_offsets = [n for n in after.graph if n.name.endswith(".offset_product")]
    assert len(with_offsets) == (4 * LAYERS + 1 if KEPT[ggml_type].has_mins else 0)
    # one per input: 4 per layer (+ the head)
    assert kinds.count("ReduceSum") == ((4 * LAYERS + 1) if KEPT[ggml_type].has_mins else 0)
    assert relative(got, expected) <= EXACT_REL_TOL, ggml_type


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q6_K"])
def test_accuracy_level_4_stays_close(tmp_path, ggml_type):
    ckpt = load_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf", ggml_type))
    plan = ckpt.tensors.source_quantization(tied=False)
    expected, _, _, got = logits_before_and_after(ckpt, tmp_path, [KeepSourceQuantizationPass(plan, accuracy_level=4)])
    assert relative(got, expected) <= INT8_REL_TOL


def test_tied_head_keeps_the_embedding_codes_and_shares_them(tmp_path):
    ckpt = load_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf", "Q4_1", tied=True))
    plan = ckpt.tensors.source_quantization(tied=True)
    assert plan.kept["lm_head"].ggml_type == "Q8_0"
    recipe = dataclasses.replace(load_recipe("source"), accuracy_level=0)
    model = build_decoder(ckpt)
    pipeline = quantization_pipeline(model, recipe, tied=True, source=plan)
    assert [type(p).__name__ for p in pipeline] == ["KeepSourceQuantizationPass", "ShareTiedEmbeddingPass"]
    expected, after, records, got = logits_before_and_after(ckpt, tmp_path, pipeline)
    assert [r["modified"] for r in records[:2]] == [True, True]
    lookup = next(n for n in after.graph if n.op_type == "GatherBlockQuantized")
    head = next(n for n in after.graph if n.name == "lm_head.MatMulNBits")
    assert head.inputs[1].producer().inputs[0] is lookup.inputs[0]  # one table: the head reads a Reshape of its rows
    assert "model.embed_tokens.weight" not in after.graph.initializers
    assert relative(got, expected) <= EXACT_REL_TOL
    described = plan.describe()["tensors"]
    assert "shared" in described["model.embed_tokens"]["as"] and described["lm_head"]["source_type"] == "Q8_0"


def test_not_kept_types_stay_float_and_say_why(tmp_path):
    ckpt = load_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf", "F16", embedding_type="Q4_1"))
    plan = ckpt.tensors.source_quantization(tied=False)
    assert plan.kept == {}
    assert "min" in plan.not_kept["model.embed_tokens"] and "F16" in plan.not_kept["model.layers.0.mlp.up_proj"]
    model = build_decoder(ckpt)
    result = KeepSourceQuantizationPass(plan)(model)
    assert result.modified is False and "MatMulNBits" not in ops(model)


def test_plan_is_by_type():
    plan = plan_source_quantization({"a": "Q4_K", "b": "IQ2_XS", "model.embed_tokens": "Q6_K"}, load=None)
    assert set(plan.kept) == {"a", "model.embed_tokens"} and "IQ2_XS" in plan.not_kept["b"]
    assert plan.describe()["tensors"]["a"]["as"].startswith("MatMulNBits 4-bit block 32, per-block offset")


def test_refuses_a_graph_without_the_planned_linears(tmp_path):
    ckpt = load_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf", "Q4_0"))
    model = build_decoder(ckpt, BuildOptions(weight_dtype="fp16"))  # a Cast between each weight and its MatMul
    with pytest.raises(ValueError, match="fp32 storage"):
        KeepSourceQuantizationPass(ckpt.tensors.source_quantization(tied=False))(model)
