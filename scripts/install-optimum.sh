#!/usr/bin/env bash
# optimum-onnx pins transformers<4.58 while quantlab's tests use transformers 5, so the optimum client
# gets its own venv (.venv-optimum); tests/cli/test_clients.py drives it in a subprocess.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-optimum/bin/python ] || "$PY" -m venv .venv-optimum
.venv-optimum/bin/python -m pip install -q --upgrade pip
.venv-optimum/bin/python -m pip install -q "torch==2.13.0"
.venv-optimum/bin/python -m pip install -q "optimum-onnx==0.1.0" "transformers>=4.55,<4.58" "onnxruntime==1.32.0"
.venv-optimum/bin/python -c "import torch; assert torch.version.cuda is None"
