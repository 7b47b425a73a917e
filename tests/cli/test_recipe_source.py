"""convert --recipe source: a GGUF's own quantization kept, through the CLI (tiny GGUF; the real SmolLM2 Q4_1)."""

from __future__ import annotations

import json

import pytest

from quantlab import api
from quantlab.cli.main import main
from quantlab.errors import InputError
from quantlab.recipe import load_recipe, recipe_from_dict
from tests.cli.conftest import SMOLLM2
from tests.models import golden, model_path
from tests.passes.test_keep_source_quantization import LAYERS, write_tiny_gguf
from tests.tiny import tiny_checkpoint

# The acceptance for SmolLM2-135M Q4_1: the artifact (model.onnx + data) at most 100 MB, and
# the KL divergence against the fp32 artifact of the same GGUF at most 0.005. The fp32 artifact holds
# the GGUF's dequantization, so what is left is MatMulNBits' int8 activations (accuracy_level 4).
MAX_BYTES = 100_000_000
MAX_KLD = 0.005


def test_source_recipe_round_trips():
    recipe = load_recipe("source")
    assert recipe.keep_source and recipe.scheme is None and recipe.name == "source"
    assert recipe_from_dict(recipe.to_dict()) == recipe
    with pytest.raises(InputError, match="give no scheme"):
        recipe_from_dict({"keep_source": True, "scheme": "w4a16-g32-asym"})


def test_source_needs_a_gguf():
    with pytest.raises(InputError, match="keeps a GGUF's own quantization"):
        api.source_quantization(tiny_checkpoint())


def test_convert_keeps_a_tiny_gguf_and_says_so(tmp_path, capsys):
    source = write_tiny_gguf(tmp_path / "tiny.gguf", "Q4_K", tied=True)
    out = tmp_path / "out"
    assert main(["convert", str(source), "-o", str(out), "--recipe", "source", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    kept = manifest["source_quantization"]
    assert (kept["kept"], kept["not_kept"]) == (7 * LAYERS + 2, 0)
    assert kept["tensors"]["model.layers.0.mlp.up_proj"]["source_type"] == "Q4_K"
    assert manifest["recipe"]["keep_source"] is True
    assert [p["pass"] for p in manifest["passes"][:2]] == ["KeepSourceQuantizationPass", "ShareTiedEmbeddingPass"]
    assert manifest["quality"]["kld_mean"] < 0.05  # random weights; int8 activations in MatMulNBits


@pytest.fixture(scope="module")
def smollm2_source(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "source"
    assert main(["convert", str(model_path(SMOLLM2)), "-o", str(out), "--recipe", "source", "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_smollm2_source_is_small_and_close(smollm2_source):
    manifest = json.loads((smollm2_source / "manifest.json").read_text())
    size = sum((smollm2_source / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    assert size <= MAX_BYTES
    assert manifest["quality"]["kld_mean"] <= MAX_KLD
    assert manifest["source_quantization"]["not_kept"] == 0
    types = {t["source_type"] for t in manifest["source_quantization"]["tensors"].values()}
    assert types == {"Q4_1", "Q8_0"}


@pytest.fixture(scope="module")
def smollm2_source_fp32_compute(tmp_path_factory):
    """The same codes with MatMulNBits computing in fp32 (accuracy_level 0): the GGUF's own weights
    up to fp32 rounding, so the greedy golden of the dequantized fp32 model holds token for token."""
    folder = tmp_path_factory.mktemp("smollm2-exact")
    recipe = folder / "source-fp32.toml"
    recipe.write_text("keep_source = true\naccuracy_level = 0\n")
    out = folder / "out"
    argv = ["convert", str(model_path(SMOLLM2)), "-o", str(out), "--recipe", str(recipe), "--no-progress", "--no-eval"]
    assert main(argv) == 0
    return out


def greedy(artifact, prompt_ids, n: int, capsys) -> list[int]:
    argv = [str(artifact), "--prompt-ids", ",".join(map(str, prompt_ids)), "--greedy", "--max-new-tokens", str(n)]
    assert main(["generate", *argv, "--ignore-eos", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"]


@pytest.mark.slow
def test_smollm2_source_generates_the_golden_continuation(smollm2_source_fp32_compute, capsys):
    for case in golden("smollm2_greedy.json")["cases"]:
        n = min(16, len(case["greedy_ids"]))
        assert greedy(smollm2_source_fp32_compute, case["prompt_ids"], n, capsys) == case["greedy_ids"][:n], case[
            "name"
        ]


@pytest.mark.slow
def test_onnxruntime_genai_runs_the_source_artifact(smollm2_source, capsys):
    """onnxruntime-genai reads the default artifact (int8 activations in MatMulNBits: near-ties of the
    fp32 model may flip, so the reference is quantlab's own generation from the same artifact)."""
    from tests.cli.test_clients import genai_greedy

    case = next(c for c in golden("smollm2_greedy.json")["cases"] if c["chat"])
    ours = greedy(smollm2_source, case["prompt_ids"], 16, capsys)
    theirs = genai_greedy(smollm2_source, case["prompt_ids"], 16)  # stops at end-of-sequence
    assert theirs and theirs == ours[: len(theirs)]
