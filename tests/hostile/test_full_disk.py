"""A really full disk: a conversion on a small tmpfs that another process fills mid-run.

The filesystem is a 48 MB tmpfs mounted in a private user + mount namespace (``unshare``), so the
test needs no root and touches nothing outside it. The conversion passes the free-space preflight,
starts calibrating, and then a filler takes every free byte: the next write fails with the kernel's
own ENOSPC. The conversion must end with one line naming the file and exit 2, and leave no output,
staging or baseline folder (the per-layer checkpoints kept for ``--resume`` may stay).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.hostile.conftest import REPO, assert_one_line_error
from tests.models import model_path

DRIVER = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from pathlib import Path

    disk, model, recipe = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    out = disk / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantlab", "convert", model, "-o", str(out), "--recipe", recipe,
         "--calib-from-model", "4", "--no-eval", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    resume = disk / ".out.resume"
    deadline = time.monotonic() + 240
    while not resume.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    filled = False
    if proc.poll() is None:
        with open(disk / "ballast", "wb") as f:  # every free byte, until the kernel says ENOSPC
            try:
                while True:
                    f.write(b"\\0" * (1 << 20))
                    f.flush()
            except OSError as e:
                filled = e.errno == 28
    stdout, stderr = proc.communicate(timeout=600)
    os.remove(disk / "ballast") if (disk / "ballast").exists() else None
    print(json.dumps({"filled": filled, "code": proc.returncode, "stderr": stderr,
                      "left": sorted(p.name for p in disk.iterdir())}))
    """
)

RECIPE = 'scheme = "w4a16-g32-gptq"\n[calibration]\nsamples = 4\nseq_len = 64\n'


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, text=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.slow
def test_real_enospc_mid_conversion(tmp_path):
    if not _can_unshare():
        pytest.skip("needs unprivileged user + mount namespaces (unshare) to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    recipe = tmp_path / "gptq.toml"
    recipe.write_text(RECIPE)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env_path = f"PYTHONPATH={REPO}"
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "env", env_path, sys.executable, str(driver),
         str(disk), str(model_path("stories260K.bin")), str(recipe)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["filled"], result  # the filler really met ENOSPC while the conversion ran
    assert result["code"] == 2, result
    line = assert_one_line_error(result["stderr"], "No space left on device")
    assert ".out.resume/" in line or "/out" in line, line  # names the file that could not be written
    # Nothing half-written: no output, no staging or baseline folder; only the resume checkpoints.
    assert [name for name in result["left"] if name != ".out.resume"] == [], result["left"]
