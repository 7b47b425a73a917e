"""``torch.ops.quantlab.matmul_nbits``: the C++ core (CPU) and the CUDA kernel as a torch op.

Importing this module registers the op (``torch.library.custom_op``) with a fake implementation,
so ``torch.compile`` and ``torch.export`` can trace through it. Signature:

    matmul_nbits(x, B, scales, zero_points=None, bias=None, *, K, N, bits=4, block_size=32,
                 accuracy_level=4, threads=0) -> Tensor (..., N)

Tensors follow onnxruntime's MatMulNBits contract (see :mod:`quantlab.kernels.reference`). CUDA
tensors run the int4 x fp16 kernel from csrc/cuda when it was built (QUANTLAB_CUDA=ON); it takes
float16 activations and scales, 4 bits, and accuracy_level is ignored there (fp16 products,
fp32 accumulation).
"""

from __future__ import annotations

import torch

from quantlab import kernels
from quantlab.kernels import _native

_cuda_lib = None


def _cuda():
    global _cuda_lib
    if _cuda_lib is None:
        _cuda_lib = _native.load_cuda() or False
    return _cuda_lib or None


@torch.library.custom_op("quantlab::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    K: int,
    N: int,
    bits: int = 4,
    block_size: int = 32,
    accuracy_level: int = 4,
    threads: int = 0,
) -> torch.Tensor:
    if x.is_cuda:
        return _matmul_nbits_cuda(x, B, scales, zero_points, bias, K=K, N=N, bits=bits, block_size=block_size)
    return kernels.matmul_nbits(
        x,
        B,
        scales,
        zero_points,
        K=K,
        N=N,
        bits=bits,
        block_size=block_size,
        bias=bias,
        accuracy_level=accuracy_level,
        threads=threads or None,
    )


@matmul_nbits.register_fake
def _(x, B, scales, zero_points=None, bias=None, *, K, N, bits=4, block_size=32, accuracy_level=4, threads=0):
    torch._check(x.shape[-1] == K, lambda: f"matmul_nbits: x has {x.shape[-1]} columns, K={K}")
    return x.new_empty((*x.shape[:-1], N))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _matmul_nbits_cuda(x, B, scales, zero_points, bias, *, K, N, bits, block_size) -> torch.Tensor:
    lib = _cuda()
    if lib is None:
        raise RuntimeError("quantlab: the CUDA kernels were not built (install with QUANTLAB_CUDA=ON)")
    if bits != 4 or x.dtype != torch.float16:
        raise ValueError("quantlab CUDA matmul_nbits supports bits=4 with float16 activations")
    lead = x.shape[:-1]
    # The kernel reads x and B with 16-byte vector loads: contiguous and 16-byte aligned.
    x2, B = _aligned(x.reshape(-1, K)), _aligned(B)
    s = scales.to(torch.float16).contiguous()
    zp = zero_points.contiguous() if zero_points is not None else None
    y = torch.empty((x2.shape[0], N), dtype=torch.float16, device=x.device)
    status = lib.qlc_matmul_nbits_f16(
        x2.data_ptr(),
        B.data_ptr(),
        s.data_ptr(),
        zp.data_ptr() if zp is not None else None,
        y.data_ptr(),
        x2.shape[0],
        K,
        N,
        block_size,
        torch.cuda.current_stream(x.device).cuda_stream,
    )
    if status != 0:
        raise RuntimeError(f"quantlab CUDA matmul_nbits failed with status {status}")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, N)
