"""Quality of each quantization recipe against the fp32 model, through the real CLI.

    python benchmarks/bench_quality.py --model stories260K.bin --group 32 [--calib-from-model 128]
    python benchmarks/bench_quality.py --model SmolLM2-135M-Instruct.Q4_1.gguf --group 128 --sym --calib-from-model 32

Converts fp32, w8 RTN, and w4 with RTN, GPTQ and AWQ, then runs `quantlab eval` against fp32 on
64 sequences sampled from the fp32 model (seed 0) and, for stories260K, on its golden story.
Writes benchmarks/results/quality_<model>.json with every figure and the artifact sizes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO.parent / "shared" / "models"
GOLDEN = REPO.parent / "shared" / "golden"


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "quantlab", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"quantlab {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def size(folder: Path) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sum(f["bytes"] for f in manifest["files"].values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="stories260K.bin")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--calib-from-model", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    model = MODELS / args.model
    sym = "sym" if args.sym else "asym"
    work = Path(tempfile.mkdtemp(prefix="quantlab-quality-"))
    recipes = {"fp32": "fp32", "w8-rtn": f"w8a16-g{args.group}-asym", "w4-rtn": f"w4a16-g{args.group}-{sym}"}
    for method in ("gptq", "awq"):
        path = work / f"{method}.toml"
        path.write_text(
            f'scheme = "w4a16-g{args.group}-{sym}"\nmethod = "{method}"\n[calibration]\n'
            f"samples = {args.calib_from_model}\nseq_len = {args.calib_seq_len}\nseed = 0\n"
        )
        recipes[f"w4-{method}"] = str(path)
    results = {}
    for name, recipe in recipes.items():
        extra = ["--calib-from-model", str(args.calib_from_model)] if name.endswith(("gptq", "awq")) else []
        start = time.perf_counter()
        cli("convert", str(model), "-o", str(work / name), "--recipe", recipe, "--no-progress", "--no-eval", *extra)
        results[name] = {
            "recipe": recipe
            if name in ("fp32", "w8-rtn", "w4-rtn")
            else f"w4a16-g{args.group}-{sym}-" + name.split("-")[1],
            "convert_s": round(time.perf_counter() - start, 1),
            "bytes": size(work / name),
        }
        print(name, results[name], flush=True)
    golden_text = None
    if args.model.startswith("stories"):
        golden_text = work / "story.txt"
        golden_text.write_text(json.loads((GOLDEN / "stories260K_greedy.json").read_text())["text"])
    for name in recipes:
        if name == "fp32":
            continue
        sampled = json.loads(
            cli(
                "eval",
                str(work / name),
                "--baseline",
                str(work / "fp32"),
                "--samples",
                str(args.samples),
                "--seed",
                "0",
                "--json",
                "--no-progress",
            )
        )
        results[name]["sampled_seed0"] = sampled
        if golden_text is not None:
            results[name]["golden_story"] = json.loads(
                cli(
                    "eval",
                    str(work / name),
                    "--baseline",
                    str(work / "fp32"),
                    "--data",
                    str(golden_text),
                    "--seq-len",
                    "512",
                    "--json",
                    "--no-progress",
                )
            )
        print(name, {k: sampled[k] for k in ("kld_mean", "top1_agreement", "ppl", "baseline_ppl")}, flush=True)
    out = REPO / "benchmarks" / "results" / f"quality_{Path(args.model).stem}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "quality",
                "model": args.model,
                "group": args.group,
                "symmetric": args.sym,
                "calibration": {"from_model": args.calib_from_model, "seq_len": args.calib_seq_len},
                "eval": f"{args.samples} sequences sampled from fp32, seed 0",
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
