"""SmoothQuant scales and the W8A8 reference maths (int8 weights per channel, int8 activations per token).

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", arXiv:2211.10438.

Activation outliers sit in a few fixed channels, which makes per-token int8 activations lossy.
SmoothQuant migrates part of that range into the weights with ``X W^T = (X diag(s)^-1)(W diag(s))^T``,
``s_k = max|X_k|^alpha / max|W_:k|^(1-alpha)`` (the paper's equation 4, alpha = 0.5 by default). The
division of X by s folds into the preceding norm exactly as AWQ's does
(:func:`quantlab.quant.awq.fold_into_norm`), and W's columns are scaled with
:func:`quantlab.quant.awq.scale_input_channels`.

Integer convention (the paper's W8A8 setting): symmetric int8 in [-127, 127] (zero point 0; -128
unused, so the range is symmetric), weights one fp32 scale per output channel, activations one fp32
scale per token computed at run time. Rounding is half to even (``np.rint``), like ONNX QuantizeLinear.

Weight codes also keep ``|q[n, 2j]| + |q[n, 2j + 1]| <= 128`` (:data:`PAIR_LIMIT`) for every pair of input
channels. onnxruntime runs DynamicQuantizeMatMul as uint8 activations x int8 weights, and on x86 CPUs
without VNNI (AVX2 only, or AVX-512 without VNNI: Zen 1-3, Haswell to Skylake) MLAS multiplies with
``vpmaddubsw``, which adds the two products of channels 2j and 2j + 1 into a *saturating* int16: with
activations up to 255 a pair of full-range weights overflows it (255 x 254 > 32767) and the result is
silently wrong (on the tests' tiny model, SmoothQuant's KL to fp32 went from 0.007 to 0.125 on an AVX2
Zen). So a row's scale is ``max(max|w| / 127, max_j (|w_2j| + |w_2j+1|) / 128)``: 255 x 128 = 32640 fits,
and the artifact computes the same integers on every CPU. onnxruntime's own quantizer offers
``reduce_range`` (7-bit weights, ``max|w| / 63``) for the same reason; the pair bound is never coarser
(a pair's sum is at most twice the row's max) and on real rows finer, since a row's largest values
rarely sit side by side. (Moving only the pairs past the bound onto it, at a full-range scale, is worse:
on Gaussian rows a tenth of the pairs pass it, by up to a tenth of their value.) VNNI, AMX and ARM
CPUs sum in 32 bits, where the bound only costs the coarser step.
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127
PAIR_LIMIT = 128  # max |q[2j]| + |q[2j + 1]| of a weight row: 255 * 128 fits an int16 (see the module doc)
SCALE_FLOOR = 1e-5


def smooth_scales(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """Smoothing factors s (K,) float32 from per-channel max|X| (K,) and the linears [(N_i, K)] reading X.

    ``s = act_absmax^alpha / w_absmax^(1 - alpha)`` with w_absmax the max |W| per input channel over
    all the linears, floored at 1e-5; a channel whose activations or weights are all zero gets s = 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    act = np.asarray(act_absmax, dtype=np.float64)
    w_absmax = np.max(np.stack([np.abs(np.asarray(w, dtype=np.float64)).max(axis=0) for w in weights]), axis=0)
    if act.shape != w_absmax.shape:
        raise ValueError(f"act_absmax has shape {act.shape}, weights have K={w_absmax.shape[0]}")
    live = (act > 0) & (w_absmax > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(live, act**alpha / w_absmax ** (1.0 - alpha), 1.0)
    return np.maximum(scales, SCALE_FLOOR).astype(np.float32)


def _quantize_rows_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: scale = max|row| / 127 (1 for an all-zero row), q = rint(v / scale)."""
    values = np.asarray(values, dtype=np.float32)
    absmax = np.abs(values).max(axis=-1)
    scales = np.where(absmax > 0, absmax / np.float32(INT8_MAX), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(values / scales[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scales


def quantize_weight_per_channel_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight (N, K) -> int8 codes (N, K) and fp32 scales (N,), one per output channel, each pair of input
    channels' codes within :data:`PAIR_LIMIT` (see the module doc)."""
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    magnitude = np.abs(weight)
    pairs = magnitude[:, : k - k % 2].reshape(n, -1, 2).sum(axis=-1)  # (N, K // 2)
    pair_max = pairs.max(axis=-1) if pairs.size else np.zeros(n, np.float32)
    bound = np.maximum(magnitude.max(axis=-1) / np.float32(INT8_MAX), pair_max / np.float32(PAIR_LIMIT))
    scales = np.where(bound > 0, bound, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(weight / scales[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    # rounding can lift a pair on the bound to 129 (float error in w / scale): take one step off its smaller code
    pair_codes = np.abs(q[:, : k - k % 2].reshape(n, -1, 2).astype(np.int16))
    over = np.argwhere(pair_codes.sum(axis=-1) > PAIR_LIMIT)
    for row, j in over:
        c = 2 * j + int(pair_codes[row, j, 1] < pair_codes[row, j, 0])
        q[row, c] -= np.sign(q[row, c])
    return q, scales


def quantize_activation_per_token_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic quantization of activations (..., K) -> int8 codes (..., K) and fp32 scales (...,), one per token."""
    return _quantize_rows_int8(x)


def w8a8_linear_reference(x: np.ndarray, weight_q: np.ndarray, weight_scales: np.ndarray) -> np.ndarray:
    """Reference W8A8 ``x @ W^T``: int8 x int8 products summed in int32, then scaled per token and channel.

    x: (..., K) float activations (quantized per token here); weight_q: (N, K) int8; weight_scales: (N,).
    Returns (..., N) float32.
    """
    x_q, x_scales = quantize_activation_per_token_int8(x)
    accumulator = x_q.astype(np.int32) @ np.asarray(weight_q).astype(np.int32).T  # (..., N) int32, exact
    return (accumulator.astype(np.float32) * x_scales[..., None] * weight_scales).astype(np.float32)
