"""benchmarks/bench_accuracy_levels.py's README table: rendered from its JSON, the ratio against onnxruntime
computed from the two medians, and the repository's README block in step with the committed results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports common.py and bench_kernels.py from its own folder
_spec = importlib.util.spec_from_file_location("bench_accuracy_levels", BENCHMARKS / "bench_accuracy_levels.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _row(impl, level, ms, err, m=16):
    return {"shape": "head", "K": 576, "N": 49152, "bits": 8, "block_size": 128, "M": m, "implementation": impl,
            "accuracy_level": level, "median_ms": ms, "gmac_per_s": 1.0, "mean_rel_err": err}  # fmt: skip


def test_readme_block_from_results():
    doc = {
        "machine": {"cpu": "Test CPU", "cores": 2, "cpu_flags": ["avx2", "amx_bf16"]},
        "onnxruntime": "9.9", "threads": 2,
        "rows": [_row("quantlab", 4, 2.0, 6e-3), _row("onnxruntime", 4, 5.0, 6e-3), _row("quantlab", 3, 1.0, 2e-3),
                 _row("quantlab", 4, 1.0, 6e-3, m=8)],  # M = 8 is not a README row
    }  # fmt: skip
    block = bench.readme_block(doc)
    assert "Test CPU (2 cores; flags: avx2 amx_bf16)" in block and "onnxruntime 9.9" in block
    rows = [line for line in block.splitlines() if line.startswith("| head")]
    assert rows == ["| head (576 x 49152) | 16 | 2.000 | 5.000 | 2.50x | 1.000 | 6.0e-03 / 2.0e-03 |"]


def test_repository_readme_matches_the_results():
    results = json.loads((BENCHMARKS / "results" / "accuracy_levels.json").read_text("utf-8"))
    readme = (BENCHMARKS.parent / "README.md").read_text("utf-8")
    start, end = readme.index(bench.README_START), readme.index(bench.README_END)
    assert readme[start + len(bench.README_START) : end].strip() == bench.readme_block(results).strip()
