"""Where the real checkpoints and golden outputs live (../shared beside the repository)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
GOLDEN = SHARED / "golden"


def model_path(name: str) -> Path:
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"real checkpoint {path} is not present (see ../shared/models/README.md)")
    return path


def golden(name: str) -> dict:
    path = GOLDEN / name
    if not path.exists():
        pytest.skip(f"golden file {path} is not present")
    return json.loads(path.read_text())
