"""``quantlab sweep SRC -o OUTDIR --recipes A,B,C --ray ADDRESS``: one conversion per recipe, one per node at a time.

    driver                                      node n (one conversion at a time, holding all of its CPUs)
      probe (check_nodes) on every node    ->   same arithmetic as the driver?
      SRC and OUTDIR at the same paths?     ->   readable source, existing output folder
      recipe i -> the first idle node      ->   `quantlab convert SRC -o OUTDIR/<recipe_i>` (a fresh process,
      <- exit status, stderr, start/end         the serial sweep's command line), next recipe to that node

Each conversion is the serial sweep's subprocess, run on a node whose probe agreed with the driver's, so
the artifacts are the serial sweep's bytes. A task asks for all of its node's CPUs and is pinned there.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import subprocess
import sys
import time

from quantlab.distributed.bench import node_label, pinned_to
from quantlab.distributed.calibrate import check_nodes, connected
from quantlab.errors import InputError

logger = logging.getLogger(__name__)


def run_convert(argv: list[str]) -> dict:
    """``python -m quantlab convert ...argv`` in a fresh process: its exit status, stderr and start/end (epoch s)."""
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "quantlab", "convert", *argv], capture_output=True, text=True)
    return {"returncode": done.returncode, "stderr": done.stderr, "started": started, "ended": time.time()}


def _paths_on_node(source: str, outdir: str) -> dict:
    """On a node: the first of ``source`` (readable) and ``outdir`` (a writable folder) that is not, or None."""
    if not os.access(source, os.R_OK):
        return {"missing": source, "what": "not readable", "hostname": socket.gethostname()}
    if not (os.path.isdir(outdir) and os.access(outdir, os.W_OK)):
        return {"missing": outdir, "what": "not a writable folder", "hostname": socket.gethostname()}
    return {"missing": None, "hostname": socket.gethostname()}


def sweep_on_cluster(address: str, source: str, outdir: str, jobs: list[tuple[str, list[str]]], progress=None):
    """``jobs`` are (recipe, convert argv) pairs; returns one :func:`run_convert` result per job, in their order,
    each with its ``node``. ``source`` and ``outdir`` (absolute) must be at the same paths on every node."""
    from quantlab.distributed.sensitivity import PROBE_RECIPE
    from quantlab.recipe import load_recipe

    with connected(address) as ray:
        nodes = check_nodes(ray, load_recipe(PROBE_RECIPE))
        check = ray.remote(num_cpus=0, max_retries=0)(_paths_on_node)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = [
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                source, outdir
            )
            for n in nodes
        ]
        hostnames = {}
        for node, result in zip(nodes, ray.get(refs), strict=True):
            if result["missing"] is not None:
                raise InputError(
                    result["missing"],
                    "--ray",
                    f"{result['what']} on node {node_label(node)}: SRC and OUTDIR must be at the same path on "
                    "every node",
                )
            hostnames[node["NodeID"]] = result["hostname"]

        task = ray.remote(max_retries=0)(run_convert)
        todo = collections.deque(enumerate(jobs))
        running: dict = {}
        results: list[dict | None] = [None] * len(jobs)

        def submit(node: dict) -> None:
            if todo:
                i, (_, argv) = todo.popleft()
                running[task.options(**pinned_to(node, ray)).remote(argv)] = (node, i)

        start = time.monotonic()
        for node in nodes:
            submit(node)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            node, i = running.pop(ref)
            result = ray.get(ref)
            result["node"] = {
                "id": node["NodeID"],
                "name": node.get("NodeName"),
                "ip": node["NodeManagerAddress"],
                "hostname": hostnames[node["NodeID"]],
            }
            results[i] = result
            if progress:
                progress(jobs[i][0], result)
            submit(node)
        logger.info("sweep: %d conversions on %d nodes in %.1f s", len(jobs), len(nodes), time.monotonic() - start)
    return results
