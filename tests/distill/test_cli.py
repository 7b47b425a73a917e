"""`quantlab distill` through the real CLI: shrinking end to end, and bad input as one line with exit 2."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from quantlab import api  # noqa: E402
from quantlab.cli.main import main  # noqa: E402
from quantlab.io import load_checkpoint  # noqa: E402
from tests.models import model_path  # noqa: E402


@pytest.fixture()
def quantlab(capsys):
    """Run the CLI in this process: (exit code, stdout, stderr)."""

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_shrink_keeps_the_chosen_layers_and_converts(tmp_path, quantlab):
    stories = model_path("stories260K.bin")
    code, out, err = quantlab(
        "distill", stories, "-o", tmp_path / "small", "--mode", "shrink", "--layers", "3",
        "--samples", "16", "--seq-len", "32", "--steps", "4", "--batch", "4", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "wrote" in out
    student = load_checkpoint(tmp_path / "small")
    assert student.spec.num_layers == 3 and student.prequantized is None
    teacher = load_checkpoint(stories)
    # the norms are trained but start from (and stay near) the teacher's layers 0, 2, 4
    description = json.loads((tmp_path / "small" / "distill.json").read_text())
    assert description["kept_layers"] == [0, 2, 4]
    assert description["data"]["sequences"] == 16
    assert student.tensors.load("model.layers.1.mlp.down_proj.weight").shape == (64, 172)
    assert teacher.spec.num_layers == 5
    api.convert(tmp_path / "small", tmp_path / "art", progress=False)
    assert len(api.generate_ids(tmp_path / "art", [1], max_new_tokens=4, stop_ids=[])) == 4


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--mode", "shrink"], ["--layers"]),
        (["--mode", "shrink", "--layers", "5"], ["--layers", "< 5"]),
        (["--recipe", "w4a16-g33"], ["--recipe", "group size"]),
        (["--recipe", "fp32"], ["--recipe", "weight-only"]),
        (["--init", "random"], ["--init", "rtn"]),
        (["--steps", "0"], ["--steps"]),
        (["--lr", "nan"], ["--lr"]),
        (["--data", "missing.txt"], ["missing.txt", "not found"]),
        (["--seq-len", "100000"], ["--seq-len", "context"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, quantlab, args, words):
    code, _, err = quantlab("distill", model_path("stories260K.bin"), "-o", tmp_path / "s", "--no-progress", *args)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantlab: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "s").exists()


def test_missing_teacher_and_existing_output(tmp_path, quantlab):
    code, _, err = quantlab("distill", tmp_path / "nope.bin", "-o", tmp_path / "s")
    assert code == 2 and "nope.bin" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "s").mkdir()
    code, _, err = quantlab("distill", model_path("stories260K.bin"), "-o", tmp_path / "s")
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. One day, "
    "she saw a big dog in the park. The dog was friendly and wanted to play. Lily and the dog ran and "
    "laughed all day. When the sun went down, Lily went home happy. "
) * 8


def test_draft_with_a_pruned_head_trains_on_the_data_and_converts_to_the_same_tokens(tmp_path, quantlab):
    """distill --loss ce --head-vocab: the loss goes down without a teacher forward; convert --head-vocab on
    the same text keeps the same tokens; the draft speculates for the fp32 target token for token."""
    from quantlab.runtime.generate import OrtDecoder, generate
    from quantlab.runtime.speculative import generate_speculative

    stories = model_path("stories260K.bin")
    text = tmp_path / "story.txt"
    text.write_text(STORY)
    code, _, err = quantlab(
        "distill", stories, "-o", tmp_path / "small", "--mode", "shrink", "--layers", "2", "--data", text,
        "--seq-len", "64", "--steps", "30", "--batch", "4", "--lr", "1e-3", "--warmup", "3", "--loss", "ce",
        "--head-vocab", "80", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    description = json.loads((tmp_path / "small" / "distill.json").read_text())
    losses = description["losses"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert description["head_vocab"]["kept"] == 80 and description["head_vocab"]["coverage"] == 1.0
    table = "model.embed_tokens.weight"  # the token table (the tied head) stays the teacher's
    assert (
        load_checkpoint(tmp_path / "small").tensors.load(table) == load_checkpoint(stories).tensors.load(table)
    ).all()
    code, _, err = quantlab(
        "convert", tmp_path / "small", "-o", tmp_path / "draft", "--recipe", "w8a16-g128", "--head-vocab", "80",
        "--head-vocab-data", text, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    pruned = json.loads((tmp_path / "draft" / "manifest.json").read_text())["head_vocab"]
    assert pruned["kept_sha256"] == description["head_vocab"]["kept_sha256"]
    assert pruned["coverage"] == 1.0
    api.convert(stories, tmp_path / "target", progress=False)
    target, draft = OrtDecoder(tmp_path / "target", threads=1), OrtDecoder(tmp_path / "draft", threads=1)
    prompt = [1, 403, 407, 261]
    result = generate_speculative(target, draft, prompt, max_new_tokens=64, k=3)
    assert result.ids == list(generate(target, prompt, max_new_tokens=64))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--head-vocab", "64"], ["--head-vocab", "shrink"]),
        (["--mode", "shrink", "--layers", "2", "--head-vocab", "512"], ["--head-vocab", "vocabulary size"]),
        (["--mode", "shrink", "--layers", "2", "--loss", "ce", "--hidden-weight", "1"], ["--hidden-weight", "ce"]),
    ],
)
def test_bad_draft_options_are_one_line_and_exit_2(tmp_path, quantlab, args, words):
    code, _, err = quantlab("distill", model_path("stories260K.bin"), "-o", tmp_path / "s", "--no-progress", *args)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and all(word in lines[0] for word in words), err
    assert not (tmp_path / "s").exists()
