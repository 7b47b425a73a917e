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

import ctypes
import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from quantlab.quant import linalg
from quantlab.quant.gram import UpperGram
from quantlab.quant.linalg import FACTOR_THREADS, torch_threads
from quantlab.quant.rtn import QuantizedWeight, group_count, grouped, scales_zero_points
from quantlab.quant.scheme import PER_CHANNEL, QuantScheme

logger = logging.getLogger(__name__)

__all__ = ["FACTOR_THREADS", "GPTQConfig", "GPTQResult", "HessianSum", "gptq_quantize", "run_gptq"]


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
    dequantized: np.ndarray | None
    loss: float


class HessianSum:
    """The GPTQ Hessian ``H = 2/n * sum_t x_t x_t^T`` accumulated over calibration batches in place.

    Memory is the blocks of ``x^T x`` on and above the diagonal, twice (:class:`quantlab.quant.gram.
    UpperGram`: the sums are added inside onnxruntime's GEMM, 5x the speed of numpy's syrk on the
    2-core machine); :meth:`hessian` assembles and mirrors them and normalizes once. For down_proj of
    a 1B model (K = 8192) the blocks are 2 x 136 MB, the Hessian 256 MB per linear input.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.gram: UpperGram | None = None
        self.count = 0
        self.threads = threads

    def add(self, x: np.ndarray) -> None:
        """x: activations (..., K) entering the linear."""
        x = np.asarray(x, dtype=np.float32)
        tokens = x.reshape(-1, x.shape[-1])  # (tokens, K)
        if self.gram is not None and self.gram.k != tokens.shape[1]:
            raise ValueError(f"hessian has K={self.gram.k}, activations have K={tokens.shape[1]}")
        if self.gram is None:
            self.gram = UpperGram(tokens.shape[1], self.threads)
        if tokens.shape[0]:
            self.gram.add(tokens)
        self.count += tokens.shape[0]

    def hessian(self) -> np.ndarray:
        """The normalized Hessian; the accumulator is empty afterwards."""
        if self.gram is None or self.count == 0:
            raise ValueError("no calibration tokens")
        h, self.gram = self.gram.total(), None
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
        initial = np.asarray(hessian, dtype=np.float32) * np.float32(n_samples / 2.0)
        acc.gram, acc.count = UpperGram(k, initial=initial), n_samples
    acc.add(x)
    return acc.hessian(), total


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), as :func:`quantlab.quant.rtn.roundf`."""
    whole = torch.trunc(x)
    return whole + torch.where((x - whole).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def _group_params(columns: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and zero point (as float) of every row of W over one group: ``columns`` (group, N)
    holds the group's columns of W (as rows of W^T). RTN formulas."""
    lo, hi = columns.min(dim=0).values.numpy(), columns.max(dim=0).values.numpy()
    scales, zero_points = scales_zero_points(lo, hi, bits, symmetric)
    zp = np.full(scales.shape, 1 << (bits - 1), np.float32) if zero_points is None else zero_points
    return torch.from_numpy(scales), torch.from_numpy(zp.astype(np.float32))


def _static_params(W: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_groups, N) scales and zero points of every group, from W (N, K) in natural column order."""
    groups = grouped(W.numpy(), config.group_size)  # (N, n_groups, group)
    scales, zero_points = scales_zero_points(groups.min(axis=2), groups.max(axis=2), config.bits, config.symmetric)
    zp = np.full(scales.shape, 1 << (config.bits - 1), np.float32) if zero_points is None else zero_points
    return torch.from_numpy(np.ascontiguousarray(scales.T)), torch.from_numpy(np.ascontiguousarray(zp.T, np.float32))


def _reciprocal(scales: torch.Tensor) -> torch.Tensor:
    return torch.where(scales != 0, 1.0 / scales, torch.zeros_like(scales))


@functools.cache
def _native_core():
    """The C++ core's ``ql_gptq_columns``, or None (then the column loop runs as torch ops)."""
    from quantlab.kernels import _native

    lib, why_not = _native.load_core()
    if lib is None:
        logger.warning("GPTQ runs its column loop in torch, about 5x slower: the C++ core is unavailable (%s)", why_not)
    return lib


class _ColumnSolver:
    """Algorithm 1's column loop and lazy batch updates over W^T, one block of columns at a time.

    Works on the transposes (Wt = W^T, (K, N)) so that a column of W is a contiguous row: the
    per-column steps then stream memory instead of striding across every row of W. Group parameters
    are held transposed too, (n_groups, N). The column loop runs in the C++ core (csrc/gptq.cpp)
    when it is built, else as torch ops; both do the same float32 operations per element.
    """

    def __init__(self, Wt, Hinv, perm, scales_t, zeros_t, config: GPTQConfig, native=True, keep_q=True, refit=True):
        self.Wt, self.Hinv, self.config = Wt, Hinv, config
        self.refit = refit and not config.act_order  # act-order groups are fixed up front
        self.k, self.n = Wt.shape
        self.size = self.k if config.group_size == PER_CHANNEL else config.group_size
        self.columns = perm.tolist()  # natural index of each column, in visiting order
        self.scales_t, self.zeros_t, self.reciprocals_t = scales_t, zeros_t, _reciprocal(scales_t)
        self.codes_t = torch.zeros(Wt.shape, dtype=torch.uint8)
        # Q (K, N) in visiting order when asked for; else each block's Q lands in one reused buffer
        self.Qt = torch.zeros_like(Wt) if keep_q else None
        self._q_scratch = None if keep_q else torch.empty(min(config.block_size, self.k), self.n)
        self.max_code = (1 << config.bits) - 1
        self.lib = _native_core() if native else None
        width = min(config.block_size, self.k)
        self._w1, self._err1 = torch.empty(width, self.n), torch.empty(width, self.n)  # reused by every block
        self._spare = torch.empty_like(Wt)  # the lazy updates write W's next state here

    def block(self, i1: int, i2: int) -> float:
        """Columns i1..i2-1: fills codes and Q, updates W; returns the block's share of the loss."""
        W1 = self._w1[: i2 - i1]  # (block, N)
        W1.copy_(self.Wt[i1:i2])
        Err1 = self._err1[: i2 - i1]
        Err1.zero_()
        refits = [] if not self.refit else [i for i in range(i2 - i1) if self.columns[i1 + i] % self.size == 0]
        bounds = sorted({0, *refits, i2 - i1})
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if a in refits:
                self._refit(W1, Err1, i1, i2, a)
            (self._columns_native if self.lib is not None else self._columns_torch)(W1, Err1, i1, i2, a, b)
        if i2 < self.k:  # lazy batch update of the columns after the block, W[i2:] -= Hinv^T Err1
            hinv_t, rest, out = self.Hinv[i1:i2, i2:].T.numpy(), self.Wt[i2:].numpy(), self._spare[i2:].numpy()
            linalg.gemm_into(hinv_t, Err1.numpy(), rest, out, alpha=-1.0, beta=1.0)
            # Rows below i2 are never read again, so the two buffers can simply trade places.
            self.Wt, self._spare = self._spare, self.Wt
        return float(torch.sum(Err1 * Err1)) / 2  # sum over its columns of (w - q)^2 / d^2 / 2

    def _refit(self, W1, Err1, i1: int, i2: int, a: int) -> None:
        """Dynamic groups: fit the group starting at block column ``a`` on its columns as updated so
        far. This block's part of the group is W1; a part past the block still lacks the pending lazy
        update from the block's columns before ``a``, applied here so the result is independent of
        the block width."""
        end = min(i1 + a + self.size, self.k)
        ahead = W1[a : end - i1]
        if end > i2:
            with torch_threads(1):
                pending = self.Hinv[i1 : i1 + a, i2:end].T @ Err1[:a]  # (end - i2, N)
            ahead = torch.cat([ahead, self.Wt[i2:end] - pending], dim=0)  # (group, N)
        group = self.columns[i1 + a] // self.size
        scale, zero = _group_params(ahead, self.config.bits, self.config.symmetric)
        self.scales_t[group], self.zeros_t[group] = scale, zero
        self.reciprocals_t[group] = _reciprocal(scale)

    def _columns_native(self, W1, Err1, i1: int, i2: int, a: int, b: int) -> None:
        from quantlab.kernels._native import GPTQColumnsArgs

        groups = np.array([c // self.size for c in self.columns[i1 + a : i1 + b]], dtype=np.int32)
        hinv1 = self.Hinv[i1:i2, i1:i2].contiguous()  # 64 KB; Hinv is column-major (linalg)
        args = GPTQColumnsArgs(
            w=W1.data_ptr(),
            hinv=hinv1.data_ptr(),
            err=Err1.data_ptr(),
            q=self._q_rows(i1, i2).data_ptr(),
            codes=self.codes_t.data_ptr() + i1 * self.n,
            scales=self.scales_t.data_ptr(),
            reciprocals=self.reciprocals_t.data_ptr(),
            zero_points=self.zeros_t.data_ptr(),
            group_of_column=groups.ctypes.data,
            n=self.n,
            block=i2 - i1,
            begin=a,
            end=b,
            ld_hinv=i2 - i1,
            max_code=self.max_code,
            threads=torch.get_num_threads(),
        )
        status = self.lib.ql_gptq_columns(ctypes.byref(args))
        if status != 0:
            raise RuntimeError(f"ql_gptq_columns failed with status {status}")

    def _q_rows(self, i1: int, i2: int) -> torch.Tensor:
        return self.Qt[i1:i2] if self.Qt is not None else self._q_scratch[: i2 - i1]

    def _columns_torch(self, W1, Err1, i1: int, i2: int, a: int, b: int) -> None:
        Hinv1 = self.Hinv[i1:i2, i1:i2]
        Q1 = self._q_rows(i1, i2)
        diagonal = Hinv1.diagonal().tolist()
        # The rank-1 update as csrc/gptq.cpp does it: each product rounded, then subtracted (addr_ may
        # fuse them into one FMA on some CPUs, which flips codes sitting on a rounding tie).
        products = torch.empty_like(W1)
        with torch_threads(1):  # thousands of small vector ops: thread hand-offs would cost more than they save
            for i in range(a, b):
                group = self.columns[i1 + i] // self.size
                scale, reciprocal, zero = self.scales_t[group], self.reciprocals_t[group], self.zeros_t[group]
                w = W1[i]
                code = torch.clamp(_roundf(w * reciprocal + zero), 0, self.max_code)
                q = (code - zero) * scale
                self.codes_t[i1 + i], Q1[i] = code, q
                err = Err1[i]
                torch.sub(w, q, out=err)
                err /= diagonal[i]
                rows = W1.shape[0] - i - 1
                W1[i + 1 :].sub_(torch.outer(Hinv1[i, i + 1 :], err, out=products[:rows]))


def _transposed(weight) -> torch.Tensor:
    """W^T (K, N) float32, one new buffer, from W (N, K) or from a sequence of row blocks of W (the
    linears of a stack): torch's transposing copy is blocked, 5-7x numpy's on a (16384, 2048) weight."""
    parts = [weight] if isinstance(weight, np.ndarray) else list(weight)
    with warnings.catch_warnings():  # read-only inputs (a layer cache's): only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        views = [torch.from_numpy(np.asarray(w, dtype=np.float32)).T for w in parts]
    return views[0].contiguous() if len(views) == 1 else torch.cat(views, dim=1)


def run_gptq(
    weight: np.ndarray | Sequence[np.ndarray],
    hessian: np.ndarray,
    config: GPTQConfig,
    *,
    consume: bool = False,
    native: bool = True,
    dequantized: bool = True,
    static: QuantizedWeight | None = None,
) -> GPTQResult:
    """GPTQ (arXiv:2210.17323, Algorithm 1) on ``weight`` (N, K) with Hessian ``hessian`` (K, K).
    ``weight`` may be a sequence of (N_i, K) row blocks (linears sharing an input), solved as one.

    Symbols: W the weight being updated (N, K), H the Hessian, Hinv the upper Cholesky factor of
    H^-1, Q the quantized columns, Err1 the scaled errors of the current block (the paper's E),
    d = [Hinv]_qq. Columns with ``H_qq == 0`` (dead: their input is always zero) get ``H_qq = 1``
    and weight 0. Linear algebra runs in float32 on CPU (:mod:`quantlab.quant.linalg`).
    ``consume=True`` lets it overwrite ``hessian`` (a float32 C-contiguous array) instead of copying
    it. ``native=False`` runs the column loop as torch ops even when the C++ core is built.
    ``dequantized=False`` leaves ``GPTQResult.dequantized`` None (saves a float32 copy of the weight).
    ``static``: codes of the same scheme whose group scales and zero points are kept (searched ones,
    say); only the rounding is solved then, instead of each group's min/max refit as GPTQ reaches it.
    """
    Wt = _transposed(weight)  # (K, N): a column of W per row
    own = consume and hessian.dtype == np.float32 and hessian.flags.c_contiguous and hessian.flags.writeable
    H = hessian if own else np.array(hessian, dtype=np.float32, order="C")
    del hessian
    k, n = Wt.shape
    if H.shape != (k, k):
        raise ValueError(f"hessian has shape {tuple(H.shape)}, expected ({k}, {k})")
    diag = H.diagonal()  # a view
    if not np.any(diag > 0):  # no calibration signal (an expert no token reached): damping adds 0 to 0
        raise ValueError("GPTQ needs a Hessian with a positive diagonal; this one is zero (no tokens): use RTN")
    dead = torch.from_numpy(diag == 0)
    diag_index = np.flatnonzero(diag == 0)
    H[diag_index, diag_index] = 1.0
    Wt[dead] = 0.0

    n_groups = group_count(k, config.group_size)
    scales_t, zeros_t = torch.zeros(n_groups, n), torch.zeros(n_groups, n)
    perm = torch.arange(k)
    if static is not None:
        if (static.bits, static.group_size) != (config.bits, config.group_size) or static.scales.shape != (n, n_groups):
            raise ValueError("static codes must have the scheme's bits and groups and the weight's shape")
        zp = static.zero_points if static.zero_points is not None else np.full((n, n_groups), 1 << (config.bits - 1))
        scales_t = torch.from_numpy(np.array(static.scales.T, np.float32, order="C"))  # a writable copy
        zeros_t = torch.from_numpy(np.array(zp.T, np.float32, order="C"))
    if config.act_order:
        if static is None:
            scales_t, zeros_t = _static_params(Wt.T, config)
        perm = torch.argsort(torch.from_numpy(H.diagonal().copy()), descending=True, stable=True)
        Wt = Wt[perm]
        index = perm.numpy()
        H = H[index]  # one permuted (K, K) copy at a time
        H = np.ascontiguousarray(H[:, index])
    H[np.diag_indices(k)] += np.float32(config.percdamp) * np.float32(np.mean(H.diagonal(), dtype=np.float32))
    R = linalg.reversed_cholesky(H)  # H is reversed in place, then dropped: one (K, K) buffer at a time
    del H
    Hinv = torch.from_numpy(linalg.inverse_hessian_factor(R))  # in R's buffer
    del R
    solver = _ColumnSolver(
        Wt, Hinv, perm, scales_t, zeros_t, config, native=native, keep_q=dequantized, refit=static is None
    )
    loss = 0.0
    for i1 in range(0, k, config.block_size):
        loss += solver.block(i1, min(i1 + config.block_size, k))
    codes_t, Qt = solver.codes_t, solver.Qt
    del solver, Wt, Hinv

    if config.act_order:  # back to the natural column order
        inverse = torch.argsort(perm)
        codes_t = codes_t[inverse]
        Qt = None if Qt is None else Qt[inverse]
    # torch's transposing copies are blocked: 5-7x numpy's on a (16384, 2048) weight
    scales = scales_t.T.contiguous().numpy()
    zero_points = None if config.symmetric else zeros_t.T.contiguous().numpy().astype(np.uint8)
    quantized = QuantizedWeight(codes_t.T.contiguous().numpy(), scales, zero_points, config.bits, config.group_size)
    del codes_t
    return GPTQResult(quantized, None if Qt is None else Qt.T.contiguous().numpy(), loss)


def gptq_quantize(
    weight: np.ndarray | Sequence[np.ndarray],
    hessian: np.ndarray,
    config: GPTQConfig,
    *,
    consume: bool = False,
    static: QuantizedWeight | None = None,
) -> QuantizedWeight:
    """GPTQ codes of ``weight`` (N, K) for Hessian ``hessian`` (K, K); see :func:`run_gptq`."""
    return run_gptq(weight, hessian, config, consume=consume, dequantized=False, static=static).weight
