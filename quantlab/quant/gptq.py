"""GPTQ: accurate post-training quantization from second-order (Hessian) information.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323.

Per linear layer the objective is ``argmin_Q ||W X - Q X||^2`` with ``H = 2 X X^T`` its Hessian.
Columns of ``W`` are quantized one at a time; the error of each is spread over the not yet
quantized columns through the inverse Hessian (Optimal Brain Quantization), with the paper's three
changes: a fixed column order shared by all rows, lazy batch updates in blocks of 128 columns, and
a Cholesky factor of ``H^-1`` for numerical stability.

The integer grid (scale and zero point per group, rounding) is the RTN one from
:mod:`quantlab.quant.rtn`, so a GPTQ weight packs and dequantizes exactly like an RTN weight.
With ``act_order`` the columns are visited in order of decreasing ``diag(H)``, but the group
scales and zero points are *static*: computed from the original weight in natural column order
before any update, so every column keeps the parameters of its natural group and the emitted
weight needs no ``g_idx`` (MatMulNBits's deprecated input) to be read back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quantlab.quant.gram import add_upper, mirror_upper
from quantlab.quant.rtn import QuantizedWeight, group_count, grouped, scales_zero_points
from quantlab.quant.scheme import PER_CHANNEL, QuantScheme

# MKL's Cholesky results depend on its thread count (a tie in a code's rounding then flips), not on the
# cores the process may use: a fixed count gives the same codes with any OMP_NUM_THREADS or affinity.
# Two threads: the 2-core machine's full speed; 1 would double the 1B model's factorization time.
FACTOR_THREADS = 2


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings. percdamp: damping as a fraction of mean(diag(H)); block_size: lazy-batch width."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits}")
        if self.group_size != PER_CHANNEL and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")
        if not 0.0 <= self.percdamp < 1.0 or self.block_size <= 0:
            raise ValueError(f"need 0 <= percdamp < 1 and block_size > 0, got {self.percdamp}, {self.block_size}")

    @classmethod
    def from_scheme(cls, scheme: QuantScheme, **overrides: object) -> GPTQConfig:
        """The weight format of ``scheme`` with GPTQ defaults, optionally overridden."""
        fields = {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric}
        return cls(**{**fields, **overrides})


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """weight: the codes. dequantized: the algorithm's own Q (N, K) float32, natural column order.
    loss: the GPTQ objective's estimate, sum over columns of (w - q)^2 / [H^-1]_qq / 2."""

    weight: QuantizedWeight
    dequantized: np.ndarray
    loss: float


class HessianSum:
    """The GPTQ Hessian ``H = 2/n * sum_t x_t x_t^T`` accumulated over calibration batches in place.

    Memory is one (K, K) float32 buffer plus one batch's blocks of ``x^T x``. Only the blocks on and
    above the diagonal are computed, on onnxruntime's GEMM (:mod:`quantlab.quant.gram`: 5x the speed of
    numpy's syrk on the 2-core machine); :meth:`hessian` mirrors them and normalizes once. For down_proj
    of a 1B model (K = 8192) the buffer is 256 MB per linear input.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.sum: np.ndarray | None = None
        self.count = 0
        self.threads = threads

    def add(self, x: np.ndarray) -> None:
        """x: activations (..., K) entering the linear."""
        x = np.asarray(x, dtype=np.float32)
        tokens = x.reshape(-1, x.shape[-1])  # (tokens, K)
        if self.sum is not None and self.sum.shape[0] != tokens.shape[1]:
            raise ValueError(f"hessian has K={self.sum.shape[0]}, activations have K={tokens.shape[1]}")
        if self.sum is None:
            self.sum = np.zeros((tokens.shape[1], tokens.shape[1]), dtype=np.float32)
        add_upper(self.sum, tokens, self.threads)
        self.count += tokens.shape[0]

    def hessian(self) -> np.ndarray:
        """The normalized Hessian; the accumulator hands its buffer over and is empty afterwards."""
        if self.sum is None or self.count == 0:
            raise ValueError("no calibration tokens")
        h, self.sum = mirror_upper(self.sum), None
        h *= np.float32(2.0 / self.count)
        return h


def accumulate_hessian(hessian: np.ndarray | None, n_samples: int, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Fold a calibration batch into a normalized Hessian ``H = 2/n * sum_t x_t x_t^T`` (pure).

    hessian: (K, K) float32 from earlier batches, or None to start; n_samples: the token count in
    it; x: activations (..., K) entering the layer. Returns the new (H, n); the input is not modified.
    Calibration uses :class:`HessianSum`, which does the same in place.
    """
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    total = n_samples + x.size // max(k, 1)
    if total == 0:
        raise ValueError("no calibration tokens")
    acc = HessianSum()
    if hessian is not None:
        if hessian.shape != (k, k):
            raise ValueError(f"hessian has shape {hessian.shape}, activations have K={k}")
        acc.sum, acc.count = np.asarray(hessian, dtype=np.float32) * np.float32(n_samples / 2.0), n_samples
    acc.add(x)
    return acc.hessian(), total


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), as :func:`quantlab.quant.rtn.roundf`."""
    whole = torch.trunc(x)
    return whole + torch.where((x - whole).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def _group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and zero point (as float) of each row of ``w`` (N, group), RTN formulas."""
    scales, zero_points = scales_zero_points(w.min(dim=1).values.numpy(), w.max(dim=1).values.numpy(), bits, symmetric)
    zp = np.full(scales.shape, 1 << (bits - 1), np.float32) if zero_points is None else zero_points
    return torch.from_numpy(scales), torch.from_numpy(zp.astype(np.float32))


def _static_params(W: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, n_groups) scales and zero points of every group, from W in natural column order."""
    groups = grouped(W.numpy(), config.group_size)  # (N, n_groups, group)
    scales, zero_points = scales_zero_points(groups.min(axis=2), groups.max(axis=2), config.bits, config.symmetric)
    zp = np.full(scales.shape, 1 << (config.bits - 1), np.float32) if zero_points is None else zero_points
    return torch.from_numpy(scales), torch.from_numpy(zp.astype(np.float32))


def _inverse_hessian_factor(box: list[torch.Tensor], percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag(H)) (paper, section 4).

    ``box`` holds the only reference to H, which is damped in place and dropped as soon as its
    Cholesky factor exists, so at most two (K, K) matrices live at a time (256 MB each at K = 8192).
    """
    H = box.pop()
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    del H
    Hinv = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(Hinv, upper=True)


def _quantize_block(
    Wt: torch.Tensor,
    Hinv: torch.Tensor,
    i1: int,
    i2: int,
    perm: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    codes_t: torch.Tensor,
    Qt: torch.Tensor,
    config: GPTQConfig,
) -> float:
    """Columns i1..i2-1 of Algorithm 1 (symbols: :func:`run_gptq`); fills codes and Q, updates W.

    Works on the transposes (Wt = W^T, (K, N)) so that a column of W is a contiguous row: the
    per-column steps then stream memory instead of striding across every row of W.
    Returns the block's share of the loss. Fits dynamic group parameters into scales/zeros in place.
    """
    k = Wt.shape[0]
    size = k if config.group_size == PER_CHANNEL else config.group_size
    W1 = Wt[i1:i2].clone()  # (block, N)
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    max_code = (1 << config.bits) - 1
    columns = perm[i1:i2].tolist()  # natural index of each column
    diagonal = Hinv1.diagonal().tolist()
    params: dict[int, tuple] = {}  # group -> (scale, reciprocal, zero), the rows' parameters
    with _threads(1):  # thousands of small vector ops: thread hand-offs would cost more than they save
        for i, column in enumerate(columns):
            group = column // size
            if not config.act_order and column % size == 0:
                # Dynamic groups: fit on the group's columns as updated so far. This block's part of
                # the group is W1; a part past the block still lacks the pending lazy update from
                # columns i1 .. i1+i-1, applied here so the result is independent of the block width.
                end = min(i1 + i + size, k)
                ahead = W1[i : end - i1]
                if end > i2:
                    pending = Hinv[i1 : i1 + i, i2:end].T @ Err1[:i]  # (end - i2, N)
                    ahead = torch.cat([ahead, Wt[i2:end] - pending], dim=0)  # (group, N)
                scales[:, group], zeros[:, group] = _group_params(ahead.T, config.bits, config.symmetric)
                params.pop(group, None)
            if group not in params:
                scale = scales[:, group]
                params[group] = (scale, torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale)), zeros[:, group])
            scale, reciprocal, zero = params[group]
            w = W1[i]
            code = torch.clamp(_roundf(w * reciprocal + zero), 0, max_code)
            q = (code - zero) * scale
            codes_t[i1 + i], Qt[i1 + i] = code, q
            err = Err1[i]
            torch.sub(w, q, out=err)
            err /= diagonal[i]
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1.0)
        # lazy batch update of the columns after the block; one thread, as MKL's GEMM results depend on
        # the thread count and the same input must give the same codes on any machine
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1
    return float(torch.sum(Err1 * Err1)) / 2  # sum over its columns of (w - q)^2 / d^2 / 2


def run_gptq(weight: np.ndarray, hessian: np.ndarray, config: GPTQConfig, *, consume: bool = False) -> GPTQResult:
    """GPTQ (arXiv:2210.17323, Algorithm 1) on ``weight`` (N, K) with Hessian ``hessian`` (K, K).

    Symbols: W the weight being updated (N, K), H the Hessian, Hinv the upper Cholesky factor of
    H^-1, Q the quantized columns, Err1 the scaled errors of the current block (the paper's E),
    d = [Hinv]_qq. Columns with ``H_qq == 0`` (dead: their input is always zero) get ``H_qq = 1``
    and weight 0. Linear algebra runs in torch float32 on CPU. ``consume=True`` lets it overwrite
    ``hessian`` (a float32 C-contiguous array) instead of copying it.
    """
    W = torch.tensor(np.asarray(weight, dtype=np.float32))
    own = consume and hessian.dtype == np.float32 and hessian.flags.c_contiguous and hessian.flags.writeable
    H = torch.from_numpy(hessian) if own else torch.tensor(np.asarray(hessian, dtype=np.float32))
    del hessian
    n, k = W.shape
    if H.shape != (k, k):
        raise ValueError(f"hessian has shape {tuple(H.shape)}, expected ({k}, {k})")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_groups = group_count(k, config.group_size)
    scales, zeros = torch.zeros(n, n_groups), torch.zeros(n, n_groups)
    perm = torch.arange(k)
    if config.act_order:
        scales, zeros = _static_params(W, config)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm]  # one permuted (K, K) copy at a time
        H = H[:, perm]

    box = [H]
    del H
    Wt = W.T.contiguous()  # (K, N): a column of W per row
    del W
    with _threads(FACTOR_THREADS):
        Hinv = _inverse_hessian_factor(box, config.percdamp)
    Qt, codes_t = torch.zeros_like(Wt), torch.zeros(Wt.shape, dtype=torch.uint8)
    loss = 0.0
    for i1 in range(0, k, config.block_size):
        i2 = min(i1 + config.block_size, k)
        loss += _quantize_block(Wt, Hinv, i1, i2, perm, scales, zeros, codes_t, Qt, config)
    del Wt, Hinv

    if config.act_order:  # back to the natural column order
        inverse = torch.argsort(perm)
        codes_t, Qt = codes_t[inverse], Qt[inverse]
    zero_points = None if config.symmetric else zeros.numpy().astype(np.uint8)
    quantized = QuantizedWeight(
        np.ascontiguousarray(codes_t.numpy().T), scales.numpy(), zero_points, config.bits, config.group_size
    )
    del codes_t
    return GPTQResult(quantized, np.ascontiguousarray(Qt.numpy().T), loss)


class _threads:
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def gptq_quantize(
    weight: np.ndarray, hessian: np.ndarray, config: GPTQConfig, *, consume: bool = False
) -> QuantizedWeight:
    """GPTQ codes of ``weight`` (N, K) for Hessian ``hessian`` (K, K); see :func:`run_gptq`."""
    return run_gptq(weight, hessian, config, consume=consume).weight
