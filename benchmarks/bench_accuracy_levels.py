"""The kernels' arithmetic at small batches: accuracy_level 4 (int8 codes, the artifacts' default) against
3 (bf16 tiles where the CPU has AMX-BF16, else fp32) and 0 (fp32), on SmolLM2-135M's linear shapes.

    python benchmarks/bench_accuracy_levels.py      # ~3 minutes on 2 cores

Writes benchmarks/results/accuracy_levels.json: per shape, rows M and level, the median time of a call
(5 passes of 20 calls after a warm-up, the levels interleaved within each pass so that they share the
machine's state) and the mean relative error against the float64 product of the dequantized weights.
Random codes, scales and zero points in MatMulNBits layout (hot: the weights stay in cache between
calls, as a batch's do within a step), 2 threads. The CPU model and flags are in the JSON.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, save  # noqa: E402  (beside this script)

from quantlab import kernels  # noqa: E402
from quantlab.kernels.reference import dequantize_nbits, k_blocks  # noqa: E402

OUT = Path(__file__).parent / "results" / "accuracy_levels.json"
# (name, K, N, bits, block): SmolLM2's fused q/k/v, gate/up and down at g32, its 8-bit head.
SHAPES = [
    ("qkv g32", 576, 960, 4, 32),
    ("gate_up g32", 576, 3072, 4, 32),
    ("down g32", 1536, 576, 4, 32),
    ("head 8-bit g128", 576, 49152, 8, 128),
]
ROWS = [1, 8, 16, 64]
LEVELS = [4, 3, 0]


def case(rng, k: int, n: int, bits: int, bs: int):
    kb = k_blocks(k, bs)
    b = rng.integers(0, 256, size=(n, kb, bs * bits // 8), dtype=np.uint8)
    s = rng.uniform(0.002, 0.03, size=(n, kb)).astype(np.float32)
    z = rng.integers(0, 256, size=(n, (kb + 1) // 2 if bits == 4 else kb), dtype=np.uint8)
    return b, s, z


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for name, k, n, bits, bs in SHAPES:
        b, s, z = case(rng, k, n, bits, bs)
        w = dequantize_nbits(b, s, z, k=k, n=n, bits=bits, block_size=bs).astype(np.float64)
        for m in ROWS:
            x = rng.standard_normal((m, k)).astype(np.float32)
            exact = x.astype(np.float64) @ w.T
            kw = dict(K=k, N=n, bits=bits, block_size=bs, threads=2)
            times = {lv: [] for lv in LEVELS}
            err = {}
            for lv in LEVELS:
                y = kernels.matmul_nbits(x, b, s, z, accuracy_level=lv, **kw)  # warm-up
                err[lv] = float(np.mean(np.abs(y - exact)) / np.mean(np.abs(exact)))
            calls = 20 if n * k < 10_000_000 else 5
            for _ in range(5):
                for lv in LEVELS:
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        kernels.matmul_nbits(x, b, s, z, accuracy_level=lv, **kw)
                    times[lv].append((time.perf_counter() - t0) / calls)
            for lv in LEVELS:
                med = float(np.median(times[lv]))
                rows.append(
                    {
                        "shape": name, "K": k, "N": n, "bits": bits, "block_size": bs, "M": m,
                        "accuracy_level": lv, "median_ms": round(med * 1e3, 4),
                        "gmac_per_s": round(m * k * n / med / 1e9, 1), "mean_rel_err": err[lv],
                    }
                )  # fmt: skip
            line = "  ".join(f"L{lv} {np.median(times[lv]) * 1e3:7.3f} ms err {err[lv]:.1e}" for lv in LEVELS)
            print(f"{name:16s} M={m:3d}  {line}", flush=True)
    save(OUT, {"benchmark": "accuracy_levels", "machine": machine(), "paths": kernels.available_paths(),
               "threads": 2, "rows": rows})  # fmt: skip
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
