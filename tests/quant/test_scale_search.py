"""Importance-weighted scale search (quant.rtn.search_scales) against plain round-to-nearest."""

import numpy as np
import pytest

from quantlab.quant.metrics import sqnr_db
from quantlab.quant.rtn import dequantize, rtn_quantize, search_scales, weighted_error

# dB the searched weight must gain over RTN in importance-weighted SQNR on the fixed-seed weight below
MIN_GAIN_DB = {(4, 32): 0.3, (4, 128): 0.3, (8, 128): 0.05}
# per-group float32 slack: the search may only tie RTN, never lose to it
TIE_RTOL = 1e-5


def _weighted_sqnr_db(weight, w_hat, importance):
    root = np.sqrt(importance)[None, :]
    return sqnr_db(weight * root, w_hat * root)


@pytest.fixture(scope="module")
def weight_and_importance():
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((96, 256)) * 0.05).astype(np.float32)  # (N, K)
    weight[:, :4] *= 8  # a few outlier input channels, as in real LLM weights
    importance = rng.gamma(0.5, 2.0, 256).astype(np.float32)  # mean x^2 per input channel, heavy-tailed
    return weight, importance


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (8, 128)])
def test_search_beats_rtn_on_weighted_error(weight_and_importance, bits, group_size, symmetric):
    weight, importance = weight_and_importance
    rtn = rtn_quantize(weight, bits, group_size, symmetric)
    searched = search_scales(weight, importance, bits, group_size, symmetric)
    assert searched.bits == bits and searched.group_size == group_size and searched.symmetric == symmetric
    assert searched.q.shape == weight.shape and int(searched.q.max()) <= searched.max_code
    # per group never worse than RTN (the grid includes RTN's own range) ...
    e_rtn, e_search = weighted_error(weight, rtn, importance), weighted_error(weight, searched, importance)
    assert np.all(e_search <= e_rtn * (1 + TIE_RTOL) + 1e-12)
    # ... and better overall by a margin
    gain = _weighted_sqnr_db(weight, dequantize(searched), importance) - _weighted_sqnr_db(
        weight, dequantize(rtn), importance
    )
    assert gain >= MIN_GAIN_DB[(bits, group_size)], gain


def test_importance_moves_the_error_to_channels_that_matter(weight_and_importance):
    weight, importance = weight_and_importance
    flat = search_scales(weight, None, 4, 32)
    weighted = search_scales(weight, importance, 4, 32)
    # each wins on its own yardstick
    assert weighted_error(weight, weighted, importance).sum() <= weighted_error(weight, flat, importance).sum()
    assert weighted_error(weight, flat).sum() <= weighted_error(weight, weighted).sum()


def test_search_is_deterministic_and_handles_partial_and_zero_groups():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((5, 70)).astype(np.float32)  # K = 70: the last group of 32 is partial
    weight[0] = 0.0  # an all-zero row: scale 0, codes at the zero point
    importance = np.abs(rng.standard_normal(70)).astype(np.float32)
    a = search_scales(weight, importance, 4, 32)
    b = search_scales(weight.copy(), importance.copy(), 4, 32)
    assert a.scales.shape == (5, 3)
    assert np.array_equal(dequantize(a)[0], np.zeros(70, np.float32))
    assert a.q.tobytes() == b.q.tobytes() and a.scales.tobytes() == b.scales.tobytes()
    assert a.zero_points.tobytes() == b.zero_points.tobytes()
    with pytest.raises(ValueError, match="importance"):
        search_scales(weight, np.ones(64, np.float32), 4, 32)


@pytest.mark.parametrize("symmetric", [False, True])
def test_search_in_row_slices_gives_the_same_codes(monkeypatch, symmetric):
    import quantlab.quant.rtn as rtn

    rng = np.random.default_rng(3)
    w = rng.standard_normal((70, 96)).astype(np.float32)
    imp = rng.random(96).astype(np.float32)
    whole = search_scales(w, imp, 4, 32, symmetric)
    monkeypatch.setattr(rtn, "SEARCH_CHUNK_ELEMENTS", 96 * 16)  # 16 rows a slice, the last one 6
    sliced = search_scales(w, imp, 4, 32, symmetric)
    np.testing.assert_array_equal(sliced.q, whole.q)
    np.testing.assert_array_equal(sliced.scales, whole.scales)
    if symmetric:
        assert sliced.zero_points is None
    else:
        np.testing.assert_array_equal(sliced.zero_points, whole.zero_points)
