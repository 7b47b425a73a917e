"""``convert --max-size`` sensitivity on one process against Ray meters on two single-CPU nodes.

    python benchmarks/bench_ray_fit.py [--model stories260K.bin] [--max-size 300000] [--requantize]
        -> benchmarks/results/bench_ray_fit_<model>.json

The choose stage (quantlab.fit.choose.choose_under_size) runs twice on the same fp32 baseline: once
measuring every (unit, rung) KL divergence in this process (quantlab.fit.sensitivity.measure_kld), once
on a two-node Ray cluster on this machine's loopback (two `ray start` processes, one CPU each:
quantlab.distributed.local) with one meter per node (quantlab.distributed.sensitivity; the meters make
the fake-quantized weights themselves, or with --weights-on-driver the driver does). Recorded: the
wall time of the measurement itself and of the whole choose stage, and whether both chose the same
schemes from the same floats. Both nodes share this machine's cores, so the figure is the overhead of
distribution, not its gain, unless the machine has a core per node to spare.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"


def timed(measure, seconds: list[float], making: list[float]):
    """``measure`` with its wall time appended to ``seconds``, and the time its ``fake_quantized`` calls
    take in this process (making the weights) to ``making``."""

    def run(baseline, ids, units, fake_quantized, **kwargs):
        def fake(unit: str, scheme: str):
            start = time.perf_counter()
            try:
                return fake_quantized(unit, scheme)
            finally:
                making.append(time.perf_counter() - start)

        if hasattr(fake_quantized, "portable"):  # the meters can make the weights themselves
            fake.portable = fake_quantized.portable

        start = time.perf_counter()
        try:
            return measure(baseline, ids, units, fake, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return run


def choose(ckpt, baseline: Path, budget: int, keep_source: bool, measure):
    """(the FitChoice, seconds measuring sensitivity, of them making weights, seconds of the choose stage)."""
    from quantlab.fit.choose import LINEAR_LADDER, choose_under_size
    from quantlab.graph_builder.decoder import BuildOptions
    from quantlab.quant.scheme import parse_scheme
    from quantlab.recipe import load_recipe

    recipe = dataclasses.replace(load_recipe("fp32"), scheme=parse_scheme(LINEAR_LADDER[0]))  # as convert does
    seconds: list[float] = []
    making: list[float] = []
    start = time.perf_counter()
    fit = choose_under_size(
        ckpt, baseline, budget, recipe, options=BuildOptions(attention="fused"), keep_source=keep_source,
        measure=timed(measure, seconds, making),
    )  # fmt: skip
    return fit, sum(seconds), sum(making), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stories260K.bin", help="a file in ../shared/models")
    ap.add_argument("--max-size", type=int, default=300_000, help="bytes")
    ap.add_argument("--requantize", action="store_true", help="keep none of a GGUF's own codes")
    ap.add_argument("--meters", type=int, default=2)
    ap.add_argument("--weights-on-driver", action="store_true", help="the driver makes the weights, not the meters")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("quantlab.distributed.sensitivity").setLevel(logging.INFO)

    from quantlab.api import _baseline_artifact
    from quantlab.distributed.local import LocalCluster
    from quantlab.distributed.sensitivity import measure_kld_on_cluster
    from quantlab.fit.sensitivity import measure_kld
    from quantlab.io import load_checkpoint

    source = MODELS / args.model
    ckpt = load_checkpoint(source)
    doc = {"machine": machine(), "model": args.model, "max_size": args.max_size, "requantize": args.requantize}
    with _baseline_artifact(ckpt, Path("/tmp") / f"bench-ray-fit-{os.getpid()}", progress=False) as baseline:
        single, measured, making, total = choose(ckpt, baseline, args.max_size, not args.requantize, measure_kld)
        figures = sum(len(v) for v in single.report["sensitivity"]["measured"].values())
        doc["single_process"] = {
            "load_average_1m_after": round(os.getloadavg()[0], 2),  # other work on the machine skews the times
            "measurements": figures,
            "measure_s": round(measured, 1),
            "of_it_making_weights_s": round(making, 1),
            "choose_s": round(total, 1),
        }
        print("one process:", doc["single_process"], flush=True)
        cluster = LocalCluster()
        try:
            cluster.start_head()
            cluster.add_worker("worker")
            os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token)
            on_cluster = functools.partial(
                measure_kld_on_cluster,
                address=cluster.address,
                meters=args.meters,
                source=None if args.weights_on_driver else {"path": str(source)},
            )
            spread, measured, making, total = choose(ckpt, baseline, args.max_size, not args.requantize, on_cluster)
        finally:
            cluster.stop()
    doc["ray"] = {
        "nodes": 2,
        "cpus_per_node": 1,
        "meters": args.meters,
        "weights_made_on": "driver" if args.weights_on_driver else "meters",
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "measure_s_with_startup": round(measured, 1),
        "choose_s": round(total, 1),
        "of_it_making_weights_on_the_driver_s": round(making, 1),
        "same_sensitivity_floats": spread.sensitivity == single.sensitivity,
        "same_choice": spread.report["choice"] == single.report["choice"],
    }
    print("ray:", doc["ray"], flush=True)
    name = Path(args.model).stem.split(".")[0]
    suffix = "_weights_on_driver" if args.weights_on_driver else ""
    save(RESULTS / f"bench_ray_fit_{name}{suffix}.json", doc)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
