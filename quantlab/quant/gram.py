"""Upper-triangle blocks of ``x^T x`` on onnxruntime's GEMM: the GPTQ Hessian's dominant cost.

A 1B model's calibration (128 x 512 tokens) sums ``x^T x`` over 65,536 tokens for each linear input of
every layer; down_proj's (K = 8192) alone is 4.4 TFLOP per layer even when only half of the symmetric
result is computed. numpy's ``x.T @ x`` goes to OpenBLAS's syrk, which ran at 64 GFLOP/s on the 2-core
development machine, while onnxruntime's MLAS GEMM ran the same products at 350 GFLOP/s. So the
product is split into blocks of ``BLOCK`` columns and only the block pairs on or above the diagonal
are computed (36 of 64 at K = 8192), as ``Gemm(transA=1)`` nodes of one small session per width K.
:class:`quantlab.quant.gptq.HessianSum` adds them up and mirrors the upper triangle at the end.
"""

from __future__ import annotations

import functools

import numpy as np

BLOCK = 1024


def row_blocks(k: int) -> list[tuple[int, int]]:
    """The (start, stop) ranges of the blocks along K, each stop - start <= BLOCK."""
    return [(start, min(start + BLOCK, k)) for start in range(0, k, BLOCK)]


def block_pairs(k: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The (rows, cols) ranges of the blocks on and above the diagonal, in the session's output order."""
    blocks = row_blocks(k)
    return [(rows, cols) for n, rows in enumerate(blocks) for cols in blocks[n:]]


@functools.lru_cache(maxsize=8)
def _session(k: int, threads: int | None):
    """x (tokens, k) f32 -> one output per pair in block_pairs(k): x[:, rows]^T @ x[:, cols]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    blocks = row_blocks(k)
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [len(blocks)], [b - a for a, b in blocks])
    nodes = [helper.make_node("Split", ["x", "sizes"], [f"x{n}" for n in range(len(blocks))], axis=1)]
    outputs = []
    for n, (rows, cols) in enumerate(block_pairs(k)):
        i, j = blocks.index(rows), blocks.index(cols)
        nodes.append(helper.make_node("Gemm", [f"x{i}", f"x{j}"], [f"block{n}"], transA=1))
        outputs.append(
            helper.make_tensor_value_info(f"block{n}", TensorProto.FLOAT, [rows[1] - rows[0], cols[1] - cols[0]])
        )
    graph = helper.make_graph(
        nodes,
        f"gram_{k}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", k])],
        outputs,
        initializer=[sizes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def release() -> None:
    """Drop the sessions and the memory their arenas keep (the blocks of a run: 150 MB at K = 8192)."""
    _session.cache_clear()


def upper_blocks(x: np.ndarray, threads: int | None = None) -> list[np.ndarray]:
    """x (tokens, K) float32 -> [x[:, rows]^T @ x[:, cols] for each (rows, cols) in block_pairs(K)]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _session(x.shape[1], threads).run(None, {"x": x})


def add_upper(total: np.ndarray, x: np.ndarray, threads: int | None = None) -> None:
    """total (K, K) += x^T x on and above the diagonal blocks; the blocks below are left as they were."""
    for ((a, b), (c, d)), block in zip(block_pairs(total.shape[0]), upper_blocks(x, threads), strict=True):
        total[a:b, c:d] += block


def mirror_upper(total: np.ndarray) -> np.ndarray:
    """Make ``total`` symmetric in place from its upper triangle (the part :func:`add_upper` keeps)."""
    blocks = row_blocks(total.shape[0])
    for n, (a, b) in enumerate(blocks):
        diagonal = total[a:b, a:b]
        lower = np.tril_indices(b - a, -1)
        diagonal[lower] = diagonal.T[lower]
        for c, d in blocks[n + 1 :]:
            total[c:d, a:b] = total[a:b, c:d].T
    return total
