"""Convert one checkpoint once per recipe into OUTDIR/<recipe>/ and list each artifact's size and quality.

Each conversion is its own `quantlab convert SRC -o OUTDIR/<recipe> --recipe <recipe> --no-progress`
process (with --no-eval unless --eval is given), so each artifact is the bytes that command writes. An
unknown recipe, or an existing OUTDIR/<recipe> without --force, is refused before any conversion starts.

With --ray ADDRESS the conversions run on a Ray cluster (:mod:`quantlab.distributed.sweep`), at most one per
node at a time, each holding all of its node's CPUs, after the probe has checked every node computes the
driver's bytes; SRC and OUTDIR must be at the same paths on every node. The artifacts are the serial sweep's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from quantlab.errors import InputError

HELP = "convert one checkpoint with several recipes (optionally on a Ray cluster)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="HF folder, .gguf file or llama2.c .bin (as for convert)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for one artifact per recipe")
    p.add_argument(
        "--recipes", required=True, help="comma-separated recipes, e.g. fp32,w8a16-g128-asym,w4a16-g128-asym"
    )
    p.add_argument("--eval", action="store_true", help="measure each artifact's quality vs fp32 (convert's default)")
    p.add_argument("--force", action="store_true", help="replace existing OUTDIR/<recipe> folders")
    p.add_argument("--json", metavar="FILE", help="write the rows (recipe, output, bytes, kld_mean, seconds) as JSON")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the conversions on a Ray cluster, one per node at a time: auto or HEAD_IP:PORT (SRC and OUTDIR "
        "at the same paths on every node; needs pip install 'quantlab[ray]')",
    )


def _recipes(text: str) -> list[str]:
    from quantlab.recipe import load_recipe

    names = [r.strip() for r in text.split(",") if r.strip()]
    if not names:
        raise InputError(None, "--recipes", "no recipe given")
    if len(set(names)) != len(names):
        raise InputError(None, "--recipes", f"a recipe is named twice: {text}")
    for name in names:
        if Path(name).suffix:
            raise InputError(name, "--recipes", "a sweep takes built-in recipe names (each names its folder)")
        try:
            load_recipe(name)  # an unknown name is refused in one line, before any work
        except InputError as e:
            raise InputError(None, "--recipes", f"{name!r} is not a recipe: {e.message}") from e
    return names


def _row(recipe: str, out: Path, result: dict) -> dict:
    from quantlab.emit.artifact import read_manifest

    row = {"recipe": recipe, "output": os.fspath(out), "seconds": round(result["ended"] - result["started"], 3)}
    if "node" in result:
        row["node"] = result["node"]
    if result["returncode"] != 0:
        lines = result["stderr"].strip().splitlines()
        return row | {"status": "failed", "returncode": result["returncode"], "reason": lines[-1] if lines else ""}
    manifest = read_manifest(out)
    quality = manifest.get("quality") or {}
    return row | {
        "status": "ok",
        "bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "kld_mean": quality.get("kld_mean"),
    }


def _line(row: dict) -> str:
    where = f"  node {row['node']['name']} ({row['node']['ip']})" if "node" in row else ""
    if row["status"] != "ok":
        return f"{row['recipe']:<20} failed (exit {row['returncode']}): {row['reason']}{where}"
    kld = f"kld_mean {row['kld_mean']:.5f}" if row["kld_mean"] is not None else "kld_mean -"
    return f"{row['recipe']:<20} {row['bytes'] / 1e6:8.3f} MB  {kld}  {row['seconds']:.1f} s{where}"


def run(args: argparse.Namespace) -> int:
    source = Path(args.source).absolute()
    outdir = Path(args.output).absolute()
    recipes = _recipes(args.recipes)
    if not source.exists():
        raise InputError(args.source, None, "not found")
    if outdir.exists() and not outdir.is_dir():
        raise InputError(args.output, "-o", "exists and is not a folder")
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise InputError(args.json, "--json", "its folder does not exist")
    if not args.force:
        for recipe in recipes:
            if (outdir / recipe).exists():
                raise InputError(outdir / recipe, None, "output already exists (pass --force to replace it)")
    if args.ray is not None:
        from quantlab.distributed import require_ray
        from quantlab.distributed.calibrate import check_reachable

        require_ray()
        check_reachable(args.ray)

    jobs = []
    for recipe in recipes:
        argv = [os.fspath(source), "-o", os.fspath(outdir / recipe), "--recipe", recipe, "--no-progress"]
        argv += [] if args.eval else ["--no-eval"]
        argv += ["--force"] if args.force else []
        jobs.append((recipe, argv))

    def progress(recipe: str, result: dict) -> None:
        print(f"sweep: {recipe} done (exit {result['returncode']})", file=sys.stderr)

    outdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if args.ray is not None:
        from quantlab.distributed.sweep import sweep_on_cluster

        results = sweep_on_cluster(args.ray, os.fspath(source), os.fspath(outdir), jobs, progress)
    else:
        from quantlab.distributed.sweep import run_convert

        results = []
        for recipe, argv in jobs:
            results.append(run_convert(argv))
            progress(recipe, results[-1])
    rows = [_row(recipe, outdir / recipe, result) for (recipe, _), result in zip(jobs, results, strict=True)]
    seconds = time.monotonic() - start
    for row in rows:
        print(_line(row))
    if args.json:
        doc = {"source": args.source, "outdir": args.output, "ray": args.ray, "seconds": round(seconds, 3)}
        Path(args.json).write_text(json.dumps(doc | {"results": rows}, indent=1) + "\n", encoding="utf-8")
    failed = [r for r in rows if r["status"] != "ok"]
    return failed[0]["returncode"] if failed else 0
