"""Round-to-nearest (RTN) group quantization of a linear weight, and the shared integer-code maths.

Layout: a weight ``W`` is ``(N, K)`` (torch ``Linear``: out_features, in_features); it is quantized
along K in groups of ``group_size`` consecutive elements, each group with one fp32 scale and one
zero point::

    W_hat[n, k] = (q[n, k] - zero_point[n, k // group_size]) * scale[n, k // group_size]

When K is not a multiple of the group size the last group is partial; the maths pads it with
zeros to a whole group, which never changes its scale or zero point (the asymmetric range always
includes 0, the symmetric scale follows the largest magnitude), and drops the padding's codes.

Rounding, chosen to reproduce onnxruntime's MLAS blockwise quantizer (``MlasQuantizeBlockwise``,
used by ``MatMulNBitsQuantizer``'s default RTN) bit for bit, all in fp32 arithmetic:

- asymmetric: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)`` (zero stays exactly representable),
  ``scale = (hi - lo) / (2^bits - 1)``, ``zero_point = clamp(roundf(-lo / scale), 0, 2^bits - 1)``;
- symmetric: zero point fixed at ``2^(bits-1)`` (8 for 4-bit, 128 for 8-bit: MatMulNBits's default
  when the zero_points input is absent) and ``scale = -w_m / 2^(bits-1)`` where ``w_m`` is the
  group's element of largest magnitude *with its sign* (the negative one on a tie). The scale is
  therefore negative when that element is positive: it lands on code 0, i.e. on the -8 end of
  [-8, 7], so the largest magnitude is always exact and all 2^bits codes are usable (absmax / 7
  would waste the -8 code). Kernels must not assume scales are positive;
- codes: ``q = clamp(roundf(w * (1 / scale) + zero_point), 0, 2^bits - 1)`` with the reciprocal in
  fp32 and ``roundf`` rounding halves away from zero (not numpy's half-to-even); a zero scale
  (an all-zero group) gives reciprocal 0, so the group's codes are its zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantlab.quant.scheme import PER_CHANNEL


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Integer codes of a ``(N, K)`` weight with per-group fp32 scales and uint8 zero points.

    q: (N, K) uint8 codes in [0, 2^bits - 1]. scales: (N, n_groups) float32.
    zero_points: (N, n_groups) uint8, or None for symmetric (implicit zero point 2^(bits-1)).
    group_size: elements of K per group, or ``PER_CHANNEL`` (-1) for one group spanning K.
    Arrays are stored as read-only views.
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits}")
        if self.group_size != PER_CHANNEL and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per channel), got {self.group_size}")
        _check_array("q", self.q, np.uint8, 2)
        n, k = self.q.shape
        n_groups = group_count(k, self.group_size)
        _check_array("scales", self.scales, np.float32, 2, (n, n_groups))
        if self.zero_points is not None:
            _check_array("zero_points", self.zero_points, np.uint8, 2, (n, n_groups))
            if int(self.zero_points.max(initial=0)) > self.max_code:
                raise ValueError(f"zero point above {self.max_code} for {self.bits}-bit codes")
        if int(self.q.max(initial=0)) > self.max_code:
            raise ValueError(f"code above {self.max_code} for {self.bits}-bit codes")
        for name in ("q", "scales", "zero_points"):
            value = getattr(self, name)
            if value is not None:
                view = value.view()
                view.flags.writeable = False
                object.__setattr__(self, name, view)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def effective_group_size(self) -> int:
        """Elements per group along K (K itself when per channel)."""
        return self.q.shape[1] if self.group_size == PER_CHANNEL else self.group_size

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def zero_point_array(self) -> np.ndarray:
        """Zero points as (N, n_groups) uint8, the implicit 2^(bits-1) filled in when symmetric."""
        if self.zero_points is not None:
            return np.asarray(self.zero_points)
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)


def _check_array(name: str, value: object, dtype: type, ndim: int, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D {np.dtype(dtype).name} array, got {_describe(value)}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"{name} has shape {value.shape}, expected {shape}")


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype.name} array of shape {value.shape}"
    return type(value).__name__


def group_count(k: int, group_size: int) -> int:
    """Number of groups along K (the last one partial when K is not a multiple of group_size)."""
    if group_size == PER_CHANNEL:
        return 1
    return -(-k // group_size)


def roundf(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: round half away from zero, exact for every float (np.round rounds half to even)."""
    whole = np.trunc(x)
    frac = x - whole  # exact: both operands share the exponent range of x
    return whole + np.where(np.abs(frac) >= 0.5, np.sign(x), 0).astype(x.dtype)


def grouped(weight: np.ndarray, group_size: int) -> np.ndarray:
    """View ``(N, K)`` as ``(N, n_groups, group)``, zero-padding the last partial group."""
    n, k = weight.shape
    size = k if group_size == PER_CHANNEL else group_size
    n_groups = group_count(k, group_size)
    pad = n_groups * size - k
    if pad:
        weight = np.pad(weight, ((0, 0), (0, pad)))
    return weight.reshape(n, n_groups, size)  # (N, n_groups, group)


def scales_zero_points(
    w_min: np.ndarray, w_max: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """fp32 scales and uint8 zero points (None when symmetric) from per-group min and max.

    See the module docstring for the formulas; they reproduce MLAS's ``range2scalezp`` and
    ``range2scale`` in fp32.
    """
    w_min = np.asarray(w_min, dtype=np.float32)
    w_max = np.asarray(w_max, dtype=np.float32)
    if symmetric:
        signed_max = np.where(np.abs(w_max) > np.abs(w_min), w_max, w_min)
        return (-signed_max / np.float32(1 << (bits - 1))).astype(np.float32), None
    lo = np.minimum(w_min, np.float32(0))
    hi = np.maximum(w_max, np.float32(0))
    max_code = np.float32((1 << bits) - 1)
    scales = ((hi - lo) / max_code).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero_fp = np.where(scales != 0, np.float32(0) - lo / scales, lo).astype(np.float32)
    zero_points = np.clip(roundf(zero_fp), 0, max_code).astype(np.uint8)
    return scales, zero_points


def quantize_with_params(
    weight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, group_size: int
) -> np.ndarray:
    """Integer codes (N, K) uint8 of ``weight`` for given per-group scales and zero points."""
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    zp = np.full(scales.shape, 1 << (bits - 1), np.uint8) if zero_points is None else zero_points
    with np.errstate(divide="ignore"):
        reciprocal = np.where(scales != 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)
    groups = grouped(weight, group_size)  # (N, n_groups, group)
    codes = roundf(groups * reciprocal[:, :, None] + zp.astype(np.float32)[:, :, None])
    codes = np.clip(codes, 0, (1 << bits) - 1).astype(np.uint8)
    return codes.reshape(n, -1)[:, :k]


def rtn_quantize(weight: np.ndarray, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest group quantization of ``weight`` (N, K) along K (formulas: module docstring)."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {weight.shape}")
    groups = grouped(weight, group_size)  # (N, n_groups, group)
    scales, zero_points = scales_zero_points(groups.min(axis=2), groups.max(axis=2), bits, symmetric)
    q = quantize_with_params(weight, scales, zero_points, bits, group_size)
    return QuantizedWeight(q, scales, zero_points, bits, group_size)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """``W_hat = (q - zero_point) * scale`` as (N, K) float32, the same fp32 arithmetic as MLAS."""
    n, k = qw.shape
    codes = grouped(np.asarray(qw.q, dtype=np.float32), qw.group_size)  # (N, n_groups, group)
    zp = qw.zero_point_array().astype(np.float32)[:, :, None]
    return ((codes - zp) * qw.scales[:, :, None]).reshape(n, -1)[:, :k]


# Shrink factors of a group's [lo, hi] range tried by :func:`search_scales` (1.0 is plain RTN, so the
# search never does worse than RTN on the weighted error it minimizes).
SCALE_SEARCH_GRID = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0 .. 0.7


def weighted_error(weight: np.ndarray, qw: QuantizedWeight, importance: np.ndarray | None = None) -> np.ndarray:
    """Per-group importance-weighted squared error ``sum_k imp[k] (W - W_hat)^2`` as (N, n_groups)."""
    diff = grouped(np.asarray(weight, np.float32) - dequantize(qw), qw.group_size)  # (N, n_groups, group)
    imp = np.ones(weight.shape[1], np.float32) if importance is None else np.asarray(importance, np.float32)
    return np.einsum("ngs,gs->ng", diff * diff, grouped(imp[None, :], qw.group_size)[0])


# search_scales works on slices of at most this many weights: its temporaries are ~6 float32 copies of
# the slice, 700 MB for SmolLM2's 49152 x 576 head in one piece
SEARCH_CHUNK_ELEMENTS = 1 << 22


def search_scales(
    weight: np.ndarray,
    importance: np.ndarray | None = None,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    grid: tuple[float, ...] = SCALE_SEARCH_GRID,
) -> QuantizedWeight:
    """Round-to-nearest with each group's scale (and zero point) searched to minimize the
    importance-weighted squared error ``sum_k imp[k] (W[n, k] - W_hat[n, k])^2``.

    ``weight`` is (N, K); ``importance`` (K,) is the mean square of the activation each input channel
    sees (``E[x_k^2]``: with it the weighted error is the expected squared error of the linear's output
    when the input channels are uncorrelated), all ones when None. The same idea as llama.cpp's
    ``make_qx_quants`` / ``make_qkx2_quants`` (weighted search over scales) and AWQ's clipping grid:

    1. for each shrink factor ``t`` in ``grid``, the RTN range ``[t lo, t hi]`` (the symmetric scale
       times ``t``), then codes by round-to-nearest; per group the ``t`` with the least error is kept;
    2. one weighted least-squares refit of the scale for the kept codes and zero point,
       ``s = sum imp w (q - z) / sum imp (q - z)^2``, codes re-rounded with it, kept where it helps.

    Zero points stay integers (what MatMulNBits reads as uint8). Grid 1.0 is plain RTN, so per group
    the result is never worse than :func:`rtn_quantize` on this error.
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {weight.shape}")
    n, k = weight.shape
    imp = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32).reshape(-1)
    if imp.shape != (k,):
        raise ValueError(f"importance has {imp.shape[0]} channels, weight has K={k}")
    rows = max(1, SEARCH_CHUNK_ELEMENTS // k)
    if n > rows:  # rows are independent: a large matrix (a vocabulary-sized head) in slices, same result
        parts = [search_scales(weight[i : i + rows], imp, bits, group_size, symmetric, grid) for i in range(0, n, rows)]
        zero_points = None if symmetric else np.concatenate([p.zero_points for p in parts])
        return QuantizedWeight(
            np.concatenate([p.q for p in parts]),
            np.concatenate([p.scales for p in parts]),
            zero_points,
            bits,
            group_size,
        )
    groups = grouped(weight, group_size)  # (N, n_groups, group)
    imp_groups = grouped(imp[None, :], group_size)[0]  # (n_groups, group), padding weighs 0
    w_min, w_max = groups.min(axis=2), groups.max(axis=2)
    max_code = np.float32((1 << bits) - 1)

    def error_of(scales, zero_points):
        # the search's own rounding (np.rint: halves to even) only ranks candidates; the returned codes
        # come from quantize_with_params with its MLAS rounding
        zp = np.float32(1 << (bits - 1)) if zero_points is None else zero_points.astype(np.float32)[:, :, None]
        with np.errstate(divide="ignore"):
            inv = np.where(scales != 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)[:, :, None]
        codes = groups * inv
        codes += zp
        np.rint(codes, out=codes)
        np.clip(codes, 0, max_code, out=codes)
        codes -= zp  # (N, n_groups, group): centred codes
        diff = codes * scales[:, :, None]
        np.subtract(groups, diff, out=diff)
        diff *= diff
        return np.einsum("ngs,gs->ng", diff, imp_groups), codes

    best_s, best_z, best_e, best_c = None, None, None, None
    for t in grid:
        s, z = scales_zero_points(w_min * np.float32(t), w_max * np.float32(t), bits, symmetric)
        e, centred = error_of(s, z)
        if best_e is None:
            best_s, best_z, best_e, best_c = s, z, e, centred
            continue
        better = e < best_e
        best_s = np.where(better, s, best_s)
        best_z = None if symmetric else np.where(better, z, best_z)
        best_e = np.where(better, e, best_e)
        np.copyto(best_c, centred, where=better[:, :, None])
    # weighted least-squares refit of the scale for the kept codes (zero point fixed)
    num = np.einsum("ngs,ngs,gs->ng", groups, best_c, imp_groups)
    den = np.einsum("ngs,ngs,gs->ng", best_c, best_c, imp_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        refit = np.where(den > 0, num / den, best_s).astype(np.float32)
    e, _ = error_of(refit, best_z)
    scales = np.where(e < best_e, refit, best_s).astype(np.float32)
    zero_points = None if symmetric else best_z.astype(np.uint8)
    q = quantize_with_params(weight, scales, zero_points, bits, group_size)
    return QuantizedWeight(q, scales, zero_points, bits, group_size)
