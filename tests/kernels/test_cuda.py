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


# Every (MT, NT) the host can pick on a 132-SM H200 (MT = 16-row tiles, NT = 8-column groups per
# tile; pick_nt in matmul_nbits_cuda.cu), with one persistent block walking several tiles (rounds > 1)
# where the shape makes it, partial last batches of chunks, K % 8 != 0, N off the tile, blocks of
# 32..256, with and without zero points. `offset` places scales (halves) and zero points (bytes) at
# that offset inside a larger buffer, so the kernel's aligned-word reads see every alignment.
CASES = [
    # m, k, n, block_size, zp, offset            MT, NT, tiles per block (rounds), remark
    (1, 4096, 11008, 128, False, 0),  # 1, 2, 3: issue 17's decode shape
    (3, 1000, 33, 32, True, 0),  # 1, 1, 1: partial batch, N off the tile
    (17, 320, 7, 64, True, 0),  # 2, 1, 1: one tile
    (64, 576, 1536, 128, False, 0),  # 4, 2, 1: K of 4.5 chunks, odd blocks per row
    (16, 4096, 2048, 32, True, 0),  # 1, 1, 1: block 32, zero points
    (1, 4096, 4096, 256, False, 0),  # 1, 2, 1: block 256
    (65, 4096, 4096, 256, True, 0),  # 4, 4, 2: a second row of tiles with one real row
    (5, 1001, 4100, 32, True, 0),  # 1, 2, 1: K % 8 != 0 (scalar activation loads)
    (1, 11008, 4096, 128, True, 0),  # 1, 2, 1: six batches per warp, the last one partial
    (40, 2000, 300, 64, False, 0),  # 3, 1, 1
    (32, 576, 3000, 128, True, 0),  # 2, 4, 1
    (5, 300, 40000, 32, True, 1),  # 1, 4, 5: many tiles per block, odd scale/zp addresses
    (16, 4096, 11008, 128, True, 0),  # 1, 4, 2
    (17, 1081, 1081, 64, True, 3),  # 2, 2, 1: zero points at byte offset 3
    (17, 1000, 4226, 256, False, 0),  # 2, 4, 2
    (33, 520, 5000, 32, True, 2),  # 3, 4, 2
    (33, 777, 1081, 128, True, 1),  # 3, 2, 1: K % 8 != 0
    (48, 700, 12000, 64, True, 0),  # 3, 4, 3
    (64, 4096, 11008, 128, False, 0),  # 4, 4, 3
    (100, 1000, 1000, 64, True, 1),  # 4, 2, 1: two rows of tiles, the second part-filled
    (100, 4096, 300, 128, False, 0),  # 4, 1, 1
    (64, 11008, 4096, 32, True, 0),  # 4, 4, 1: block 32, 11 batches per warp
]


@pytest.mark.cuda
@pytest.mark.parametrize("m,k,n,block_size,zp,offset", CASES)
def test_cuda_matches_reference(cuda_lib_path, monkeypatch, m, k, n, block_size, zp, offset):
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

    def at_offset(a: np.ndarray):
        buf = torch.zeros(a.size + offset + 8, dtype=torch.from_numpy(a).dtype, device=dev)
        buf[offset : offset + a.size] = torch.from_numpy(a.reshape(-1)).to(dev)
        return buf[offset : offset + a.size]

    def run():
        return torch.ops.quantlab.matmul_nbits(
            torch.from_numpy(xh).to(dev),
            torch.from_numpy(b).to(dev),
            at_offset(sh),
            None if z is None else at_offset(z),
            K=k,
            N=n,
            block_size=block_size,
        )

    y = run()
    w = dequantize_nbits(b, sh.astype(np.float32), z, k=k, n=n, block_size=block_size)
    ref = xh.astype(np.float32) @ w.T
    mag = np.abs(xh.astype(np.float32)) @ np.abs(w).T
    # fp16 weights after scaling (half an ulp each), fp32 accumulation, fp16 output.
    err = np.abs(y.float().cpu().numpy() - ref)
    assert np.all(err <= 2e-3 * mag + 1e-3 * np.abs(ref) + 1e-3)
    # Deterministic: a second call gives the same bits.
    assert torch.equal(y, run())
