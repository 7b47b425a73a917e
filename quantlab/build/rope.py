"""Rotary position embedding frequencies, computed once at build time."""

from __future__ import annotations

import math

import numpy as np

from quantlab.io.spec import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies ``theta^(-2i/head_dim)`` for i in [0, head_dim/2), shape (head_dim // 2,).

    With Llama 3 scaling (``rope_type: llama3``) low frequencies are divided by ``factor``, high
    frequencies are kept, and the band between is interpolated smoothly; the same rule as Meta's
    reference code and transformers' ``_compute_llama3_parameters``.
    """
    # float64 then rounded once, so the table does not depend on accumulation order
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is not None:
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)
