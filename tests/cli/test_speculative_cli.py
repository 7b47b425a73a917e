"""`quantlab generate ART --draft DRAFT_ART`: the same greedy ids as plain decoding, the statistics in --json,
and one-line errors (exit 2) for a draft that does not fit."""

from __future__ import annotations

import json
import shutil

import pytest

from quantlab.cli.main import main
from tests.models import model_path

ARGS = ["--prompt-ids", "1,403,407,261", "--greedy", "--json"]


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    out = tmp_path_factory.mktemp("speculative-cli") / "w4"
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(out), "--recipe", "w4a16-g32-sym"]
    assert main([*argv, "--no-eval", "--no-progress"]) == 0
    return out


def _generate(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_draft_gives_plain_greedy_ids_and_reports_acceptance(stories_artifact, draft, capsys, backend):
    if backend == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("quantlab.kernels.torch_ops", exc_type=ImportError)  # the w4 draft's matmuls
    common = [str(stories_artifact), *ARGS, "--max-new-tokens", "100", "--backend", backend]
    code, plain, err = _generate(capsys, *common)
    assert code == 0, err
    code, spec, err = _generate(capsys, *common, "--draft", str(draft), "--draft-tokens", "3")
    assert code == 0, err
    assert spec["ids"] == plain["ids"] and spec["text"] == plain["text"]
    stats = spec["speculative"]
    assert stats["draft"] == str(draft) and stats["draft_tokens"] == 3
    assert 0 < stats["acceptance_rate"] < 1
    assert stats["accepted"] <= stats["drafted"] <= 3 * stats["rounds"]
    assert stats["tokens_per_target_forward"] > 1


def test_draft_streams_the_same_text(stories_artifact, draft, capsys):
    argv = [str(stories_artifact), "--prompt", "Once upon a time", "--greedy", "--max-new-tokens", "40"]
    assert main(["generate", *argv]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", *argv, "--draft", str(draft)]) == 0
    assert capsys.readouterr().out == plain


def test_max_new_tokens_respected(stories_artifact, draft, capsys):
    for n in (1, 6, 13):
        code, spec, err = _generate(
            capsys, str(stories_artifact), *ARGS, "--max-new-tokens", str(n), "--draft", str(draft)
        )
        assert code == 0, err
        assert len(spec["ids"]) == n


def _one_line_error(capsys, *argv: str) -> str:
    code = main(["generate", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    return err


def test_vocabulary_mismatch_is_refused(stories_artifact, draft, tmp_path, capsys):
    other = tmp_path / "other-vocab"
    shutil.copytree(draft, other)
    config = json.loads((other / "genai_config.json").read_text())
    config["model"]["vocab_size"] = 49152
    (other / "genai_config.json").write_text(json.dumps(config))
    err = _one_line_error(capsys, str(stories_artifact), *ARGS, "--draft", str(other))
    assert str(other / "genai_config.json") in err and "vocab_size" in err


def test_bad_draft_flags_are_refused(stories_artifact, draft, tmp_path, capsys):
    err = _one_line_error(capsys, str(stories_artifact), *ARGS, "--draft", str(tmp_path))
    assert str(tmp_path) in err and "model.onnx" in err
    err = _one_line_error(capsys, str(stories_artifact), *ARGS, "--draft", str(draft), "--draft-tokens", "0")
    assert "--draft-tokens" in err
    err = _one_line_error(capsys, str(stories_artifact), *ARGS, "--draft", str(draft), "--kv-window", "8")
    assert "--kv-window" in err
