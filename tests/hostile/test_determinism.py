"""Same input, same bytes: across PYTHONHASHSEED, thread counts and working directories."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.hostile.conftest import run_cli
from tests.hostile.test_failures import CALIBRATED_RECIPE, tree_bytes, verify_complete
from tests.models import model_path

# onnxruntime sizes its thread pool from the CPUs the process may use: taskset changes that count.
TASKSET = ["taskset", "-c", "0"] if shutil.which("taskset") and len(os.sched_getaffinity(0)) > 1 else []
VARIANTS = [
    ({"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}, "a", TASKSET),
    ({"PYTHONHASHSEED": "4242", "OMP_NUM_THREADS": "2"}, "b/c", []),
]


@pytest.mark.parametrize(
    "extra",
    [
        ["--recipe", "fp32"],
        ["--recipe", "w4a16-g32-sym"],
        pytest.param(["--recipe", "{gptq}", "--calib-from-model", "4"], marks=pytest.mark.slow),
    ],
    ids=["fp32", "rtn-with-quality", "gptq-with-quality"],
)
def test_identical_bytes_across_environments(tmp_path, extra):
    gptq = tmp_path / "gptq.toml"
    gptq.write_text(CALIBRATED_RECIPE)
    extra = [e.format(gptq=gptq) for e in extra]
    artifacts = []
    for n, (env, folder, prefix) in enumerate(VARIANTS):
        cwd = tmp_path / folder
        cwd.mkdir(parents=True)
        out = f"out{n}"  # relative: resolved against a different working directory each time
        source = model_path("stories260K.bin")
        proc = run_cli("convert", source, "-o", out, "--no-progress", *extra, cwd=cwd, env=env, prefix=prefix)
        assert proc.returncode == 0, proc.stderr
        verify_complete(cwd / out)
        artifacts.append(tree_bytes(cwd / out))
    assert artifacts[0].keys() == artifacts[1].keys()
    for name in artifacts[0]:
        assert artifacts[0][name] == artifacts[1][name], f"{name} differs between environments"
