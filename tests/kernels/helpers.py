"""Shared helpers for the kernel tests: random MatMulNBits tensors, a one-node onnxruntime graph, CMake builds."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.kernels.reference import k_blocks

# bf16 tiles round every weight and activation to 8 significant bits: a product is off by at most
# 2^-7 + 2^-16 of itself (relative to sum_k |x_k w_k|, like the fp32 tolerances).
BF16_TOL = 2.0**-7 + 2.0**-16


def amx_bf16_tiles(path: str, *, m: int, bits: int, block_size: int, accuracy_level: int, dtype=np.float32) -> bool:
    """Whether the AMX path runs this call on bf16 tiles (``amx_bf16_rows`` in csrc/kernels_amx_bf16.cpp):
    accuracy_level 3 (bf16), fp32 activations, M >= 8, blocks of a multiple of 32. Other level-3
    calls are computed in fp32."""
    from quantlab import kernels

    if path == "auto":
        path = "amx" if "amx" in kernels.available_paths() else ""
    return path == "amx" and accuracy_level == 3 and np.dtype(dtype) == np.float32 and m >= 8 and not block_size % 32


def make_case(rng: np.random.Generator, *, m: int, k: int, n: int, bits: int, block_size: int, zp: bool):
    """Random codes, scales and (optionally) zero points in MatMulNBits layout, and activations."""
    kb = k_blocks(k, block_size)
    b = rng.integers(0, 256, size=(n, kb, block_size * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.03, size=n * kb).astype(np.float32)
    zero_points = None
    if zp:
        zero_points = rng.integers(0, 256, size=n * ((kb + 1) // 2 if bits == 4 else kb), dtype=np.uint8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return x, b, scales, zero_points


def ort_matmul_nbits(x, b, scales, zero_points, *, k, n, bits, block_size, accuracy_level=0):
    """Runs com.microsoft.MatMulNBits in onnxruntime (the independent oracle)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT16 if x.dtype == np.float16 else TensorProto.FLOAT
    inputs = ["A", "B", "scales"] + (["zero_points"] if zero_points is not None else [])
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales.astype(x.dtype), "scales")]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "zero_points"))
    graph = helper.make_graph(
        [node],
        "matmul_nbits",
        [helper.make_tensor_value_info("A", elem, ["M", k])],
        [helper.make_tensor_value_info("Y", elem, ["M", n])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def cmake_build(build_dir, *configure_args: str, target: str | None = None, timeout: int = 600) -> None:
    """Configures and builds this repository's CMake project into ``build_dir`` (-j2: CI has 2 cores)."""
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(build_dir), *configure_args],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    cmd = [cmake, "--build", str(build_dir), "-j", "2"] + (["--target", target] if target else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
