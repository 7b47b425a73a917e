"""package --fit: per-layer precision from measured sensitivity vs the best uniform ladder rung, per budget.

    python benchmarks/bench_fit.py                                   # SmolLM2-135M, 3 budgets
    python benchmarks/bench_fit.py --model stories260K.bin --fractions 0.1 0.3

Converts the model once as w4a16-g128-asym (the artifact handed to ``package``), sizes every unit and
ladder rung (no conversion), measures each unit's sensitivity once, then for budgets at the given
fractions of the way from the uniform w4a16-g128 bundle to the uniform w8a16-g128 bundle runs the
same fit ``quantlab package --fit`` runs: the per-layer choice converted and measured, and every
uniform rung that fits converted and measured (each rung once across budgets). Sizes are the bundle
estimates the fit compares against the budget (exact for the weights; runner and manifest as a fixed
allowance). Writes benchmarks/results/fit_<model>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import machine, save  # (benchmarks/ is the script folder)

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO.parent / "shared" / "models"
GIVEN_RECIPE = "w4a16-g128-asym"


def main() -> int:
    from quantlab import api
    from quantlab.package.fit import fit_plan, measure_plan_sensitivity, plan_fit
    from quantlab.package.targets import TARGETS

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.45, 0.7])
    ap.add_argument("--workdir", default=None, help="keep conversions here (default: a temporary folder)")
    args = ap.parse_args()

    source = MODELS / args.model
    name = args.model.split("-")[0].split(".")[0]
    with tempfile.TemporaryDirectory(prefix="bench_fit-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        given = work / "given"
        start = time.perf_counter()
        if not (given / "manifest.json").is_file():
            api.convert(source, given, recipe=GIVEN_RECIPE, progress=False, overwrite=True)
        convert_s = time.perf_counter() - start

        start = time.perf_counter()
        plan = plan_fit(given, source, TARGETS["cpu-x86_64"], work)
        plan_s = time.perf_counter() - start
        start = time.perf_counter()
        sensitivity = measure_plan_sensitivity(plan)
        sensitivity_s = time.perf_counter() - start
        sizes = {label: predicted for label, _, predicted in plan.rungs}
        lo, hi = sizes["w4a16-g128-asym"], sizes["w8a16-g128-asym"]

        results = []
        for fraction in args.fractions:
            budget = int(lo + fraction * (hi - lo))
            start = time.perf_counter()
            _, report = fit_plan(plan, sensitivity, budget)
            fit_s = time.perf_counter() - start
            per_layer = report.get("per_layer")
            rungs = [c for c in report["candidates"] if c["label"] not in ("artifact", "per-layer") and c["fits"]]
            best_rung = min(rungs, key=lambda c: c["kld_mean"]) if rungs else None
            row = {
                "fraction": fraction,
                "budget_bytes": budget,
                "chosen": report["chosen"],
                "fit_wall_s": round(fit_s, 1),
                "per_layer": per_layer
                and {
                    "bytes": per_layer["estimated_bytes"],
                    "kld_mean": per_layer["kld_mean"],
                    "top1_agreement": per_layer["top1_agreement"],
                    "predicted_kld_mean": per_layer["predicted_kld_mean"],
                    "schemes": dict(sorted(Counter(per_layer["precisions"].values()).items())),
                    "precisions": per_layer["precisions"],
                },
                "best_ladder_rung": best_rung
                and {k: best_rung[k] for k in ("label", "estimated_bytes", "kld_mean", "top1_agreement")},
                "rungs_fitting": [
                    {k: c[k] for k in ("label", "estimated_bytes", "kld_mean", "top1_agreement")} for c in rungs
                ],
            }
            results.append(row)
            pl = row["per_layer"] or {}
            print(
                f"budget {budget / 1e6:.3f} MB: per-layer {pl.get('bytes', 0) / 1e6:.3f} MB kld {pl.get('kld_mean')} | "
                f"best rung {best_rung and best_rung['label']} {best_rung and best_rung['kld_mean']}",
                flush=True,
            )

    doc = {
        "model": args.model,
        "given_artifact_recipe": GIVEN_RECIPE,
        "target": "cpu-x86_64",
        "machine": machine(),
        "uniform_bundle_bytes": sizes,
        "wall_s": {
            "given_convert": round(convert_s, 1),
            "plan": round(plan_s, 1),
            "sensitivity": round(sensitivity_s, 1),
        },
        "sensitivity": sensitivity.to_dict(),
        "budgets": results,
        "command": f"python benchmarks/bench_fit.py --model {args.model} --fractions "
        + " ".join(str(f) for f in args.fractions),
    }
    save(REPO / "benchmarks" / "results" / f"fit_{name}.json", doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
