"""``quantlab bench T1 T2 --ray`` on a real two-node Ray cluster on loopback (one CPU per node).

The grid's rows are the serial run's (same cells, keys and order; latencies differ), each names the node
it ran on and that node's CPU, no two cells overlapped on one node, and a target a node cannot read is
refused in one line naming the path and the node.
"""

from __future__ import annotations

import json

import pytest

from quantlab.cli.main import main
from tests.distributed.cluster import connected_cluster
from tests.models import model_path

# 2 targets x 2 thread counts on onnxruntime (always installed): 4 cells, so both nodes get more than one
GRID = ["--backend", "onnxruntime", "--threads", "1,2", "--prompt-len", "8", "--gen", "4", "--runs", "2"]
GRID += ["--roofline-mib", "8"]
# what names a cell in the grid (the serial run's keys, not its timings)
CELL_KEYS = ("model", "variant", "backend", "threads", "batch", "prompt_len", "context", "gen", "target", "status")


@pytest.fixture(scope="module")
def cluster():
    with connected_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    from quantlab import api

    root = tmp_path_factory.mktemp("bench")
    source = model_path("stories260K.bin")
    out = [root / "w4", root / "fp32"]
    api.convert(source, out[0], recipe="w4a16-g128-asym", evaluate_quality=False, progress=False)
    api.convert(source, out[1], evaluate_quality=False, progress=False)
    return [str(p) for p in out]


def test_bench_grid_on_the_cluster_has_the_serial_rows_one_cell_per_node(cluster, targets, tmp_path):
    serial_json, ray_json = tmp_path / "serial.json", tmp_path / "ray.json"
    assert main(["bench", *targets, *GRID, "--json", str(serial_json)]) == 0
    assert main(["bench", *targets, *GRID, "--json", str(ray_json), "--ray", cluster.address]) == 0
    serial, spread = json.loads(serial_json.read_text()), json.loads(ray_json.read_text())

    assert len(serial["results"]) == 4
    assert [[r[k] for k in CELL_KEYS] for r in spread["results"]] == [
        [r[k] for k in CELL_KEYS] for r in serial["results"]
    ]
    assert all(r["status"] == "ok" for r in spread["results"])
    for s, r in zip(serial["results"], spread["results"], strict=True):
        assert set(r) == set(s) | {"node"}
        assert r["generated_ids"] == s["generated_ids"]  # greedy on the same prompt: the same tokens
    assert set(spread) == set(serial) | {"nodes"}

    nodes = spread["nodes"]
    used = {r["node"]["id"] for r in spread["results"]}
    assert used == set(nodes) and len(used) == 2  # the driver gives each idle node a cell
    for r in spread["results"]:
        node = r["node"]
        assert node["ip"] and node["name"] in ("head", "worker")
        assert node["cpu"] == nodes[node["id"]]["machine"]["cpu"] and node["cpu"]
        assert node["cpu_flags"] == nodes[node["id"]]["machine"]["cpu_flags"]
        assert node["started"] < node["ended"]
    for node_id in nodes:
        spans = sorted(
            (r["node"]["started"], r["node"]["ended"]) for r in spread["results"] if r["node"]["id"] == node_id
        )
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))
        assert set(nodes[node_id]["roofline_GBps"]) == {"1", "2"}
    # both nodes are this machine: the document says they shared its cores
    assert any("2 nodes on one machine" in w for w in spread["warnings"])
    assert spread["machine"]["others_cpu_share"] is None


def test_a_target_missing_on_a_node_is_refused_in_one_line(cluster, tmp_path, capsys):
    import ray

    from quantlab.bench.runner import BenchConfig
    from quantlab.distributed.bench import setup_nodes
    from quantlab.errors import InputError

    missing = tmp_path / "not-here"
    assert main(["bench", str(missing), *GRID, "--ray", cluster.address]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err

    # the driver sees it, a node does not: checked on every node before any cell runs
    with pytest.raises(InputError) as caught:
        setup_nodes(ray, [str(missing)], BenchConfig(roofline_mib=8))
    line = caught.value.one_line()
    assert "\n" not in line and str(missing) in line and "not readable on node" in line and "same path" in line
