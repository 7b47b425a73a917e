"""Failures: signals, kill -9 at random points, a full or read-only disk, resuming a calibration."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantlab.cli.main import main
from tests.hostile.conftest import REPO, assert_one_line_error, leftovers, run_cli
from tests.models import model_path

STORIES = "stories260K.bin"
# A calibration long enough to interrupt (several seconds of GPTQ over stories260K's 5 layers).
CALIBRATED_RECIPE = 'scheme = "w4a16-g32-gptq"\n[calibration]\nsamples = 4\nseq_len = 64\n'
# For the signal tests: a calibration that runs for seconds after the .resume folder appears (about 7 s
# here), so the signal lands inside it even when a loaded machine delays the test's polling.
SIGNAL_RECIPE = 'scheme = "w4a16-g32-gptq"\n[calibration]\nsamples = 32\nseq_len = 256\n'
KILL_POINTS = int(os.environ.get("QUANTLAB_KILL_POINTS", "10"))
KILL_SEED = 20261129


def _convert_argv(out: Path, recipe: Path, *extra) -> list[str]:
    return [
        sys.executable, "-m", "quantlab", "convert", str(model_path(STORIES)), "-o", str(out),
        "--recipe", str(recipe), "--calib-from-model", "4", "--no-eval", "--no-progress", *extra,
    ]  # fmt: skip


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored across
    # exec: the child would never see the test's SIGINT. Give it a terminal's default instead.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"finished before the signal: {proc.returncode} {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the conversion to start work")
        time.sleep(0.02)


def verify_complete(artifact: Path) -> dict:
    """The artifact's files are exactly the manifest's list, each with the recorded size and sha256."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    on_disk = sorted(p.name for p in artifact.iterdir())
    assert on_disk == sorted([*manifest["files"], "manifest.json"]), on_disk
    for name, entry in manifest["files"].items():
        data = (artifact / name).read_bytes()
        assert len(data) == entry["bytes"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
    return manifest


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture()
def recipe(tmp_path) -> Path:
    path = tmp_path / "gptq.toml"
    path.write_text(CALIBRATED_RECIPE)
    return path


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_calibration_cleans_up(tmp_path, signum, code):
    recipe = tmp_path / "signal.toml"
    recipe.write_text(SIGNAL_RECIPE)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    proc = _spawn([*_convert_argv(out, recipe), "--calib-from-model", "32"])
    # The baseline artifact exists while calibration runs: interrupt then.
    _wait_for(lambda: any(".resume" in p.name for p in work.iterdir()), proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert not out.exists()
    # The per-layer checkpoints stay for --resume; nothing else may.
    assert [name for name in leftovers(work) if not name.endswith(".resume")] == []


def test_disk_space_preflight_refuses(capsys, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["convert", str(model_path(STORIES)), "-o", str(out), "--no-progress"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "not enough free disk space", "MB are free")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_write_failure_is_one_line(capsys, tmp_path, monkeypatch, err):
    import quantlab.emit.artifact as artifact

    def failing_save(model, folder, *, progress=True):  # noqa: ARG001
        (folder / "model.onnx.data").write_bytes(b"partial")
        raise OSError(err, os.strerror(err), str(folder / "model.onnx.data"))

    monkeypatch.setattr(artifact, "save_model", failing_save)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["convert", str(model_path(STORIES)), "-o", str(out), "--no-progress"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "model.onnx.data", os.strerror(err))
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = run_cli("convert", model_path(STORIES), "-o", parent / "out", "--no-progress")
        assert proc.returncode == 2, proc.stderr
        assert_one_line_error(proc.stderr, "ro")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_read_only_output_folder_via_mkdtemp(capsys, tmp_path, monkeypatch):
    """The same refusal where permissions cannot be used (as root): the folder cannot be created."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["convert", str(model_path(STORIES)), "-o", str(out), "--no-progress"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "Read-only file system")
    assert not out.exists()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from quantlab.emit.staging import remove_stale_temporaries

    dead = tmp_path / ".out.staging-999999999-abc"  # above any pid_max: no such process
    dead_baseline = tmp_path / ".out.baseline-999999999-def"
    mine = tmp_path / f".out.staging-{os.getpid()}-xyz"
    other_output = tmp_path / ".out.x.staging-999999999-abc"
    for folder in (dead, dead_baseline, mine, other_output):
        folder.mkdir()
        (folder / "model.onnx.data").write_bytes(b"partial")
    assert sorted(remove_stale_temporaries(tmp_path / "out")) == sorted([dead, dead_baseline])
    assert mine.exists() and other_output.exists() and not dead.exists()


def test_resume_refuses_changed_inputs(capsys, tmp_path, recipe):
    out = tmp_path / "out"
    folder = tmp_path / ".out.resume"
    folder.mkdir()
    (folder / "fingerprint.json").write_text(json.dumps({"sha256": "0" * 64, "inputs": {"recipe": {}}}))
    capsys.readouterr()
    code = main(_convert_argv(out, recipe, "--resume")[3:])
    assert code == 2
    line = assert_one_line_error(capsys.readouterr().err, ".out.resume", "fingerprint", "changed: ")
    assert "recipe" in line and "calibration_data" in line
    assert not out.exists()


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(tmp_path, recipe):
    """kill -9 at seeded random moments: the output is absent or complete; --resume gives the same bytes."""
    reference = tmp_path / "reference"
    start = time.monotonic()
    proc = subprocess.run(_convert_argv(reference, recipe), capture_output=True, text=True, env={**os.environ})
    duration = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    verify_complete(reference)
    want = tree_bytes(reference)
    rng = random.Random(KILL_SEED)
    outcomes = []
    for n in range(KILL_POINTS):
        work = tmp_path / f"kill{n}"
        work.mkdir()
        out = work / "out"
        delay = rng.uniform(0.0, duration)
        child = _spawn(_convert_argv(out, recipe))
        time.sleep(delay)
        child.kill()  # SIGKILL: no handler runs
        child.communicate()
        if out.exists():
            verify_complete(out)
            state = "complete"
        else:
            state = "absent"
        layers = len(list((work / ".out.resume").glob("layer-*.npz"))) if (work / ".out.resume").exists() else 0
        if state == "complete":
            assert tree_bytes(out) == want
        else:
            resumed = subprocess.run(
                _convert_argv(out, recipe, "--resume"), capture_output=True, text=True, env={**os.environ}
            )
            assert resumed.returncode == 0, resumed.stderr
            assert tree_bytes(out) == want, f"kill at {delay:.2f}s: resumed artifact differs"
            # The checkpoints are gone after success, and so is whatever the killed run left behind.
            assert leftovers(work) == []
        outcomes.append((round(delay, 2), state, layers))
    print(f"uninterrupted {duration:.1f}s; kill -9 outcomes (delay s, output, layers checkpointed): {outcomes}")


def test_resume_after_a_crash_between_layers_is_byte_identical(tmp_path, monkeypatch):
    """In process and fast: a crash after layer 0 is checkpointed, then --resume; same bytes as no crash."""
    from quantlab import api
    from quantlab.calib import resume
    from tests.hostile.conftest import llama_config, llama_tensors, write_hf

    dims = dict(hidden=64, ff=128, layers=3)
    config = llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    folder = write_hf(tmp_path / "hf", config=config, tensors=llama_tensors(**dims))
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([[1 + (i * 7 + j) % 60 for j in range(16)] for i in range(4)]))
    recipe = tmp_path / "r.toml"
    recipe.write_text('scheme = "w4a16-g32-gptq"\nembedding = "none"\nlm_head = "none"\n[calibration]\nseq_len = 16\n')
    kwargs = dict(recipe=str(recipe), calib=str(calib), evaluate_quality=False, progress=False)
    api.convert(folder, tmp_path / "reference", **kwargs)

    real_save = resume.LayerCheckpoints.save_layer

    def save_then_crash(self, i, *args):
        real_save(self, i, *args)
        if i == 1:
            raise KeyboardInterrupt  # as if killed right after layer 1 was saved

    monkeypatch.setattr(resume.LayerCheckpoints, "save_layer", save_then_crash)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        api.convert(folder, out, **kwargs)
    assert not out.exists()
    saved = sorted(p.name for p in (tmp_path / ".out.resume").iterdir())
    assert saved == [
        "fingerprint.json",
        "hidden-a.npy",
        "hidden-b.npy",
        "hidden.json",
        "layer-0000.npz",
        "layer-0001.npz",
    ]
    assert json.loads((tmp_path / ".out.resume" / "hidden.json").read_text()) == {"slot": "hidden-b.npy", "layer": 1}
    monkeypatch.setattr(resume.LayerCheckpoints, "save_layer", real_save)

    restored = []
    real_restore = resume.LayerCheckpoints.restore
    monkeypatch.setattr(
        resume.LayerCheckpoints, "restore", lambda self, *a: restored.append(real_restore(self, *a)) or restored[-1]
    )
    api.convert(folder, out, resume=True, **kwargs)
    assert restored[0][0] == 2  # continued from layer 2
    assert tree_bytes(out) == tree_bytes(tmp_path / "reference")
    assert not (tmp_path / ".out.resume").exists()
