"""How to run a GGUF Q4_1 block (w = d * q + m) in onnxruntime's MatMulNBits without rounding it again.

    python benchmarks/bench_source_layouts.py           # SmolLM2-135M's shapes, M in {1, 64}, ~1 minute

Layouts, each one MatMulNBits(x) of 4-bit codes in blocks of 32, timed on one thread:

- ``float_zp``: zero points of the scales' type, ``zp = -m / d`` (exact up to fp32 rounding). onnxruntime
  1.32 accepts them on CPU for 2 and 4 bits only and runs them by dequantizing B and calling SGEMM:
  accuracy_level 4 is ignored there (the error stays at fp32's);
- ``offset`` (what ``--recipe source`` emits): the implicit zero point 8 and ``+ block_sums(x) @ (m + 8d)^T``
  beside the node (exact up to fp32 rounding);
- ``uint8_zp``: the nearest integer zero point ``round(-m / d)``, with no offset: the packed fast path,
  but not the GGUF's weights (shown for the cost of the fast path and the error of rounding the min).

Accuracy: max |y - y_ref| / max |y_ref|, y_ref = x @ (d * q + m)^T in float64. Writes
benchmarks/results/source_layouts.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import machine, save

RESULTS = Path(__file__).parent / "results"
SHAPES = ((576, 1536), (1536, 576), (576, 576))  # SmolLM2-135M: gate/up, down, o
BLOCK = 32


def q4_1_block(k: int, n: int, seed: int = 0):
    """Random Q4_1-like weights: codes (N, K), fp16 scales d and mins m (N, K / 32), as fp32."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    d = rng.uniform(0.005, 0.02, (n, k // BLOCK)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(6, 9, d.shape)).astype(np.float16).astype(np.float32)
    return codes, d, m


def model(layout: str, codes, d, m, level: int) -> bytes:
    n, k = codes.shape
    nb = k // BLOCK
    b = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, nb, BLOCK // 2)  # low nibble first
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(d, "S")]
    inputs, nodes, out = ["A", "B", "S"], [], "Y"
    if layout == "float_zp":
        inits.append(numpy_helper.from_array(-m / d, "Z"))
        inputs.append("Z")
    elif layout == "uint8_zp":
        zp = np.clip(np.rint(-m / d), 0, 15).astype(np.uint8)
        zp = np.concatenate([zp, np.full((n, nb % 2), 8, np.uint8)], axis=1)
        inits.append(numpy_helper.from_array(zp[:, 0::2] | (zp[:, 1::2] << 4), "Z"))
        inputs.append("Z")
    else:  # offset
        inits += [
            numpy_helper.from_array(np.ascontiguousarray((m + 8 * d).T), "OffT"),
            numpy_helper.from_array(np.array([0, nb, BLOCK], np.int64), "shape"),
            numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        ]
        out = "Y0"
        nodes += [
            helper.make_node("Reshape", ["A", "shape"], ["A3"]),
            helper.make_node("ReduceSum", ["A3", "axes"], ["sums"], keepdims=0),
            helper.make_node("MatMul", ["sums", "OffT"], ["C"]),
            helper.make_node("Add", ["Y0", "C"], ["Y"]),
        ]
    attrs = {"K": k, "N": n, "bits": 4, "block_size": BLOCK, "accuracy_level": level}
    nodes.insert(0, helper.make_node("MatMulNBits", inputs, [out], domain="com.microsoft", **attrs))
    graph = helper.make_graph(
        nodes,
        layout,
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def measure(args) -> list[dict]:
    rows = []
    for k, n in SHAPES:
        codes, d, m = q4_1_block(k, n)
        w = np.repeat(d, BLOCK, axis=1).astype(np.float64) * codes + np.repeat(m, BLOCK, axis=1)
        sessions = {}
        for layout in ("float_zp", "offset", "uint8_zp"):
            for level in (0, 4):
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                sessions[layout, level] = ort.InferenceSession(model(layout, codes, d, m, level), opts)
        for rows_m in args.m:
            x = np.random.default_rng(1).standard_normal((rows_m, k)).astype(np.float32)
            ref = x.astype(np.float64) @ w.T
            times = {key: [] for key in sessions}
            for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits every layout alike
                for key, s in sessions.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        y = s.run(None, {"A": x})[0]
                    times[key].append((time.perf_counter() - start) / args.calls)
            for (layout, level), s in sessions.items():
                y = s.run(None, {"A": x})[0]
                rows.append(
                    {
                        "K": k,
                        "N": n,
                        "M": rows_m,
                        "layout": layout,
                        "accuracy_level": level,
                        "median_us": round(1e6 * float(np.median(times[layout, level])), 1),
                        "rel_error": float(np.abs(y - ref).max() / np.abs(ref).max()),
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| K x N | M | layout | accuracy_level | median µs | rel. error |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['K']} x {r['N']} | {r['M']} | {r['layout']} | {r['accuracy_level']} | {r['median_us']} "
            f"| {r['rel_error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    rows = measure(args)
    doc = {"machine": machine(), "load_average": os.getloadavg(), "onnxruntime": ort.__version__, "rows": rows}
    save(RESULTS / "source_layouts.json", doc)
    (RESULTS / "source_layouts.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
