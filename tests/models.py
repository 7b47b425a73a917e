"""Where the real checkpoints and golden outputs live (../shared beside the repository)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# QUANTLAB_SHARED when set (.ci/run sets it for a clone made away from the checkout), else ../shared
SHARED = Path(os.environ.get("QUANTLAB_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
MODELS = SHARED / "models"
GOLDEN = SHARED / "golden"


def model_path(name: str) -> Path:
    path = MODELS / name
    require(path.exists(), f"real checkpoint {path} is not present (see ../shared/models/README.md)")
    return path


def golden_path(name: str) -> Path:
    path = GOLDEN / name
    require(path.exists(), f"golden file {path} is not present")
    return path


def golden(name: str) -> dict:
    return json.loads(golden_path(name).read_text())


def require(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false, except in CI (CI=true), where .ci/run installs everything the
    tests need and a missing piece is a failure, not a skip."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs this: see .ci/run)")
    pytest.skip(reason)
