"""The README's table is generated: markdown from a results JSON, and the block between the markers replaced."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantlab.bench import report

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "make_readme_table.py"


@pytest.fixture
def results_dir(bench_run, tmp_path):
    """A results folder holding the session's benchmark JSON and its plot, as benchmarks/results would."""
    json_path, doc, _ = bench_run
    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(json_path, folder / "latency_test.json")
    shutil.copy(json_path.parent / doc["plot"], folder / doc["plot"])
    return folder


def _readme(tmp_path: Path, markers: bool) -> Path:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    if markers and report.START_MARKER not in text:
        text += f"\n## Performance\n\n{report.START_MARKER}\nold table\n{report.END_MARKER}\n\nAfter the block.\n"
    if not markers:
        text = text.replace(report.START_MARKER, "").replace(report.END_MARKER, "")
    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def test_markdown_table_from_json(bench_run, tmp_path):
    json_path, doc, _ = bench_run
    md = report.markdown([(json_path, doc)], tmp_path)
    lines = md.splitlines()
    header = "| " + " | ".join(report.COLUMNS) + " |"
    assert header in lines
    rows = [line for line in lines if line.startswith("| fp32 |") or line.startswith("| w8a16-g128-asym |")]
    assert len(rows) == 3  # fp32 and w8 on onnxruntime, w8 on torch-kernels
    assert all(line.count("|") == len(report.COLUMNS) + 1 for line in rows)
    assert "100.0%" in md  # the baseline's top-1 agreement with itself
    plot = (json_path.parent / doc["plot"]).relative_to(json_path.parent.parent)
    assert f"](../{plot.as_posix()})" in md  # linked relative to the folder the README is in


def test_script_replaces_only_the_block(results_dir, tmp_path):
    readme = _readme(tmp_path, markers=True)
    before = readme.read_text(encoding="utf-8")
    run = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results_dir), "--readme", str(readme)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    after = readme.read_text(encoding="utf-8")
    head, _, rest = after.partition(report.START_MARKER)
    block, _, tail = rest.partition(report.END_MARKER)
    assert head == before.partition(report.START_MARKER)[0] and tail == before.partition(report.END_MARKER)[2]
    assert "old table" not in block and "| w8a16-g128-asym | onnxruntime | 1 |" in block
    assert "](results/latency_test.png)" in block  # the plot, linked relative to the README
    check = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results_dir), "--readme", str(readme),
                            "--check"])  # fmt: skip
    assert check.returncode == 0


def test_script_fails_clearly_without_markers(results_dir, tmp_path):
    readme = _readme(tmp_path, markers=False)
    before = readme.read_text(encoding="utf-8")
    run = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results_dir), "--readme", str(readme)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 1
    assert report.START_MARKER in run.stderr and report.END_MARKER in run.stderr
    assert readme.read_text(encoding="utf-8") == before


def test_replace_block_needs_both_markers_in_order():
    text = f"a\n{report.START_MARKER}\nx\n{report.END_MARKER}\nb\n"
    assert report.replace_block(text, "new") == f"a\n{report.START_MARKER}\nnew\n{report.END_MARKER}\nb\n"
    for broken in ("a\nb\n", f"{report.START_MARKER}\n", f"{report.END_MARKER}\n{report.START_MARKER}\n"):
        with pytest.raises(ValueError, match="bench:start"):
            report.replace_block(broken, "new")


def test_goal_line_compares_w4_with_fp32():
    def row(variant: str, tpot: float) -> dict:
        return {"status": "ok", "variant": variant, "model": "m", "threads": 2, "backend": "onnxruntime",
                "context": None, "tpot_ms": {"median": tpot}}  # fmt: skip

    lines = report.goal_lines({"results": [row("fp32", 30.0), row("w4a16-g128-asym", 9.0)]})
    assert lines == ["w4a16-g128-asym on onnxruntime / fp32 on onnxruntime, threads 2: TPOT ratio 0.30 "
                     "(goal <= 0.33: met)"]  # fmt: skip


def test_a_batch_column_only_when_batches_were_measured():
    row = {"variant": "w4", "backend": "onnxruntime", "threads": 2, "status": "unavailable", "reason": "why"}
    single = {"results": [{**row, "batch": 1}]}
    assert report.columns(single) == report.COLUMNS
    batched = {"results": [{**row, "batch": 1}, {**row, "batch": 16}]}
    head = report.columns(batched)
    assert head[3] == "batch" and len(head) == len(report.COLUMNS) + 1
    cells = report.row_cells(batched["results"][1], {}, batch=True)
    assert cells[:5] == ["w4", "onnxruntime", "2", "16", "unavailable [1]"] and len(cells) == len(head)


def test_attention_is_labelled_when_a_run_mixes_plain_and_fused():
    row = {"variant": "w4a16-g32-asym", "backend": "onnxruntime", "threads": 2, "status": "unavailable", "reason": "x"}
    mixed = {"results": [{**row, "attention": "fused"}, {**row, "attention": "plain"}]}
    assert report.mixes_attention(mixed) and not report.mixes_attention({"results": mixed["results"][:1]})
    assert report.row_cells(mixed["results"][0], {}, attention=True)[0] == "w4a16-g32-asym fused"
    assert report.row_cells(mixed["results"][0], {})[0] == "w4a16-g32-asym"
