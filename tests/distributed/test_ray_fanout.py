"""The embarrassingly parallel work on a real two-node Ray cluster on loopback: the single process's results.

``convert --max-size --ray``: every (unit, rung) sensitivity figure measured by actors on both nodes is
the single process's float, also when a meter is SIGKILLed inside a measurement (Ray restarts it and
retries the call), so the chosen schemes and the artifact are the same bytes. ``eval A B
--ray``: the reports are the serial run's. The cluster (one CPU per node, token authentication) delays
every actor call by a random 0-300 ms (Ray's fault injection), so measurements finish in varying order.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import time

import numpy as np
import pytest

from quantlab.cli.main import main
from tests.distributed.cluster import connected_cluster
from tests.distributed.test_ray_calibration import RANDOM_DELAYS, _shard_processes, artifact_sha256
from tests.models import model_path

# between the smallest reachable artifact (~0.26 MB) and all-8-bit (~0.59 MB) of stories260K (tests/fit)
MAX_SIZE = 300_000
# units and rungs measured directly: a layer unit, the tied head (which feeds the embedding too)
UNITS = {
    "model.layers.0.mlp_in": ("w8a16-g128-asym", "w4a16-g32-asym"),
    "model.layers.4.attn_v": ("w4a16-g32-asym",),
    "lm_head": ("w8a16-g128-asym", "w4a16-g32-asym", "w4a16-g64-asym"),
}


@pytest.fixture(scope="module")
def cluster():
    with connected_cluster(RAY_testing_asio_delay_us=RANDOM_DELAYS) as c:
        yield c


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The fp32 baseline, a plain 4-bit artifact and the single-process --max-size one of stories260K."""
    from quantlab import api

    root = tmp_path_factory.mktemp("fanout")
    source = model_path("stories260K.bin")
    out = {"fp32": root / "fp32", "w4": root / "w4", "fit": root / "fit"}
    api.convert(source, out["fp32"], progress=False)
    api.convert(source, out["w4"], recipe="w4a16-g32-asym", evaluate_quality=False, progress=False)
    api.convert(source, out["fit"], max_size=MAX_SIZE, evaluate_quality=False, progress=False)
    return {"source": source, **out}


def _rtn_fake_quantizer(ckpt):
    from quantlab.fit.choose import load_weight
    from quantlab.fit.sensitivity import EMBEDDING_TENSOR, HEAD_UNIT, unit_tensors
    from quantlab.quant.rtn import dequantize, rtn_quantize
    from quantlab.quant.scheme import parse_scheme

    def fake(unit: str, scheme: str) -> dict[str, np.ndarray]:
        s = parse_scheme(scheme)
        fed = {}
        for tensor in unit_tensors(unit):
            w_hat = dequantize(rtn_quantize(load_weight(ckpt, tensor), s.bits, s.group_size, s.symmetric))
            fed[f"{tensor}.weight"] = np.ascontiguousarray(w_hat.T)  # (in, out)
            if tensor == HEAD_UNIT:
                fed[f"{EMBEDDING_TENSOR}.weight"] = w_hat  # (vocab, hidden): the head is the tied table
        return fed

    return fake


def _kill_one_busy_meter(cluster, running) -> int | None:
    """SIGKILL the first meter process caught inside a measurement while ``running`` runs; its pid."""
    deadline = time.monotonic() + 60
    while not running.done() and time.monotonic() < deadline:
        busy = _shard_processes(cluster, "ray::SensitivityMeter.kld")
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            return busy[0]
        time.sleep(0.005)
    return None


def test_sensitivity_on_the_cluster_is_the_single_process_floats(cluster, artifacts, tmp_path, caplog):
    from quantlab.api import _baseline_artifact
    from quantlab.distributed.sensitivity import measure_kld_on_cluster
    from quantlab.fit.sensitivity import measure_kld
    from quantlab.io import load_checkpoint

    ckpt = load_checkpoint(artifacts["source"])
    assert ckpt.spec.tie_word_embeddings
    ids = np.random.default_rng(5).integers(3, ckpt.spec.vocab_size, (3, 48))
    fake = _rtn_fake_quantizer(ckpt)
    # the graph --max-size measures: the fp32 build, its head's own (tied) weight input kept
    with _baseline_artifact(ckpt, tmp_path / "out", progress=False) as baseline:
        single = measure_kld(baseline, ids, UNITS, fake, data="random ids")
        with caplog.at_level(logging.INFO, logger="quantlab.distributed.sensitivity"):
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                running = pool.submit(
                    measure_kld_on_cluster, baseline, ids, UNITS, fake, data="random ids", address=cluster.address,
                    meters=2,
                )  # fmt: skip
                killed = _kill_one_busy_meter(cluster, running)
                spread = running.result(timeout=120)
        assert not (baseline / "sensitivity.onnx").exists()  # the driver's temporary graph is gone
    assert killed is not None, "never caught a meter inside a measurement"
    assert "by 2 meters on 2 nodes" in caplog.text and "weights made on the driver" in caplog.text
    assert spread == single  # exact floats, every (unit, rung), whichever meter measured it
    assert all(v > 0 for row in single.kld.values() for v in row.values())
    assert single.kld["lm_head"]["w4a16-g32-asym"] > single.kld["lm_head"]["w8a16-g128-asym"]


def test_max_size_with_ray_writes_the_single_process_artifact(cluster, artifacts, tmp_path, caplog):
    out = tmp_path / "fit-ray"
    args = ["convert", str(artifacts["source"]), "-o", str(out), "--max-size", str(MAX_SIZE), "--no-progress"]
    with caplog.at_level(logging.INFO, logger="quantlab.distributed.sensitivity"):
        assert main([*args, "--no-eval", "--ray", cluster.address, "--shards", "2"]) == 0
    assert "by 2 meters on 2 nodes" in caplog.text and "weights made on the meters" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fit"]["written_bytes"] <= MAX_SIZE
    assert (
        manifest["fit"]["sensitivity"]
        == json.loads((artifacts["fit"] / "manifest.json").read_text())["fit"]["sensitivity"]
    )
    assert artifact_sha256(out) == artifact_sha256(artifacts["fit"])


def test_ray_without_calibration_or_max_size_is_refused(cluster, tmp_path, capsys):
    out = tmp_path / "x"
    source = str(model_path("stories260K.bin"))
    assert main(["convert", source, "-o", str(out), "--ray", cluster.address, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--ray" in err and "--max-size" in err and not out.exists()


def test_eval_of_many_artifacts_on_the_cluster_is_the_serial_report(cluster, artifacts, capsys):
    candidates = [str(artifacts[k]) for k in ("w4", "fit", "fp32")]
    args = ["eval", *candidates, "--baseline", str(artifacts["fp32"]), "--samples", "4", "--seq-len", "48"]
    assert main([*args, "--json", "--no-progress"]) == 0
    serial = capsys.readouterr().out.splitlines()
    assert main([*args, "--json", "--no-progress", "--ray", cluster.address]) == 0
    spread = capsys.readouterr().out.splitlines()
    assert spread == serial  # same figures, same order, byte for byte
    reports = [json.loads(line) for line in serial]
    assert [r["candidate"] for r in reports] == candidates
    assert reports[0]["kld_mean"] > 0 and reports[1]["kld_mean"] > 0 and reports[2]["kld_mean"] == 0
