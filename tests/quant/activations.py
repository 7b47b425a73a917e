"""Synthetic calibration data for the quantization-maths tests: Gaussian activations with a few
large-magnitude channels (the outlier structure of LLM activations that GPTQ, AWQ and SmoothQuant
exploit), optionally correlated across channels."""

from __future__ import annotations

import numpy as np


def outlier_activations(
    seed: int, k: int, tokens: tuple[int, ...], n_outliers: int, outlier_scale: float, correlated: bool = False
) -> list[np.ndarray]:
    """One (tokens_i, K) float32 batch per entry of ``tokens``, all from the same distribution.

    ``n_outliers`` channels are ``outlier_scale`` times larger than the rest. With ``correlated`` the
    channels are mixed by a fixed random matrix (0.3 I + M / sqrt(K)) first, so the Hessian X^T X
    is far from diagonal.
    """
    rng = np.random.default_rng(seed)
    channel_scale = np.ones(k, np.float32)
    channel_scale[rng.choice(k, n_outliers, replace=False)] = outlier_scale
    mix = np.float32(0.3) * np.eye(k, dtype=np.float32) + rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
    batches = []
    for count in tokens:
        x = rng.standard_normal((count, k)).astype(np.float32)
        if correlated:
            x = x @ mix
        batches.append((x * channel_scale).astype(np.float32))  # (tokens, K)
    return batches
