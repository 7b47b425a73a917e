"""The CUDA int4 x fp16 kernel: it compiles for sm_80 and sm_90 wherever nvcc is (CI has no GPU),
and matches the reference where a GPU is (marked ``cuda``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantlab.kernels import _native
from quantlab.kernels.reference import dequantize_nbits
from tests.kernels.helpers import cmake_build, make_case


def _nvcc() -> str | None:
    return shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))


@pytest.fixture(scope="module")
def cuda_lib_path(tmp_path_factory):
    # CI builds the target itself (cmake --build build/cuda --target quantlab_cuda) and points
    # QUANTLAB_CUDA_BUILD_DIR at it; otherwise it is built here.
    prebuilt = os.environ.get("QUANTLAB_CUDA_BUILD_DIR")
    if prebuilt:
        build = Path(prebuilt)
    else:
        if _nvcc() is None:
            pytest.skip("nvcc not found")
        build = tmp_path_factory.mktemp("cuda")
        cmake_build(build, "-DQUANTLAB_CUDA=ON", "-DQUANTLAB_BUILD_TESTS=OFF", target="quantlab_cuda")
    flags = (build / "CMakeFiles" / "quantlab_cuda.dir" / "flags.make").read_text()
    assert "sm_80" in flags and "sm_90" in flags
    return build / _native.CUDA_LIB_NAME


def test_cuda_kernel_compiles_for_sm80_sm90(cuda_lib_path):
    assert cuda_lib_path.is_file()


@pytest.mark.cuda
@pytest.mark.parametrize(
    "m,k,n,block_size,zp",
    [
        (1, 4096, 11008, 128, False),
        (3, 1000, 33, 32, True),
        (17, 320, 7, 64, True),
        (64, 576, 1536, 128, False),
        # The kernel's tile choices on a 132-SM H200 (MT = 16-row tiles, NT = 8-column groups per block):
        (16, 4096, 2048, 32, True),  # decode-sized M = 16 with NT = 2, block 32, zero points
        (1, 4096, 4096, 256, False),  # NT = 2 (m <= 4), block 256
        (65, 4096, 4096, 256, True),  # MT = 4, NT = 4, a second grid row of tiles with one real row
        (5, 1001, 4100, 32, True),  # K % 8 != 0 (scalar activation loads), last NT = 4 block part-filled
        (1, 11008, 4096, 128, True),  # three batches of chunks per warp, the last one partial
        (40, 2000, 300, 64, False),  # MT = 3
        (32, 576, 3000, 128, True),  # MT = 2, NT = 2
    ],
)
def test_cuda_matches_reference(cuda_lib_path, monkeypatch, m, k, n, block_size, zp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from quantlab.kernels import torch_ops

    monkeypatch.setenv("QUANTLAB_CUDA_LIB", str(cuda_lib_path))
    monkeypatch.setattr(torch_ops, "_cuda_lib", None)
    rng = np.random.default_rng(m + k + n)
    x, b, s, z = make_case(rng, m=m, k=k, n=n, bits=4, block_size=block_size, zp=zp)
    xh, sh = x.astype(np.float16), s.astype(np.float16)
    dev = torch.device("cuda")
    y = torch.ops.quantlab.matmul_nbits(
        torch.from_numpy(xh).to(dev),
        torch.from_numpy(b).to(dev),
        torch.from_numpy(sh).to(dev),
        None if z is None else torch.from_numpy(z).to(dev),
        K=k,
        N=n,
        block_size=block_size,
    )
    w = dequantize_nbits(b, sh.astype(np.float32), z, k=k, n=n, block_size=block_size)
    ref = xh.astype(np.float32) @ w.T
    mag = np.abs(xh.astype(np.float32)) @ np.abs(w).T
    # fp16 weights after scaling (half an ulp each), fp32 accumulation, fp16 output.
    err = np.abs(y.float().cpu().numpy() - ref)
    assert np.all(err <= 2e-3 * mag + 1e-3 * np.abs(ref) + 1e-3)
