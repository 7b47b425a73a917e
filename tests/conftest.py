"""Shared fixtures over tests/models.py: the real models and golden outputs beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models import GOLDEN, MODELS, golden_path, model_path

# Names the reader tests use; the one definition of where the files live is tests/models.py.
SHARED_DIR, MODELS_DIR, GOLDEN_DIR = MODELS.parent, MODELS, GOLDEN
require_model = model_path
require_golden = golden_path


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not MODELS_DIR.is_dir():
        pytest.skip(f"shared models folder not found at {MODELS_DIR}")
    return MODELS_DIR


@pytest.fixture(scope="session", name="require_model")
def require_model_fixture():
    """``require_model("stories260K.bin") -> Path``, for tests that take it as a fixture."""
    return require_model


@pytest.fixture(scope="session", name="require_golden")
def require_golden_fixture():
    return require_golden
