"""``quantlab bench T1 T2 ... --ray ADDRESS``: the grid's cells on a Ray cluster, at most one per node at a time.

    driver                                      node n (one cell at a time, holding all of its CPUs)
      setup on every node                  ->   targets readable at the same paths? machine_info(), roofline
      cell i -> the first idle node        ->   measured_row(): a fresh worker process, as the serial run
      <- row i + node (id, IP, CPU, flags, start/end)   next cell to that node

Each task asks for all of its node's CPUs and is pinned to that node, and the driver gives a node its
next cell only when its last one has returned, so two timed cells never share a node. They may still
share a machine: nodes on one machine (as on loopback) run at the same time on the same cores, and the
document says so. Rows keep the serial run's order and keys, plus ``node``; the roofline is each node's.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import time
from pathlib import Path

from quantlab.bench.runner import BenchConfig, Cell, machine_info, measure_roofline, measured_row
from quantlab.distributed.calibrate import connected
from quantlab.errors import InputError

logger = logging.getLogger(__name__)


def _setup_node(paths: list[str], threads: list[int], roofline_mib: int) -> dict:
    """On a node: the first target path it cannot read (or None), its machine and its roofline."""
    missing = next((p for p in paths if not os.access(p, os.R_OK)), None)
    if missing is not None:
        return {"missing": missing}
    machine = machine_info() | {"hostname": socket.gethostname()}
    return {
        "missing": None,
        "machine": machine,
        "roofline_GBps": {str(t): measure_roofline(t, roofline_mib) for t in threads},
    }


def _measure_cell(cell: Cell, config: BenchConfig, roofline: dict) -> tuple[dict, float, float]:
    """On a node: the serial run's row of ``cell`` (a fresh worker process) and its start and end (epoch s)."""
    started = time.time()
    row = measured_row(cell.target, cell.backend, cell.threads, cell.context, config, roofline, cell.batch)
    return row, started, time.time()


def node_label(node: dict) -> str:
    return f"{node.get('NodeName') or node['NodeID'][:12]} ({node['NodeManagerAddress']})"


def pinned_to(node: dict, ray):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # all of the node's CPUs: no other task of ours (or anyone's asking for CPUs) runs there meanwhile
    return {
        "num_cpus": node["Resources"]["CPU"],
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
    }


def setup_nodes(ray, paths: list[str], config: BenchConfig) -> tuple[list[dict], dict[str, dict]]:
    """The alive nodes with CPUs and, by node id, each one's machine and roofline; an InputError naming the
    path and the node when a target is not readable there."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise InputError(None, "--ray", "the cluster has no alive node with CPUs")
    task = ray.remote(max_retries=0)(_setup_node)
    threads = sorted(set(config.threads))
    refs = [task.options(**pinned_to(n, ray)).remote(paths, threads, config.roofline_mib) for n in nodes]
    info = {}
    for node, result in zip(nodes, ray.get(refs), strict=True):
        if result["missing"] is not None:
            raise InputError(
                result["missing"],
                "--ray",
                f"not readable on node {node_label(node)}: targets must be at the same path on every node",
            )
        info[node["NodeID"]] = {
            "id": node["NodeID"],
            "name": node.get("NodeName"),
            "ip": node["NodeManagerAddress"],
            "cpus": node["Resources"]["CPU"],
            "machine": result["machine"],
            "roofline_GBps": result["roofline_GBps"],
        }
    return nodes, info


def run_cells(ray, nodes: list[dict], info: dict[str, dict], cells: list[Cell], config: BenchConfig, progress=None):
    """Rows in the cells' order, each with its ``node``; a node gets its next cell when its last one returned."""
    task = ray.remote(max_retries=0)(_measure_cell)
    config_ref = ray.put(config)
    todo = collections.deque(enumerate(cells))
    running: dict = {}
    rows: list[dict | None] = [None] * len(cells)

    def submit(node: dict) -> None:
        if todo:
            i, cell = todo.popleft()
            roofline = info[node["NodeID"]]["roofline_GBps"]
            # a Ray worker's folder is not the driver's: the node opens the absolute path, the row names the given one
            absolute = dataclasses.replace(
                cell, target=dataclasses.replace(cell.target, path=cell.target.path.absolute())
            )
            running[task.options(**pinned_to(node, ray)).remote(absolute, config_ref, roofline)] = (node, i)

    for node in nodes:
        submit(node)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        node, i = running.pop(ref)
        row, started, ended = ray.get(ref)
        n = info[node["NodeID"]]
        row["target"] = os.fspath(cells[i].target.path)
        row["node"] = {
            "id": n["id"],
            "name": n["name"],
            "ip": n["ip"],
            "hostname": n["machine"]["hostname"],
            "cpu": n["machine"]["cpu"],
            "cpu_flags": n["machine"]["cpu_flags"],
            "started": started,
            "ended": ended,
        }
        rows[i] = row
        if progress:
            progress(row)
        submit(node)
    return rows


def machine_warnings(rows: list[dict], info: dict[str, dict]) -> list[str]:
    """What a reader must know before comparing the rows: several machines, or nodes sharing one."""
    used = {r["node"]["id"] for r in rows if "node" in r}
    machines = collections.defaultdict(list)
    for node_id in sorted(used):
        n = info[node_id]
        machines[(n["ip"], n["machine"]["hostname"])].append(n)
    out = []
    if len(machines) > 1:
        cpus = sorted(
            {n["machine"]["cpu"] + " " + ",".join(n["machine"]["cpu_flags"]) for g in machines.values() for n in g}
        )
        out.append(
            f"rows come from {len(machines)} machines ({', '.join(ip for ip, _ in machines)}; "
            f"{len(cpus)} CPU model/flag set{'s' if len(cpus) > 1 else ''}): compare rows of one machine (row.node)"
        )
    for (ip, host), group in machines.items():
        if len(group) > 1:
            out.append(
                f"{len(group)} nodes on one machine ({host}, {ip}) ran cells at the same time on shared cores: "
                "their latencies are not those of a machine to itself"
            )
    return out


def bench_on_cluster(address: str, paths: list[str]):
    """A ``measure`` for :func:`quantlab.bench.runner.run_bench` that runs the cells on the cluster at
    ``address``; ``paths`` (the targets) must be readable at the same paths on every node. --baseline's quality
    columns stay on the driver."""

    def measure(cells: list[Cell], config: BenchConfig, progress=None) -> tuple[list[dict], dict]:
        with connected(address) as ray:
            absolute = [os.fspath(Path(p).absolute()) for p in paths]
            nodes, info = setup_nodes(ray, absolute, config)
            start = time.monotonic()
            rows = run_cells(ray, nodes, info, cells, config, progress)
            logger.info("bench: %d cells on %d nodes in %.1f s", len(cells), len(nodes), time.monotonic() - start)
        return rows, {
            "roofline_GBps": {},  # one per node: nodes[id].roofline_GBps
            "nodes": info,
            # the cells ran in Ray's processes, not this one's children: the witness cannot tell them from others
            "machine": {"others_cpu_share": None, "cells_ran_on": "the Ray nodes in nodes"},
            "warnings": machine_warnings(rows, info),
        }

    return measure
