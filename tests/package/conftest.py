"""stories260K artifacts converted once per session, and a clean virtual environment for verify."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantlab import api
from tests.models import model_path

QDQ_RECIPE = 'scheme = "w4a16-g32-asym"\nformat = "qdq"\nembedding = "none"\n'
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
CLEAN_PACKAGES = ("onnxruntime", "numpy", "tokenizers")


@pytest.fixture(scope="session")
def stories_w4(tmp_path_factory):
    out = tmp_path_factory.mktemp("package_w4") / "w4"
    api.convert(model_path("stories260K.bin"), out, recipe="w4a16-g128-asym", evaluate_quality=False, progress=False)
    return out


@pytest.fixture(scope="session")
def stories_qdq(tmp_path_factory):
    root = tmp_path_factory.mktemp("package_qdq")
    (root / "qdq.toml").write_text(QDQ_RECIPE)
    out = root / "qdq"
    api.convert(
        model_path("stories260K.bin"), out, recipe=str(root / "qdq.toml"), evaluate_quality=False, progress=False
    )
    return out


@pytest.fixture(scope="session")
def smollm2_w4_and_qdq(tmp_path_factory):
    """SmolLM2-135M as w4a16-g128-asym (MatMulNBits) and as the same scheme in standard-ONNX QDQ."""
    root = tmp_path_factory.mktemp("package_smollm2")
    source = model_path(SMOLLM2)
    (root / "qdq.toml").write_text(QDQ_RECIPE.replace("g32", "g128"))
    w4, qdq = root / "w4", root / "qdq"
    api.convert(source, w4, recipe="w4a16-g128-asym", evaluate_quality=False, progress=False)
    api.convert(source, qdq, recipe=str(root / "qdq.toml"), evaluate_quality=False, progress=False)
    return w4, qdq


@pytest.fixture(scope="session")
def clean_python(tmp_path_factory):
    """A fresh venv (no --system-site-packages) holding only onnxruntime, numpy and tokenizers."""
    venv = tmp_path_factory.mktemp("clean_venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *CLEAN_PACKAGES], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot install {', '.join(CLEAN_PACKAGES)} into a fresh venv: {proc.stderr.strip()[-300:]}")
    return python
