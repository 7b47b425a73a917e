"""Conversion cost: wall time and peak RSS of `quantlab convert`, each run in a fresh process.

    python benchmarks/bench_convert.py [--runs 3] [--model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes benchmarks/results/convert.json. Peak RSS is the child's ru_maxrss from wait4, so it covers the
whole process (interpreter, imports, reading, building, writing), compared with the fp32 weight bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import machine, run_convert, save  # noqa: E402  (benchmarks/ is the script folder)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_once(model: Path, dtype: str) -> dict:
    out = Path(tempfile.mkdtemp()) / "art"
    timing = run_convert([str(model), "-o", str(out), "--dtype", dtype])
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out.parent)
    return {
        "wall_s": timing["wall_s"],
        "peak_rss_bytes": timing["peak_rss_bytes"],
        "parameters": manifest["graph"]["parameters"],
        "artifact_bytes": sum(f["bytes"] for f in manifest["files"].values()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "convert.json")
    args = ap.parse_args()
    results = []
    for dtype in ("fp32", "fp16"):
        runs = [run_once(args.model, dtype) for _ in range(args.runs)]
        fp32_weight_bytes = runs[0]["parameters"] * 4
        peak = statistics.median(r["peak_rss_bytes"] for r in runs)
        row = {
            "dtype": dtype,
            "runs": args.runs,
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "peak_rss_bytes_median": peak,
            "fp32_weight_bytes": fp32_weight_bytes,
            "peak_rss_over_fp32_weights": peak / fp32_weight_bytes,
            "artifact_bytes": runs[0]["artifact_bytes"],
            "all_runs": runs,
        }
        results.append(row)
        print(
            f"{dtype}: {row['wall_s_median']:.1f}s, peak RSS {peak / 2**20:.0f} MiB = "
            f"{row['peak_rss_over_fp32_weights']:.2f}x fp32 weights, artifact {row['artifact_bytes'] / 1e6:.1f} MB"
        )
    doc = {
        "benchmark": "convert",
        "model": args.model.name,
        "machine": machine(),
        "results": results,
    }
    save(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
