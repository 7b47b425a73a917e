"""stories260K converted once per test session, in fp32 (the baseline) and fp16 (a genuinely different model)."""

from __future__ import annotations

import pytest

from quantlab.cli.main import main
from tests.models import model_path


def _convert(tmp_path_factory, dtype: str):
    out = tmp_path_factory.mktemp("eval-stories") / dtype
    assert main(["convert", str(model_path("stories260K.bin")), "-o", str(out), "--dtype", dtype, "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def stories_fp32(tmp_path_factory):
    return _convert(tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def stories_fp16(tmp_path_factory):
    return _convert(tmp_path_factory, "fp16")
