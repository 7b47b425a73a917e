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
