"""AWQ: activation-aware weight quantization, as analyses that return values and pure apply helpers.

Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", arXiv:2306.00978.

A few input channels carry large activations; their weights matter most. AWQ scales weight column
``k`` up by ``s_k`` before quantizing (``W' = W diag(s)``) and divides the activation by ``s_k``, which
is folded into the op that produces it (an RMSNorm weight, or the rows of the previous linear), so
the float model is unchanged and the salient columns lose less to rounding. ``s = mean|x|^alpha``,
normalized, with ``alpha`` picked on a grid to minimize the quantized output's error
(:func:`search_awq_scales`). A second search shrinks each group's clipping range
(:func:`search_awq_clip`). The integer grid is RTN's (:mod:`quantlab.quant.rtn`).

Search (returns numbers) and apply (pure array maths) are separate, as in llm-awq; the graph pass
takes the searched scales and clips as values and calls the apply helpers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from quantlab.quant.linalg import linear
from quantlab.quant.rtn import dequantize, grouped, rtn_quantize
from quantlab.quant.scheme import PER_CHANNEL, QuantScheme

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AwqMapping:
    """One group of linears sharing an input, and the op whose output that input is.

    previous_kind "norm": divide the norm's weight (and bias, if any) by s. "linear": divide the
    previous linear's output rows (and bias) by s; only possible when its output width equals the
    group's input width (not for v_proj -> o_proj under grouped-query attention, where it is skipped).
    """

    previous: str
    previous_kind: str
    linears: tuple[str, ...]


# Decoder-layer roles (Llama-family names); a model family maps its tensors onto these roles.
AWQ_MAPPINGS: tuple[AwqMapping, ...] = (
    AwqMapping("input_layernorm", "norm", ("q_proj", "k_proj", "v_proj")),
    AwqMapping("v_proj", "linear", ("o_proj",)),
    AwqMapping("post_attention_layernorm", "norm", ("gate_proj", "up_proj")),
    AwqMapping("up_proj", "linear", ("down_proj",)),
)

# llm-awq skips the clip search for q and k: their outputs meet in q @ k^T, where a per-layer
# output MSE says little about the attention scores.
AWQ_CLIP_SKIP: tuple[str, ...] = ("q_proj", "k_proj")


def _quantize_dequantize(weight: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    return dequantize(rtn_quantize(weight, scheme.bits, scheme.group_size, scheme.symmetric))


def _check_activations(x: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    x = x.reshape(-1, x.shape[-1])  # (tokens, K)
    if x.shape[1] != k:
        raise ValueError(f"activations have {x.shape[1]} channels, weights have K={k}")
    return x


def search_awq_scales(x: np.ndarray, weights: list[np.ndarray], scheme: QuantScheme, grid: int = 20) -> np.ndarray:
    """Per-input-channel scales s (K,) float32 for the linears ``weights`` [(N_i, K)] sharing input ``x``.

    For alpha in 0, 1/grid, ..., (grid-1)/grid: ``s = mean|x|^alpha`` (floored at 1e-4), divided by
    ``sqrt(max(s) min(s))`` to center it around 1; each weight is quantized as ``Q(W diag(s)) / s``
    and the alpha with the lowest output MSE over all the linears wins. alpha = 0 is plain RTN, so
    the result never does worse than RTN on ``x``.
    """
    stacked = np.concatenate([np.asarray(w, dtype=np.float32) for w in weights], axis=0)  # (sum N_i, K)
    x = _check_activations(x, stacked.shape[1])
    reference = linear(x, stacked)  # (tokens, sum N_i)
    x_mean = np.mean(np.abs(x), axis=0)  # (K,)
    best_error, best_scales, best_alpha = np.inf, np.ones_like(x_mean), 0.0
    for step in range(grid):
        alpha = step / grid
        scales = np.maximum(x_mean**alpha, np.float32(1e-4)).astype(np.float32)
        scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
        w_hat = _quantize_dequantize(stacked * scales, scheme) / scales
        error = float(np.mean((linear(x, w_hat) - reference) ** 2))
        if error < best_error:
            best_error, best_scales, best_alpha = error, scales, alpha
    logger.debug("awq scale search: alpha=%.2f mse=%.3g", best_alpha, best_error)
    return best_scales


def search_shared_awq_scales(
    x: np.ndarray,
    groups: list[tuple[np.ndarray, list[np.ndarray]]],
    scheme: QuantScheme,
    grid: int = 20,
) -> np.ndarray:
    """One s (K,) for linears that read different tokens of one input (a sparse MLP's experts, each on the
    tokens routed to it), which must share s because it is folded into the op producing that input.

    ``x`` (tokens, K): the input at every token, whose ``mean|x|`` makes s as in
    :func:`search_awq_scales`; ``groups``: (x_g, [W (N_i, K)]) per expert, its tokens and its linears.
    The error of an alpha is the summed squared output error of every group on its own tokens, so each
    expert weighs by the tokens it receives; alpha = 0 (plain RTN) is on the grid.
    """
    x_mean = np.mean(np.abs(_check_activations(x, groups[0][1][0].shape[1])), axis=0)  # (K,)
    prepared = []
    for x_g, weights in groups:
        stacked = np.concatenate([np.asarray(w, dtype=np.float32) for w in weights], axis=0)  # (sum N_i, K)
        x_g = _check_activations(x_g, stacked.shape[1])
        prepared.append((x_g, stacked, linear(x_g, stacked)))
    best_error, best_scales, best_alpha = np.inf, np.ones_like(x_mean), 0.0
    for step in range(grid):
        alpha = step / grid
        scales = np.maximum(x_mean**alpha, np.float32(1e-4)).astype(np.float32)
        scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
        error = 0.0
        for x_g, stacked, reference in prepared:
            w_hat = _quantize_dequantize(stacked * scales, scheme) / scales
            error += float(np.sum((linear(x_g, w_hat) - reference) ** 2))
        if error < best_error:
            best_error, best_scales, best_alpha = error, scales, alpha
    logger.debug("shared awq scale search over %d groups: alpha=%.2f sse=%.3g", len(groups), best_alpha, best_error)
    return best_scales


def search_awq_clip(
    x: np.ndarray,
    weight: np.ndarray,
    scheme: QuantScheme,
    grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
    rows_per_chunk: int = 256,
) -> np.ndarray:
    """Per-group clipping magnitude max_val (N, n_groups) float32 for ``weight`` (N, K) fed by ``x``.

    Each group's range is shrunk to ``max|w| * (1 - i/grid)`` for i < max_shrink * grid; the value
    with the lowest MSE of the group's partial output ``x_g . w_g`` over (at most ``max_tokens``
    evenly spaced) tokens wins. i = 0 is no clipping. Apply with :func:`apply_awq_clip`.
    """
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    x = _check_activations(x, k)
    x = x[:: max(1, x.shape[0] // max_tokens)][:max_tokens]
    x_groups = grouped(x, scheme.group_size)  # (tokens, n_groups, group)
    result = []
    for start in range(0, n, rows_per_chunk):  # bounds memory at (rows, tokens, n_groups)
        rows = weight[start : start + rows_per_chunk]
        w_groups = grouped(rows, scheme.group_size)  # (rows, n_groups, group)
        reference = np.einsum("tgs,ngs->ntg", x_groups, w_groups)  # (rows, tokens, n_groups)
        original_max = np.abs(w_groups).max(axis=2)  # (rows, n_groups)
        best_max = original_max.copy()
        best_error = np.full(original_max.shape, np.inf, dtype=np.float32)
        for step in range(int(max_shrink * grid)):
            max_val = (original_max * np.float32(1 - step / grid)).astype(np.float32)
            w_hat = _quantize_dequantize(apply_awq_clip(rows, max_val, scheme.group_size), scheme)
            output = np.einsum("tgs,ngs->ntg", x_groups, grouped(w_hat, scheme.group_size))
            error = np.mean((output - reference) ** 2, axis=1)  # (rows, n_groups)
            better = error < best_error
            best_error[better], best_max[better] = error[better], max_val[better]
        result.append(best_max)
    return np.concatenate(result, axis=0).astype(np.float32)


def apply_awq_clip(weight: np.ndarray, max_val: np.ndarray, group_size: int) -> np.ndarray:
    """``weight`` (N, K) with each group clamped to [-max_val, max_val] (max_val: (N, n_groups))."""
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    size = k if group_size == PER_CHANNEL else group_size
    bound = np.repeat(np.asarray(max_val, dtype=np.float32), size, axis=1)[:, :k]  # (N, K)
    return np.clip(weight, -bound, bound)


def scale_input_channels(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``W diag(s)``: column k of ``weight`` (N, K) times s[k]; the input must then be divided by s."""
    return (np.asarray(weight, dtype=np.float32) * np.asarray(scales, dtype=np.float32)[None, :]).astype(np.float32)


def fold_into_norm(
    norm_weight: np.ndarray, scales: np.ndarray, norm_bias: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Divide a norm's per-channel weight (K,) (and LayerNorm bias) by s, so its output becomes x / s."""
    scales = np.asarray(scales, dtype=np.float32)
    weight = (np.asarray(norm_weight, dtype=np.float32) / scales).astype(np.float32)
    bias = None if norm_bias is None else (np.asarray(norm_bias, dtype=np.float32) / scales).astype(np.float32)
    return weight, bias


def fold_into_previous_linear(
    weight: np.ndarray, scales: np.ndarray, bias: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Divide output row k of the previous linear (K, K_prev) (and its bias) by s[k]: its output becomes y / s."""
    weight = np.asarray(weight, dtype=np.float32)
    scales = np.asarray(scales, dtype=np.float32)
    if weight.shape[0] != scales.shape[0]:
        raise ValueError(f"previous linear has {weight.shape[0]} outputs, scales have {scales.shape[0]}")
    folded = (weight / scales[:, None]).astype(np.float32)
    return folded, None if bias is None else (np.asarray(bias, dtype=np.float32) / scales).astype(np.float32)
