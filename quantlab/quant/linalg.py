"""Dense linear algebra for GPTQ on onnxruntime's GEMM (MLAS).

On the 2-core development machine (AMD EPYC) MLAS multiplies float32 matrices at about 400 GFLOP/s,
torch's MKL at 180 (two threads) and numpy's OpenBLAS slower still; MLAS also returns the same bytes
for any thread count, which MKL does not promise. So the products GPTQ spends its time in (the lazy
batch updates, the triangular inverse of the Hessian's factor) run here, as single-node sessions
kept per attribute set.

:func:`reversed_cholesky` and :func:`inverse_hessian_factor` give GPTQ's ``U`` (upper triangular,
``U^T U = H^-1``) from one Cholesky factorization and one triangular inverse, where the textbook
route (Cholesky, explicit inverse, Cholesky again: 4/3 K^3 flops) costs twice the arithmetic: with
``J`` the exchange matrix (reversal), ``J H J = L L^T`` gives ``H = (J L J)(J L J)^T`` with
``J L J`` upper triangular, so ``H^-1 = U^T U`` for ``U = (J L J)^-1 = J L^-1 J``, which is upper
triangular with a positive diagonal: the (unique) Cholesky factor GPTQ asks for. For a square
matrix ``J M J`` is the reversal of its row-major buffer, done in place.
"""

from __future__ import annotations

import functools

import numpy as np

# MKL's Cholesky results depend on its thread count (a tie in a code's rounding then flips), not on the
# cores the process may use: a fixed count gives the same codes with any OMP_NUM_THREADS or affinity.
# Two threads: the 2-core machine's full speed; 1 would double the 1B model's factorization time.
FACTOR_THREADS = 2
# Blocks at most this wide are inverted directly (a triangular solve against the identity).
INVERSE_BASE = 256
# Elements swapped per step of an in-place reversal (4 MB of float32).
_REVERSE_STEP = 1 << 20


def cpu_session(nodes, inputs, outputs, initializers=(), *, threads: int | None = None, arena: bool = True):
    """A small onnxruntime CPU session over onnx.helper parts (opset 18), for numerical kernels."""
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(list(nodes), "kernel", list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see calib.layerwise.LayerRunner
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def _gemm(names: tuple[str, ...], threads: int | None, double: bool = False, **attributes):
    """One Gemm over float32 (float64 when ``double``) inputs ``names`` -> y; no arena: one-off shapes,
    whose largest result an arena would keep alive."""
    from onnx import TensorProto, helper

    elem = TensorProto.DOUBLE if double else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(name, elem, ["r", "c"]) for name in names]
    output = helper.make_tensor_value_info("y", elem, ["m", "n"])
    node = helper.make_node("Gemm", list(names), ["y"], **attributes)
    return cpu_session([node], inputs, [output], threads=threads, arena=False)


@functools.lru_cache(maxsize=16)
def _gemm_session(trans_a: bool, trans_b: bool, alpha: float, threads: int | None, double: bool = False):
    """a, b -> alpha * op(a) @ op(b); op = transpose when trans_a / trans_b."""
    return _gemm(("a", "b"), threads, double, transA=int(trans_a), transB=int(trans_b), alpha=alpha)


def matmul(
    a: np.ndarray,
    b: np.ndarray,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    alpha: float = 1.0,
    threads: int | None = None,
    dtype=np.float32,
):
    """alpha * op(a) @ op(b) on MLAS (op(m) = m.T when trans_*), in float32 or float64 (``dtype``); inputs
    are made contiguous. MLAS splits a product over its rows and columns, never along K, so the result
    is the same bytes for any thread count."""
    double = np.dtype(dtype) == np.float64
    if not double and np.dtype(dtype) != np.float32:
        raise ValueError(f"matmul: float32 or float64, not {np.dtype(dtype)}")
    a = np.ascontiguousarray(a, dtype=dtype)
    b = np.ascontiguousarray(b, dtype=dtype)
    if (a.shape[0] if trans_a else a.shape[1]) != (b.shape[1] if trans_b else b.shape[0]):
        raise ValueError(
            f"matmul: inner dimensions differ, {a.shape}{'^T' if trans_a else ''} @ {b.shape}{'^T' if trans_b else ''}"
        )
    session = _gemm_session(bool(trans_a), bool(trans_b), float(alpha), threads, double)
    return session.run(None, {"a": a, "b": b})[0]


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x (tokens, K) @ weight (N, K)^T in float32 on MLAS: the same bytes for any thread count, where
    numpy's OpenBLAS sgemm changes its rounding with its thread count on some CPUs (AVX2 Zen: the
    digest of quantlab.distributed.probe differed between one and two threads), and an error or a
    search decided on those products would then differ between a cluster's nodes and this process."""
    return matmul(x, weight, trans_b=True)


@functools.lru_cache(maxsize=16)
def _gemm_into_session(alpha: float, beta: float, threads: int | None):
    """a, b, c f32 -> alpha * a @ b + beta * c."""
    return _gemm(("a", "b", "c"), threads, alpha=alpha, beta=beta)


def gemm_into(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    out: np.ndarray,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    threads: int | None = None,
) -> None:
    """out = alpha * a @ b + beta * c on MLAS, written straight into ``out`` (C-contiguous float32, not
    overlapping ``c``) through an I/O binding: no result array is allocated, which matters when the
    same product runs many times over large buffers (GPTQ's lazy batch updates)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]) or out.shape != c.shape:
        raise ValueError(f"gemm_into: shapes do not chain, {a.shape} @ {b.shape} + {c.shape} -> {out.shape}")
    if not (c.flags.c_contiguous and out.flags.c_contiguous and c.dtype == out.dtype == np.float32):
        raise ValueError("gemm_into: c and out must be C-contiguous float32")
    session = _gemm_into_session(float(alpha), float(beta), threads)
    binding = session.io_binding()
    binding.bind_cpu_input("a", a)
    binding.bind_cpu_input("b", b)
    binding.bind_cpu_input("c", c)
    binding.bind_output("y", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    session.run_with_iobinding(binding)


def reverse_(flat: np.ndarray) -> None:
    """Reverse a 1-D array in place with a few MB of scratch (for a square matrix's buffer: J M J)."""
    n = flat.shape[0]
    for start in range(0, n // 2, _REVERSE_STEP):
        stop = min(start + _REVERSE_STEP, n // 2)
        head = flat[start:stop].copy()
        flat[start:stop] = flat[n - stop : n - start][::-1]
        flat[n - stop : n - start] = head[::-1]


def invert_upper_(R: np.ndarray, threads: int | None = None) -> None:
    """Overwrite the upper triangular ``R`` (n, n) float32, zeros below its diagonal, with ``R^-1``.

    Blocked recursion: with ``R = [[A, B], [0, C]]``, ``R^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]``:
    the diagonal blocks recurse, the off-diagonal block is two GEMMs (2/3 n^3 flops in all).
    """
    n = R.shape[0]
    if n <= INVERSE_BASE:
        import torch

        with torch_threads(1):  # MKL's results may depend on its thread count
            block = torch.from_numpy(np.ascontiguousarray(R))
            R[...] = torch.linalg.solve_triangular(block, torch.eye(n, dtype=block.dtype), upper=True).numpy()
        return
    half = (n // 2 + 63) // 64 * 64
    invert_upper_(R[:half, :half], threads)
    invert_upper_(R[half:, half:], threads)
    left = matmul(R[:half, :half], R[:half, half:], threads=threads)  # A^-1 B
    R[:half, half:] = matmul(left, R[half:, half:], alpha=-1.0, threads=threads)


def reversed_cholesky(H: np.ndarray) -> np.ndarray:
    """``L^T``, C-contiguous, for the Cholesky factorization ``J H J = L L^T`` of a symmetric positive
    definite float32 ``H`` (C-contiguous; reversed in place: the caller drops it after).

    LAPACK returns ``L`` column-major, which is ``L^T`` row-major: no transposing copy. Runs in torch
    (MKL) on ``FACTOR_THREADS`` threads.
    """
    import torch

    reverse_(H.reshape(-1))  # J H J
    with torch_threads(FACTOR_THREADS):
        R = torch.linalg.cholesky(torch.from_numpy(H)).mT.numpy()
    return R if R.flags.c_contiguous else np.ascontiguousarray(R)


def inverse_hessian_factor(R: np.ndarray, threads: int | None = None) -> np.ndarray:
    """GPTQ's ``U`` (upper triangular, ``U^T U = H^-1``) from ``R = reversed_cholesky(H)``, computed in
    R's own buffer and returned as a Fortran-ordered view of it (its transpose is C-contiguous)."""
    invert_upper_(R, threads)  # L^-T
    reverse_(R.reshape(-1))  # J L^-T J = U^T, lower
    return R.T


def release() -> None:
    """Drop the GEMM sessions and their arenas."""
    _gemm_session.cache_clear()
    _gemm_into_session.cache_clear()


class torch_threads:
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)
