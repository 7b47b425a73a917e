"""`quantlab bench TARGET --draft DRAFT_ART`: speculative rows beside the plain ones, in the JSON and the table."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from quantlab.bench.report import markdown
from quantlab.cli.main import main
from tests.bench.conftest import TINY

GEN = "12"


@pytest.fixture(scope="module")
def spec_run(stories_fp32, stories_w8, tmp_path_factory):
    """(document, stdout) of one bench of w8 (the target) with fp32 as the draft, on onnxruntime and torch."""
    out = tmp_path_factory.mktemp("bench-speculative") / "latency_speculative.json"
    argv = ["bench", str(stories_w8), *TINY, "--gen", GEN, "--backend", "onnxruntime", "--backend", "torch-kernels"]
    argv += ["--draft", str(stories_fp32), "--draft-tokens", "3", "--json", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return json.loads(out.read_text()), stdout.getvalue()


def _speculative_rows(doc: dict) -> list[dict]:
    return [r for r in doc["results"] if r.get("mode") == "speculative"]


def test_speculative_rows_report_acceptance_and_effective_tpot(spec_run, stories_fp32):
    doc, _ = spec_run
    rows = _speculative_rows(doc)
    assert [r["backend"] for r in rows] == ["onnxruntime", "torch-kernels"]
    for row in rows:
        assert row["status"] == "ok", row.get("reason")
        assert row["draft"] == str(stories_fp32) and row["draft_tokens"] == 3
        assert row["identical_to_plain"] is True  # greedy: the draft never changes the output
        assert len(row["generated_ids"]) == int(GEN)
        assert 0 <= row["acceptance_rate"] <= 1
        stats = row["stats"]
        assert stats["generated"] == int(GEN) and stats["target_forwards"] == stats["rounds"] + 1
        assert row["tokens_per_target_forward"] == pytest.approx(int(GEN) / stats["target_forwards"])
        tpot = row["effective_tpot_ms"]
        assert tpot["plain"] > 0 and tpot["speculative"] > 0
        assert row["tpot_ratio"] == pytest.approx(tpot["speculative"] / tpot["plain"])
        assert row["tpot_ms"]["n"] == 2 * (int(GEN) - 1)  # the plain steps of the measured runs
        assert row["prompt"].startswith("chat: ") and row["prompt_len"] > 8
    assert "speculative" in doc["method"]
    plain = [r for r in doc["results"] if r.get("mode") is None]
    assert {r["backend"] for r in plain} == {"onnxruntime", "torch-kernels"}  # the plain grid still runs


def test_speculative_table_is_its_own(spec_run, tmp_path):
    doc, stdout = spec_run
    assert "speculative decoding: chat prompt" in stdout
    block = stdout.split("speculative decoding: chat prompt")[1].split("\n\n")[0].splitlines()
    assert block[1].split()[:3] == ["variant", "draft", "backend"]
    assert [line.split()[2] for line in block[2:]] == ["onnxruntime", "torch-kernels"]
    assert all(line.endswith("x  yes") for line in block[2:])
    assert "speculative decoding" in markdown([(tmp_path / "latency_speculative.json", doc)], tmp_path)


def test_draft_of_another_vocabulary_is_refused(stories_fp32, stories_w8, tmp_path, capsys):
    other = tmp_path / "other-vocab"
    shutil.copytree(stories_fp32, other)
    config = json.loads((other / "genai_config.json").read_text())
    config["model"]["vocab_size"] = 32000
    (other / "genai_config.json").write_text(json.dumps(config))
    assert main(["bench", str(stories_w8), *TINY, "--draft", str(other)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(other / "genai_config.json") in err
    assert main(["bench", str(stories_w8), *TINY, "--draft", str(stories_fp32), "--draft-tokens", "0"]) == 2
    assert "--draft-tokens" in capsys.readouterr().err
