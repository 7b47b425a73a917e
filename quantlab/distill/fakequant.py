"""A linear whose weight is fake-quantized in the forward pass, trained with a straight-through estimator.

    codes  = clamp(round(W / s + z), 0, 2^bits - 1)        per group of K, s (N, G) learnable, z (N, G) fixed
    W_hat  = (codes - z) * s                               what MatMulNBits computes with, exactly
    y      = x W_hat^T

``round`` passes its gradient straight through (STE, arXiv 1308.3432), so both the latent weight
``W`` and the scales ``s`` learn (the scale gradient is LSQ's, arXiv 1902.08153); ``clamp`` stops the
gradient of weights pushed outside the grid, which is how the scales learn to clip. Zero points stay
the integers they were initialized with (the asymmetric range of RTN/GPTQ/AWQ; 2^(bits-1) when
symmetric), so the exported codes, scales and zero points are the integers and floats the forward
pass used: :meth:`FakeQuantLinear.export` re-derives nothing, it reads them off.

:meth:`FakeQuantLinear.freeze_codes` fixes the integer codes where they are (say, GPTQ's): from then on
``W_hat = (codes - z) * s`` with only ``s`` learning, and its gradient is exact, not straight-through.
That is E2E-QP's "train the step sizes only" (arXiv 2407.11062): on a model whose GPTQ codes were chosen
with error compensation, letting a noisy small-batch gradient flip codes undoes more than it wins.
"""

from __future__ import annotations

import numpy as np
import torch

from quantlab.quant.rtn import QuantizedWeight, dequantize, group_count

# A group whose scale is exactly 0 (an all-zero group) would divide by zero; it keeps its codes at the
# zero point with this stand-in scale, which dequantizes to the same zeros.
TINY_SCALE = 1e-12


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


class FakeQuantLinear(torch.nn.Module):
    """``y = x W_hat^T`` with ``W_hat`` the group-quantized latent weight (see the module docstring)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        n, k = qw.shape
        self.bits, self.k = qw.bits, k
        self.group = qw.effective_group_size
        self.n_groups = group_count(k, qw.group_size)
        self.group_size = qw.group_size
        self.symmetric = qw.symmetric
        scales = np.array(qw.scales, dtype=np.float32)
        scales[scales == 0] = TINY_SCALE
        # the latent weight starts at the dequantized codes, so the first forward pass is exactly qw
        self.weight = torch.nn.Parameter(torch.from_numpy(np.array(dequantize(qw), dtype=np.float32)))  # (N, K)
        self.scale = torch.nn.Parameter(torch.from_numpy(scales))  # (N, G)
        self.register_buffer("zero_point", torch.from_numpy(qw.zero_point_array().astype(np.float32)))  # (N, G)
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone())
        self.register_buffer("frozen_codes", None)  # (N, G, group) once freeze_codes() ran

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Keep today's integer codes for good; the latent weight stops learning (module docstring)."""
        self.frozen_codes = self.codes().detach().clone()
        self.weight.requires_grad_(False)

    def _grouped(self) -> torch.Tensor:
        pad = self.n_groups * self.group - self.k
        w = torch.nn.functional.pad(self.weight, (0, pad)) if pad else self.weight
        return w.view(w.shape[0], self.n_groups, self.group)  # (N, G, group)

    def codes(self) -> torch.Tensor:
        """Integer codes as floats (N, G, group), with the straight-through gradient (or the frozen ones)."""
        if self.frozen_codes is not None:
            return self.frozen_codes
        q = round_ste(self._grouped() / self.scale[:, :, None] + self.zero_point[:, :, None])
        return torch.clamp(q, 0, (1 << self.bits) - 1)

    def dequantized(self) -> torch.Tensor:
        w = (self.codes() - self.zero_point[:, :, None]) * self.scale[:, :, None]  # (N, G, group)
        return w.reshape(w.shape[0], -1)[:, : self.k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.dequantized().T
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """The codes, scales and zero points this module computes with, as a QuantizedWeight."""
        codes = self.codes().reshape(self.weight.shape[0], -1)[:, : self.k]
        zp = None if self.symmetric else self.zero_point.numpy().astype(np.uint8)
        return QuantizedWeight(
            codes.numpy().astype(np.uint8), self.scale.detach().numpy().copy(), zp, self.bits, self.group_size
        )


class FloatLinear(torch.nn.Module):
    """``y = x W^T (+ b)`` with a float weight (N, K); frozen when ``trainable`` is False."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, trainable: bool = True):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone(), requires_grad=trainable)
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias
