"""`quantlab bench` end to end on stories260K: what the JSON, the table and the plot hold (no timing thresholds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from quantlab.bench.backends import BACKENDS
from quantlab.cli.main import main
from tests.bench.conftest import TINY
from tests.models import model_path

ROW_KEYS = {
    "model", "variant", "backend", "threads", "prompt_len", "context", "gen", "target", "kind", "size_bytes",
    "status", "reason", "ttft_ms", "tpot_ms", "tokens_per_s", "peak_rss_bytes", "weight_bytes_per_step",
    "bandwidth_GBps", "roofline_pct", "load_s", "affinity", "backend_info", "generated_ids", "noisy",
    "step_spread", "run_spread",
}  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ok_rows(doc: dict) -> list[dict]:
    return [r for r in doc["results"] if r["status"] == "ok"]


def test_json_has_every_key_per_artifact(bench_run, stories_fp32, stories_w8):
    _, doc, _ = bench_run
    assert {
        "benchmark",
        "schema",
        "config",
        "method",
        "machine",
        "roofline_GBps",
        "targets",
        "results",
        "warnings",
    } <= set(doc)
    machine = doc["machine"]
    assert {"cpu", "cores", "affinity", "versions", "loadavg_start", "loadavg_end", "others_cpu_share"} <= set(machine)
    assert 0 <= machine["others_cpu_share"] <= 1
    assert {"onnxruntime", "numpy", "torch", "quantlab"} <= set(machine["versions"])
    ort_rows = [r for r in doc["results"] if r["backend"] == "onnxruntime"]
    assert sorted(r["variant"] for r in ort_rows) == ["fp32", "w8a16-g128-asym"]
    for row in ort_rows:
        assert row["status"] == "ok", row["reason"]
        assert ROW_KEYS <= set(row)
        assert row["threads"] == 1 and row["prompt_len"] == 8 and row["gen"] == 4
        assert len(row["generated_ids"]) == 4
        assert row["tpot_ms"]["n"] == 2 * 3  # runs x (gen - 1) decode steps
        assert row["ttft_ms"]["n"] == 2


def test_times_are_positive_and_consistent(bench_run):
    for row in _ok_rows(bench_run[1]):
        ttft, tpot = row["ttft_ms"], row["tpot_ms"]
        assert ttft["median"] > 0 and tpot["median"] > 0
        assert tpot["p90"] >= tpot["median"] and ttft["p90"] >= ttft["median"]
        assert math.isclose(row["tokens_per_s"], 1e3 / tpot["median"], rel_tol=1e-9)
        assert row["peak_rss_bytes"] > 0
        expected_bw = row["weight_bytes_per_step"] / (tpot["median"] / 1e3) / 1e9
        assert math.isclose(row["bandwidth_GBps"], expected_bw, rel_tol=1e-9)
        assert math.isclose(row["roofline_pct"], 100 * expected_bw / bench_run[1]["roofline_GBps"]["1"], rel_tol=1e-9)


def test_sizes_equal_the_manifest(bench_run):
    targets = {t["path"]: t for t in bench_run[1]["targets"]}
    for row in _ok_rows(bench_run[1]):
        files = json.loads((Path(row["target"]) / "manifest.json").read_text())["files"]
        assert row["size_bytes"] == sum(f["bytes"] for f in files.values())
        # every initializer byte is either streamed per step or in the gathered embedding table
        target = targets[row["target"]]
        # (stories260K's tied head shares the table, so nothing is only gathered: embedding_bytes is 0)
        assert target["embedding_bytes"] >= 0 and row["weight_bytes_per_step"] == target["weight_bytes_per_step"]
        streamed_or_gathered = target["weight_bytes_per_step"] + target["embedding_bytes"]
        data, graph = files["model.onnx.data"]["bytes"], files["model.onnx"]["bytes"]
        assert data <= streamed_or_gathered <= data + graph


def test_quality_columns_against_the_baseline(bench_run):
    rows = {r["variant"]: r for r in _ok_rows(bench_run[1]) if r["backend"] == "onnxruntime"}
    assert rows["fp32"]["quality"]["kld_mean"] == pytest.approx(0, abs=1e-9)
    assert rows["fp32"]["quality"]["top1_agreement"] == 1.0
    w8 = rows["w8a16-g128-asym"]["quality"]
    assert w8["kld_mean"] > 0 and 0 < w8["top1_agreement"] <= 1 and w8["tokens"] == 2 * 127


def test_torch_kernels_row_runs_or_says_why(bench_run):
    rows = [r for r in bench_run[1]["results"] if r["backend"] == "torch-kernels"]
    assert [r["variant"] for r in rows] == ["w8a16-g128-asym"]  # quantized artifacts only
    reason = BACKENDS["torch-kernels"].why_unavailable()
    assert rows[0]["status"] == ("ok" if reason is None else "unavailable")
    if reason is not None:
        assert rows[0]["reason"] == reason and "torch" in reason


def test_table_and_plot(bench_run):
    json_path, doc, stdout = bench_run
    assert "TPOT ms" in stdout and "w8a16-g128-asym" in stdout and "roofline" in stdout
    png = json_path.parent / doc["plot"]
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_context_sweep_skips_what_the_model_cannot_hold(stories_fp32, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = ["bench", str(stories_fp32), *TINY, "--contexts", "16,1024", "--backend", "onnxruntime",
            "--json", str(out), "--plot", str(tmp_path / "sweep.png")]  # fmt: skip
    assert main(argv) == 0
    rows = {r["context"]: r for r in json.loads(out.read_text())["results"]}
    assert rows[16]["status"] == "ok" and rows[16]["prompt_len"] == 16
    assert rows[16]["ttft_ms"]["n"] == 1 and rows[16]["tpot_ms"]["n"] == 2 * 3
    assert rows[1024]["status"] == "skipped" and "512" in rows[1024]["reason"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert "skipped [1]" in capsys.readouterr().out


def test_transformers_baseline_generates_what_onnxruntime_generates(stories_fp32, tmp_path):
    """The same greedy tokens from the same weights: transformers (llama2.c rows re-laid for its RoPE) and ours."""
    out = tmp_path / "hf.json"
    argv = [
        "bench",
        str(stories_fp32),
        str(model_path("stories260K.bin")),
        *TINY,
        "--gen",
        "6",
        "--backend",
        "onnxruntime",
        "--backend",
        "transformers-fp32",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["transformers-fp32"]["status"] == "ok", rows["transformers-fp32"]["reason"]
    assert rows["transformers-fp32"]["generated_ids"] == rows["onnxruntime"]["generated_ids"]
    assert rows["transformers-fp32"]["prompt_ids_head"] == rows["onnxruntime"]["prompt_ids_head"]
    assert "quantlab reader" in rows["transformers-fp32"]["backend_info"]["loader"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--gen", "1"], "--gen"), (["--runs", "0"], "--runs"), (["--contexts", "0"], "--contexts")],
)
def test_bad_input_exits_2(stories_fp32, capsys, extra, message):
    assert main(["bench", str(stories_fp32), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_target_exits_2(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope"), *TINY]) == 2
    assert "not found" in capsys.readouterr().err


def test_batch_rows_report_the_batch_throughput(stories_fp32, tmp_path, capsys):
    out = tmp_path / "batch.json"
    argv = ["bench", str(stories_fp32), *TINY, "--batch", "1,3", "--backend", "onnxruntime", "--json", str(out)]
    assert main(argv) == 0
    rows = {r["batch"]: r for r in json.loads(out.read_text())["results"]}
    assert sorted(rows) == [1, 3] and all(r["status"] == "ok" for r in rows.values())
    assert rows[3]["generated_ids"] == rows[1]["generated_ids"]  # the first prompt of the batch is batch 1's
    assert math.isclose(rows[3]["tokens_per_s"], 3e3 / rows[3]["tpot_ms"]["median"], rel_tol=1e-9)
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("variant"))
    assert header.split()[:4] == ["variant", "backend", "threads", "batch"]


def test_native_runtime_batch_rows(stories_w8, tmp_path):
    """torch-kernels decodes a batch through the native layers (mask and positions): the first prompt of the
    batch gives batch 1's tokens, and the batch rows carry their throughput."""
    out = tmp_path / "batch.json"
    argv = ["bench", str(stories_w8), *TINY, "--batch", "1,3", "--backend", "torch-kernels", "--json", str(out)]
    assert main(argv) == 0
    rows = {r["batch"]: r for r in json.loads(out.read_text())["results"]}
    assert sorted(rows) == [1, 3] and all(r["status"] == "ok" for r in rows.values()), rows
    assert rows[3]["generated_ids"] == rows[1]["generated_ids"]
    assert rows[3]["tokens_per_s"] > 0


def test_genai_leaves_out_an_artifact_it_cannot_run(stories_fp32, tmp_path):
    """An artifact whose genai_config says onnxruntime-genai cannot run it (the per-token int8 cache) gets no
    onnxruntime-genai cell, instead of a failed row with genai's parse error; an fp32-cache one does."""
    from quantlab.bench.targets import describe_target

    int8 = tmp_path / "kv-int8"
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(int8), "--kv", "int8", "--no-eval"]
    assert main([*argv, "--no-progress"]) == 0
    note = json.loads((int8 / "genai_config.json").read_text())["model"]["decoder"]["kv_cache"]["onnxruntime_genai"]
    assert "cannot run" in note
    genai = BACKENDS["onnxruntime-genai"]
    assert not genai.accepts(describe_target(int8))
    assert genai.accepts(describe_target(stories_fp32))
