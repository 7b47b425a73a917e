import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from quantlab.quant.packing import (
    matmul_nbits_attributes,
    matmul_nbits_block_size,
    pack_matmul_nbits,
    unpack_matmul_nbits,
)
from quantlab.quant.rtn import QuantizedWeight, dequantize, rtn_quantize

# onnxruntime's MatMulNBits (CPU, fp32, accuracy_level unset) against x @ dequantize(qw).T in
# numpy: both are fp32 sums of the same products in different orders, so they agree to a few ulps
# of the output's magnitude (measured worst ~6e-7 relative to max|y|).
ORT_RELATIVE_TOLERANCE = 1e-5

AWKWARD_SHAPES = [(1, 32), (7, 100), (33, 257), (5, 384)]  # (N, K): odd N, K not a multiple of the block


def test_golden_bytes_4bit_asym():
    # codes (k + 5n) mod 16: row 0 = 0, 1, ..., 15, 0, ...; K = 40 gives two whole blocks of 16 and a
    # partial third of 8 codes padded with code 0.
    n, k = 2, 40
    q = ((np.arange(k)[None, :] + 5 * np.arange(n)[:, None]) % 16).astype(np.uint8)
    zero_points = np.array([[1, 2, 3], [15, 0, 7]], np.uint8)
    qw = QuantizedWeight(q, np.ones((n, 3), np.float32), zero_points, bits=4, group_size=16)
    b_packed, scales, packed_zero_points = pack_matmul_nbits(qw)
    assert b_packed.shape == (2, 3, 8) and scales.shape == (2, 3) and packed_zero_points.shape == (2, 2)
    expected_b = [
        "1032547698badcfe" * 2 + "1032547600000000",
        "6587a9cbed0f2143" * 2 + "6587a9cb00000000",
    ]
    assert [b_packed[i].tobytes().hex() for i in range(n)] == expected_b
    # zero points two per byte along the blocks of a row, low nibble first; the unused nibble is 8
    assert [packed_zero_points[i].tobytes().hex() for i in range(n)] == ["2183", "0f87"]


def test_golden_bytes_8bit_sym():
    q = np.array([[0, 1, 2, 127, 128, 254, 255, 17, 200, 3, 4, 5, 6, 7, 8, 9, 10, 11]], np.uint8)
    qw = QuantizedWeight(q, np.ones((1, 2), np.float32), None, bits=8, group_size=16)
    b_packed, _, packed_zero_points = pack_matmul_nbits(qw)
    assert packed_zero_points is None  # MatMulNBits defaults to 128
    assert b_packed.shape == (1, 2, 16)
    assert b_packed.tobytes().hex() == "0001027f80feff11c803040506070809" + "0a0b" + "00" * 14


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [16, 32, 128, -1])
@pytest.mark.parametrize("n,k", [(3, 40), (5, 300), (1, 16)])
def test_pack_unpack_round_trip(bits, symmetric, group_size, n, k):
    rng = np.random.default_rng(2)
    q = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    n_groups = 1 if group_size == -1 else -(-k // group_size)
    scales = rng.standard_normal((n, n_groups)).astype(np.float32)
    zero_points = None if symmetric else rng.integers(0, 1 << bits, size=(n, n_groups), dtype=np.uint8)
    qw = QuantizedWeight(q, scales, zero_points, bits, group_size)
    b_packed, packed_scales, packed_zero_points = pack_matmul_nbits(qw)
    block_size = matmul_nbits_block_size(qw)
    assert b_packed.shape == (n, -(-k // block_size), block_size * bits // 8)
    back = unpack_matmul_nbits(b_packed, packed_scales, packed_zero_points, k, bits, block_size, group_size)
    np.testing.assert_array_equal(back.q, qw.q)
    np.testing.assert_array_equal(back.scales, qw.scales)
    np.testing.assert_array_equal(back.zero_point_array(), qw.zero_point_array())
    assert back.symmetric == symmetric and back.group_size == group_size


def test_per_channel_block_is_the_next_power_of_two():
    qw = rtn_quantize(np.ones((2, 300), np.float32), bits=4, group_size=-1)
    assert matmul_nbits_attributes(qw) == {"K": 300, "N": 2, "bits": 4, "block_size": 512}
    with pytest.raises(ValueError, match="power-of-two"):
        matmul_nbits_block_size(rtn_quantize(np.ones((2, 300), np.float32), bits=4, group_size=96))


def _matmul_nbits_session(b_packed, scales, zero_points, attributes):
    k, n = attributes["K"], attributes["N"]
    initializers = [numpy_helper.from_array(b_packed, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["A", "B", "scales"]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **attributes)
    graph = helper.make_graph(
        [node],
        "matmul_nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("n,k", AWKWARD_SHAPES)
def test_onnxruntime_matmul_nbits_matches_dequantize(bits, symmetric, group_size, n, k):
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    qw = rtn_quantize(weight, bits, group_size, symmetric)
    session = _matmul_nbits_session(*pack_matmul_nbits(qw), matmul_nbits_attributes(qw))
    x = rng.standard_normal((5, k)).astype(np.float32)
    (y,) = session.run(None, {"A": x})
    expected = x @ dequantize(qw).T
    np.testing.assert_allclose(y, expected, rtol=0, atol=ORT_RELATIVE_TOLERANCE * np.abs(expected).max())


def _onnxruntime_rtn(weight: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """Run onnxruntime's MatMulNBitsQuantizer (default RTN config) on MatMul(A, weight.T)."""
    n, k = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])],
        "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "W")],  # MatMul's B is (K, N)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric)
    quantizer.process()
    quantized: onnx.ModelProto = quantizer.model.model
    (node,) = quantized.graph.node
    assert node.op_type == "MatMulNBits"
    tensors = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [tensors[name] for name in node.input[1:]], attributes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("n,k", AWKWARD_SHAPES)
def test_same_bytes_as_onnxruntime_quantizer(bits, symmetric, block_size, n, k):
    """Our RTN reproduces MLAS's rounding (see rtn.py), so the packed tensors are byte-identical.

    One exception, masked here: for 4-bit and odd K the last code's byte has an unused high nibble,
    where onnxruntime leaves a stale code from the previous pair and we leave 0.
    """
    rng = np.random.default_rng(4)
    weight = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    weight[0, : min(k, 40)] = 0.0  # an all-zero block: zero scale
    ours = pack_matmul_nbits(rtn_quantize(weight, bits, block_size, symmetric))
    theirs, attributes = _onnxruntime_rtn(weight, bits, block_size, symmetric)
    assert attributes == {"K": k, "N": n, "bits": bits, "block_size": block_size}
    assert len(theirs) == (2 if symmetric else 3)
    if bits == 4 and k % 2:
        last_byte = (k - (theirs[0].shape[1] - 1) * block_size) // 2
        theirs[0] = theirs[0].copy()
        theirs[0][:, -1, last_byte] &= 0x0F
    for mine, reference in zip(ours, theirs, strict=False):
        assert mine.dtype == reference.dtype and mine.shape == reference.shape
        assert mine.tobytes() == reference.tobytes()
