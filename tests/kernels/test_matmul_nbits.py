"""quantlab.kernels.matmul_nbits against onnxruntime's MatMulNBits and against the scalar path.

Tolerances (stated once, used everywhere):
- fp32 arithmetic (accuracy_level=0): |y - y_ref| <= FP32_TOL * (|x| @ |W|^T) — summation order only.
- int8 activations (accuracy_level=4): additionally |y - y_fp32| <= 0.5 * sum_b d[m, b] * sum_{k in b} |W[n, k]|,
  d = max|x_block| / 127: the exact bound of rounding x to int8 per (row, block).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from quantlab import kernels
from quantlab.kernels.reference import dequantize_nbits, k_blocks, unpack_codes, unpack_zero_points
from tests.kernels.helpers import BF16_TOL, amx_bf16_tiles, make_case, ort_matmul_nbits

FP32_TOL = 2e-5
SHAPES = [(1, 1000, 7), (3, 320, 33), (17, 200, 5)]  # M = 1, 3, 17; K not a multiple of 256; odd N


def magnitude(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T


def int8_bound(x: np.ndarray, w: np.ndarray, block_size: int) -> np.ndarray:
    m, k = x.shape
    kb = k_blocks(k, block_size)
    pad = kb * block_size - k
    xb = np.pad(np.abs(x), ((0, 0), (0, pad))).reshape(m, kb, block_size)
    d = xb.max(axis=2) / 127.0  # (m, kb)
    wb = np.pad(np.abs(w), ((0, 0), (0, pad))).reshape(w.shape[0], kb, block_size).sum(axis=2)  # (n, kb)
    return 0.5 * d.astype(np.float64) @ wb.astype(np.float64).T


def test_backend_reports_native_or_numpy():
    assert kernels.backend() == "numpy" or kernels.backend().startswith("native:")
    assert isinstance(kernels.build_info(), str)


def test_unpack_golden_bytes():
    # Low nibble first: 0x21 -> codes 1, 2; 0x43 -> 3, 4. Blocks of 16 4-bit codes are 8 bytes.
    b = np.array([[[0x21, 0x43, 0x65, 0x87, 0xA9, 0xCB, 0xED, 0x0F]]], dtype=np.uint8)
    assert unpack_codes(b, k=16, n=1, bits=4, block_size=16).tolist() == [
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0]
    ]
    # Three blocks of zero points pack into two bytes per row, the even block in the low nibble.
    zp = np.array([0x5A, 0x03, 0xF1, 0x02], dtype=np.uint8)
    assert unpack_zero_points(zp, k=48, n=2, bits=4, block_size=16).tolist() == [[10, 5, 3], [1, 15, 2]]
    w = dequantize_nbits(b, np.array([0.5], np.float32), k=16, n=1, bits=4, block_size=16)
    assert w[0, :3].tolist() == [-3.5, -3.0, -2.5]  # (code - 8) * 0.5


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize(
    "bits,block_size,zp", [(4, 32, False), (4, 128, True), (4, 64, True), (8, 32, True), (8, 128, False)]
)
def test_matches_onnxruntime(m, k, n, bits, block_size, zp):
    rng = np.random.default_rng(m * 1000 + k + n + bits + block_size)
    x, b, s, z = make_case(rng, m=m, k=k, n=n, bits=bits, block_size=block_size, zp=zp)
    y_ort = ort_matmul_nbits(x, b, s, z, k=k, n=n, bits=bits, block_size=block_size, accuracy_level=0)
    w = dequantize_nbits(b, s, z, k=k, n=n, bits=bits, block_size=block_size)
    mag = magnitude(x, w)
    y0 = kernels.matmul_nbits(x, b, s, z, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=0)
    assert np.all(np.abs(y0 - y_ort) <= FP32_TOL * mag + 1e-6)
    y4 = kernels.matmul_nbits(x, b, s, z, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=4)
    y3 = kernels.matmul_nbits(x, b, s, z, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=3)
    bf16 = amx_bf16_tiles("auto", m=m, bits=bits, block_size=block_size, accuracy_level=3)
    assert np.all(np.abs(y3 - y_ort) <= ((BF16_TOL if bf16 else 0.0) + FP32_TOL) * mag + 1e-6)
    assert np.all(np.abs(y4 - y_ort) <= int8_bound(x, w, block_size) * 1.001 + FP32_TOL * mag + 1e-6)
    # onnxruntime's accuracy_level=4 quantizes activations the same way (per block, max/127,
    # round half to even): the int8 paths agree to fp32 summation order.
    y_ort4 = ort_matmul_nbits(x, b, s, z, k=k, n=n, bits=bits, block_size=block_size, accuracy_level=4)
    assert np.all(np.abs(y4 - y_ort4) <= FP32_TOL * mag + 1e-6)


@pytest.mark.skipif(not kernels.available_paths(), reason="native kernels not built")
@pytest.mark.parametrize("path", kernels.available_paths())
@pytest.mark.parametrize("accuracy_level", [0, 3, 4])
def test_every_path_matches_scalar(path, accuracy_level):
    rng = np.random.default_rng(7)
    # M = 17 (third and sixth) with 4-bit blocks >= 128 also runs the AMX tiles where present.
    schemes = [(4, 32, True), (8, 64, True), (4, 128, True), (4, 16, True), (8, 32, False), (4, 256, False)]
    for (m, k, n), (bits, block_size, zp) in zip(SHAPES * 2, schemes, strict=True):
        x, b, s, z = make_case(rng, m=m, k=k, n=n, bits=bits, block_size=block_size, zp=zp)
        kw = dict(K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)
        ref = kernels.matmul_nbits(x, b, s, z, path="scalar", **kw)
        w = dequantize_nbits(b, s, z, k=k, n=n, bits=bits, block_size=block_size)
        bf16 = amx_bf16_tiles(path, m=m, bits=bits, block_size=block_size, accuracy_level=accuracy_level)
        if bf16:  # AMX's bf16 tiles against the fp32 product instead of the int8 reference
            ref = x @ w.T
        for threads in (1, 2):
            y = kernels.matmul_nbits(x, b, s, z, path=path, threads=threads, **kw)
            tol = (BF16_TOL + FP32_TOL if bf16 else FP32_TOL) * magnitude(x, w) + 1e-6
            assert np.all(np.abs(y - ref) <= tol), (path, m, k, n, bits, block_size)


@pytest.mark.skipif(not kernels.available_paths(), reason="native kernels not built")
@pytest.mark.parametrize("path", kernels.available_paths())
def test_8bit_weights_every_block_size(path):
    # 8-bit weights have their own kernels on the AVX-512 path: blocks of 16 / 32 split a 64-code
    # chunk, blocks of 64..256 sum whole chunks; decode (M = 1, 1 x 4 tiles and a ragged edge) and
    # prefill tiles, K not a multiple of the block, with and without zero points.
    rng = np.random.default_rng(11)
    for block_size in (16, 32, 64, 128, 256):
        for (m, k, n), zp in (((1, 600, 11), True), ((1, 576, 8), False), ((9, 330, 6), True)):
            x, b, s, z = make_case(rng, m=m, k=k, n=n, bits=8, block_size=block_size, zp=zp)
            kw = dict(K=k, N=n, bits=8, block_size=block_size, accuracy_level=3 if zp else 4)
            ref = kernels.matmul_nbits(x, b, s, z, path="scalar", **kw)
            w = dequantize_nbits(b, s, z, k=k, n=n, bits=8, block_size=block_size)
            bf16 = amx_bf16_tiles(path, m=m, bits=8, block_size=block_size, accuracy_level=kw["accuracy_level"])
            if bf16:  # AMX's bf16 tiles against the fp32 product instead of the int8 reference
                ref = x @ w.T
            for threads in (1, 2):
                y = kernels.matmul_nbits(x, b, s, z, path=path, threads=threads, **kw)
                tol = (BF16_TOL + FP32_TOL if bf16 else FP32_TOL) * magnitude(x, w) + 1e-6
                assert np.all(np.abs(y - ref) <= tol), (path, block_size, m, k, n)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs(dtype):
    import ml_dtypes

    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    m, k, n = 3, 256, 11
    x, b, s, z = make_case(rng, m=m, k=k, n=n, bits=4, block_size=32, zp=True)
    xh, sh = x.astype(np_dtype), s.astype(np_dtype)
    y = kernels.matmul_nbits(xh, b, sh, z, K=k, N=n, block_size=32, accuracy_level=0)
    assert y.dtype == np_dtype and y.shape == (m, n)
    w = dequantize_nbits(b, sh.astype(np.float32), z, k=k, n=n, bits=4, block_size=32)
    ref = xh.astype(np.float32) @ w.T
    out_ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    assert np.all(np.abs(y.astype(np.float32) - ref) <= FP32_TOL * magnitude(x, w) + out_ulp * np.abs(ref) + 1e-5)
    if dtype == "float16":
        y_ort = ort_matmul_nbits(xh, b, sh, z, k=k, n=n, bits=4, block_size=32).astype(np.float32)
        assert np.allclose(y.astype(np.float32), y_ort, rtol=4e-3, atol=4e-3 * np.abs(y_ort).max())


def test_torch_tensors_and_leading_dims():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x, b, s, z = make_case(rng, m=6, k=128, n=9, bits=4, block_size=64, zp=False)
    xt = torch.from_numpy(x).reshape(2, 3, 128)
    y = kernels.matmul_nbits(
        xt, torch.from_numpy(b), torch.from_numpy(s), K=128, N=9, block_size=64, bias=torch.ones(9)
    )
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 9)
    ref = kernels.matmul_nbits_reference(x, b, s, bias=np.ones(9, np.float32), k=128, n=9, block_size=64)
    w = dequantize_nbits(b, s, k=128, n=9, block_size=64)
    assert np.all(np.abs(y.reshape(6, 9).numpy() - ref) <= int8_bound(x, w, 64) * 1.001 + 1e-4)


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    x, b, s, _ = make_case(rng, m=2, k=64, n=4, bits=4, block_size=32, zp=False)
    with pytest.raises(ValueError):
        kernels.matmul_nbits(x, b, s, K=64, N=4, bits=3, block_size=32)
    with pytest.raises(ValueError):
        kernels.matmul_nbits(x, b, s, K=32, N=4, block_size=32)
    if kernels.backend() != "numpy":
        with pytest.raises(ValueError):
            kernels.matmul_nbits(x, b[:2], s, K=64, N=4, block_size=32)
        with pytest.raises(ValueError):
            kernels.matmul_nbits(
                x, b, s, K=64, N=4, block_size=32, path="neon" if "avx2" in kernels.available_paths() else "avx2"
            )


def test_numpy_fallback_when_core_missing():
    code = (
        "import logging, numpy as np; logging.basicConfig(level=logging.WARNING);"
        "import quantlab.kernels as k; print(k.backend());"
        "b = np.full((3, 2, 16), 0x98, np.uint8); s = np.full(6, 0.5, np.float32);"
        "print(k.matmul_nbits(np.ones((1, 64), np.float32), b, s, K=64, N=3).tolist())"
    )
    env = dict(os.environ, QUANTLAB_KERNELS_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.split("\n")
    assert lines[0] == "numpy"
    assert "numpy fallback" in out.stderr
    # codes 8 (low) and 9 (high) -> weights 0 and 0.5: 32 * 0.5 per output.
    assert lines[1] == "[[16.0, 16.0, 16.0]]"


@pytest.mark.skipif(not hasattr(os, "fork") or not kernels.available_paths(), reason="needs fork and the core")
def test_thread_pool_survives_fork():
    code = (
        "import os, numpy as np, quantlab.kernels as k;"
        "b = np.zeros((64, 2, 16), np.uint8); s = np.ones(128, np.float32); x = np.ones((1, 64), np.float32);"
        "k.matmul_nbits(x, b, s, K=64, N=64, threads=2);"
        "pid = os.fork();"
        "y = k.matmul_nbits(x, b, s, K=64, N=64, threads=2);"
        "os._exit(0 if float(y[0, 0]) == -512.0 else 3) if pid == 0 else None;"
        "_, status = os.waitpid(pid, 0); raise SystemExit(os.waitstatus_to_exitcode(status))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_pack_weights_places_equal_aligned_copies():
    rng = np.random.default_rng(5)
    x, b, s, z = make_case(rng, m=1, k=320, n=9, bits=4, block_size=64, zp=True)
    arrays = [b, s, z, np.arange(3, dtype=np.int64)]
    placed = kernels.pack_weights(arrays)
    for a, p in zip(arrays, placed, strict=True):
        assert p.dtype == a.dtype and p.shape == a.shape and np.array_equal(p, a)
        assert p.ctypes.data % 64 == 0 and not np.shares_memory(p, a)
    # one buffer, in order, starting on a 2 MiB boundary
    assert placed[0].ctypes.data % (2 << 20) == 0
    assert placed[0].ctypes.data < placed[1].ctypes.data < placed[2].ctypes.data < placed[3].ctypes.data
    kw = dict(K=320, N=9, bits=4, block_size=64)
    assert np.array_equal(kernels.matmul_nbits(x, *placed[:3], **kw), kernels.matmul_nbits(x, b, s, z, **kw))


def test_huge_page_arrays_are_zeroed_aligned_and_disjoint():
    specs = [((2, 3, 5), np.float32), ((7,), np.int8), ((4, 4), np.float32)]
    arrays = kernels.huge_page_arrays(specs)
    for (shape, dtype), a in zip(specs, arrays, strict=True):
        assert a.shape == shape and a.dtype == dtype and not a.any() and a.flags.writeable
        assert a.ctypes.data % 64 == 0
    for i, a in enumerate(arrays):  # writing one leaves the others as they were
        a[...] = i + 1
    assert [int(a.min()) for a in arrays] == [1, 2, 3] and [int(a.max()) for a in arrays] == [1, 2, 3]
    assert arrays[0].ctypes.data % (2 << 20) == 0


@pytest.mark.skipif("amx" not in kernels.available_paths(), reason="no AMX on this CPU")
@pytest.mark.parametrize("bits,block_size,m", [(4, 32, 16), (4, 64, 9), (8, 128, 16), (4, 128, 64)])
def test_amx_bf16_tiles_closer_than_int8(bits, block_size, m):
    # accuracy_level 3 on AMX (bf16 tiles) lands closer to the fp32 product than int8 codes (level
    # 4, same call) and is not the fp32 computation: fails if those calls fell back to either.
    assert amx_bf16_tiles("amx", m=m, bits=bits, block_size=block_size, accuracy_level=3)
    rng = np.random.default_rng(bits * 100 + block_size + m)
    x, b, s, z = make_case(rng, m=m, k=576, n=96, bits=bits, block_size=block_size, zp=True)
    w = dequantize_nbits(b, s, z, k=576, n=96, bits=bits, block_size=block_size)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    kw = dict(K=576, N=96, bits=bits, block_size=block_size, threads=2)
    err_bf16 = np.abs(kernels.matmul_nbits(x, b, s, z, path="amx", accuracy_level=3, **kw) - exact).mean()
    err_int8 = np.abs(kernels.matmul_nbits(x, b, s, z, path="amx", accuracy_level=4, **kw) - exact).mean()
    err_fp32 = np.abs(kernels.matmul_nbits(x, b, s, z, path="amx", accuracy_level=0, **kw) - exact).mean()
    assert err_fp32 < 0.1 * err_bf16 and err_bf16 < 0.7 * err_int8, (err_fp32, err_bf16, err_int8)
