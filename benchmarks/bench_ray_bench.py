"""`quantlab bench` over a grid, one process against `--ray` on a two-node loopback cluster.

Starts a LocalCluster (two `ray start` processes, one CPU each, on this machine) and runs the same grid
(`quantlab bench TARGETS --backend onnxruntime --threads 1`) serially and with `--ray`, alternately, `--repeats`
times each; records each run's wall time (start-up and rooflines included) and every row's TPOT and node.
Both nodes share this machine's cores, so this measures the overhead of distribution, not its gain.

    python benchmarks/bench_ray_bench.py out/s-w4 out/s-w8      # two artifact folders (about 3 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import machine, save  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bench_ray_bench.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", help="artifact folders")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    from quantlab.distributed.local import LocalCluster

    grid = ["--backend", "onnxruntime", "--threads", "1"]
    cluster = LocalCluster()
    cluster.start_head()
    cluster.add_worker("worker")
    runs = []
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                for mode in ("serial", "ray"):
                    out = Path(tmp) / f"{mode}-{repeat}.json"
                    cmd = [sys.executable, "-m", "quantlab", "bench", *args.targets, *grid, "--json", str(out)]
                    cmd += ["--ray", cluster.address] if mode == "ray" else []
                    start = time.perf_counter()
                    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                    wall = time.perf_counter() - start
                    doc = json.loads(out.read_text())
                    rows = [
                        {
                            "target": r.get("target"),
                            "tpot_ms_median": r["tpot_ms"]["median"],
                            "node": (r.get("node") or {}).get("name"),
                        }
                        for r in doc["results"]
                    ]
                    runs.append({"mode": mode, "repeat": repeat, "wall_s": round(wall, 2), "rows": rows})
                    print(f"{mode} {repeat}: {wall:.1f} s", [round(r["tpot_ms_median"], 3) for r in rows], flush=True)
    finally:
        cluster.stop()
    save(
        args.results,
        {
            "benchmark": "ray_bench_grid",
            "machine": machine(),
            "nodes": "2 single-CPU Ray nodes on this machine's loopback (they share its cores)",
            "grid": grid,
            "targets": [str(Path(t).resolve()) for t in args.targets],
            "runs": runs,
        },
    )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
