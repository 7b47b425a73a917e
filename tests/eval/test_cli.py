"""quantlab eval through the command line."""

from __future__ import annotations

import json

from quantlab.cli.main import main
from tests.models import golden

QUALITY_KEYS = {"ppl", "baseline_ppl", "kld_mean", "kld_median", "kld_p99_9", "kld_max", "top1_agreement", "tokens"}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv, "--no-progress", "--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_with_baseline_on_a_text_file(stories_fp32, stories_fp16, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(golden("stories260K_greedy.json")["text"], encoding="utf-8")
    code, out, err = run_cli(capsys, str(stories_fp16), "--baseline", str(stories_fp32), "--data", str(text), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert QUALITY_KEYS <= set(result)
    assert result["data"]["source"] == str(text) and result["data"]["sequences"] == 3  # 257 tokens / 128
    assert result["data"]["seq_len"] == 128 and len(result["data"]["sha256"]) == 64
    assert result["tokens"] == 127 + 127 + 0  # the last window holds one token: nothing to predict


def test_json_with_samples_is_reproducible(stories_fp32, stories_fp16, capsys):
    argv = (str(stories_fp16), "--baseline", str(stories_fp32), "--samples", "4", "--seq-len", "32", "--json")
    first = json.loads(run_cli(capsys, *argv)[1])
    assert first == json.loads(run_cli(capsys, *argv)[1])
    assert QUALITY_KEYS <= set(first) and first["tokens"] == 4 * 31
    other = json.loads(run_cli(capsys, *argv, "--seed", "1")[1])
    assert other["data"]["sha256"] != first["data"]["sha256"]


def test_without_baseline_only_perplexity(stories_fp32, capsys):
    code, out, _ = run_cli(capsys, str(stories_fp32), "--samples", "2", "--seq-len", "16", "--json")
    assert code == 0
    assert set(json.loads(out)) == {"candidate", "data", "tokens", "ppl"}
    code, out, _ = run_cli(capsys, str(stories_fp32), "--samples", "2", "--seq-len", "16")
    assert code == 0 and "perplexity" in out and "KL" not in out


def test_table_with_baseline(stories_fp32, capsys):
    code, out, _ = run_cli(
        capsys, str(stories_fp32), "--baseline", str(stories_fp32), "--samples", "2", "--seq-len", "16"
    )
    assert code == 0 and "KL divergence" in out and "top-1 agreement  100.00%" in out


def test_bad_input_exits_2_with_one_line(stories_fp32, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    cases = [
        ([str(stories_fp32), "--data", str(bad)], f"{bad}: line 2"),
        ([str(stories_fp32), "--data", str(tmp_path / "missing.txt")], "not found"),
        ([str(tmp_path), "--samples", "2"], "not an artifact folder"),
        ([str(stories_fp32), "--samples", "2", "--seq-len", "9999"], "context length"),
        ([str(stories_fp32), "--samples", "0"], "--samples"),
        ([str(stories_fp32), "--samples", "2", "--max-sequences", "1"], "--max-sequences"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert message in err and len(err.strip().splitlines()) == 1
