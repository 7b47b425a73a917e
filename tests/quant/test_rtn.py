import numpy as np
import pytest

from quantlab.quant.metrics import sqnr_db
from quantlab.quant.rtn import QuantizedWeight, dequantize, roundf, rtn_quantize
from quantlab.quant.scheme import PER_CHANNEL

# Minimum SQNR (dB) of RTN on a (256, 1024) N(0, 0.02^2) weight, seed 0. Measured values (seeds 0-2
# agree to 0.1 dB) are in the comments; the thresholds sit ~0.5 dB below them. Sanity check against
# theory: a uniform quantizer has noise step^2 / 12; a 128-sample Gaussian group spans ~5.2 sigma,
# so 4-bit asym has step = 5.2 sigma / 15 and SQNR = 10 log10(12 * 15^2 / 5.2^2) = 20 dB, and each
# extra bit adds 6 dB (8-bit: ~44 dB). Smaller groups span less range, so SQNR rises as groups shrink.
SQNR_MIN_DB = {
    (4, 32, False): 21.3,  # measured 21.85
    (4, 32, True): 20.8,  # 21.30
    (4, 64, False): 20.3,  # 20.81
    (4, 128, False): 19.4,  # 19.93
    (4, 128, True): 19.2,  # 19.69
    (4, 256, False): 18.7,  # 19.19
    (4, PER_CHANNEL, False): 17.5,  # 18.02
    (4, PER_CHANNEL, True): 17.5,  # 18.06
    (8, 128, False): 44.0,  # 44.55
    (8, 128, True): 43.3,  # 43.81
    (8, PER_CHANNEL, True): 41.6,  # 42.15
}


@pytest.fixture(scope="module")
def gaussian_weight():
    return (np.random.default_rng(0).standard_normal((256, 1024)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("bits,group_size,symmetric", sorted(SQNR_MIN_DB))
def test_sqnr_per_scheme(gaussian_weight, bits, group_size, symmetric):
    qw = rtn_quantize(gaussian_weight, bits, group_size, symmetric)
    assert sqnr_db(gaussian_weight, dequantize(qw)) >= SQNR_MIN_DB[(bits, group_size, symmetric)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,group_size", [((5, 100), 32), ((3, 33), 64), ((7, 256), 128), ((2, 50), -1)])
def test_shapes_codes_and_error_bound(bits, symmetric, shape, group_size):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal(shape).astype(np.float32)
    qw = rtn_quantize(weight, bits, group_size, symmetric)
    n, k = shape
    n_groups = 1 if group_size == PER_CHANNEL else -(-k // group_size)
    assert qw.q.shape == (n, k) and qw.q.dtype == np.uint8
    assert qw.scales.shape == (n, n_groups) and qw.scales.dtype == np.float32
    assert qw.symmetric == symmetric
    if not symmetric:
        assert qw.zero_points.shape == (n, n_groups) and qw.zero_points.dtype == np.uint8
    assert int(qw.q.max()) <= (1 << bits) - 1
    # Every element is within one step of its dequantized value: half a step inside the grid, and
    # the grid ends are at most one step short (asym: zero-point rounding; sym: the [-8, 7] code
    # range covers -8 steps on the largest magnitude's side but only 7 on the other).
    size = k if group_size == PER_CHANNEL else group_size
    step = np.repeat(np.abs(qw.scales), size, axis=1)[:, :k]
    assert np.all(np.abs(dequantize(qw) - weight) <= step * 1.0001)


def test_symmetric_scale_sign_puts_largest_magnitude_on_the_minus_end():
    weight = np.array([[0.5, -0.25, 1.6, 0.0], [-3.2, 1.0, 0.4, 0.0]], dtype=np.float32)
    qw = rtn_quantize(weight, bits=4, group_size=32, symmetric=True)
    np.testing.assert_array_equal(qw.scales[:, 0], np.float32([-0.2, 0.4]))
    assert qw.q[0, 2] == 0 and qw.q[1, 0] == 0  # the largest magnitude is code 0, exact
    np.testing.assert_array_equal(qw.q[:, 3], [8, 8])  # zero is the zero point
    assert dequantize(qw)[0, 2] == np.float32(1.6) and dequantize(qw)[1, 0] == np.float32(-3.2)


def test_all_zero_group_and_exact_grid():
    weight = np.zeros((2, 40), dtype=np.float32)
    weight[1, 32:] = [0.0, 0.5, 1.0, 7.5, 2.0, 3.0, 0.0, 6.5]  # range 7.5 = 15 steps of 0.5, zero point 0
    qw = rtn_quantize(weight, bits=4, group_size=32, symmetric=False)
    assert np.all(qw.scales[0] == 0) and np.all(qw.q[0] == qw.zero_points[0, 0])
    np.testing.assert_array_equal(dequantize(qw), weight)


def test_roundf_rounds_halves_away_from_zero():
    x = np.float32([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, -0.49999997, 7.0])
    np.testing.assert_array_equal(roundf(x), np.float32([-3, -2, -1, 1, 2, 3, 0, 0, 7]))


def test_quantized_weight_validates_and_is_read_only():
    q = np.zeros((2, 4), np.uint8)
    with pytest.raises(ValueError, match="scales has shape"):
        QuantizedWeight(q, np.ones((2, 2), np.float32), None, 4, 32)
    with pytest.raises(ValueError, match="code above 15"):
        QuantizedWeight(q + 16, np.ones((2, 1), np.float32), None, 4, 32)
    with pytest.raises(ValueError, match="uint8"):
        QuantizedWeight(q.astype(np.int32), np.ones((2, 1), np.float32), None, 4, 32)
    qw = QuantizedWeight(q, np.ones((2, 1), np.float32), None, 4, 32)
    with pytest.raises(ValueError, match="read-only"):
        qw.q[0, 0] = 1
    q[0, 0] = 1  # the caller's array stays writable
