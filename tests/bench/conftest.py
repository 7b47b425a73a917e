"""stories260K artifacts converted once per session (fp32 baseline, w8) and one small benchmark run over them."""

from __future__ import annotations

import json

import pytest

from quantlab.cli.main import main
from tests.models import model_path

# tiny on purpose: these tests check what is reported, never how fast anything is
TINY = ["--prompt-len", "8", "--gen", "4", "--runs", "2", "--threads", "1", "--roofline-mib", "16"]


def _convert(tmp_path_factory, recipe: str):
    out = tmp_path_factory.mktemp("bench-stories") / recipe
    argv = ["convert", str(model_path("stories260K.bin")), "-o", str(out), "--recipe", recipe, "--no-eval"]
    assert main([*argv, "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def stories_fp32(tmp_path_factory):
    return _convert(tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def stories_w8(tmp_path_factory):
    return _convert(tmp_path_factory, "w8a16-g128")


@pytest.fixture(scope="session")
def bench_run(stories_fp32, stories_w8, tmp_path_factory):
    """(json path, document, stdout) of one `quantlab bench` over fp32 and w8, with quality and a plot."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench-results")
    argv = [
        "bench",
        str(stories_fp32),
        str(stories_w8),
        *TINY,
        "--baseline",
        str(stories_fp32),
        "--backend",
        "onnxruntime",
        "--backend",
        "torch-kernels",
        "--quality-samples",
        "2",
        "--json",
        str(out / "latency_test.json"),
        "--plot",
        str(out / "latency_test.png"),
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return out / "latency_test.json", json.loads((out / "latency_test.json").read_text()), stdout.getvalue()
