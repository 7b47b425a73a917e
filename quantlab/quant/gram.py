"""Upper-triangle blocks of ``x^T x`` on onnxruntime's GEMM: the GPTQ Hessian's dominant cost.

A 1B model's calibration (128 x 512 tokens) sums ``x^T x`` over 65,536 tokens for each linear input of
every layer; down_proj's (K = 8192) alone is 4.4 TFLOP per layer even when only half of the symmetric
result is computed. numpy's ``x.T @ x`` goes to OpenBLAS's syrk, which ran at 64 GFLOP/s on the 2-core
development machine, while onnxruntime's MLAS GEMM ran the same products at 350 GFLOP/s. So the
product is split into blocks of ``BLOCK`` columns and only the block pairs on or above the diagonal
are computed (136 of 256 at K = 8192), as ``Gemm(transA=1)`` nodes of one small session per width K.
:class:`quantlab.quant.gptq.HessianSum` adds them up and mirrors the upper triangle at the end.
"""

from __future__ import annotations

import functools

import numpy as np

# 512: the diagonal blocks (computed whole) waste half as much as at 1024, and the GEMMs still run
# at full speed: 5% less time per batch at K = 8192.
BLOCK = 512


def row_blocks(k: int) -> list[tuple[int, int]]:
    """The (start, stop) ranges of the blocks along K, each stop - start <= BLOCK."""
    return [(start, min(start + BLOCK, k)) for start in range(0, k, BLOCK)]


def block_pairs(k: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The (rows, cols) ranges of the blocks on and above the diagonal, in the session's output order."""
    blocks = row_blocks(k)
    return [(rows, cols) for n, rows in enumerate(blocks) for cols in blocks[n:]]


@functools.lru_cache(maxsize=8)
def _session(k: int, threads: int | None):
    """x (tokens, k), c0..cN -> y0..yN with y_n = c_n + x[:, rows]^T @ x[:, cols], (rows, cols) the
    n-th pair of block_pairs(k): one calibration batch added to the running sums of the blocks."""
    from onnx import TensorProto, helper

    from quantlab.quant.linalg import cpu_session

    blocks = row_blocks(k)
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [len(blocks)], [b - a for a, b in blocks])
    nodes = [helper.make_node("Split", ["x", "sizes"], [f"x{n}" for n in range(len(blocks))], axis=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", k])]
    outputs = []
    for n, (rows, cols) in enumerate(block_pairs(k)):
        i, j = blocks.index(rows), blocks.index(cols)
        shape = [rows[1] - rows[0], cols[1] - cols[0]]
        nodes.append(helper.make_node("Gemm", [f"x{i}", f"x{j}", f"c{n}"], [f"y{n}"], transA=1, beta=1.0))
        inputs.append(helper.make_tensor_value_info(f"c{n}", TensorProto.FLOAT, shape))
        outputs.append(helper.make_tensor_value_info(f"y{n}", TensorProto.FLOAT, shape))
    return cpu_session(nodes, inputs, outputs, [sizes], threads=threads)


def release() -> None:
    """Drop the sessions and the memory their arenas keep."""
    _session.cache_clear()


def symmetric_from_upper(k: int, blocks) -> np.ndarray:
    """(k, k) float32 from ``((a, b), (c, d)), block`` pairs covering the upper triangle (rows a:b, columns
    c:d, a <= c): each block written in place and mirrored, a diagonal block from its upper triangle."""
    out = np.empty((k, k), np.float32)
    for ((a, b), (c, d)), block in blocks:
        out[a:b, c:d] = block
        if (a, b) == (c, d):
            lower = np.tril_indices(b - a, -1)
            out[a:b, a:b][lower] = block.T[lower]
        else:
            out[c:d, a:b] = block.T
    return out


class UpperGram:
    """The running sum of ``x^T x`` over batches of rows, as its blocks on and above the diagonal.

    Each batch is one onnxruntime run that adds its products to the sums inside the GEMMs
    (``Gemm(beta=1)``), reading the sums from one set of block buffers and writing them into a second
    set through an I/O binding: no allocation, copy or numpy addition per batch (at K = 8192 the blocks
    are 136 MB, and adding them up in numpy took 2 s of each 1B layer's calibration). The two sets
    then trade places.
    """

    def __init__(self, k: int, threads: int | None = None, initial: np.ndarray | None = None) -> None:
        """initial: a (k, k) sum to continue from (its upper blocks are used)."""
        self.k, self.threads = k, threads
        self.pairs = block_pairs(k)
        if initial is None:
            self.blocks = [np.zeros((b - a, d - c), np.float32) for (a, b), (c, d) in self.pairs]
        else:
            self.blocks = [np.array(initial[a:b, c:d], dtype=np.float32) for (a, b), (c, d) in self.pairs]
        self._spare: list[np.ndarray] | None = None

    def add(self, x: np.ndarray) -> None:
        """x (tokens, k) float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.k:
            raise ValueError(f"gram of width {self.k}, got activations of shape {x.shape}")
        if self._spare is None:
            self._spare = [np.empty_like(block) for block in self.blocks]
        from onnxruntime import OrtValue

        session = _session(self.k, self.threads)
        binding = session.io_binding()
        # OrtValues over the numpy buffers (ortvalue_from_numpy shares their memory)
        values = [OrtValue.ortvalue_from_numpy(x), *(OrtValue.ortvalue_from_numpy(b) for b in self.blocks)]
        binding.bind_ortvalue_input("x", values[0])
        for n, (value, out) in enumerate(zip(values[1:], self._spare, strict=True)):
            binding.bind_ortvalue_input(f"c{n}", value)
            binding.bind_output(f"y{n}", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        session.run_with_iobinding(binding)
        self.blocks, self._spare = self._spare, self.blocks

    def total(self) -> np.ndarray:
        """The (k, k) sum, made exactly symmetric from its upper triangle; the blocks are dropped."""
        self._spare = None
        out = symmetric_from_upper(self.k, zip(self.pairs, self.blocks, strict=True))
        self.blocks = []
        return out


def upper_size(k: int) -> int:
    """Elements in the packed upper blocks of a (k, k) Gram (:meth:`UpperGram.packed`)."""
    return sum((b - a) * (d - c) for (a, b), (c, d) in block_pairs(k))


def packed_upper(gram: UpperGram) -> np.ndarray:
    """The blocks of ``gram`` on and above the diagonal, raveled in :func:`block_pairs` order into one
    float32 vector (one buffer: one message when it travels); the gram restarts from zero in its own
    buffers (zeroing 136 MB at K = 8192 costs less than faulting in new pages for the next block)."""
    out = np.concatenate([block.ravel() for block in gram.blocks]) if gram.blocks else np.zeros(0, np.float32)
    for block in gram.blocks:
        block.fill(0.0)
    return out


class OrderedGramSum:
    """``H = 2/n * sum_b G_b`` over canonical blocks of calibration sequences, added in block order.

    Each block's Gram ``G_b`` is a float32 sum over its own batches (:class:`UpperGram`), the same
    computation wherever the block runs; the blocks are added in float64, always in block order, and the
    total is divided once by the integer token count. So the Hessian is the same bytes whether one
    process observed every block or N machines each observed a contiguous run of them: an order of
    float additions that does not depend on the sharding (quantlab.distributed). Memory is the float64
    upper blocks (272 MB for K = 8192), beside a block's float32 running sum.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.count = 0
        self.blocks = 0
        self._total: np.ndarray | None = None  # float64, packed upper blocks

    def add(self, packed: np.ndarray, count: int) -> None:
        """The next block's packed upper Gram (float32, :func:`packed_upper`) and its token count."""
        if packed.shape != (upper_size(self.k),):
            raise ValueError(f"gram of width {self.k} has {upper_size(self.k)} packed elements, got {packed.shape}")
        if self._total is None:
            self._total = packed.astype(np.float64)  # 0 + x: exact, as every later addition's first operand
        else:
            np.add(self._total, packed, out=self._total)  # float32 -> float64 per element, then one rounding
        self.count += int(count)
        self.blocks += 1

    def hessian(self) -> np.ndarray:
        """(k, k) float32 ``2/n * sum``, exactly symmetric; the sum is dropped."""
        if self._total is None or self.count == 0:
            raise ValueError("no calibration tokens")
        total, self._total = self._total, None
        total *= 2.0 / self.count

        def blocks():
            at = 0
            for (a, b), (c, d) in block_pairs(self.k):
                yield ((a, b), (c, d)), total[at : at + (b - a) * (d - c)].reshape(b - a, d - c)
                at += (b - a) * (d - c)

        return symmetric_from_upper(self.k, blocks())
