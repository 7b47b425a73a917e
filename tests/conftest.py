"""Shared fixtures: where the real models and golden outputs live, and skipping when they are absent.

Real checkpoints are never copied into the repository; they sit in ``../shared/models`` beside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1] / ".." / "shared"
MODELS_DIR = SHARED_DIR / "models"
GOLDEN_DIR = SHARED_DIR / "golden"


def require_model(name: str) -> Path:
    """The path of ``../shared/models/<name>``; skips the test (with the reason) when it is absent."""
    path = MODELS_DIR / name
    if not path.is_file():
        pytest.skip(f"real model {name} not found at {path.resolve()} (needs the shared models folder)")
    return path


def require_golden(name: str) -> Path:
    path = GOLDEN_DIR / name
    if not path.is_file():
        pytest.skip(f"golden file {name} not found at {path.resolve()} (needs the shared golden folder)")
    return path


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not MODELS_DIR.is_dir():
        pytest.skip(f"shared models folder not found at {MODELS_DIR.resolve()}")
    return MODELS_DIR


@pytest.fixture(scope="session", name="require_model")
def require_model_fixture():
    """``require_model("stories260K.bin") -> Path``, for tests that take it as a fixture."""
    return require_model


@pytest.fixture(scope="session", name="require_golden")
def require_golden_fixture():
    return require_golden
