"""GPTQ's linear algebra on onnxruntime's GEMM: the reversed Cholesky route to U with U^T U = H^-1."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.quant import linalg


def _spd(k: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((2 * k + 16, k)).astype(np.float32)
    x[:, : k // 3] *= 10.0  # uneven channel scales, as activations have
    h = (x.T @ x) / x.shape[0]
    h[np.diag_indices(k)] += 0.01 * np.mean(np.diag(h))
    return h.astype(np.float32)


@pytest.mark.parametrize("n", [1, 5, 2 * 1024 * 1024 + 3])
def test_reverse_in_place(n):
    # lengths below, at and across the swap step, odd and even
    a = np.arange(n, dtype=np.float32)
    expected = a[::-1].copy()
    linalg.reverse_(a)
    np.testing.assert_array_equal(a, expected)


@pytest.mark.parametrize("n", [3, linalg.INVERSE_BASE, linalg.INVERSE_BASE + 1, 700])
def test_blocked_triangular_inverse(n):
    # base case, and recursions with ragged halves
    rng = np.random.default_rng(n)
    r = np.triu(rng.standard_normal((n, n))).astype(np.float32) * 0.1
    r[np.diag_indices(n)] = rng.uniform(1.0, 2.0, n)
    inverse = r.copy()
    linalg.invert_upper_(inverse)
    assert np.all(np.tril(inverse, -1) == 0)
    np.testing.assert_allclose(inverse @ r, np.eye(n), atol=1e-4)


@pytest.mark.parametrize("k", [16, 300, 1100])
def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_inverse(k):
    h = _spd(k, k)
    u = linalg.inverse_hessian_factor(linalg.reversed_cholesky(h.copy()))
    assert np.all(np.tril(u, -1) == 0) and np.all(np.diag(u) > 0)
    # the unique upper factor with positive diagonal of H^-1, as the textbook route computes it
    h64 = h.astype(np.float64)
    reference = np.linalg.cholesky(np.linalg.inv(h64)).T
    scale = np.abs(reference).max()
    np.testing.assert_allclose(u, reference, atol=2e-3 * scale)
    np.testing.assert_allclose(u.T.astype(np.float64) @ u @ h64, np.eye(k), atol=1e-2)


def test_factor_is_the_same_with_any_thread_count():
    h = _spd(700, 1)
    one, two = (linalg.inverse_hessian_factor(linalg.reversed_cholesky(h.copy()), threads) for threads in (1, 2))
    np.testing.assert_array_equal(one, two)


def test_matmul_checks_shapes():
    a, b = np.ones((3, 4), np.float32), np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match="inner dimensions"):
        linalg.matmul(a, b)
    np.testing.assert_array_equal(linalg.matmul(a, np.ones((3, 2), np.float32), trans_a=True, alpha=-2.0), -6.0)
