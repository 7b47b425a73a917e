"""convert -> generate -> inspect through the CLI on the real checkpoints, against their golden outputs."""

from __future__ import annotations

import json

from quantlab.cli.main import main
from tests.cli.conftest import SMOLLM2
from tests.models import golden, model_path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def generate_json(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, "generate", *argv, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_stories260k_reproduces_golden_greedy_ids_and_text(stories_artifact, capsys):
    g = golden("stories260K_greedy.json")
    expected = g["ids"][1:]
    result = generate_json(
        capsys, str(stories_artifact), "--prompt-ids", "1", "--greedy", "--max-new-tokens", str(len(expected))
    )
    assert result["ids"] == expected
    assert result["text"] == g["text"]


def test_stories260k_text_prompt_is_encoded_with_bos(stories_artifact, capsys):
    result = generate_json(
        capsys, str(stories_artifact), "--prompt", "Once upon a time", "--greedy", "--max-new-tokens", "8"
    )
    assert result["prompt_ids"][0] == 1
    assert len(result["ids"]) == 8


def test_sampling_is_reproducible_and_seed_dependent(stories_artifact, capsys):
    args = [
        str(stories_artifact),
        "--prompt-ids",
        "1",
        "--max-new-tokens",
        "24",
        "--temperature",
        "1.0",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
    ]
    a = generate_json(capsys, *args, "--seed", "7")
    b = generate_json(capsys, *args, "--seed", "7")
    c = generate_json(capsys, *args, "--seed", "8")
    assert a["ids"] == b["ids"]
    assert a["ids"] != c["ids"]


def test_smollm2_matches_golden_greedy_ids(smollm2_artifact, capsys):
    g = golden("smollm2_greedy.json")
    for case in g["cases"]:
        expected = case["greedy_ids"]
        result = generate_json(
            capsys,
            str(smollm2_artifact),
            "--prompt-ids",
            ",".join(map(str, case["prompt_ids"])),
            "--greedy",
            "--max-new-tokens",
            str(len(expected)),
            "--ignore-eos",
        )
        n = min(16, len(expected))
        assert result["ids"][:n] == expected[:n], case["name"]


def test_smollm2_chat_answers_paris(smollm2_artifact, capsys):
    case = next(c for c in golden("smollm2_greedy.json")["cases"] if c["chat"])
    result = generate_json(
        capsys, str(smollm2_artifact), "--prompt", case["prompt"], "--chat", "--greedy", "--max-new-tokens", "32"
    )
    assert result["prompt_ids"] == case["prompt_ids"]
    assert result["text"].strip() == "The capital of France is Paris."


def test_smollm2_story_text_prompt(smollm2_artifact, capsys):
    case = next(c for c in golden("smollm2_greedy.json")["cases"] if c["name"] == "story")
    result = generate_json(
        capsys, str(smollm2_artifact), "--prompt", case["prompt"], "--greedy", "--max-new-tokens", "16"
    )
    assert result["prompt_ids"] == case["prompt_ids"]
    assert result["ids"] == case["greedy_ids"][:16]


def test_inspect_reports_graph_and_provenance(smollm2_artifact, capsys):
    code, out, err = run_cli(capsys, "inspect", str(smollm2_artifact), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["parameters"] == 134_515_008
    # the default graph is the fused one: 7 linears per layer and the head; attention is one op per layer
    assert info["ops"]["MatMul"] == 30 * 7 + 1
    assert info["ops"]["com.microsoft.GroupQueryAttention"] == info["ops"]["com.microsoft.RotaryEmbedding"] // 2 == 30
    assert [v["name"] for v in info["inputs"][:3]] == ["input_ids", "attention_mask", "position_ids"]
    assert info["inputs"][3]["shape"] == ["batch_size", 3, "past_sequence_length", 64]
    assert info["source"]["format"] == "gguf"
    assert len(info["source"]["files"][SMOLLM2]) == 64
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "config.json", "tokenizer.json"} <= set(info["files"])
    assert (smollm2_artifact / "manifest.json").is_file()  # it lists every file but itself
    code, out, _ = run_cli(capsys, "inspect", str(smollm2_artifact))
    assert code == 0 and "parameters 134,515,008" in out


def test_same_input_same_bytes(stories_artifact, tmp_path):
    again = tmp_path / "again"
    assert main(["convert", str(model_path("stories260K.bin")), "-o", str(again), "--no-progress"]) == 0
    first = json.loads((stories_artifact / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert first["files"] == second["files"]
    assert (stories_artifact / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()


def test_fp16_storage_halves_the_weights(stories_artifact, tmp_path, capsys):
    out = tmp_path / "fp16"
    assert (
        main(["convert", str(model_path("stories260K.bin")), "-o", str(out), "--dtype", "fp16", "--no-progress"]) == 0
    )
    fp32 = (stories_artifact / "model.onnx.data").stat().st_size
    fp16 = (out / "model.onnx.data").stat().st_size
    assert 0.45 < fp16 / fp32 < 0.55
    capsys.readouterr()
    result = generate_json(capsys, str(out), "--prompt-ids", "1", "--greedy", "--max-new-tokens", "16")
    assert result["ids"] == golden("stories260K_greedy.json")["ids"][1:17]
