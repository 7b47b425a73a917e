import numpy as np
import pytest

from quantlab.quant.metrics import (
    compare_logits,
    kl_divergence_per_token,
    log_softmax,
    sqnr_db,
    top1_agreement,
)


def test_sqnr_known_values():
    reference = np.ones(1000, np.float32)
    assert sqnr_db(reference, reference * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise 0.01 per element
    assert sqnr_db(reference, reference) == float("inf")
    assert sqnr_db(np.zeros(3), np.ones(3)) == float("-inf")
    with pytest.raises(ValueError, match="shapes"):
        sqnr_db(np.ones(3), np.ones(4))


def test_log_softmax_is_stable_for_huge_logits():
    logits = np.array([[1e4, 1e4 - 1.0, -1e4], [0.0, 0.0, 0.0]], np.float32)
    result = log_softmax(logits)
    assert np.all(np.isfinite(result))
    np.testing.assert_allclose(np.exp(result).sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(result[1], np.log(1 / 3))
    np.testing.assert_allclose(result[0, 0] - result[0, 1], 1.0, rtol=1e-12)


def test_kl_divergence_known_value():
    # P = (0.5, 0.5), Q = (0.25, 0.75): KL = 0.5 ln 2 + 0.5 ln(2/3)
    reference = np.log(np.array([[0.5, 0.5]]))
    candidate = np.log(np.array([[0.25, 0.75]])) + 7.0  # a constant shift does not change softmax
    expected = 0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0)
    np.testing.assert_allclose(kl_divergence_per_token(reference, candidate), [expected], rtol=1e-12)
    assert kl_divergence_per_token(candidate, candidate)[0] == 0.0


def test_compare_logits_summary():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((4, 50, 32)).astype(np.float32) * 3
    candidate = reference + rng.standard_normal(reference.shape).astype(np.float32) * 0.1
    candidate[0, 0] = reference[0, 0][::-1]  # one token with a different argmax
    summary = compare_logits(reference, candidate)
    kl = kl_divergence_per_token(reference, candidate).reshape(-1)
    assert summary.n_tokens == 200
    assert summary.kl_mean == pytest.approx(kl.mean()) and summary.kl_median == pytest.approx(np.median(kl))
    assert summary.kl_median <= summary.kl_mean <= summary.kl_p999 <= summary.kl_max == pytest.approx(kl.max())
    assert summary.top1_agreement == top1_agreement(reference, candidate) < 1.0
    assert top1_agreement(reference, reference) == 1.0
