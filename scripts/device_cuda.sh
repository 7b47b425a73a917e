#!/usr/bin/env bash
# The GPU checks of issue 17, for a lent GPU machine (CI has none): build the CUDA kernel for the GPU,
# run its tests against the reference, and time it against cuBLAS fp16 (benchmarks/bench_kernels.py
# --cuda-only). Results land in ${OUT:-out/device}: pytest.txt, kernels_cuda_<gpu>.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/device}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/gpu.txt"
cmake -S . -B build/cuda -DQUANTLAB_CUDA=ON -DQUANTLAB_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null \
  && cmake --build build/cuda -j"$(nproc)" --target quantlab_cuda 2>&1 | tail -3 || exit 1
export QUANTLAB_CUDA_BUILD_DIR=$PWD/build/cuda QUANTLAB_CUDA_LIB=$PWD/build/cuda/_libquantlab_cuda.so
python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cuda.py 2>&1 | tee "$out/pytest.txt"
python3 benchmarks/bench_kernels.py --cuda-only --out "$out"
