#!/usr/bin/env bash
# Create .venv and install quantlab with everything its tests need (CPU torch only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# torch first, pinned to the CPU build, so nothing below can pull a CUDA build.
# (this machine's pip finds the CPU wheel of torch 2.13.0 on disk, in /opt/wheels).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python - <<'PY'
import torch
assert torch.version.cuda is None, f"a CUDA build of torch was installed ({torch.__version__}); quantlab pins the CPU wheel"
PY
