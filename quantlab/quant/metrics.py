"""Numerical quality metrics, pure numpy: SQNR of a tensor, KL divergence and top-1 agreement of logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - approx)^2)`` in dB.

    Computed in float64. ``inf`` when the two are identical; ``-inf`` when the reference is all zero
    and the approximation is not.
    """
    ref = np.asarray(reference, dtype=np.float64)
    approx = np.asarray(approximation, dtype=np.float64)
    if ref.shape != approx.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {approx.shape}")
    signal = float(np.sum(ref * ref))
    noise = float(np.sum((ref - approx) ** 2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax in float64: subtract the max before exponentiating."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def kl_divergence_per_token(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> np.ndarray:
    """``KL(P_ref || P_cand)`` in nats for each position; logits are (..., vocab), result is (...,)."""
    ref = np.asarray(reference_logits)
    cand = np.asarray(candidate_logits)
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {cand.shape}")
    log_p = log_softmax(ref)
    log_q = log_softmax(cand)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return np.maximum(kl, 0.0)  # rounding can leave -1e-17 where P == Q


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Fraction of positions whose argmax token is the same in both logit tensors."""
    ref = np.asarray(reference_logits)
    cand = np.asarray(candidate_logits)
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {cand.shape}")
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))


@dataclass(frozen=True)
class LogitComparison:
    """Summary of ``KL(P_ref || P_cand)`` over token positions (nats) and top-1 agreement."""

    kl_mean: float
    kl_median: float
    kl_p999: float
    kl_max: float
    top1_agreement: float
    n_tokens: int


def compare_logits(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> LogitComparison:
    """KL mean / median / 99.9th percentile / max per token and top-1 agreement of two (..., vocab) logits."""
    kl = kl_divergence_per_token(reference_logits, candidate_logits).reshape(-1)
    if kl.size == 0:
        raise ValueError("no token positions to compare")
    return LogitComparison(
        kl_mean=float(np.mean(kl)),
        kl_median=float(np.median(kl)),
        kl_p999=float(np.percentile(kl, 99.9)),
        kl_max=float(np.max(kl)),
        top1_agreement=top1_agreement(reference_logits, candidate_logits),
        n_tokens=int(kl.size),
    )
