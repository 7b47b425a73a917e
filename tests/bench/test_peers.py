"""Peers in one `quantlab bench`: onnxruntime-genai's model builder output (run by onnxruntime and by genai's own
loop) beside transformers on the Hugging Face folder it came from, and llama.cpp on a GGUF file."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from quantlab.bench.backends import BACKENDS
from quantlab.bench.targets import describe_target
from quantlab.cli.main import main
from quantlab.errors import InputError
from tests.models import model_path

TINY = ["--prompt-len", "8", "--gen", "6", "--runs", "2", "--threads", "1", "--roofline-mib", "16"]
VOCAB = 128

LLAMA_CPP_REASON = BACKENDS["llama.cpp"].why_unavailable()
requires_llama_cpp = pytest.mark.skipif(LLAMA_CPP_REASON is not None, reason=f"llama.cpp: {LLAMA_CPP_REASON}")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random 2-layer Llama written by save_pretrained, with a word-level tokenizer of its vocabulary."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("peers") / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="t0")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def builder_fp32(tiny_hf):
    """onnxruntime-genai's model builder on the tiny folder, fp32 so that transformers is an exact oracle."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    out = tiny_hf.parent / "builder"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_hf), "-o", str(out)]
    command += ["-p", "fp32", "-e", "cpu", "-c", str(tiny_hf.parent / "cache")]
    subprocess.run(command, check=True, capture_output=True)
    return out


def test_a_builder_artifact_is_described_from_its_graph(builder_fp32):
    assert not (builder_fp32 / "manifest.json").exists()
    target = describe_target(builder_fp32)
    assert target.kind == "artifact" and target.producer == "onnxruntime-genai"
    assert target.variant == "float (onnxruntime-genai)" and not target.quantized
    assert target.vocab_size == VOCAB and target.max_positions == 256 and target.cache_dtype == "float32"
    files = ("model.onnx", "model.onnx.data")
    assert target.size_bytes == sum((builder_fp32 / f).stat().st_size for f in files)
    runs = {name for name, backend in BACKENDS.items() if backend.accepts(target)}
    assert {"onnxruntime", "onnxruntime-genai"} <= runs and "torch-kernels" not in runs


def test_one_run_puts_the_peers_side_by_side(builder_fp32, tiny_hf, tmp_path):
    """The builder's graph in onnxruntime and in genai, and transformers on its source: the same greedy tokens,
    one sequence or the first of a batch of 2."""
    out = tmp_path / "peers.json"
    argv = ["bench", str(builder_fp32), str(tiny_hf), *TINY, "--batch", "1,2", "--model-label", "tiny"]
    for backend in ("onnxruntime", "onnxruntime-genai", "transformers-fp32"):
        argv += ["--backend", backend]
    assert main([*argv, "--json", str(out)]) == 0
    rows = {(r["backend"], r["batch"]): r for r in json.loads(out.read_text())["results"]}
    assert rows["transformers-fp32", 2]["status"] == "unavailable"
    expected = rows["transformers-fp32", 1]["generated_ids"]
    for key in [("onnxruntime", 1), ("onnxruntime", 2), ("onnxruntime-genai", 1), ("onnxruntime-genai", 2)]:
        row = rows[key]
        assert row["status"] == "ok", row["reason"]
        assert row["generated_ids"] == expected and row["prompt_len"] == 8 and row["target"] == str(builder_fp32)
        assert math.isclose(row["tokens_per_s"], key[1] * 1e3 / row["tpot_ms"]["median"], rel_tol=1e-9)


def test_genai_prefills_again_in_a_context_sweep(builder_fp32, tmp_path):
    out = tmp_path / "sweep.json"
    argv = ["bench", str(builder_fp32), *TINY, "--contexts", "16", "--backend", "onnxruntime-genai", "--json", str(out)]
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "ok" and row["ttft_ms"]["n"] == 2 and not row["ttft_ms"]["cold_single_prefill"]


def test_a_folder_without_the_decoder_contract_is_refused(tmp_path):
    import onnx

    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Identity", ["x"], ["y"])],
        "not-a-decoder",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(h.make_model(graph), tmp_path / "model.onnx")
    with pytest.raises(InputError, match="genai_config.json"):
        describe_target(tmp_path)
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"vocab_size": 4}}))
    with pytest.raises(InputError, match="not a decoder"):
        describe_target(tmp_path)


def test_a_gguf_variant_names_its_file_type():
    assert describe_target(model_path("SmolLM2-135M-Instruct.Q4_1.gguf")).variant == "gguf Q4_1"


@requires_llama_cpp
def test_llama_cpp_session_decodes_and_rewinds():
    from quantlab.bench.backends import LlamaCppSession

    session = LlamaCppSession(model_path("SmolLM2-135M-Instruct.Q4_1.gguf"), threads=1, max_tokens=64)
    assert session.vocab_size == 49152 and session.info()["use_extra_bufts"] is False
    prompt = np.random.default_rng(0).integers(0, session.vocab_size, 16).tolist()
    first = session.prefill(prompt, chunk=5)  # several llama_decode calls
    session.mark()
    run = [session.decode(first)]
    for _ in range(4):
        run.append(session.decode(run[-1]))
    session.rewind()
    again = [session.decode(first)]
    for _ in range(4):
        again.append(session.decode(again[-1]))
    assert again == run and session.n_tokens == 16 + 5
    assert session.prefill(prompt, chunk=512) == first


@requires_llama_cpp
def test_llama_cpp_rows_in_bench(tmp_path):
    out = tmp_path / "llama.json"
    gguf = model_path("SmolLM2-135M-Instruct.Q4_1.gguf")
    argv = ["bench", str(gguf), *TINY, "--backend", "llama.cpp", "--batch", "1,2", "--json", str(out)]
    assert main(argv) == 0
    rows = {r["batch"]: r for r in json.loads(out.read_text())["results"]}
    assert rows[1]["status"] == "ok", rows[1]["reason"]
    assert rows[1]["variant"] == "gguf Q4_1" and len(rows[1]["generated_ids"]) == 6
    assert rows[2]["status"] == "unavailable" and "one sequence" in rows[2]["reason"]


@pytest.mark.slow
def test_f32_gguf_holds_the_dequantized_weights(tmp_path):
    """The f32 GGUF that llama.cpp's quantizer starts from: the same tensors as quantlab reads from the source."""
    from quantlab.bench.peers import write_f32_gguf
    from quantlab.io import load_checkpoint

    source = model_path("SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path / "f32.gguf"
    write_f32_gguf(source, out)
    assert describe_target(out).variant == "gguf F32"
    original, copy = load_checkpoint(source), load_checkpoint(out)
    assert copy.spec == original.spec
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        np.testing.assert_array_equal(copy.tensors.load(name), original.tensors.load(name))


def test_llama_cpp_keeps_its_fast_buffers_except_on_amx_cpus(tmp_path):
    from quantlab.bench.peers import llama_cpp_extra_buffers

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert llama_cpp_extra_buffers(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n")
    assert not llama_cpp_extra_buffers(cpuinfo)
    assert llama_cpp_extra_buffers(tmp_path / "absent")
