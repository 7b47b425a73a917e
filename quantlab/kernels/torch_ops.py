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
    """`t` itself when it is contiguous and 16-byte aligned (the kernel's vector loads); a copy
    otherwise."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _current_stream(device: torch.device) -> int:
    """The raw cudaStream_t of `device`'s current stream (the capture stream under a CUDA graph)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # no Stream object: ~1 us cheaper
    if raw is not None:
        return raw(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _matmul_nbits_cuda(x, B, scales, zero_points, bias, *, K, N, bits, block_size) -> torch.Tensor:
    # Per call this costs the checks, the output allocation and one ctypes call: inputs that are
    # already contiguous, aligned float16 are passed as they are (decode runs this once per
    # projection per token).
    lib = _cuda()
    if lib is None:
        raise RuntimeError("quantlab: the CUDA kernels were not built (install with QUANTLAB_CUDA=ON)")
    if bits != 4 or x.dtype != torch.float16:
        raise ValueError("quantlab CUDA matmul_nbits supports bits=4 with float16 activations")
    k_blocks = (K + block_size - 1) // block_size
    if B.numel() != N * k_blocks * block_size // 2 or scales.numel() != N * k_blocks:
        raise ValueError(f"matmul_nbits: B or scales do not match K={K}, N={N}, block_size={block_size}")
    if zero_points is not None and zero_points.numel() != N * ((k_blocks + 1) // 2):
        raise ValueError(f"matmul_nbits: zero_points do not match K={K}, N={N}, block_size={block_size}")
    if not (B.is_cuda and scales.is_cuda and (zero_points is None or zero_points.is_cuda)):
        raise ValueError("matmul_nbits: x is on a CUDA device, B, scales and zero_points must be too")
    lead = x.shape[:-1]
    # The kernel reads x and B with 16-byte vector loads: contiguous and 16-byte aligned.
    x2, B = _aligned(x.reshape(-1, K)), _aligned(B)
    s = scales if scales.dtype == torch.float16 else scales.to(torch.float16)
    if not s.is_contiguous():
        s = s.contiguous()
    zp = zero_points
    if zp is not None and not zp.is_contiguous():
        zp = zp.contiguous()
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
        _current_stream(x.device),
    )
    if status != 0:
        raise RuntimeError(f"quantlab CUDA matmul_nbits failed with status {status}")
    if bias is not None:
        y.add_(bias if bias.dtype == y.dtype else bias.to(y.dtype))
    return y.reshape(*lead, N)
