"""Distributed GPTQ on a real two-node Ray cluster on loopback: the artifact is the single process's bytes.

The cluster is two `ray start --block` processes (one CPU each, their own temp folders, token
authentication), with Ray's own fault injection delaying every actor call by a random 0-300 ms so that
shards finish in varying order. Each conversion is stories260K (real, 5 layers) with GPTQ on 16 x 256
tokens: 4 canonical blocks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quantlab.distributed.local import LocalCluster as Cluster
from tests.distributed.cluster import connected_cluster
from tests.models import model_path

RECIPE = 'scheme = "w4a16-g32-gptq"\n[calibration]\nsamples = 16\nseq_len = 256\n'
# Ray's fault injection (RAY_testing_asio_delay_us): each task pushed to an actor waits 0-300 ms first.
RANDOM_DELAYS = "CoreWorkerService.grpc_server.PushTask=0:300000"


def artifact_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cluster():
    with connected_cluster(RAY_testing_asio_delay_us=RANDOM_DELAYS) as c:
        yield c


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-inputs")
    (folder / "gptq.toml").write_text(RECIPE)
    np.save(folder / "calib.npy", np.random.default_rng(0).integers(3, 512, (16, 256)).astype(np.int64))
    return {
        "source": model_path("stories260K.bin"),
        "recipe": str(folder / "gptq.toml"),
        "calib": str(folder / "calib.npy"),
        "evaluate_quality": False,
        "progress": False,
    }


@pytest.fixture(scope="module")
def single_sha256(inputs, tmp_path_factory):
    from quantlab import api

    out = tmp_path_factory.mktemp("single") / "out"
    api.convert(inputs["source"], out, **{k: v for k, v in inputs.items() if k != "source"})
    return artifact_sha256(out)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_sharded_gptq_is_the_single_process_bytes(cluster, inputs, single_sha256, shards, tmp_path, caplog):
    from quantlab import api

    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="quantlab.distributed.calibrate"):
        options = {k: v for k, v in inputs.items() if k != "source"}
        api.convert(inputs["source"], out, ray=cluster.address, shards=shards, **options)
    assert artifact_sha256(out) == single_sha256
    arrivals = [r.getMessage() for r in caplog.records if "shards answered in order" in r.getMessage()]
    assert len(arrivals) == 5  # one per layer of stories260K
    if shards == 4:  # the random delays did reorder the shards' answers (1/24 per layer were it luck)
        assert any(not a.endswith("[0, 1, 2, 3]") for a in arrivals), arrivals


def test_awq_on_shards_is_the_single_process_bytes(cluster, inputs, tmp_path):
    """AWQ's searches read sampled tokens: drawn per run, they are the same wherever the run was observed.
    (SmoothQuant, whose maxima are exact in any order, gave the same bytes too: not repeated here for time.)"""
    from quantlab import api

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.replace("w4a16-g32-gptq", "w4a16-g32-awq"))
    options = {**{k: v for k, v in inputs.items() if k != "source"}, "recipe": str(recipe)}
    single = api.convert(inputs["source"], tmp_path / "single", **options)
    sharded = api.convert(inputs["source"], tmp_path / "sharded", ray=cluster.address, shards=2, **options)
    assert artifact_sha256(sharded) == artifact_sha256(single)


def _shard_processes(cluster: Cluster, title: str) -> list[int]:
    """Ray worker processes of this cluster (in the sessions of its `ray start` processes) whose title
    starts with ``title``."""
    sessions = {node.proc.pid for node in cluster.nodes}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if cmdline.startswith(title) and os.getsid(int(proc.name)) in sessions:
                found.append(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return found


def _convert_argv(inputs, out: Path, address: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "quantlab", "convert", str(inputs["source"]), "-o", str(out),
        "--recipe", inputs["recipe"], "--calib", inputs["calib"], "--no-eval", "--no-progress",
        "--ray", address, *extra,
    ]  # fmt: skip


def test_a_shard_killed_mid_layer_is_rebuilt_and_the_bytes_do_not_change(cluster, inputs, single_sha256, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.env["RAY_AUTH_TOKEN"]}
    proc = subprocess.Popen(
        _convert_argv(inputs, out, cluster.address, "--shards", "2"), env=env, stderr=subprocess.PIPE, text=True
    )
    killed = None
    deadline = time.monotonic() + 120
    try:
        committed = tmp_path / ".out.resume" / "layer-0000.npz"
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            busy = _shard_processes(cluster, "ray::CalibrationShard.observe") if committed.exists() else []
            if busy:
                os.kill(busy[0], signal.SIGKILL)  # a shard's worker, inside layer 1+'s call
                killed = busy[0]
            time.sleep(0.005)
        _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "never caught a shard inside a call"
    assert proc.returncode == 0, stderr
    assert artifact_sha256(out) == single_sha256


def test_ray_resume_continues_from_the_last_committed_layer(cluster, inputs, single_sha256, tmp_path, caplog):
    from quantlab import api

    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.env["RAY_AUTH_TOKEN"]}
    proc = subprocess.Popen(_convert_argv(inputs, out, cluster.address, "--shards", "2"), env=env)
    folder = tmp_path / ".out.resume"
    deadline = time.monotonic() + 120
    try:
        while not (folder / "layer-0002.npz").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before layer 2"
            time.sleep(0.005)
    finally:
        proc.kill()  # SIGKILL: the driver dies with layers 0..2 (at least) committed
        proc.wait()
    assert not out.exists()
    committed = json.loads((folder / "hidden.json").read_text())["layer"] + 1  # what --resume restores
    with caplog.at_level(logging.INFO, logger="quantlab.distributed.calibrate"):  # in process: no second start-up
        api.convert(
            inputs["source"], out, ray=cluster.address, shards=4, resume=True,
            **{k: v for k, v in inputs.items() if k != "source"},
        )  # fmt: skip
    layers = [r.getMessage() for r in caplog.records if "shards answered in order" in r.getMessage()]
    assert len(layers) == 5 - committed  # only the layers not committed before the kill
    assert artifact_sha256(out) == single_sha256


def test_a_node_with_other_arithmetic_is_refused_by_name(cluster, inputs, tmp_path, capsys):
    """A node whose MKL takes its SSE4.2 code path (an older CPU, as far as GPTQ's Cholesky goes)."""
    from quantlab.cli.main import main

    odd = cluster.add_worker("odd-node", MKL_ENABLE_INSTRUCTIONS="SSE4_2")
    try:
        code = main(_convert_argv(inputs, tmp_path / "out", cluster.address)[3:])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and "node odd-node" in err[0] and "refused" in err[0], err
        assert not (tmp_path / "out").exists()
    finally:
        odd.stop()
        cluster.nodes.remove(odd)


def test_without_ray_the_flag_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    """Ray not importable (None in sys.modules makes `import ray` fail): one line, exit 2, nothing written."""
    from quantlab.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["convert", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "out"), "--ray", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "pip install 'quantlab[ray]'" in err[0], err
    assert not (tmp_path / "out").exists()
