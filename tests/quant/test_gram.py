"""The Gram blocks behind the GPTQ Hessian: upper blocks on onnxruntime's GEMM, mirrored."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.quant import gram
from quantlab.quant.gptq import HessianSum


@pytest.mark.parametrize("k", [1, 64, gram.BLOCK, gram.BLOCK + 300, 2 * gram.BLOCK + 5])
def test_streamed_blocks_equal_the_full_product(k):
    # widths below, at and across the block size (a ragged last block), several batches
    rng = np.random.default_rng(k)
    batches = [rng.standard_normal((n, k)).astype(np.float32) for n in (37, 200, 1)]
    acc = HessianSum()
    for x in batches:
        acc.add(x)
    x = np.concatenate(batches).astype(np.float64)
    reference = 2.0 / x.shape[0] * x.T @ x
    h = acc.hessian()
    assert h.dtype == np.float32 and h.shape == (k, k)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(h, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_gram_is_the_same_with_any_thread_count():
    # same input, same bytes: the Hessian may not depend on onnxruntime's thread count
    x = np.random.default_rng(0).standard_normal((513, gram.BLOCK + 77)).astype(np.float32)
    sums = []
    for threads in (1, 2):
        acc = gram.UpperGram(x.shape[1], threads)
        acc.add(x[:300])
        acc.add(x[300:])
        sums.append(acc.total())
    np.testing.assert_array_equal(sums[0], sums[1])


def test_only_the_blocks_on_and_above_the_diagonal_are_computed():
    pairs = gram.block_pairs(4 * gram.BLOCK)
    assert len(pairs) == 10  # of 16
    assert all(rows[0] <= cols[0] for rows, cols in pairs)
