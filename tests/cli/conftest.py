"""Artifacts converted once per test session from the real checkpoints, shared by the end-to-end tests."""

from __future__ import annotations

import pytest

from quantlab.cli.main import main
from tests.models import model_path

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def stories_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "fp32"
    assert main(["convert", str(model_path("stories260K.bin")), "-o", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "fp32"
    assert main(["convert", str(model_path(SMOLLM2)), "-o", str(out), "--no-progress"]) == 0
    return out
