"""``quantlab sweep SRC -o OUTDIR --recipes ... --ray`` on a real two-node Ray cluster on loopback (one CPU per node).

Every file of every artifact is the serial sweep's, byte for byte (SHA-256), and both nodes converted;
an unknown recipe is refused in one line (exit 2) before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from quantlab.cli.main import main
from tests.distributed.cluster import connected_cluster
from tests.models import model_path

# a float and a quantized recipe: one conversion per node
RECIPES = ("fp32", "w4a16-g128-asym")


@pytest.fixture(scope="module")
def cluster():
    with connected_cluster() as c:
        yield c


def file_sha256(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_sweep_on_the_cluster_writes_the_serial_sweeps_bytes(cluster, tmp_path):
    source = str(model_path("stories260K.bin"))
    recipes = ",".join(RECIPES)
    serial, spread = tmp_path / "serial", tmp_path / "ray"
    assert main(["sweep", source, "-o", str(serial), "--recipes", recipes, "--json", str(tmp_path / "s.json")]) == 0
    args = ["sweep", source, "-o", str(spread), "--recipes", recipes, "--json", str(tmp_path / "r.json")]
    assert main([*args, "--ray", cluster.address]) == 0

    assert sorted(p.name for p in serial.iterdir()) == sorted(p.name for p in spread.iterdir()) == sorted(RECIPES)
    for recipe in RECIPES:
        files = file_sha256(serial / recipe)
        assert "model.onnx" in files and "manifest.json" in files
        assert file_sha256(spread / recipe) == files, recipe

    rows_serial = json.loads((tmp_path / "s.json").read_text())["results"]
    rows_ray = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["recipe"] for r in rows_ray] == [r["recipe"] for r in rows_serial] == list(RECIPES)
    assert [r["bytes"] for r in rows_ray] == [r["bytes"] for r in rows_serial]
    assert all(r["status"] == "ok" and r["kld_mean"] is None for r in rows_serial + rows_ray)  # --no-eval
    assert rows_serial[0]["bytes"] > 2 * rows_serial[1]["bytes"]
    assert {r["node"]["name"] for r in rows_ray} == {"head", "worker"}  # each idle node got a conversion


def test_an_unknown_recipe_is_refused_in_one_line_before_any_work(cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", str(model_path("stories260K.bin")), "-o", str(out), "--recipes", "fp32,w9a16-g128-asym"]
    for extra in ([], ["--ray", cluster.address]):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "w9a16-g128-asym" in err and "--recipes" in err
        assert not out.exists()


def test_an_existing_artifact_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "sweep"
    (out / "fp32").mkdir(parents=True)
    assert main(["sweep", str(model_path("stories260K.bin")), "-o", str(out), "--recipes", "fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert list(out.iterdir()) == [out / "fp32"] and not any((out / "fp32").iterdir())
