"""PackedWeights: codes held bit-packed come back exactly, and take 8/bits times less memory."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.quant.packed import PackedWeights, pack_codes, unpack_codes
from quantlab.quant.rtn import QuantizedWeight, rtn_quantize


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 5), k=st.integers(1, 37), seed=st.integers(0, 2**16))
def test_pack_then_unpack_is_the_identity(bits, n, k, seed):
    q = np.random.default_rng(seed).integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    packed = pack_codes(q, bits)
    assert packed.shape == (n, -(-k * bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, k), q)


def test_4bit_packing_is_low_nibble_first():
    packed = pack_codes(np.array([[1, 2, 15]], np.uint8), 4)
    assert packed.tolist() == [[0x21, 0x0F]]


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (2, False)])
def test_packed_weights_round_trip_and_shrink(bits, symmetric):
    w = np.random.default_rng(0).standard_normal((48, 200)).astype(np.float32)
    qw = rtn_quantize(w, bits=bits, group_size=32, symmetric=symmetric)
    store = PackedWeights()
    store["layer.mlp.down_proj"] = qw
    back = store["layer.mlp.down_proj"]
    assert isinstance(back, QuantizedWeight) and back is not qw
    np.testing.assert_array_equal(back.q, qw.q)
    np.testing.assert_array_equal(back.scales, qw.scales)
    assert (back.zero_points is None) == symmetric
    assert (back.bits, back.group_size, store.shape("layer.mlp.down_proj")) == (bits, 32, (48, 200))
    side = qw.scales.nbytes + (0 if symmetric else qw.zero_points.nbytes)
    assert store.nbytes - side == 48 * -(-200 * bits // 8)
    assert list(store) == ["layer.mlp.down_proj"] and len(store) == 1
    del store["layer.mlp.down_proj"]
    assert len(store) == 0


def test_packed_weights_refuse_other_values():
    with pytest.raises(TypeError, match="x: expected a QuantizedWeight"):
        PackedWeights()["x"] = np.zeros((2, 2), np.uint8)
